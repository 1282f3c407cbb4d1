"""Turn an ExecutionResult into what smolagents' CodeAgent expects."""

from __future__ import annotations

import ast
import io
import re
from typing import Any

from smolagents.local_python_executor import CodeOutput
from smolagents.remote_executors import RemotePythonExecutor

from ..results import ExecutionResult, ExecutionTimeout
from .values import decode_value

__all__ = ["FINAL_ANSWER_EXCEPTION", "code_output", "error_message", "step_error_message", "timeout_message"]

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


# IPython names a cell's frames "Cell In[3], line 2" (ANSI colours already stripped).
_CELL_FRAME = re.compile(r"^\s*Cell In\s*\[\s*\d*\s*\],\s*line (\d+)", re.MULTILINE)


def failing_statement(code: str, traceback: tuple[str, ...]) -> str | None:
    """The top-level statement of ``code`` that raised, as smolagents' local executor quotes it.

    The outermost frame of the cell in the kernel's traceback gives the line;
    the statement is the one of ``code`` spanning it (several lines for a
    loop or a call over several lines). None when no frame of the cell is in
    the traceback (an error before the code ran).
    """
    found = _CELL_FRAME.search("\n".join(traceback))
    if found is None:
        return None
    line = int(found.group(1))
    try:
        tree = ast.parse(code)
    except SyntaxError:  # IPython syntax (magics, `!cmd`): quote the line itself
        lines = code.splitlines()
        return lines[line - 1].strip() if 0 < line <= len(lines) else None
    for node in tree.body:
        end = node.end_lineno or node.lineno
        if node.lineno <= line <= end:
            return ast.get_source_segment(code, node)
    return None


def step_error_message(result: ExecutionResult, code: str) -> str:
    """The error of a step whose code raised, in smolagents' local executor's words.

    ``Code execution failed at line '<statement>' due to: <name>: <value>``,
    then the kernel's traceback (what smolagents' interpreter cannot give);
    code that does not parse: ``Code parsing failed on line N due to: ...``.
    Falls back to :func:`error_message` when the failing line is unknown.
    """
    error = result.error
    if error is None:
        return error_message(result)
    if error.ename in ("SyntaxError", "IndentationError", "TabError"):
        try:
            ast.parse(code)
        except SyntaxError as exc:  # as smolagents' local executor words it, detail after
            return "\n".join(
                [
                    f"Code parsing failed on line {exc.lineno} due to: {type(exc).__name__}: {exc}",
                    f"{exc.text}{' ' * (exc.offset or 0)}^",
                    *error.traceback,
                ]
            )
    statement = failing_statement(code, error.traceback)
    if statement is None:
        return error_message(result)
    head = f"Code execution failed at line '{statement}' due to: {error.ename}: {error.evalue}"
    return "\n".join(part for part in [head, "\n".join(error.traceback)] if part)


def timeout_message(exc: ExecutionTimeout) -> str:
    """The headline of a step that timed out, in smolagents' words where they apply.

    ``Code execution exceeded the maximum execution time of N seconds``, then
    what happened to the kernel; a bounded setup step that ran out keeps our
    own wording (smolagents has none for it).
    """
    if exc.timeout is None:
        return f"Executing code failed: {exc}"
    return (
        f"Code execution exceeded the maximum execution time of {exc.timeout:g} seconds; "
        f"{exc.recovery.describe()}"
    )


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
