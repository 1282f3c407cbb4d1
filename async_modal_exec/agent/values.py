"""The last expression's value as a Python object, as smolagents' local executor returns it.

A kernel sends the value of a cell's last expression as a mime bundle whose
``text/plain`` is its repr (``'1'`` for ``1``). The facade installs a hook in
the kernel's display hook (only there: ``display()`` calls are untouched) that
adds one more mime type to that bundle: the value serialized in smolagents'
JSON-safe format (``safe:...``) when it is made only of types that survive it
exactly, or pickled (``pickle:...``) when the executor allows pickle. The
facade decodes it as smolagents decodes final answers; anything else stays
the repr. Images keep their own path (the best image of the bundle).
"""

from __future__ import annotations

from typing import Any

from smolagents.remote_executors import RemotePythonExecutor

from ..kernel_side import run_code
from ..results import RichOutput

__all__ = ["VALUE_MIME", "decode_value", "value_hook_code"]

VALUE_MIME = "application/x.async-modal-exec.value"


def value_hook_code(allow_pickle: bool) -> str:
    """Code that installs the value hook in the kernel (idempotent; updates ``allow_pickle``).

    The hook is :mod:`async_modal_exec.kernel_side.values`, run in a namespace of its own.
    """
    return run_code("values", f"install(shell, {allow_pickle!r}, {VALUE_MIME!r})", shell="get_ipython()")


def decode_value(output: RichOutput, *, allow_pickle: bool) -> tuple[bool, Any]:
    """``(True, object)`` when the bundle carries the value itself, else ``(False, None)``."""
    payload = output.data.get(VALUE_MIME)
    if not isinstance(payload, str):
        return False, None
    try:
        # As for final answers: "safe:" through SafeSerializer, "pickle:" only if allowed.
        return True, RemotePythonExecutor._deserialize_final_answer(payload, allow_pickle)
    except Exception:  # pickle not allowed, a class the host cannot import, a bad payload: the repr stays
        return False, None
