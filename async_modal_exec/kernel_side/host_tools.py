"""Kernel side of host tools: stubs that forward calls to the host over stdin.

Kept in the kernel as ``sys.modules['async_modal_exec_host_tools']``, defined
once per kernel by :mod:`async_modal_exec.host_tools`, which also supplies
``_deserialize`` (smolagents' safe-JSON decoder) in the same namespace. Only
the standard library (and maybe PIL) can be assumed there.

A call serialises the tool name and arguments as safe JSON (the ``safe:``
format of smolagents' ``SafeSerializer``, never pickle) behind ``MARKER`` and
asks the kernel's own ``raw_input``; the host answers the ``input_request``
with ``ok:<safe value>`` or ``error:<json>``. Plain ``input()`` by user code
raises at once: nobody is there to answer it.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from typing import Any

MARKER = "\x1easync_modal_exec.host_tool/1:"


class HostToolError(Exception):
    """A host tool failed, or its call could not be made."""


def _to_json_safe(obj: Any) -> Any:
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, list):
        return [_to_json_safe(item) for item in obj]
    if isinstance(obj, dict):
        if all(isinstance(key, str) for key in obj):
            return {key: _to_json_safe(value) for key, value in obj.items()}
        pairs = [[_to_json_safe(key), _to_json_safe(value)] for key, value in obj.items()]
        return {"__type__": "dict_with_complex_keys", "data": pairs}
    for kind, cls in (("tuple", tuple), ("set", set), ("frozenset", frozenset)):
        if isinstance(obj, cls):
            return {"__type__": kind, "data": [_to_json_safe(item) for item in obj]}
    if isinstance(obj, bytes):
        return {"__type__": "bytes", "data": base64.b64encode(obj).decode()}
    if isinstance(obj, complex):
        return {"__type__": "complex", "real": obj.real, "imag": obj.imag}
    try:
        import PIL.Image

        if isinstance(obj, PIL.Image.Image):
            buffer = io.BytesIO()
            obj.save(buffer, format="PNG")
            return {"__type__": "PIL.Image", "data": base64.b64encode(buffer.getvalue()).decode()}
    except ImportError:
        pass
    raise TypeError(f"a {type(obj).__name__} cannot be sent to the host (safe JSON types only)")


_ask: Callable[[str], str] | None = None


def _deserialize(data: str) -> Any:
    raise NotImplementedError("replaced by the host with smolagents' safe-JSON decoder")


def call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run host tool ``name`` with ``args`` / ``kwargs`` on the host and return its value."""
    try:
        request = {"tool": name, "args": _to_json_safe(list(args)), "kwargs": _to_json_safe(kwargs)}
        payload = json.dumps(request)
    except (TypeError, ValueError) as exc:
        raise HostToolError(f"host tool {name!r}: {exc}") from None
    if _ask is None:
        raise HostToolError(f"host tool {name!r}: the bridge is not installed in this kernel")
    reply = _ask(MARKER + payload)
    kind, _, body = reply.partition(":")
    if kind == "ok":
        return _deserialize(body)
    if kind == "error":
        raise HostToolError(f"host tool {name!r} failed: {body}")
    raise HostToolError(f"host tool {name!r}: the host sent no answer")


def _refuse_input(*args: Any, **kwargs: Any) -> str:
    raise RuntimeError(
        "input() is not available here: the code runs in a sandbox with nobody to answer. "
        "Use the tools and variables you were given instead."
    )


def install(kernel: Any) -> None:
    """Take the kernel's stdin for host-tool calls; plain input()/getpass() raise."""
    global _ask
    if _ask is None:
        _ask = type(kernel).raw_input.__get__(kernel)
    # ipykernel rebinds builtins.input to kernel.raw_input for every execution.
    kernel.raw_input = _refuse_input
    kernel.getpass = _refuse_input


def make_stub(name: str, doc: str) -> Callable[..., Any]:
    """A function named like the tool whose calls run on the host."""

    def stub(*args: Any, **kwargs: Any) -> Any:
        return call(name, args, kwargs)

    stub.__name__ = stub.__qualname__ = name
    stub.__doc__ = doc
    return stub
