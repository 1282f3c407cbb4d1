"""AsyncExecutor: the one async core that runs code in a remote kernel.

The executor keeps the configuration and the public API; the kernel's
lifecycle (create, connect, reconnect, idle close, replace, close) is the
explicit state machine of :class:`~async_modal_exec.session.KernelSession`,
and everything else has a module of its own: one deadline per call
(:mod:`~async_modal_exec.deadline`), the kernel held for one call
(:mod:`~async_modal_exec.turn`), the execution driver
(:mod:`~async_modal_exec.driver`) and its recovery
(:mod:`~async_modal_exec.recovery`), the files API
(:mod:`~async_modal_exec.file_api`), installs (:mod:`~async_modal_exec.packages`).
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from contextlib import aclosing
from typing import Any

# anyio imports its asyncio backend on first use: a ~40 ms import that would
# otherwise run inside the event loop when the first executor is created.
from . import environment, files, packages
from ._shield import Completion, run_shielded
from ._timing import startup_phase
from .backends.base import Backend, GatewayEndpoint, Sandbox
from .deadline import Deadline, timed_out
from .driver import DriverSettings
from .errors import ExecutorStateError
from .file_api import FileOperations
from .fold import ExecutionFold
from .gateway import GatewayClient
from .host_tools import HostTools
from .package_api import PackageOperations
from .protocol import new_msg_id
from .results import Event, ExecutionResult, ExecutionTimeout, KernelDied, RecoveryOutcome
from .session import KernelSession, KernelState
from .turn import HeldTurn

logger = logging.getLogger("async_modal_exec.executor")
startup_logger = logging.getLogger("async_modal_exec.startup")

__all__ = ["AsyncExecutor", "ExecutorState"]

DEFAULT_MAX_OUTPUT_CHARS = 10_000_000
DEFAULT_MAX_MESSAGE_BYTES = 512 * 2**20


class ExecutorState(str, enum.Enum):
    """Where an :class:`AsyncExecutor` is in its life (equal to its value as a string)."""

    UNOPENED = "unopened"
    STARTING = "starting"
    OPEN = "open"
    CLOSED = "closed"


class AsyncExecutor(FileOperations, PackageOperations):
    """Runs Python code in a Jupyter kernel provided by a backend.

    Use it as ``async with AsyncExecutor(backend) as ex: result = await ex.run(code)``,
    or call :meth:`start` and :meth:`aclose` yourself. The executor owns one
    kernel and one persistent websocket to it; executions on one executor run
    one at a time, in the order they were called.

    Errors raised by the user's code are data: ``result.error`` (see
    :class:`~async_modal_exec.ExecutionResult`). Exceptions mean the execution
    itself failed: :class:`~async_modal_exec.ExecutionTimeout`,
    :class:`~async_modal_exec.KernelDied`, gateway errors; the execution ones
    carry the partial result. Every exception is an
    :class:`~async_modal_exec.AsyncModalExecError`.

    Args:
        backend: provides the gateway; default: a new
            :class:`~async_modal_exec.LocalBackend`. A
            :class:`~async_modal_exec.Sandbox` (a started backend) is
            shared: the executor makes its kernel there and neither starts
            nor closes the backend.
        owns_backend: close the backend in :meth:`aclose` (default True;
            always False on a ``Sandbox``).
        timeout: default timeout of :meth:`run` / :meth:`stream`, seconds (None: no limit).
        interrupt_grace: how long the interrupt of a timed-out or cancelled
            execution may take, until the kernel is idle again, before the
            kernel is replaced (in the background).
        max_output_chars: cap on the characters kept per execution: stdout,
            stderr, displays and the value (None: no cap); the rest is dropped
            with a visible marker.
        store_history: passed to the kernel (``True``: the kernel keeps ``In``/``Out``).
        on_progress: called on the loop as each startup phase starts,
            ``(phase, None)``, and ends, ``(phase, seconds)``; the phases are
            ``backend``, ``gateway_ready``, ``kernel_created``, and
            ``requirements`` when the backend has requirements to install
            (each end is also an INFO record on ``async_modal_exec.startup``).
            It must not block.
        gateway_timeout: how long the gateway may take to answer after the backend started.
        kernel_name: kernel spec to start (None: the gateway's default).
        max_message_bytes: largest websocket message accepted (None: unlimited).
        liveness_interval: after this many seconds without a message during an
            execution, the kernel is checked over REST (a deleted kernel is
            reported as :class:`~async_modal_exec.KernelDied` this soon).
        host_tools: tools that run on the host and are called from the
            sandboxed code (see :class:`~async_modal_exec.HostTools`): a
            ``HostTools``, a mapping ``{name: tool}`` or a list of tools.
        env: environment variables set in every kernel of this executor
            before any code runs (a replacement kernel gets them too); see
            also ``run(env=)`` for one run.
        file_chunk_bytes: size of the chunks :meth:`upload` and
            :meth:`download` move (memory use is a few of them).
    """

    def __init__(
        self,
        backend: Backend | Sandbox | None = None,
        *,
        owns_backend: bool = True,
        timeout: float | None = None,
        interrupt_grace: float = 5.0,
        max_output_chars: int | None = DEFAULT_MAX_OUTPUT_CHARS,
        store_history: bool = False,
        on_progress: Callable[[str, float | None], None] | None = None,
        gateway_timeout: float = 120.0,
        kernel_name: str | None = None,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        liveness_interval: float = 2.0,
        host_tools: HostTools | Mapping[str, Any] | Iterable[Any] | None = None,
        env: Mapping[str, str] | None = None,
        file_chunk_bytes: int = files.DEFAULT_CHUNK_BYTES,
    ) -> None:
        if backend is None:
            from .backends.local import LocalBackend

            backend = LocalBackend()
        Deadline.after(timeout)  # the one check of a timeout: positive or None
        if interrupt_grace <= 0:
            raise ValueError("interrupt_grace must be positive")
        if file_chunk_bytes <= 0:
            raise ValueError("file_chunk_bytes must be positive")
        self.env = environment.checked_env(env)
        self.file_chunk_bytes = file_chunk_bytes
        self.packages = packages.PackageRecord()
        self._sandbox: Sandbox | None = None
        if isinstance(backend, Sandbox):
            self._sandbox = backend
            backend = backend.backend
            owns_backend = False
        self.backend = backend
        self._owns_backend = owns_backend
        self.default_timeout = timeout
        self.interrupt_grace = interrupt_grace
        self.max_output_chars = max_output_chars
        self.store_history = store_history
        self.on_progress = on_progress
        self._numbering: tuple[str | None, int] = (None, 0)  # (kernel id, executions sent to it)
        self.gateway_timeout = gateway_timeout
        self.kernel_name = kernel_name
        self._max_message_bytes = max_message_bytes
        self.liveness_interval = liveness_interval
        self._state = ExecutorState.UNOPENED
        self._close_requested = False
        self._teardown_steps_once = Completion(self._teardown_steps)
        self._gateway: GatewayClient | None = None
        self._session: KernelSession | None = None
        self.startup_timings: dict[str, float] = {}
        self.host_tools = host_tools if isinstance(host_tools, HostTools) else HostTools(host_tools or ())

    # -- lifecycle -----------------------------------------------------------------

    @property
    def kernel_id(self) -> str | None:
        """The id of the current kernel (None before start)."""
        return self._session.kernel_id if self._session is not None else None

    @property
    def sandbox(self) -> Sandbox | None:
        """The sandbox the kernel runs in: the one given, or the one the backend started (None until then)."""
        return self._sandbox

    @property
    def endpoint(self) -> GatewayEndpoint | None:
        """The gateway this executor's kernel runs on (None until there is a :attr:`sandbox`)."""
        return self._sandbox.endpoint if self._sandbox is not None else None

    @property
    def state(self) -> ExecutorState:
        """An :class:`ExecutorState`: ``UNOPENED``, ``STARTING``, ``OPEN`` or ``CLOSED``."""
        return self._state

    @property
    def kernel_state(self) -> KernelState | None:
        """Where the kernel is in its lifecycle (None before start); see :class:`KernelState`."""
        return self._session.state if self._session is not None else None

    async def start(self) -> AsyncExecutor:
        """Start the backend, wait for the gateway, create the kernel, connect.

        Raises:
            ExecutorStateError: already started or closed, or closed by
                :meth:`aclose` while starting.
            BackendError, GatewayError: the sandbox or gateway failed.
            PackageInstallError: installing the backend's ``requirements`` failed.

        Cancelling the call (or any failure) tears down everything started so
        far, shielded from the cancellation, and leaves the executor closed.
        """
        if self._state is not ExecutorState.UNOPENED:
            raise ExecutorStateError(f"cannot start an executor that is {self._state.value}")
        self._state = ExecutorState.STARTING
        try:
            with self._phase("backend"):
                sandbox = self._sandbox = self._sandbox or await self.backend.start()
            self._check_not_closed()
            with self._phase("gateway_ready"):
                self._gateway = GatewayClient(sandbox.endpoint)
                await self._gateway.wait_ready(self.gateway_timeout)
            self._check_not_closed()
            with self._phase("kernel_created"):
                self._session = KernelSession(
                    self._gateway, kernel_name=self.kernel_name, max_message_bytes=self._max_message_bytes
                )
                await self._session.open()
            self._check_not_closed()
        except BaseException as exc:
            await self._teardown()
            if self._close_requested and isinstance(exc, Exception):
                if isinstance(exc, ExecutorStateError):
                    raise
                raise ExecutorStateError("the executor was closed while it started") from exc
            raise
        self._state = ExecutorState.OPEN
        if self.backend.requirements and not self.backend.requirements_ready:
            try:
                with self._phase("requirements"):
                    await packages.provision(self, self.backend)
            except BaseException:
                await self._teardown()
                raise
        if sandbox.idle_disconnect is not None:
            self._session.watch_idle(sandbox.idle_disconnect)
        return self

    def _phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return startup_phase(name, self.startup_timings, startup_logger, self.on_progress)

    def _check_not_closed(self) -> None:
        if self._close_requested:
            raise ExecutorStateError("the executor was closed while it started")

    async def aclose(self) -> None:
        """Delete the kernel, close the websocket, close the backend if owned.

        Safe to call twice, and while :meth:`start` runs (a kernel being
        created then is waited for and deleted). A running execution is
        stopped by closing its websocket: it raises :class:`ExecutorStateError`,
        and this call waits (up to 10 s) until it has let go of the kernel
        before deleting it.

        Runs to completion even when the calling task is cancelled (the
        cancellation is re-raised afterwards).
        """
        self._close_requested = True
        await self._teardown()

    async def __aenter__(self) -> AsyncExecutor:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _teardown(self) -> None:
        """Close everything started, once; a teardown cut short is finished by the next call."""
        self._state = ExecutorState.CLOSED
        await self._teardown_steps_once.run()

    async def _teardown_steps(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._gateway is not None:
            await self._gateway.aclose()
        if self._owns_backend:
            await self.backend.aclose()

    def _open_session(self) -> KernelSession:
        if self._state is not ExecutorState.OPEN or self._session is None:
            if self._state is ExecutorState.CLOSED:
                raise ExecutorStateError("the executor is closed")
            raise ExecutorStateError("the executor is not started: use 'async with' or await start()")
        return self._session

    # -- execution -----------------------------------------------------------------

    async def run(
        self, code: str, *, timeout: float | Deadline | None = None, env: Mapping[str, str] | None = None
    ) -> ExecutionResult:
        """Run ``code`` and return everything it produced.

        Args:
            code: Python source (IPython syntax works too).
            timeout: seconds for the whole call (waiting for the executions
                queued before it included); default: the executor's ``timeout``. A
                :class:`~async_modal_exec.deadline.Deadline` is shared with the calls
                that hold it (one install's probe and installer).
            env: environment variables for this run only: set before the
                code, restored after it (also when it fails, times out or is
                cancelled; if they cannot be restored, the kernel is replaced
                before the next run). The restore may add up to
                ``interrupt_grace`` to the bounds below.

        Returns:
            The result. If the code raised, ``result.error`` says so and the
            output printed before the error is in ``result.stdout``. If some
            of the kernel's messages were lost on the way, ``result.incomplete``
            says so (and how many: ``result.lost_messages``).

        Raises:
            ExecutionTimeout: the timeout expired (also a ``TimeoutError``),
                within ``timeout + interrupt_grace`` (+1 s); its ``recovery``
                says what became of the kernel (a :class:`RecoveryOutcome`).
            KernelDied: the kernel process died; the next call gets a fresh kernel.
            ExecutorStateError: not started, or closed (also while running).
            GatewayError: the gateway failed, or a replacement kernel died
                before it answered (the next run tries another).

        Cancelling the call interrupts the kernel (shielded, and bounded by
        ``interrupt_grace`` plus at most 1 s) and re-raises. A kernel that
        ignores the interrupt is not waited for: a fresh one starts in the
        background.
        """
        fold = self._new_fold(code)
        async with aclosing(self._execute(code, fold, timeout, environment.checked_env(env))) as events:
            async for _ in events:
                pass
        return fold.result()

    async def stream(
        self, code: str, *, timeout: float | Deadline | None = None, env: Mapping[str, str] | None = None
    ) -> AsyncGenerator[Event, None]:
        """Run ``code``, yielding stdout, stderr, display, result and error events as they arrive.

        Same arguments and errors as :meth:`run`. Leaving the loop early (``break``) or
        cancelling it interrupts the kernel; wrap the iterator in
        ``contextlib.aclosing`` so that happens at once rather than when the
        iterator is garbage-collected.
        """
        fold = self._new_fold(code)
        async with aclosing(self._execute(code, fold, timeout, environment.checked_env(env))) as events:
            async for event in events:
                yield event

    def _next_number(self, kernel_id: str | None) -> int:
        """1, 2, 3 ... for the executions sent to one kernel; 1 again on a new kernel."""
        last_kernel, count = self._numbering
        count = count + 1 if kernel_id == last_kernel else 1
        self._numbering = (kernel_id, count)
        return count

    def _new_fold(self, code: str, *, capped: bool = True) -> ExecutionFold:
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        return ExecutionFold(new_msg_id(), max_output_chars=self.max_output_chars if capped else None)

    def _driver_settings(self) -> DriverSettings:
        return DriverSettings(
            liveness_interval=self.liveness_interval,
            interrupt_grace=self.interrupt_grace,
            answer_input=self.host_tools.answer if self.host_tools else None,
            store_history=self.store_history,
        )

    @property
    def _work_dir(self) -> str | None:
        return self._sandbox.work_dir if self._sandbox is not None else None

    async def _execute(
        self, code: str, fold: ExecutionFold, timeout: float | Deadline | None, env: Mapping[str, str]
    ) -> AsyncGenerator[Event, None]:
        """The execution of :meth:`run` and :meth:`stream`, under one deadline.

        Takes the kernel's turn (a connected websocket to a live kernel),
        prepares a new kernel (environment, host-tool stubs), sets the run's
        ``env``, drives ``code``, restores the environment. The deadline
        covers it all, waiting for the turn included.
        """
        deadline = Deadline.of(timeout, self.default_timeout)
        session = self._open_session()
        started = False
        try:
            async with session.turn(deadline=deadline) as channel:
                started = True
                turn = HeldTurn(session, channel, self._driver_settings())
                sandbox_env = self._sandbox.env if self._sandbox is not None else {}
                await turn.prepare({**sandbox_env, **self.env}, self.host_tools, deadline)
                try:
                    if env:
                        await turn.set_env(env, deadline, save=True)
                    if not self.store_history:
                        fold.number = self._next_number(session.kernel_id)
                    async with aclosing(turn.execute(code, fold, deadline)) as events:
                        async for event in events:
                            yield event
                finally:
                    if env:
                        await run_shielded(turn.restore_env())
        except TimeoutError as exc:
            if started or isinstance(exc, ExecutionTimeout):
                raise
            raise timed_out(deadline, fold.result(), RecoveryOutcome.NOT_STARTED) from None

    async def ping(self) -> None:
        """Check over REST that the gateway answers and knows the kernel alive (one request).

        Raises:
            KernelDied: the kernel is gone or dead (the next run replaces it).
            GatewayError: the gateway did not answer properly.
            ExecutorStateError: not started, or closed.

        Cancelling the call abandons the request; nothing changes.
        """
        why = await self._open_session().check_alive()
        if why is not None:
            raise KernelDied(f"{why}; the next run uses a fresh kernel", ExecutionResult())

    async def interrupt(self) -> None:
        """Interrupt whatever the kernel is running (like Ctrl-C in a notebook).

        The running :meth:`run` then returns a result whose error is
        ``KeyboardInterrupt``. Does not wait for the running execution.

        Raises:
            ExecutorStateError: not started, or closed.
            GatewayError: the gateway refused or failed the interrupt.

        Cancelling the call abandons the REST request; the interrupt may or
        may not have reached the kernel.
        """
        session = self._open_session()
        running = session.running  # the execution this interrupt is for, taken before any await
        if await session.interrupt() and running is not None:
            running.interrupted_by_message()

    async def restart(self) -> None:
        """Start over on a brand-new kernel: all state is lost, ``kernel_id`` changes.

        Waits for the running execution to finish. The old kernel is deleted
        and a new one created (not the gateway's in-place restart, which can
        lose the first host-tool call: see :meth:`KernelSession.replace`).

        Raises:
            ExecutorStateError: not started, or closed.
            GatewayError: the gateway failed; the next run tries again.

        Cancelling the call while it waits its turn changes nothing. Later, the
        old kernel may already be deleted; the next run then finishes the job
        and starts on a brand-new kernel.
        """
        async with self._open_session().turn(fresh=True):
            pass
