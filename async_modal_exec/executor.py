"""AsyncExecutor: the one async core that runs code in a remote kernel.

The executor keeps the configuration and the public API; the kernel's
lifecycle (create, connect, reconnect, idle close, replace, close) is the
explicit state machine of :class:`~async_modal_exec.session.KernelSession`,
and the Jupyter messages are built and folded by the sans-I/O
:mod:`~async_modal_exec.protocol`. What is left here is the execution
driver: send a request, move messages from the websocket into the fold, act on
what the fold says, and recover the kernel when an execution is cut short.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import enum
import functools
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any, overload

import anyio

# anyio imports its asyncio backend on first use: a ~40 ms import that would
# otherwise run inside the event loop when the first executor is created.
import anyio._backends._asyncio  # isort: skip

from . import environment, files, packages
from ._shield import Completion, run_shielded
from ._timing import record_phase
from .backends.base import Backend, GatewayEndpoint, Sandbox
from .channel import ChannelLost, KernelChannel
from .errors import (
    AsyncModalExecError,
    ExecutionError,
    ExecutionTimeout,
    ExecutorStateError,
    GatewayNotFound,
    GatewayUnreachable,
    KernelDied,
    RecoveryOutcome,
)
from .gateway import GatewayClient
from .host_tools import HostTools
from .protocol import (
    ExecutionFold,
    execute_request,
    input_reply,
    kernel_info_request,
    msg_id_of,
    new_msg_id,
    parent_msg_id,
    unaccounted_messages,
)
from .results import Event, ExecutionResult
from .session import KernelSession, KernelState

logger = logging.getLogger("async_modal_exec.executor")
startup_logger = logging.getLogger("async_modal_exec.startup")

__all__ = ["AsyncExecutor", "ExecutorState"]

DEFAULT_MAX_OUTPUT_CHARS = 10_000_000
DEFAULT_MAX_MESSAGE_BYTES = 512 * 2**20
_RECONNECT_ATTEMPTS = 3
_SETUP_TIMEOUT = 10.0  # defining the host-tool stubs in a kernel
_LAST_LOOK = 1.0  # recovery: how long a websocket ping may take (a dead link, or a stuck kernel?)
_IOPUB_GRACE = 3.0  # after the execute_reply, how long IOPub may stay silent before idle
# What a started execute_request sends at least (busy, execute_input, execute_reply, idle).
_STARTED_REQUEST_MESSAGES = 4


class ExecutorState(str, enum.Enum):
    """Where an :class:`AsyncExecutor` is in its life (equal to its value as a string)."""

    UNOPENED = "unopened"
    STARTING = "starting"
    OPEN = "open"
    CLOSED = "closed"


class AsyncExecutor:
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
        ready_timeout: how long the gateway may take to answer after the backend started.
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
        ready_timeout: float = 120.0,
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
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive or None")
        if interrupt_grace <= 0:
            raise ValueError("interrupt_grace must be positive")
        if file_chunk_bytes <= 0:
            raise ValueError("file_chunk_bytes must be positive")
        self.env = environment.checked_env(env)
        self.file_chunk_bytes = file_chunk_bytes
        self.packages = packages.PackageRecord()
        self._sandbox_endpoint: GatewayEndpoint | None = None
        if isinstance(backend, Sandbox):
            self._sandbox_endpoint = backend.endpoint
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
        self.ready_timeout = ready_timeout
        self.kernel_name = kernel_name
        self._max_message_bytes = max_message_bytes
        self.liveness_interval = liveness_interval
        self._state = ExecutorState.UNOPENED
        self._close_requested = False
        self._teardown_steps_once = Completion(self._teardown_steps)
        self._gateway: GatewayClient | None = None
        self._session: KernelSession | None = None
        # Messages read ahead while probing after a reconnect, for the running execution.
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._running: ExecutionFold | None = None  # the execution on the kernel now (for interrupt())
        self.startup_timings: dict[str, float] = {}
        self.host_tools = host_tools if isinstance(host_tools, HostTools) else HostTools(host_tools or ())

    # -- lifecycle -----------------------------------------------------------------

    @property
    def kernel_id(self) -> str | None:
        """The id of the current kernel (None before start)."""
        return self._session.kernel_id if self._session is not None else None

    @property
    def endpoint(self) -> GatewayEndpoint | None:
        """The gateway this executor's kernel runs on (None before start)."""
        return self._gateway.endpoint if self._gateway is not None else None

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
                endpoint = self._sandbox_endpoint or await self.backend.start()
            self._check_not_closed()
            with self._phase("gateway_ready"):
                self._gateway = GatewayClient(endpoint)
                await self._gateway.wait_ready(self.ready_timeout)
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
        if self.backend.idle_disconnect is not None:
            self._session.watch_idle(self.backend.idle_disconnect)
        return self

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """One startup phase: the progress callback hears its start and end, the log its time."""
        began = time.monotonic()
        if self.on_progress is not None:
            self.on_progress(name, None)
        yield
        if self.on_progress is not None:
            self.on_progress(name, time.monotonic() - began)
        record_phase(self.startup_timings, name, began, startup_logger)

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
        self, code: str, *, timeout: float | None = None, env: Mapping[str, str] | None = None
    ) -> ExecutionResult:
        """Run ``code`` and return everything it produced.

        Args:
            code: Python source (IPython syntax works too).
            timeout: seconds for the whole call (waiting for the executions
                queued before it included); default: the executor's ``timeout``.
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
        self, code: str, *, timeout: float | None = None, env: Mapping[str, str] | None = None
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

    def _timeout(self, timeout: float | None) -> float | None:
        value = self.default_timeout if timeout is None else timeout
        if value is not None and value <= 0:
            raise ValueError("timeout must be positive or None")
        return value

    async def _execute(
        self, code: str, fold: ExecutionFold, timeout: float | None, env: Mapping[str, str]
    ) -> AsyncGenerator[Event, None]:
        """The execution driver of :meth:`run` and :meth:`stream`.

        Takes the kernel's turn (a connected websocket to a live kernel),
        prepares a new kernel (environment, host-tool stubs), sets the run's
        ``env``, drives ``code``, restores the environment. One deadline
        covers it all, waiting for the turn included.
        """
        timeout = self._timeout(timeout)
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        session = self._open_session()
        started = False
        try:
            async with session.turn(deadline=deadline) as channel:
                started = True
                await self._prepare_kernel(channel, deadline)
                await self._ensure_host_tools(channel, deadline)
                try:
                    if env:
                        apply = environment.apply_code(save=True)
                        await self._setup(channel, apply, deadline, "setting env", env)
                    async with aclosing(self._drive(channel, code, fold, deadline)) as events:
                        async for event in events:
                            yield event
                finally:
                    if env:
                        await run_shielded(self._restore_env(channel, session))
        except TimeoutError as exc:
            if started or isinstance(exc, ExecutionTimeout):
                raise
            outcome = RecoveryOutcome.NOT_STARTED
            raise ExecutionTimeout(
                f"execution timed out after {timeout} s; {outcome.describe()}",
                fold.result(),
                recovery=outcome,
            ) from None

    async def _internal(
        self,
        channel: KernelChannel,
        code: str,
        deadline: float,
        metadata: Mapping[str, Any] | None = None,
    ) -> ExecutionResult:
        """Run the package's own ``code`` in the held turn: no output cap, nothing of it is the user's."""
        fold = self._new_fold(code, capped=False)
        async with aclosing(self._drive(channel, code, fold, deadline, metadata, internal=True)) as events:
            async for _ in events:
                pass
        return fold.result()

    async def _setup(
        self,
        channel: KernelChannel,
        code: str,
        deadline: float,
        what: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """A setup step in the held turn (at most ``_SETUP_TIMEOUT``); its error raises ExecutionError."""
        metadata = {environment.METADATA_KEY: dict(env)} if env is not None else None
        setup_deadline = min(deadline, time.monotonic() + _SETUP_TIMEOUT)
        result = await self._internal(channel, code, setup_deadline, metadata)
        if result.error is not None:
            raise ExecutionError(
                f"{what} in the kernel failed: {result.error.ename}: {result.error.evalue}", result
            )

    async def _prepare_kernel(self, channel: KernelChannel, deadline: float) -> None:
        """Set the executor's environment in a kernel that does not have it yet."""
        session = self._open_session()
        if "env" in session.prepared:  # every run passes here: nothing else to do once set
            return
        env = {**self.backend.kernel_env, **self.env}
        if env:
            await self._setup(channel, environment.apply_code(save=False), deadline, "setting env", env)
        session.prepared.add("env")

    async def _restore_env(self, channel: KernelChannel, session: KernelSession) -> None:
        """Put back the environment a run changed; if that cannot be done, the kernel is replaced."""
        kernel = session.kernel_id
        try:
            if session.state is not KernelState.CONNECTED or not channel.is_open:
                raise ChannelLost("the kernel is not connected")
            # Bounded like the interrupt: a run's end waits for its restore.
            until = time.monotonic() + min(_SETUP_TIMEOUT, self.interrupt_grace)
            await self._setup(channel, environment.restore_code(), until, "restoring env")
        except (AsyncModalExecError, ChannelLost, TimeoutError) as exc:
            if session.kernel_id == kernel and not session.closing:
                logger.warning("restoring a run's env failed (%s); the kernel will be replaced", exc)
                session.mark_lost("a run's environment could not be restored")

    async def _ensure_host_tools(self, channel: KernelChannel, deadline: float) -> None:
        """Define the stubs of host tools the current kernel lacks (all of them in a new kernel)."""
        session = self._open_session()
        stubbed = session.stubbed
        missing = [name for name in self.host_tools.names if stubbed is None or name not in stubbed]
        if not missing:
            return
        # Off the loop: the first call reads and tokenizes source files (tens of ms).
        setup = functools.partial(self.host_tools.setup_code, missing, install_bridge=stubbed is None)
        code = await anyio.to_thread.run_sync(setup)
        await self._setup(channel, code, deadline, "defining the host tools")
        session.stubbed = (stubbed or set()) | set(missing)

    async def _drive(
        self,
        channel: KernelChannel,
        code: str,
        fold: ExecutionFold,
        deadline: float,
        metadata: Mapping[str, Any] | None = None,
        *,
        internal: bool = False,
    ) -> AsyncGenerator[Event, None]:
        """Send ``code`` and yield its events until the kernel goes idle (the session is held).

        ``deadline`` is a ``time.monotonic()`` time (``math.inf``: none);
        ``metadata`` goes in the request's metadata (data the code reads);
        ``internal`` code (the package's own) is kept out of the history and
        out of the numbering of the user's runs.
        """
        session = self._open_session()
        began = time.monotonic()
        self._pending.clear()
        if not self.store_history and not internal:
            fold.number = self._next_number(session.kernel_id)
        request = execute_request(
            code,
            session=session.ws_session,
            store_history=self.store_history and not internal,
            allow_stdin=bool(self.host_tools),
            msg_id=fold.msg_id,
            metadata=metadata,
        )
        self._running = fold
        try:
            await self._send(channel, request)
            quiet_from: float | None = None  # once replied: when the last message came
            while not fold.done:
                until = deadline if quiet_from is None else min(deadline, quiet_from + _IOPUB_GRACE)
                message = await self._receive(channel, fold, until, request)
                if message is None:
                    if quiet_from is not None and time.monotonic() < deadline:
                        # Like nbclient's iopub_timeout: the kernel answered on
                        # shell, but its idle status never came on IOPub.
                        logger.warning("kernel %s replied but never went idle on IOPub", session.kernel_id)
                        fold.assume_done()
                    break
                events = fold.feed(message)
                if fold.kernel_dead:
                    session.mark_lost("the kernel died during an execution")
                    raise KernelDied(
                        "the kernel died during the execution; the next run uses a fresh kernel",
                        fold.result(),
                    )
                pending = fold.take_input_request()
                if pending is not None:
                    await self._answer_input(channel, pending, deadline)
                for event in events:
                    yield event
                if fold.replied:
                    quiet_from = time.monotonic()
        except KernelDied:
            self._running = None
            raise
        except BaseException as exc:
            self._running = None
            # Cancelled, the consumer left early, or the connection failed:
            # bring the kernel back to idle before anyone else uses it.
            if session.closing and isinstance(exc, Exception):
                raise ExecutorStateError("the executor was closed while the execution ran") from exc
            outcome = await run_shielded(self._recover(channel, fold))
            if outcome is not None:
                logger.info("execution stopped (%r); %s", exc, outcome.describe())
            raise
        self._running = None
        if not fold.done:
            outcome = await run_shielded(self._recover(channel, fold))
            if outcome is None:
                raise ExecutorStateError("the executor was closed while the execution ran")
            timeout = round(deadline - began, 3)
            logger.info("execution timed out after %s s; %s", timeout, outcome.describe())
            raise ExecutionTimeout(
                f"execution timed out after {timeout} s; {outcome.describe()}",
                fold.result(),
                recovery=outcome,
            )

    async def _send(self, channel: KernelChannel, message: Mapping[str, Any]) -> None:
        """Send one message; a websocket found closed is reopened (same session) and the send retried once.

        Raises:
            ExecutorStateError: closed meanwhile.
            GatewayError: the websocket cannot be reopened, or fails again.
        """
        session = self._open_session()
        try:
            await channel.send(message)
            return
        except ChannelLost as exc:
            if session.closing:
                raise ExecutorStateError("the executor is closed") from exc
            session.dropped(f"sending failed: {exc}")
        await session.reconnect()
        try:
            await channel.send(message)
        except ChannelLost as exc:
            session.dropped(f"sending failed again: {exc}")
            raise GatewayUnreachable(f"cannot send to the kernel websocket: {exc}") from exc

    async def _answer_input(
        self, channel: KernelChannel, request: Mapping[str, Any], deadline: float
    ) -> None:
        """Answer the kernel's ``input_request``: a host-tool call (or EOF for plain ``input()``).

        The call counts toward the execution's deadline; past it, no answer is
        sent and the timeout path interrupts the kernel out of ``input()``.
        """
        content = request.get("content")
        prompt = content.get("prompt", "") if isinstance(content, Mapping) else ""
        with anyio.move_on_after(deadline - time.monotonic()):
            value = await self.host_tools.answer(str(prompt))
            session = self._open_session()
            await self._send(channel, input_reply(value, session=session.ws_session, parent=request))

    async def _receive(
        self,
        channel: KernelChannel,
        fold: ExecutionFold,
        deadline: float,
        request: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """The next message, or None at the deadline.

        Reconnects a dropped websocket (same session: the gateway replays what
        was missed), and checks the kernel over REST whenever the websocket has
        been silent for ``liveness_interval``: a deleted or dead kernel does not
        always say so on the websocket. Every wait takes what is left of
        ``deadline``. If the connection dropped before anything of ``request``
        came back, the request may never have reached the kernel: see
        :meth:`_resend_if_never_received`.
        """
        session = self._open_session()
        reconnects = 0
        while True:
            if self._pending:
                return self._pending.popleft()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            wait = min(remaining, self.liveness_interval)
            message: dict[str, Any] | None = None
            try:
                with anyio.move_on_after(wait):
                    message = await channel.receive()
            except ChannelLost as exc:
                if session.closing:
                    raise ExecutorStateError("the executor is closed") from exc
                session.dropped(f"the websocket closed: {exc}")
                reconnects += 1
                last_seen = channel.last_counter
                with anyio.move_on_after(deadline - time.monotonic()):
                    await self._reconnect_or_die(session, fold, reconnects)
                    if request is not None and not fold.acknowledged and channel.is_open:
                        await self._resend_if_never_received(channel, fold, request, last_seen)
                continue
            if message is not None:
                return message
            if wait < remaining:
                with anyio.move_on_after(deadline - time.monotonic()):
                    await self._check_alive(session, fold)

    async def _resend_if_never_received(
        self,
        channel: KernelChannel,
        fold: ExecutionFold,
        request: Mapping[str, Any],
        last_seen: tuple[str, int] | None,
    ) -> None:
        """Send ``request`` again if the kernel never received it; never run it twice.

        A request sent just before the connection dropped may be lost with
        it. The kernel numbers every message it sends, so a probe
        (``kernel_info_request``) tells: if every number between the last
        message seen before the drop and the probe's first answer is
        accounted for, the kernel never started the request (shell requests
        are handled in order, and a started one sends at least four
        messages). Gateways "nudge" a reconnected kernel with
        ``kernel_info_request``s of their own: each such request seen (by its
        status messages) accounts for three numbers (busy, reply, idle).
        Fewer than four numbers nobody saw cannot be the request either: had
        it started, its four messages (busy, execute_input, reply, idle)
        would all be among them, or one would have arrived. That leaves room
        for the kernel's greeting of a new IOPub subscription
        (``iopub_welcome``), which the gateway's own check takes. In doubt,
        nothing is sent again. Anything that arrives meanwhile is kept for
        the fold.
        """
        probe = kernel_info_request(session=self._open_session().ws_session)
        try:
            await channel.send(probe)
            while parent_msg_id(message := await channel.receive()) != msg_id_of(probe):
                self._pending.append(message)
                if fold.belongs(message):
                    return  # it did arrive
        except ChannelLost:
            return  # dropped again: the next receive reconnects and asks again
        unexplained = unaccounted_messages(last_seen, message, self._pending)
        if unexplained is not None and 0 <= unexplained < _STARTED_REQUEST_MESSAGES:
            logger.info("the request was lost with the connection; sending it again")
            with contextlib.suppress(ChannelLost):
                await channel.send(request)
        else:
            logger.info(
                "kernel messages unaccounted for after a reconnect (%s): not sending again", unexplained
            )

    async def _check_alive(self, session: KernelSession, fold: ExecutionFold) -> None:
        why = await session.check_alive()
        if why is not None:
            raise KernelDied(f"{why}; the next run uses a fresh kernel", fold.result())

    async def _reconnect_or_die(self, session: KernelSession, fold: ExecutionFold, attempt: int) -> None:
        await self._check_alive(session, fold)
        if attempt > _RECONNECT_ATTEMPTS:
            session.mark_lost("the websocket could not be reconnected")
            raise KernelDied("lost the kernel websocket and could not reconnect", fold.result())
        await anyio.sleep(0.05 * 2**attempt)
        logger.info("kernel websocket dropped; reconnecting with the same session to replay")
        try:
            await session.reconnect()
        except GatewayNotFound:
            session.mark_lost("the gateway no longer knows the kernel")
            raise KernelDied("the kernel is gone (the gateway no longer knows it)", fold.result()) from None
        except GatewayUnreachable as exc:
            logger.info("reconnecting failed (attempt %d): %s", attempt, exc)

    async def _recover(self, channel: KernelChannel, fold: ExecutionFold) -> RecoveryOutcome | None:
        """Interrupt the kernel and drain the request; say what became of the kernel.

        Bounded in time: the interrupt and the drain share one
        ``interrupt_grace``, and a websocket ping (is it the link or the
        kernel?) takes at most 1 s more. A kernel that stays busy, or died, is replaced in the
        background (:meth:`KernelSession.replace_soon`), so no caller waits for
        a new kernel. Returns None when there is nothing to do (or the
        executor is closing).
        """
        session = self._session
        if session is None or fold.done or session.closing:
            return None
        grace = time.monotonic() + self.interrupt_grace
        try:
            try:
                with anyio.fail_after(self.interrupt_grace):
                    if await session.interrupt():
                        fold.interrupted_by_message()
            except (GatewayUnreachable, TimeoutError) as exc:
                logger.warning("cannot reach the gateway to interrupt kernel %s: %r", session.kernel_id, exc)
                session.discard_connection("the gateway is unreachable")
                return RecoveryOutcome.UNREACHABLE
            while not fold.done and not fold.kernel_dead:
                message = await self._receive(channel, fold, grace)
                if message is None:
                    break
                fold.feed(message)
                fold.take_input_request()  # the interrupt ends input(): nothing to answer
            if fold.done and not fold.kernel_dead:
                return RecoveryOutcome.INTERRUPTED
            if not fold.kernel_dead and not await channel.ping(_LAST_LOOK):
                # Not the kernel: the link is dead (no pong). Keep the kernel.
                session.discard_connection("the websocket went dead")
                return RecoveryOutcome.UNREACHABLE
            why = "the kernel died" if fold.kernel_dead else "the kernel ignored an interrupt"
            logger.warning("%s (kernel %s); replacing it with a fresh kernel", why, session.kernel_id)
            session.replace_soon(why)
            return RecoveryOutcome.REPLACED
        except KernelDied as exc:
            session.replace_soon(str(exc))
            return RecoveryOutcome.REPLACED
        except (AsyncModalExecError, ChannelLost, TimeoutError) as exc:
            logger.warning(
                "recovering kernel %s failed (%r); the next run starts on a fresh kernel",
                session.kernel_id,
                exc,
            )
            session.mark_lost(f"recovery failed: {exc!r}")
            return RecoveryOutcome.DEFERRED

    async def ping(self) -> None:
        """Check over REST that the gateway answers and knows the kernel alive (one request).

        Raises:
            KernelDied: the kernel is gone or dead (the next run replaces it).
            GatewayError: the gateway did not answer properly.
            ExecutorStateError: not started, or closed.

        Cancelling the call abandons the request; nothing changes.
        """
        await self._check_alive(self._open_session(), ExecutionFold("ping"))

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
        running = self._running  # the execution this interrupt is for, taken before any await
        if await self._open_session().interrupt() and running is not None:
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

    # -- files -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _files_turn(self, timeout: float | None) -> AsyncIterator[files.HelperCall]:
        """Hold the kernel for one file operation; yield the call of its files helper.

        ``timeout`` covers the whole operation (None: no limit). A timeout
        raises :class:`ExecutionTimeout` like a run's.
        """
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive or None")
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        session = self._open_session()
        acquired = False
        try:
            async with session.turn(deadline=deadline) as channel:
                acquired = True
                if "files" not in session.prepared:
                    helper = files.helper_code(self.backend.work_dir)
                    await self._setup(channel, helper, deadline, "defining the files helper")
                    session.prepared.add("files")

                async def call(operation: str, args: tuple[Any, ...], chunk: bytes | None) -> dict[str, Any]:
                    metadata = None
                    if chunk is not None:
                        metadata = {files.CHUNK_KEY: base64.b64encode(chunk).decode("ascii")}
                    until = deadline
                    if operation == "abort":  # cleaning up, also after the deadline: briefly, if at all
                        if session.state is not KernelState.CONNECTED or not channel.is_open:
                            return {}
                        until = time.monotonic() + min(_SETUP_TIMEOUT, self.interrupt_grace)
                    code = files.call_code(operation, *args)
                    return files.answer_of(await self._internal(channel, code, until, metadata), operation)

                yield call
        except TimeoutError as exc:
            if acquired or isinstance(exc, ExecutionTimeout):
                raise
            outcome = RecoveryOutcome.NOT_STARTED
            raise ExecutionTimeout(
                f"the file operation timed out after {timeout} s; {outcome.describe()}",
                ExecutionResult(),
                recovery=outcome,
            ) from None

    async def upload(
        self,
        source: files.Source,
        remote_path: str,
        *,
        timeout: float | None = None,
    ) -> files.RemoteFile:
        """Write ``source`` (bytes, a local file's path, or an async iterable of bytes) to ``remote_path``.

        ``remote_path`` is relative to the sandbox's work directory (or
        absolute inside it); missing directories are created. The file is
        sent in chunks of ``file_chunk_bytes`` (memory stays flat whatever its
        size), written under a temporary name and renamed into place only
        when its SHA-256 matches: a reader never sees half a file.

        Returns:
            The file as the sandbox sees it (:class:`RemoteFile`).

        Raises:
            RemotePathRefused: the path leads outside the work directory.
            ChecksumMismatch: the bytes that arrived differ (nothing is written).
            RemoteFileError: the sandbox refused (a directory there, disk full, ...).
            FileNotFoundError: the local ``source`` does not exist.
            ExecutionTimeout: ``timeout`` (seconds for the whole transfer) expired.

        Cancelling the call (or any failure) stops the transfer and removes
        the temporary file; an existing file at ``remote_path`` is untouched.
        """
        async with self._files_turn(timeout) as call:
            return await files.upload(call, source, remote_path, self.file_chunk_bytes)

    @overload
    async def download(self, remote_path: str, *, timeout: float | None = None) -> bytes: ...

    @overload
    async def download(
        self, remote_path: str, local_path: str | os.PathLike[str], *, timeout: float | None = None
    ) -> files.RemoteFile: ...

    async def download(
        self,
        remote_path: str,
        local_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> bytes | files.RemoteFile:
        """Read ``remote_path`` from the sandbox: its bytes, or into ``local_path``.

        With ``local_path`` the file is streamed to disk in chunks (memory
        stays flat) under a temporary name, renamed into place once its
        SHA-256 matches the one the kernel computed; the result is then the
        :class:`RemoteFile` read. Without it, the bytes are returned (the
        whole file in memory).

        Raises:
            RemoteFileNotFound: no such file.
            RemotePathRefused: the path leads outside the work directory.
            ChecksumMismatch: the bytes that arrived differ (``local_path`` is untouched).
            RemoteFileError: the sandbox refused (a directory, no permission, ...).
            ExecutionTimeout: ``timeout`` (seconds for the whole transfer) expired.

        Cancelling the call stops the transfer; a partial local file is removed.
        """
        async with self.reading(remote_path, timeout=timeout) as (info, chunks):
            if local_path is None:
                return b"".join([chunk async for chunk in chunks])
            target = anyio.Path(local_path)
            temporary = target.with_name(f".{target.name}.{new_msg_id()}.part")
            try:
                async with await anyio.open_file(temporary, "wb") as handle:
                    async for chunk in chunks:
                        await handle.write(chunk)
                await temporary.replace(target)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await temporary.unlink(missing_ok=True)
                raise
        return info

    @contextlib.asynccontextmanager
    async def reading(
        self, remote_path: str, *, timeout: float | None = None
    ) -> AsyncIterator[tuple[files.RemoteFile, AsyncIterator[bytes]]]:
        """Open ``remote_path`` for streaming: ``async with ex.reading(p) as (info, chunks)``.

        ``info`` is known (and errors are raised) before the first chunk is
        read; ``chunks`` yields the bytes in pieces of ``file_chunk_bytes`` and
        ends with :class:`ChecksumMismatch` if they differ from what the kernel
        read. The kernel is held for the block: other runs wait until it ends.

        Raises:
            RemoteFileNotFound, RemotePathRefused, RemoteFileError: as :meth:`download`.

        Leaving the block early (or cancelling it) closes the file in the kernel.
        """
        async with self._files_turn(timeout) as call:
            info, chunks = await files.begin_download(call, remote_path, self.file_chunk_bytes)
            async with aclosing(chunks):
                yield info, chunks

    async def stat(self, remote_path: str, *, timeout: float | None = None) -> files.RemoteFile:
        """What ``remote_path`` is in the sandbox (symlinks followed, within the work directory).

        Raises:
            RemoteFileNotFound: no such file or directory.
            RemotePathRefused: the path leads outside the work directory.

        Cancelling the call abandons it (nothing changes).
        """
        async with self._files_turn(timeout) as call:
            return files.RemoteFile.from_answer(await call("stat_path", (remote_path,), None))

    async def listdir(self, remote_dir: str = ".", *, timeout: float | None = None) -> list[files.RemoteFile]:
        """The entries of ``remote_dir`` in the sandbox, sorted by name (symlinks listed, not followed).

        Raises:
            RemoteFileNotFound: no such directory.
            RemotePathRefused: the path leads outside the work directory.
            RemoteFileError: not a directory, or the sandbox refused.

        Cancelling the call abandons the listing (nothing changes).
        """
        async with self._files_turn(timeout) as call:
            answer = await call("listdir", (remote_dir,), None)
        return [files.RemoteFile.from_answer(entry) for entry in answer["entries"]]

    async def remove(
        self, remote_path: str, *, recursive: bool = False, timeout: float | None = None
    ) -> None:
        """Delete a file, a symlink (not what it points to) or a directory in the sandbox.

        A directory must be empty unless ``recursive``. The work directory
        itself cannot be removed.

        Raises:
            RemoteFileNotFound: no such file.
            RemotePathRefused: the path leads outside the work directory (or is it).
            RemoteFileError: a non-empty directory without ``recursive``, or the sandbox refused.

        Cancelling the call may leave a recursive removal half done.
        """
        async with self._files_turn(timeout) as call:
            await call("remove", (remote_path, recursive), None)

    # -- packages --------------------------------------------------------------------

    async def install(
        self,
        requirements: Sequence[str | packages.Requirement],
        *,
        timeout: float | None = 600.0,
        on_output: Callable[[str], None] | None = None,
    ) -> packages.InstallReport:
        """Make ``requirements`` (installer specs: ``"pandas>=2"``) importable in the sandbox.

        One probe asks the kernel which are already satisfied (the
        distribution is installed at a version the spec allows); the missing
        ones are installed in one command, with ``uv pip`` where the sandbox
        has ``uv``, else pip, in the kernel's own interpreter (a jailed local
        kernel has no network: its packages are installed from the host into
        the backend's package directory). What this executor installed or
        found is remembered, so asking again costs nothing.

        Args:
            requirements: the specs.
            timeout: seconds for the probe and the installer together (None: no limit).
            on_output: called on the loop with each piece of the installer's
                output as it is written (it must not block).

        Returns:
            An :class:`InstallReport`: what was installed, what was already there.

        Raises:
            PackageInstallError: the installer failed (the message names the packages).
            ExecutionTimeout: ``timeout`` expired (the installer is interrupted).

        Cancelling the call interrupts the probe or the installer (like a
        cancelled :meth:`run`); nothing is recorded as installed, so the next
        call probes again.
        """
        return await packages.install(self, requirements, timeout=timeout, on_output=on_output)
