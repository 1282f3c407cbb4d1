"""Host tools: sandboxed code calls tools that stay on the host.

Some tools cannot or must not go into the sandbox as source: managed agents,
MCP tools (they hold a connection on the host), tools built with constructor
arguments or API keys, closures over host state. Registered here, each gets a
stub in the kernel named like the tool. A call travels over the kernel's own
stdin channel (an ``input_request`` carrying the tool name and safe-JSON
arguments), so it needs no extra port, works through a Modal tunnel, and the
tool's code and secrets never leave the host. The host runs the tool and
answers with the safe-JSON value or the error; the stub returns the value or
raises ``HostToolError`` in the sandbox.

On the host: coroutine tools are awaited on the executor's loop, the others
run in a worker thread, so a slow tool never blocks the loop. Each call has a
timeout and a size limit on arguments and results; only registered names are
dispatched; arguments of smolagents tools are checked against their input
schema.
"""

from __future__ import annotations

import functools
import inspect
import json
import keyword
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import anyio

from . import kernel_side
from ._extras import require
from .kernel_side.host_tools import MARKER

logger = logging.getLogger("async_modal_exec.host_tools")

__all__ = ["HostTools"]

DEFAULT_CALL_TIMEOUT = 300.0
DEFAULT_MAX_BYTES = 16 * 2**20
EOF_REPLY = "\x04"  # makes the kernel's input() raise EOFError: never leave it waiting
_MODULE = "async_modal_exec_host_tools"


def tool_name(tool: Any) -> str:
    name = getattr(tool, "name", None) or getattr(tool, "__name__", None)
    if not isinstance(name, str):
        raise TypeError(f"cannot tell the name of host tool {tool!r}: pass it as name=")
    return name


def _is_coroutine_tool(tool: Any) -> bool:
    target = getattr(tool, "forward", tool)
    # A function, or an object whose __call__ is a coroutine function.
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(type(target).__call__)


_Bound = dict[str, Any] | tuple[list[Any], dict[str, Any]]  # checked keywords, or plain (args, kwargs)


class _HostTool:
    """One registered tool: how to bind its arguments and run it."""

    def __init__(self, name: str, tool: Any) -> None:
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"host tool name {name!r} is not a Python identifier")
        if not callable(tool):
            raise TypeError(f"host tool {name!r} is not callable")
        self.name = name
        self.tool = tool
        self.inputs: Mapping[str, Any] | None = getattr(tool, "inputs", None)
        self.is_async = _is_coroutine_tool(tool)
        self.doc = str(getattr(tool, "description", None) or inspect.getdoc(tool) or "")

    def bind(
        self, args: list[Any], kwargs: dict[str, Any]
    ) -> dict[str, Any] | tuple[list[Any], dict[str, Any]]:
        """Keyword arguments checked against the tool's schema (smolagents tools and agents)."""
        if self.inputs is None:
            inspect.signature(self.tool).bind(*args, **kwargs)  # TypeError names what is wrong
            return args, kwargs
        if len(args) == 1 and not kwargs and isinstance(args[0], dict) and set(args[0]) <= set(self.inputs):
            args, kwargs = [], dict(args[0])  # smolagents' "one dict of arguments" convention
        names = list(self.inputs)
        if len(args) > len(names):
            raise TypeError(f"{self.name}() takes {len(names)} arguments but {len(args)} were given")
        arguments = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key in arguments:
                raise TypeError(f"{self.name}() got multiple values for argument {key!r}")
            arguments[key] = value
        from smolagents.tools import validate_tool_arguments

        validate_tool_arguments(self.tool, arguments)  # ValueError / TypeError
        return arguments

    async def run(self, bound: _Bound) -> Any:
        args, kwargs = ([], bound) if isinstance(bound, dict) else bound
        if self.is_async:
            target = getattr(self.tool, "forward", self.tool)
            if getattr(self.tool, "is_initialized", True) is False:
                await anyio.to_thread.run_sync(self.tool.setup)
            return await target(*args, **kwargs)
        # A worker thread; cancelling the execution abandons the thread (it
        # finishes on its own) instead of waiting for it.
        call = functools.partial(self.tool, *args, **kwargs)
        return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)


@functools.cache
def _bridge_code() -> str:
    """Kernel code installing the bridge module (built once: it reads source files)."""
    from smolagents.serialization import SafeSerializer

    decoder = SafeSerializer.get_deserializer_code(allow_pickle=False)
    define = kernel_side.define_code("host_tools", _MODULE, ((decoder, "<smolagents safe-JSON decoder>"),))
    module = kernel_side.module_expr(_MODULE)
    return f"{define}\n{module}.install(get_ipython().kernel)\nHostToolError = {module}.HostToolError"


class HostTools:
    """The tools an executor runs on the host, and the answers to their calls.

    Args:
        tools: tools to register: smolagents ``Tool`` objects, managed agents,
            or plain functions (sync or ``async``), as a mapping ``{name: tool}``
            or an iterable (names from ``tool.name`` / ``__name__``).
        call_timeout: seconds one call may take; the sandbox then gets a
            ``HostToolError`` saying it timed out.
        max_bytes: limit on the serialised arguments and on the serialised result.

    Raises:
        MissingExtra: tools were given and smolagents is not installed.
    """

    def __init__(
        self,
        tools: Mapping[str, Any] | Iterable[Any] = (),
        *,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if call_timeout <= 0:
            raise ValueError("call_timeout must be positive")
        self.call_timeout = call_timeout
        self.max_bytes = max_bytes
        self._tools: dict[str, _HostTool] = {}
        self.calls = 0
        self.add(tools)

    def add(self, tools: Mapping[str, Any] | Iterable[Any]) -> None:
        """Register more tools (a same-named tool replaces the old one).

        Raises:
            MissingExtra: smolagents is not installed (its safe serializer carries
                the arguments and results both ways).
        """
        named = tools.items() if isinstance(tools, Mapping) else ((tool_name(tool), tool) for tool in tools)
        items = list(named)
        if items:
            require("smolagents", "host tools")
        for name, tool in items:
            self._tools[name] = _HostTool(name, tool)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def __bool__(self) -> bool:
        return bool(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def setup_code(self, names: Iterable[str], *, install_bridge: bool) -> str:
        """Kernel code defining the stubs for ``names`` (and the bridge itself, once per kernel)."""
        lines = [_bridge_code()] if install_bridge else []
        for name in names:
            doc = self._tools[name].doc
            lines.append(f"{name} = {kernel_side.module_expr(_MODULE)}.make_stub({name!r}, {doc!r})")
        return "\n".join(lines)

    async def answer(self, prompt: str) -> str:
        """The ``input_reply`` value for an ``input_request`` prompt.

        Never raises for a bad call: the error goes back to the sandbox.
        Cancelling it cancels the tool call (a sync tool's thread is abandoned).
        """
        # smolagents is imported on first use: `import async_modal_exec` stays light.
        from smolagents.serialization import SafeSerializer, SerializationError

        if not prompt.startswith(MARKER):
            logger.warning("input() without the host-tool marker; answering EOF")
            return EOF_REPLY
        name = "?"
        try:
            payload = prompt[len(MARKER) :]
            if len(payload) > self.max_bytes:
                raise ValueError(
                    f"the arguments are {len(payload)} bytes, over the limit of {self.max_bytes}"
                )
            request = json.loads(payload)
            name = str(request["tool"])
            tool = self._tools.get(name)
            if tool is None:
                raise LookupError(
                    f"no host tool is registered under this name (known: {', '.join(self._tools)})"
                )
            args = SafeSerializer.from_json_safe(request["args"])
            kwargs = SafeSerializer.from_json_safe(request["kwargs"])
            bound = tool.bind(args, kwargs)
            self.calls += 1
            with anyio.fail_after(self.call_timeout):
                value = await tool.run(bound)
            try:
                encoded = SafeSerializer.dumps(value, allow_pickle=False)
            except SerializationError as exc:
                raise TypeError(
                    f"its {type(value).__name__} result cannot be sent to the sandbox: {exc}"
                ) from None
            if len(encoded) > self.max_bytes:
                raise ValueError(f"the result is {len(encoded)} bytes, over the limit of {self.max_bytes}")
            return f"ok:{encoded}"
        except TimeoutError:
            return f"error:TimeoutError: no answer within {self.call_timeout} s"
        except Exception as exc:
            logger.info("host tool %s failed: %s: %s", name, type(exc).__name__, exc)
            return f"error:{type(exc).__name__}: {exc}"
