"""Executor: smolagents' synchronous executor interface over the async core.

``CodeAgent`` calls its executor synchronously (``send_variables``,
``send_tools``, then ``executor(code)`` every step). :class:`Executor` runs the
one async core (:class:`~async_modal_exec.AsyncExecutor`) on an event loop and
hands each call to it through an anyio blocking portal: its own background
loop thread by default, or a portal you pass in so your app's loop owns the
sandbox. No Modal or HTTP call ever blocks a running event loop.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import anyio
from anyio.from_thread import BlockingPortal
from smolagents.agents import MultiStepAgent
from smolagents.local_python_executor import DEFAULT_MAX_LEN_OUTPUT, CodeOutput, ExecutionTimeoutError
from smolagents.monitoring import AgentLogger, LogLevel
from smolagents.remote_executors import RemotePythonExecutor
from smolagents.tools import Tool, get_tools_definition_code
from smolagents.utils import AgentError, truncate_content

from .._shield import run_shielded, wait_shielded
from ..backends.base import Backend
from ..errors import ExecutorStateError
from ..executor import AsyncExecutor, ExecutorState
from ..files import RemoteFile
from ..host_tools import HostTools, tool_name
from ..results import ExecutionError, ExecutionResult, ExecutionTimeout
from .bridge import LoopBridge, running_loop
from .final_answer import patch_repr_fallback
from .outputs import code_output, error_message, is_final_answer, step_error_message, timeout_message
from .packages import InstallPolicy, PackageInstaller
from .requirements import (
    Requirement,
    guard_imports,
    is_mcp_tool,
    requirement_from_spec,
    requirements_of_tool,
    shipping_problem,
)
from .values import value_hook_code

logger = logging.getLogger("async_modal_exec.agent")

__all__ = ["Executor", "StepTimeoutError"]

T = TypeVar("T")

#: Seconds a step may run by default: smolagents' own executor stops at 30 s.
DEFAULT_STEP_TIMEOUT = 30.0


class _Unset(enum.Enum):
    UNSET = enum.auto()


class StepTimeoutError(AgentError, ExecutionTimeoutError):  # type: ignore[misc]
    """A step ran past the executor's timeout (the kernel was interrupted).

    Both smolagents' ``AgentError`` (what ``CodeAgent`` records and shows the
    model) and smolagents' ``ExecutionTimeoutError`` (what its local executor
    raises), so code that catches either keeps working.
    """


# The final-answer tools patched by an Executor, and the class each had before.
# smolagents patches a tool by subclassing its class; patching an already
# patched tool again (a second agent.run()) shipped a forward() whose baked-in
# setting was lost (NameError in the kernel). Each patch starts from the original.
_UNPATCHED_CLASS: weakref.WeakKeyDictionary[Any, type] = weakref.WeakKeyDictionary()


def _unshippable_stub(name: str, reason: str) -> str:
    message = f"tool {name!r} could not be sent to the sandbox: {reason}"
    return f"def {name}(*args, **kwargs):\n    raise RuntimeError({message!r})\n"


class Executor(RemotePythonExecutor):  # type: ignore[misc]
    """A smolagents ``PythonExecutor`` running code in a remote kernel.

    Pass it to ``CodeAgent(..., executor=Executor(backend))``. Nothing starts
    in the constructor (it is often called on an app's event-loop thread): the
    sandbox starts on first use, or call :meth:`start`.

    Args:
        backend: where kernels run (default: a new ``LocalBackend``).
        additional_imports: import names the code needs; installed if missing.
        logger: smolagents ``AgentLogger``. Default: the logger of the
            ``CodeAgent`` that runs it, from its first ``agent.run()`` on (so
            ``verbosity_level`` applies), and an INFO-level one before that
            (nothing is logged at construction then).
        allow_pickle: as in smolagents: pickle only if you trust the sandbox.
        portal: an anyio ``BlockingPortal`` on your app's loop; the sandbox then
            lives on that loop. Default: a background loop thread owned by this executor.
        requirements: packages every tool needs (skips discovery).
        tool_requirements: ``{tool_name: [packages]}``, per tool (skips discovery for it).
        install_packages: ``"auto"`` (install what is missing) or ``"never"``.
        install_timeout: seconds the installer may run.
        timeout: per-step timeout in seconds (default 30, as smolagents' own
            executor; None: no limit).
        timeout_seconds: smolagents' name for ``timeout`` (as on its
            ``LocalPythonExecutor``); None: no limit. Give one of the two.
        max_print_outputs_length: printed output of a step kept for the
            model (default 50,000 characters, as smolagents' own executor;
            None: all); longer output is cut in the middle with a visible marker.
        host_tools: tools (or tool names) that always run on the host, called
            from the sandbox over the kernel's stdin channel. Managed agents,
            MCP tools and tools that cannot be shipped as source run there too.
        host_fallback: False: tools that cannot be shipped become stubs that
            raise a clear error instead of running on the host (managed agents,
            MCP tools and ``host_tools`` still run on the host).
        host_tool_timeout: seconds one host-tool call may take.
        core: an already started :class:`~async_modal_exec.AsyncExecutor` on
            the running loop to use instead of starting one (e.g. from a
            ``SandboxPool`` session); drive the agent with ``run_agent`` then.
            ``additional_imports`` are not installed for it.
        **executor_options: passed to :class:`~async_modal_exec.AsyncExecutor`.

    Ctrl-C during a call cancels the work on the loop, lets its cleanup run
    (the kernel is interrupted), then re-raises ``KeyboardInterrupt``. If the
    process exits without :meth:`cleanup`, the sandbox is still terminated.

    Warns:
        BlockingCallWarning: a synchronous call (``executor(code)``,
            ``agent.run(task)``, :meth:`cleanup` ...) made inside a running
            event loop whose sandbox lives elsewhere: the call blocks that loop
            until it returns. Use ``await run_agent(agent, task)`` and
            ``await executor.aclose()`` from async code.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        additional_imports: Sequence[str] = (),
        logger: AgentLogger | None = None,
        allow_pickle: bool = False,
        portal: BlockingPortal | None = None,
        requirements: Sequence[str] | None = None,
        tool_requirements: Mapping[str, Sequence[str]] | None = None,
        install_packages: InstallPolicy = "auto",
        install_timeout: float = 600.0,
        timeout: float | None = DEFAULT_STEP_TIMEOUT,
        timeout_seconds: float | Literal[_Unset.UNSET] | None = _Unset.UNSET,
        max_print_outputs_length: int | None = DEFAULT_MAX_LEN_OUTPUT,
        host_tools: Sequence[Any] = (),
        host_fallback: bool = True,
        host_tool_timeout: float = 300.0,
        core: AsyncExecutor | None = None,
        **executor_options: Any,
    ) -> None:
        if timeout_seconds is not _Unset.UNSET:
            if timeout != DEFAULT_STEP_TIMEOUT and timeout != timeout_seconds:
                raise ValueError("give timeout or timeout_seconds (smolagents' name for it), not both")
            timeout = timeout_seconds
        # smolagents' constructor logs "Initializing executor, hold on...": only
        # to a logger the caller chose (nothing starts here anyway).
        super().__init__(list(additional_imports), logger or AgentLogger(level=LogLevel.OFF), allow_pickle)
        #: True while the logger is our default, to be replaced by the running agent's.
        self._default_logger = logger is None
        if logger is None:
            self.logger = AgentLogger(level=LogLevel.INFO)
        if core is None:
            registry = HostTools(call_timeout=host_tool_timeout)
            core = AsyncExecutor(backend, timeout=timeout, host_tools=registry, **executor_options)
        self.core = core
        self.max_print_outputs_length = max_print_outputs_length
        self.forced_host_tools = {item if isinstance(item, str) else tool_name(item) for item in host_tools}
        self.host_fallback = host_fallback
        self.host_tool_reasons: dict[str, str] = {}
        self.requirements = list(requirements) if requirements is not None else None
        self.tool_requirements = {name: list(specs) for name, specs in (tool_requirements or {}).items()}
        self.installer = PackageInstaller(install_packages, install_timeout)
        self.unshippable_tools: dict[str, str] = {}
        # An already started core lives on the loop running now.
        self.bridge = LoopBridge(portal, running_loop() if core.state is ExecutorState.OPEN else None)
        #: Where ``CodeAgent`` reads a failed step's printed output, as from
        #: smolagents' local executor: ``state["_print_outputs"]``.
        self.state: dict[str, Any] = {"_print_outputs": ""}
        self._value_hook_kernel: str | None = None  # the kernel the value hook is installed in
        self._exit_hook = False
        self._closed = False

    # -- the bridge ------------------------------------------------------------------

    def _call(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``func(*args)`` on the core's loop and wait; Ctrl-C cancels it cleanly."""
        if self._closed:
            raise ExecutorStateError("the executor is cleaned up")
        if not self._exit_hook:
            # Runs before the interpreter joins non-daemon threads (the
            # bridge's loop thread among them), so an executor never cleaned
            # up still terminates its sandbox and lets the process exit.
            self._exit_hook = True
            threading._register_atexit(self._cleanup_at_exit)  # type: ignore[attr-defined]
        return self.bridge.call(func, *args)

    def attach_portal(self, portal: BlockingPortal, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        """Reach the core through ``portal`` (on ``loop``, default: the running loop) for a while.

        Used by :func:`~async_modal_exec.run_agent`: an executor that has not
        started yet then starts on that loop. Nothing changes if the sandbox
        already lives on another loop.

        Returns:
            True if attached; call :meth:`detach_portal` when done. After the
            detach, calls still reach the core while its loop runs.
        """
        return self.bridge.attach(portal, loop or asyncio.get_running_loop())

    def detach_portal(self, portal: BlockingPortal) -> None:
        """Undo :meth:`attach_portal`."""
        self.bridge.detach(portal)

    # -- async side (runs on the core's loop) ------------------------------------------

    async def _ensure_started(self) -> AsyncExecutor:
        if self.core.state is ExecutorState.UNOPENED:
            self.bridge.bind()
            self.logger.log("Starting the sandbox...", level=LogLevel.INFO)
            await self.core.start()
            if self.additional_imports:
                await self._install([requirement_from_spec(name) for name in self.additional_imports])
        return self.core

    async def _install(self, requirements: Sequence[Requirement]) -> list[str]:
        installed = await self.installer.ensure(self.core, requirements)
        if installed:
            self.installed_packages += installed
            self.logger.log(f"Installed in the sandbox: {' '.join(installed)}", level=LogLevel.INFO)
        return installed

    async def _run(self, code: str) -> ExecutionResult:
        executor = await self._ensure_started()
        await self._ensure_value_hook()
        return await executor.run(code)

    async def _ensure_value_hook(self) -> None:
        """Install the hook that sends the last value as an object (once per kernel)."""
        kernel = self.core.kernel_id
        if kernel is None or kernel == self._value_hook_kernel:
            return
        result = await self.core.run(value_hook_code(self.allow_pickle))
        if result.error is None:
            self._value_hook_kernel = kernel
        else:  # values then come back as their repr, as from other remote executors
            error = result.error
            logger.warning("the value hook could not be installed: %s: %s", error.ename, error.evalue)

    async def _send_tools(self, tools: Mapping[str, Any]) -> ExecutionResult | None:
        await self._ensure_started()
        # Off the loop: inspecting tools reads and parses source files (tens
        # of ms per tool, more on a busy machine), and the loop may be an app's.
        on_host, needed, code = await anyio.to_thread.run_sync(self._plan_tools, tools)
        self.core.host_tools.add(on_host)
        await self._install(needed)
        # An empty run still defines the host-tool stubs, so the first step finds them.
        return await self.core.run(code) if code.strip() or on_host else None

    def _plan_tools(self, tools: Mapping[str, Any]) -> tuple[dict[str, Any], list[Requirement], str]:
        """Sort ``tools`` into host tools, requirements and the code defining the rest (no I/O)."""
        shippable: dict[str, Tool] = {}
        on_host: dict[str, Any] = {}
        stubs: list[str] = []
        needed: list[Requirement] = []
        optional: set[str] = set()
        for name, tool in tools.items():
            # The final-answer tool is patched here (smolagents swaps its class) and
            # holds no state of its own: comparing it with a fresh instance says nothing.
            problem = shipping_problem(tool, check_state=name != "final_answer")
            reason = self._host_reason(name, tool, problem)
            if reason is not None:
                on_host[name] = tool
                self.host_tool_reasons[name] = reason
                self.logger.log(f"Tool {name!r} runs on the host: {reason}", level=LogLevel.INFO)
                continue
            if problem is not None:
                self.unshippable_tools[name] = problem
                stubs.append(_unshippable_stub(name, problem))
                message = f"Tool {name!r} is not sent to the sandbox: {problem}"
                self.logger.log(message, level=LogLevel.INFO)
                logger.warning(message)
                continue
            shippable[name] = tool
            explicit = self.tool_requirements.get(name, self.requirements)
            requirements, origin, optional_here = requirements_of_tool(tool, explicit)
            logger.debug("requirements of tool %s (%s): %s", name, origin, [r.spec for r in requirements])
            needed += requirements
            optional |= optional_here
        # Also with no tool: the definitions start with the standard imports
        # (math, re, time ...) smolagents' other executors define.
        definitions = guard_imports(get_tools_definition_code(shippable), optional)
        code = "\n".join([definitions, *stubs])
        return on_host, needed, code

    def _host_reason(self, name: str, tool: Any, problem: str | None) -> str | None:
        """Why ``tool`` runs on the host, or None if it goes into the sandbox."""
        if name == "final_answer":
            return None  # patched to raise in the sandbox, as smolagents expects
        if name in self.forced_host_tools:
            return "listed in host_tools"
        if isinstance(tool, MultiStepAgent):
            return "it is a managed agent"
        if is_mcp_tool(tool):
            return "it is an MCP tool (its connection lives on the host)"
        if problem is not None and self.host_fallback:
            return problem
        return None

    # -- smolagents' interface ---------------------------------------------------------

    def start(self) -> Executor:
        """Start the sandbox now instead of on first use."""
        self._call(self._ensure_started)
        return self

    def run_code_raise_errors(self, code: str) -> CodeOutput:
        """Run one step's code.

        Returns:
            ``CodeOutput``: the value (the object for plain types, an image as
            ``PIL.Image``, else its repr), the logs (stdout and stderr in the
            order written, capped), and whether ``final_answer`` was called.

        Raises:
            StepTimeoutError: the step ran past the timeout (the kernel was
                interrupted); also smolagents' ``ExecutionTimeoutError``. The
                message starts as smolagents': "Code execution exceeded the
                maximum execution time of N seconds".
            AgentError: the code raised or the kernel died; the message holds
                the error's name, value and traceback, and for an error the
                code raised starts as smolagents' local executor's: "Code
                execution failed at line '<statement>' due to: <name>:
                <value>". In both cases the output
                printed before is in ``state["_print_outputs"]``, where
                ``CodeAgent`` reads it.

        Ctrl-C interrupts the kernel and re-raises ``KeyboardInterrupt``.
        """
        self.state["_print_outputs"] = ""
        try:
            result = self._call(self._run, code)
        except ExecutionTimeout as exc:
            self.state["_print_outputs"] = self._cap(exc.result.logs)
            message = error_message(exc.result, timeout_message(exc))
            raise StepTimeoutError(self._cap(message), self.logger) from exc
        except ExecutionError as exc:
            self.state["_print_outputs"] = self._cap(exc.result.logs)
            message = error_message(exc.result, f"Executing code failed: {exc}")
            raise AgentError(self._cap(message), self.logger) from exc
        logs = self.state["_print_outputs"] = self._cap(result.logs)
        if result.error is not None and not is_final_answer(result):
            raise AgentError(self._cap(step_error_message(result, code)), self.logger)
        return code_output(result, logs=logs, allow_pickle=self.allow_pickle)

    def _cap(self, text: str) -> str:
        """``text`` cut to ``max_print_outputs_length`` (smolagents' marker in the middle)."""
        if self.max_print_outputs_length is None:
            return text
        return str(truncate_content(text, max_length=self.max_print_outputs_length))

    def send_tools(self, tools: dict[str, Any]) -> None:
        """Define the tools in the kernel, installing only the packages it is missing.

        Tools that cannot be sent as source (constructor arguments, closures,
        managed agents) are listed in ``unshippable_tools`` and defined as stubs
        that raise a clear error when called; they never break the agent's start.
        """
        self._adopt_agent_settings()
        if "final_answer" in tools:
            self._patch_final_answer_with_exception(tools["final_answer"])
        result = self._call(self._send_tools, tools)
        if result is not None:
            if result.error is not None:
                raise AgentError(error_message(result, "Defining the tools failed:"), self.logger)
            if result.stdout:
                self.logger.log(result.stdout)

    def send_variables(self, variables: dict[str, Any]) -> None:
        """Define ``variables`` in the kernel (smolagents' ``SafeSerializer``; pickle only if allowed)."""
        self._adopt_agent_settings()
        super().send_variables(variables)

    def _adopt_agent_settings(self) -> None:
        """Take the calling agent's ``max_print_outputs_length`` and logger.

        ``CodeAgent(max_print_outputs_length=)`` and ``verbosity_level`` reach
        only the executor the agent builds itself; one passed in is never
        told. ``MultiStepAgent.run`` calls :meth:`send_variables` and
        :meth:`send_tools` directly, so the agent is the caller's ``self``.
        The logger is taken only when the executor was given none.
        """
        try:
            caller = sys._getframe(2).f_locals.get("self")
        except ValueError:  # called from the top of a stack
            return
        if not isinstance(caller, MultiStepAgent):
            return
        length = getattr(caller, "max_print_outputs_length", None)
        if isinstance(length, int) and not isinstance(length, bool) and length > 0:
            self.max_print_outputs_length = length
        agent_logger = getattr(caller, "logger", None)
        if self._default_logger and isinstance(agent_logger, AgentLogger):
            self.logger = agent_logger

    def _patch_final_answer_with_exception(self, final_answer_tool: Any) -> None:
        """smolagents' patch (``final_answer`` raises with the serialized answer), once per tool:
        a tool patched before gets its original class back first, so any number of runs work.
        An answer smolagents cannot serialize safely is sent as its repr (see :mod:`.final_answer`)."""
        original = _UNPATCHED_CLASS.get(final_answer_tool)
        if original is not None:
            final_answer_tool.__class__ = original
        else:
            original = type(final_answer_tool)
        super()._patch_final_answer_with_exception(final_answer_tool)
        patch_repr_fallback(type(final_answer_tool))
        _UNPATCHED_CLASS[final_answer_tool] = original

    def install_packages(self, additional_imports: list[str]) -> list[str]:
        """Install what is missing among ``additional_imports`` (import names or specs)."""
        requirements = [requirement_from_spec(name) for name in additional_imports]
        return self._call(self._install_after_start, requirements)

    async def _install_after_start(self, requirements: Sequence[Requirement]) -> list[str]:
        await self._ensure_started()
        return await self._install(requirements)

    # -- files (the sandbox starts on first use) -------------------------------------------

    def upload(
        self, source: bytes | str | os.PathLike[str], remote_path: str, *, timeout: float | None = None
    ) -> RemoteFile:
        """Write bytes or a local file to ``remote_path`` in the sandbox; see :meth:`AsyncExecutor.upload`."""
        info: RemoteFile = self._call(
            functools.partial(self._on_core, "upload", source, remote_path, timeout=timeout)
        )
        return info

    def download(
        self,
        remote_path: str,
        local_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> bytes | RemoteFile:
        """``remote_path``'s bytes, or written to ``local_path``; see :meth:`AsyncExecutor.download`."""
        args = (remote_path,) if local_path is None else (remote_path, local_path)
        got: bytes | RemoteFile = self._call(
            functools.partial(self._on_core, "download", *args, timeout=timeout)
        )
        return got

    def listdir(self, remote_dir: str = ".", *, timeout: float | None = None) -> list[RemoteFile]:
        """The entries of ``remote_dir`` in the sandbox; see :meth:`AsyncExecutor.listdir`."""
        return self._call(functools.partial(self._on_core, "listdir", remote_dir, timeout=timeout))

    def remove(self, remote_path: str, *, recursive: bool = False, timeout: float | None = None) -> None:
        """Delete a file or directory in the sandbox; see :meth:`AsyncExecutor.remove`."""
        self._call(
            functools.partial(self._on_core, "remove", remote_path, recursive=recursive, timeout=timeout)
        )

    async def _on_core(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``core.<method>(*args, **kwargs)``, once the sandbox is started."""
        core = await self._ensure_started()
        return await getattr(core, method)(*args, **kwargs)

    def cleanup(self) -> None:
        """Terminate the sandbox and stop the background loop; safe to call twice.

        Works from any thread. On the event-loop thread that runs the sandbox
        (after :func:`~async_modal_exec.run_agent`, or ``with CodeAgent(...)``
        inside async code) it cannot wait for that loop: it schedules the close
        there, logs that it did, and returns; ``asyncio.run`` waits for the
        close before it ends, and ``await executor.aclose()`` waits for it too.

        Raises:
            ExecutorStateError: the loop the sandbox lives on has stopped, so
                nothing can close it any more (close before the loop ends).
        """
        if self._closed:
            return
        started = self.core.state in (ExecutorState.STARTING, ExecutorState.OPEN)
        task = self.bridge.close(self.core.aclose if started else None)
        if task is None:
            self._closed = True
            return
        logger.warning(
            "cleanup() ran on the event loop that runs the sandbox: closing it in the background "
            "(`await executor.aclose()` waits for it)"
        )
        task.add_done_callback(lambda _: self._closed_now())

    def _closed_now(self) -> None:
        self._closed = True
        self.bridge.stop()

    def delete(self) -> None:
        """Same as :meth:`cleanup` (smolagents' name)."""
        self.cleanup()

    async def aclose(self) -> None:
        """Close from async code: on the sandbox's own loop, or from another loop via a worker thread.

        Runs to completion when cancelled (the cancellation is delivered after).
        """
        if self._closed:
            return
        if self.bridge.on_core_loop():
            scheduled = self.bridge.closing_task
            if scheduled is not None:
                await wait_shielded(scheduled)
            else:
                await self.core.aclose()  # shielded itself
            self._closed_now()
        else:
            await run_shielded(anyio.to_thread.run_sync(self.cleanup))

    def _cleanup_at_exit(self) -> None:
        try:
            self.cleanup()
        except Exception as exc:  # interpreter exit: report, never raise
            logger.warning("cleanup at exit failed: %s", exc)

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
