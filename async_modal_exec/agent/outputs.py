"""Turn an ExecutionResult into what smolagents' CodeAgent expects."""

from __future__ import annotations

import io
from typing import Any

from smolagents.local_python_executor import CodeOutput
from smolagents.remote_executors import RemotePythonExecutor

from ..results import ExecutionResult

__all__ = ["FINAL_ANSWER_EXCEPTION", "code_output", "error_message"]

FINAL_ANSWER_EXCEPTION = RemotePythonExecutor.FINAL_ANSWER_EXCEPTION


def _as_image(data: bytes) -> Any:
    import PIL.Image

    image = PIL.Image.open(io.BytesIO(data))
    image.load()
    return image


def is_final_answer(result: ExecutionResult) -> bool:
    """True when the code called ``final_answer`` (which raises a marker exception)."""
    return result.error is not None and result.error.ename == FINAL_ANSWER_EXCEPTION


def error_message(result: ExecutionResult, headline: str = "Executing code yielded an error:") -> str:
    """What the agent sees for a failed step: the output printed before, then the error."""
    error = result.error
    parts = [result.stdout.rstrip("\n"), headline]
    if error is not None:
        parts += [error.ename, error.evalue, "\n".join(error.traceback)]
    return "\n".join(part for part in parts if part)


def code_output(result: ExecutionResult, *, allow_pickle: bool) -> CodeOutput:
    """The ``CodeOutput`` of a successful (or final-answer) step.

    The output is the final answer when there is one; else the last value (its
    image as a ``PIL.Image`` if it has one, otherwise its ``text/plain``); else
    the last displayed image; else None.
    """
    if is_final_answer(result):
        assert result.error is not None
        value = RemotePythonExecutor._deserialize_final_answer(result.error.evalue, allow_pickle)
        return CodeOutput(output=value, logs=result.stdout, is_final_answer=True)
    output: Any = None
    if result.value is not None:
        images = result.value.images
        output = _as_image(images[-1][1]) if images else result.value.text
    elif result.images:
        output = _as_image(result.images[-1][1])
    return CodeOutput(output=output, logs=result.stdout, is_final_answer=False)
