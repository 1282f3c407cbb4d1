"""Turn an ExecutionResult into what smolagents' CodeAgent expects."""

from __future__ import annotations

import io
from typing import Any

from smolagents.local_python_executor import CodeOutput
from smolagents.remote_executors import RemotePythonExecutor

from ..results import ExecutionResult
from .values import decode_value

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
    """The error of a failed step: the headline, then the error's name, value and traceback.

    The output printed before the error is not repeated here: ``CodeAgent``
    shows it to the model from the executor's ``state["_print_outputs"]``, as
    for smolagents' local executor.
    """
    error = result.error
    parts = [headline]
    if error is not None:
        parts += [error.ename, error.evalue, "\n".join(error.traceback)]
    return "\n".join(part for part in parts if part)


def code_output(result: ExecutionResult, *, logs: str, allow_pickle: bool) -> CodeOutput:
    """The ``CodeOutput`` of a successful (or final-answer) step.

    The output is the final answer when there is one; else the last value: the
    object itself when it came serialized (see :mod:`.values`), else its image
    as a ``PIL.Image`` (PNG over JPEG), else its ``text/plain``; else the last
    displayed image; else None. ``logs`` are the step's logs as the caller
    capped them (``result.logs``: stdout and stderr interleaved).
    """
    if is_final_answer(result):
        assert result.error is not None
        value = RemotePythonExecutor._deserialize_final_answer(result.error.evalue, allow_pickle)
        return CodeOutput(output=value, logs=logs, is_final_answer=True)
    output: Any = None
    if result.value is not None:
        decoded, value = decode_value(result.value, allow_pickle=allow_pickle)
        if decoded:
            output = value
        elif (best := result.value.best_image) is not None:
            output = _as_image(best[1])
        else:
            output = result.value.text
    elif (best := result.best_image) is not None:
        output = _as_image(best[1])
    return CodeOutput(output=output, logs=logs, is_final_answer=False)
