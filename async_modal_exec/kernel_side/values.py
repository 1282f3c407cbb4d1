"""Kernel side of last values: a display-hook wrapper that adds the value itself to its bundle.

Run once per kernel (in a namespace of its own) by
:mod:`async_modal_exec.agent.values`, which calls :func:`install`. Exact
types only: a subclass (an IntEnum, a namedtuple, a defaultdict) would come
back as its base type, so it stays a repr; so does a dict that has a
``"__type__"`` key (the format's own tag).
"""

from __future__ import annotations

import base64
import json
import pickle
import sys
from typing import Any

__all__ = ["encode", "install", "serialize"]

_PLAIN = (type(None), bool, int, float, str)


def encode(obj: Any, depth: int = 0) -> Any:
    """``obj`` in smolagents' JSON-safe form; ``ValueError`` where that would not be exact."""
    if depth > 50:
        raise ValueError("too deep")
    kind = type(obj)
    if kind in _PLAIN:
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


def serialize(obj: Any, allow_pickle: bool) -> str | None:
    """``"safe:..."``, else ``"pickle:..."`` (if allowed), else None (also for a PIL image: it is
    sent as an image already)."""
    image = sys.modules.get("PIL.Image")
    if image is not None and isinstance(obj, image.Image):
        return None
    try:
        return "safe:" + json.dumps(encode(obj), allow_nan=True)
    except (ValueError, TypeError, RecursionError):
        pass
    if allow_pickle:
        try:
            return "pickle:" + base64.b64encode(pickle.dumps(obj)).decode()
        except Exception:
            return None
    return None


def install(shell: Any, allow_pickle: bool, mime: str) -> None:
    """Wrap ``shell.displayhook.compute_format_data`` to add the value as ``mime``.

    Idempotent: on a hook already wrapped, only ``allow_pickle`` is updated.
    """
    hook = shell.displayhook
    if getattr(hook, "_async_modal_exec_value_hook", False):
        hook._async_modal_exec_allow_pickle = allow_pickle
        return
    compute = hook.compute_format_data

    def compute_with_value(result: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        data, metadata = compute(result)
        payload = serialize(result, hook._async_modal_exec_allow_pickle)
        if payload is not None:
            data = {**data, mime: payload}
        return data, metadata

    hook.compute_format_data = compute_with_value
    hook._async_modal_exec_allow_pickle = allow_pickle
    hook._async_modal_exec_value_hook = True
