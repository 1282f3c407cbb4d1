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

from ..results import RichOutput

__all__ = ["VALUE_MIME", "decode_value", "value_hook_code"]

VALUE_MIME = "application/x.async-modal-exec.value"

# Runs in the kernel (its own namespace). Exact types only: a subclass (an
# IntEnum, a namedtuple, a defaultdict) would come back as its base type, so it
# stays a repr; so does a dict that has a "__type__" key (the format's own tag).
_HOOK = r"""
def _install(allow_pickle, mime):
    import base64, json, pickle, sys

    hook = get_ipython().displayhook
    if getattr(hook, "_async_modal_exec_value_hook", False):
        hook._async_modal_exec_allow_pickle = allow_pickle
        return
    plain = (type(None), bool, int, float, str)

    def encode(obj, depth):
        if depth > 50:
            raise ValueError("too deep")
        kind = type(obj)
        if kind in plain:
            return obj
        if kind is list:
            return [encode(item, depth + 1) for item in obj]
        if kind in (tuple, set, frozenset):
            return {"__type__": kind.__name__, "data": [encode(item, depth + 1) for item in obj]}
        if kind is dict:
            if "__type__" in obj:
                raise ValueError("a key the format uses")
            if all(type(key) is str for key in obj):
                return {key: encode(value, depth + 1) for key, value in obj.items()}
            pairs = [[encode(key, depth + 1), encode(value, depth + 1)] for key, value in obj.items()]
            return {"__type__": "dict_with_complex_keys", "data": pairs}
        if kind is complex:
            return {"__type__": "complex", "real": obj.real, "imag": obj.imag}
        if kind is bytes:
            return {"__type__": "bytes", "data": base64.b64encode(obj).decode()}
        raise ValueError(kind.__name__)

    def serialize(obj):
        image = sys.modules.get("PIL.Image")
        if image is not None and isinstance(obj, image.Image):
            return None  # sent as an image already
        try:
            return "safe:" + json.dumps(encode(obj, 0), allow_nan=True)
        except (ValueError, TypeError, RecursionError):
            pass
        if hook._async_modal_exec_allow_pickle:
            try:
                return "pickle:" + base64.b64encode(pickle.dumps(obj)).decode()
            except Exception:
                return None
        return None

    compute = hook.compute_format_data

    def compute_with_value(result):
        data, metadata = compute(result)
        payload = serialize(result)
        if payload is not None:
            data = {**data, mime: payload}
        return data, metadata

    hook.compute_format_data = compute_with_value
    hook._async_modal_exec_allow_pickle = allow_pickle
    hook._async_modal_exec_value_hook = True
"""


def value_hook_code(allow_pickle: bool) -> str:
    """Code that installs the value hook in the kernel (idempotent; updates ``allow_pickle``)."""
    call = f"\n_install({allow_pickle!r}, {VALUE_MIME!r})"
    return f"exec({_HOOK + call!r}, {{'get_ipython': get_ipython}})"


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
