"""AsyncExecutor: the one async core that runs code in a remote kernel."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import math
import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import aclosing
from typing import Any

import anyio

# anyio imports its asyncio backend on first use: a ~40 ms import that would
# otherwise run inside the event loop when the first executor is created.
import anyio._backends._asyncio  # isort: skip

from ._shield import run_shielded
from .backends.base import Backend
from .channel import ChannelLost, KernelChannel
from .errors import (
    AsyncModalExecError,
    ExecutionError,
    ExecutionTimeout,
    ExecutorStateError,
    GatewayError,
    GatewayNotFound,
    KernelDied,
    ProtocolError,
)
from .gateway import GatewayClient
from .host_tools import HostTools
from .protocol import (
    ExecutionFold,
    execute_request,
    input_reply,
    kernel_died,
    msg_id_of,
    msg_type_of,
    new_session_id,
)
from .results import Event, ExecutionResult

logger = logging.getLogger("async_modal_exec.executor")
startup_logger = logging.getLogger("async_modal_exec.startup")

__all__ = ["AsyncExecutor"]

DEFAULT_MAX_OUTPUT_CHARS = 10_000_000
DEFAULT_MAX_MESSAGE_BYTES = 512 * 2**20
_RECONNECT_ATTEMPTS = 3
_CLEANUP_TIMEOUT = 10.0
_IOPUB_GRACE = 3.0  # after the execute_reply, how long IOPub may stay silent before idle
_IOPUB_CONFIRM_TIMEOUT = 30.0  # a new websocket: how long until the kernel's IOPub must answer


class _State(enum.Enum):
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
    carry the partial result.

    Args:
        backend: provides the gateway; default: a new
            :class:`~async_modal_exec.LocalBackend`.
        owns_backend: close the backend in :meth:`aclose` (default True).
        timeout: default timeout of :meth:`run` / :meth:`stream`, seconds (None: no limit).
        interrupt_grace: how long an interrupted kernel gets to come back
            before it is restarted.
        max_output_chars: cap on stdout + stderr characters kept per execution
            (None: no cap); the rest is dropped with a visible marker.
        store_history: passed to the kernel (``True`` numbers executions like a notebook).
        ready_timeout: how long the gateway may take to answer after the backend started.
        kernel_name: kernel spec to start (None: the gateway's default).
        max_message_bytes: largest websocket message accepted (None: unlimited).
        liveness_interval: after this many seconds without a message during an
            execution, the kernel is checked over REST (a deleted kernel is
            reported as :class:`~async_modal_exec.KernelDied` this soon).
        host_tools: tools that run on the host and are called from the
            sandboxed code (see :class:`~async_modal_exec.HostTools`): a
            ``HostTools``, a mapping ``{name: tool}`` or a list of tools.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        owns_backend: bool = True,
        timeout: float | None = None,
        interrupt_grace: float = 5.0,
        max_output_chars: int | None = DEFAULT_MAX_OUTPUT_CHARS,
        store_history: bool = False,
        ready_timeout: float = 120.0,
        kernel_name: str | None = None,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        liveness_interval: float = 2.0,
        host_tools: HostTools | Mapping[str, Any] | Iterable[Any] | None = None,
    ) -> None:
        if backend is None:
            from .backends.local import LocalBackend

            backend = LocalBackend()
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive or None")
        if interrupt_grace <= 0:
            raise ValueError("interrupt_grace must be positive")
        self.backend = backend
        self._owns_backend = owns_backend
        self.default_timeout = timeout
        self.interrupt_grace = interrupt_grace
        self.max_output_chars = max_output_chars
        self.store_history = store_history
        self.ready_timeout = ready_timeout
        self.kernel_name = kernel_name
        self._max_message_bytes = max_message_bytes
        self.liveness_interval = liveness_interval
        self._state = _State.UNOPENED
        self._lock = anyio.Lock()
        self._gateway: GatewayClient | None = None
        self._channel: KernelChannel | None = None
        self._kernel_id: str | None = None
        self._session_id = new_session_id()
        self._kernel_suspect = False
        self._idle_watch: asyncio.Task[None] | None = None
        self._last_activity = time.monotonic()
        self.startup_timings: dict[str, float] = {}
        self.host_tools = host_tools if isinstance(host_tools, HostTools) else HostTools(host_tools or ())
        self._stubbed: set[str] | None = None  # host-tool stubs defined in the current kernel

    # -- lifecycle -----------------------------------------------------------------

    @property
    def kernel_id(self) -> str | None:
        """The id of the current kernel (None before start)."""
        return self._kernel_id

    @property
    def state(self) -> str:
        """``"unopened"``, ``"starting"``, ``"open"`` or ``"closed"``."""
        return self._state.value

    async def start(self) -> AsyncExecutor:
        """Start the backend, wait for the gateway, create the kernel, connect.

        Raises:
            ExecutorStateError: already started or closed.
            BackendError, GatewayError: the sandbox or gateway failed.

        Cancelling the call (or any failure) tears down everything started so
        far, shielded from the cancellation, and leaves the executor closed.
        """
        if self._state is not _State.UNOPENED:
            raise ExecutorStateError(f"cannot start an executor that is {self._state.value}")
        self._state = _State.STARTING
        try:
            began = time.monotonic()
            endpoint = await self.backend.start()
            self._phase("backend", began)
            began = time.monotonic()
            self._gateway = GatewayClient(endpoint)
            await self._gateway.wait_ready(self.ready_timeout)
            self._phase("gateway_ready", began)
            began = time.monotonic()
            await self._new_kernel()
            self._phase("kernel_created", began)
        except BaseException:
            await self._teardown()
            raise
        self._state = _State.OPEN
        if self.backend.idle_disconnect is not None:
            self._idle_watch = asyncio.create_task(self._close_when_idle(self.backend.idle_disconnect))
        return self

    def _phase(self, name: str, began: float) -> None:
        self.startup_timings[name] = time.monotonic() - began
        startup_logger.info("%s: %.2f s", name.replace("_", " "), self.startup_timings[name])

    async def _close_when_idle(self, idle: float) -> None:
        """Close the websocket after ``idle`` quiet seconds; the next run reopens it."""
        while True:
            quiet = time.monotonic() - self._last_activity
            channel = self._channel
            if quiet < idle or channel is None or not channel.is_open:
                await anyio.sleep(idle - quiet if quiet < idle else idle)
                continue
            async with self._lock:
                if time.monotonic() - self._last_activity >= idle and channel.is_open:
                    logger.debug("closing the idle kernel websocket of kernel %s", self._kernel_id)
                    await channel.aclose()

    async def aclose(self) -> None:
        """Delete the kernel, close the websocket, close the backend if owned.

        Safe to call twice. Waits for a running execution to be interrupted
        rather than cutting it mid-message. Runs to completion even when the
        calling task is cancelled (the cancellation is re-raised afterwards).
        """
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        await self._teardown()

    async def __aenter__(self) -> AsyncExecutor:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _teardown(self) -> None:
        self._state = _State.CLOSED
        await run_shielded(self._teardown_unshielded())

    async def _teardown_unshielded(self) -> None:
        watch, self._idle_watch = self._idle_watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        with anyio.move_on_after(_CLEANUP_TIMEOUT):
            channel, self._channel = self._channel, None
            if channel is not None:
                await channel.aclose()
            gateway, self._gateway = self._gateway, None
            if gateway is not None:
                if self._kernel_id is not None:
                    try:
                        await gateway.delete_kernel(self._kernel_id)
                    except AsyncModalExecError as exc:
                        logger.debug("could not delete kernel %s: %s", self._kernel_id, exc)
                await gateway.aclose()
        if self._owns_backend:
            await self.backend.aclose()

    def _open_gateway(self) -> GatewayClient:
        if self._state is not _State.OPEN or self._gateway is None:
            if self._state is _State.CLOSED:
                raise ExecutorStateError("the executor is closed")
            raise ExecutorStateError("the executor is not started: use 'async with' or await start()")
        return self._gateway

    async def _new_kernel(self) -> None:
        """Create a kernel and connect a new websocket to it, with a new session id.

        The new session makes the gateway build new kernel streams instead of
        replaying a buffer meant for another; they are checked before any code
        is sent (see :meth:`KernelChannel.confirm_iopub`).
        """
        gateway = self._gateway
        assert gateway is not None
        if self._channel is not None:
            await self._channel.aclose()
            self._channel = None

        async def create() -> None:
            # Shielded and stored here: a cancellation landing while the
            # gateway creates the kernel must not lose its id, or nobody
            # would ever delete it (teardown deletes self._kernel_id).
            self._kernel_id = await gateway.create_kernel(self.kernel_name)

        await run_shielded(create())
        assert self._kernel_id is not None
        self._stubbed = None
        self._session_id = new_session_id()
        self._channel = KernelChannel(
            gateway.websocket_url(self._kernel_id, self._session_id),
            headers=gateway.endpoint.headers,
            ssl_context=gateway.endpoint.ssl,
            max_message_bytes=self._max_message_bytes,
        )
        await self._channel.open()
        await self._channel.confirm_iopub(session=self._session_id, timeout=_IOPUB_CONFIRM_TIMEOUT)
        self._kernel_suspect = False
        logger.debug("kernel %s ready", self._kernel_id)

    async def _replace_kernel(self) -> None:
        """Delete the current kernel and start a brand-new one, with a new websocket.

        This is how the executor restarts a kernel; the gateway's own restart is
        not used. That one answers before the new kernel process listens, so
        the streams of a websocket opened then connect later, each on its own
        ZeroMQ reconnect timer (measured: the first IOPub answer ~0.8 s after
        the restart returned). The stdin stream can come last, and an
        ``input_request`` the kernel sends before then is dropped: a host-tool
        call, and the run, would wait forever (seen once in CI). A created
        kernel is listening before the gateway completes its websocket.

        Until the new kernel is in place the executor counts its kernel as
        suspect, so an interrupted or failed replacement is finished by the
        next run. A delete that fails raises (GatewayError) before any new
        kernel exists: the old one is still ``kernel_id``, so the next attempt
        or :meth:`aclose` deletes it, and none is left on a shared gateway.
        """
        gateway = self._gateway
        assert gateway is not None
        self._kernel_suspect = True
        if self._kernel_id is not None:
            await gateway.delete_kernel(self._kernel_id)  # already gone: fine
        await self._new_kernel()

    async def _ensure_kernel(self) -> KernelChannel:
        """A connected channel to a live kernel with the host-tool stubs defined;
        a fresh kernel if the old one is gone."""
        self._open_gateway()
        assert self._kernel_id is not None
        if self._kernel_suspect or self._channel is None:
            # The kernel died, vanished or could not be recovered, or replacing
            # it failed halfway (no channel). The gateway may already have
            # restarted it under the same id, but a restart soon after start
            # moves it to new ports and can leave the gateway's streams talking
            # to the dead process (seen as a hung next run): replace it with a
            # brand-new kernel instead.
            old = self._kernel_id
            await self._replace_kernel()
            logger.info("kernel %s replaced by a fresh kernel %s", old, self._kernel_id)
        assert self._channel is not None
        await self._channel.open()
        await self._ensure_host_tools(self._channel)
        return self._channel

    # -- execution -----------------------------------------------------------------

    async def run(self, code: str, *, timeout: float | None = None) -> ExecutionResult:
        """Run ``code`` and return everything it produced.

        Args:
            code: Python source (IPython syntax works too).
            timeout: seconds; default: the executor's ``timeout``.

        Returns:
            The result. If the code raised, ``result.error`` says so and the
            output printed before the error is in ``result.stdout``.

        Raises:
            ExecutionTimeout: the timeout expired (also a ``TimeoutError``); the
                kernel was interrupted (or restarted if it did not come back).
            KernelDied: the kernel process died; the next call gets a fresh kernel.
            ExecutorStateError: not started, or closed.
            GatewayError: the gateway failed, or a replacement kernel died
                before it answered (the next run tries another).

        Cancelling the call interrupts the kernel (shielded, so the kernel is
        idle again before the cancellation propagates) and re-raises.
        """
        fold = await self._run_fold(code, timeout)
        return fold.result()

    async def _run_fold(self, code: str, timeout: float | None) -> ExecutionFold:
        async with self._lock:
            channel = await self._ensure_kernel()
            request, fold = self._request(code)
            try:
                async with aclosing(self._drive(channel, request, fold, self._timeout(timeout))) as events:
                    async for _ in events:
                        pass
            finally:
                self._last_activity = time.monotonic()
        return fold

    async def stream(self, code: str, *, timeout: float | None = None) -> AsyncGenerator[Event, None]:
        """Run ``code``, yielding stdout, stderr, display, result and error events as they arrive.

        Same errors as :meth:`run`. Leaving the loop early (``break``) or
        cancelling it interrupts the kernel; wrap the iterator in
        ``contextlib.aclosing`` so that happens at once rather than when the
        iterator is garbage-collected.
        """
        async with self._lock:
            channel = await self._ensure_kernel()
            request, fold = self._request(code)
            try:
                async with aclosing(self._drive(channel, request, fold, self._timeout(timeout))) as events:
                    async for event in events:
                        yield event
            finally:
                self._last_activity = time.monotonic()

    def _timeout(self, timeout: float | None) -> float | None:
        value = self.default_timeout if timeout is None else timeout
        if value is not None and value <= 0:
            raise ValueError("timeout must be positive or None")
        return value

    async def _ensure_host_tools(self, channel: KernelChannel) -> None:
        """Define the stubs of host tools the current kernel lacks (all of them after a restart)."""
        missing = [
            name for name in self.host_tools.names if self._stubbed is None or name not in self._stubbed
        ]
        if not missing:
            return
        # Off the loop: the first call reads and tokenizes source files (tens of ms).
        setup = functools.partial(self.host_tools.setup_code, missing, install_bridge=self._stubbed is None)
        code = await anyio.to_thread.run_sync(setup)
        request, fold = self._request(code)
        async with aclosing(self._drive(channel, request, fold, _CLEANUP_TIMEOUT)) as events:
            async for _ in events:
                pass
        result = fold.result()
        if result.error is not None:
            raise ExecutionError(
                f"defining the host tools in the kernel failed: {result.error.ename}: {result.error.evalue}",
                result,
            )
        self._stubbed = (self._stubbed or set()) | set(missing)

    def _request(self, code: str) -> tuple[dict[str, Any], ExecutionFold]:
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        request = execute_request(
            code,
            session=self._session_id,
            store_history=self.store_history,
            allow_stdin=bool(self.host_tools),
        )
        return request, ExecutionFold(msg_id_of(request), max_output_chars=self.max_output_chars)

    async def _drive(
        self,
        channel: KernelChannel,
        request: dict[str, Any],
        fold: ExecutionFold,
        timeout: float | None,
    ) -> AsyncGenerator[Event, None]:
        """Send ``request`` and yield its events until the kernel goes idle."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        try:
            await channel.send(request)
            quiet_from: float | None = None  # once replied: when the last message came
            while not fold.done:
                until = deadline if quiet_from is None else min(deadline, quiet_from + _IOPUB_GRACE)
                message = await self._receive(channel, fold, until)
                if message is None:
                    if quiet_from is not None and time.monotonic() < deadline:
                        # Like nbclient's iopub_timeout: the kernel answered on
                        # shell, but its idle status never came on IOPub.
                        logger.warning("kernel %s replied but never went idle on IOPub", self._kernel_id)
                        fold.assume_done()
                    break
                if msg_type_of(message) == "input_request" and fold.belongs(message):
                    await self._answer_input(channel, message, deadline)
                    continue
                for event in fold.feed(message):
                    yield event
                if fold.replied:
                    quiet_from = time.monotonic()
        except KernelDied:
            raise
        except BaseException:
            # Cancelled, the consumer left early, or the connection failed:
            # bring the kernel back to idle before anyone else uses it.
            await run_shielded(self._recover(channel, fold))
            raise
        if not fold.done:
            restarted = await run_shielded(self._recover(channel, fold))
            if restarted:
                how = (
                    "the kernel ignored the interrupt and was restarted as a fresh kernel (its state is lost)"
                )
            else:
                how = "the kernel was interrupted (its state is kept)"
            raise ExecutionTimeout(
                f"execution timed out after {timeout} s; {how}", fold.result(), restarted=restarted
            )

    async def _answer_input(self, channel: KernelChannel, request: dict[str, Any], deadline: float) -> None:
        """Answer the kernel's ``input_request``: a host-tool call (or EOF for plain ``input()``).

        The call counts toward the execution's deadline; past it, no answer is
        sent and the timeout path interrupts the kernel out of ``input()``.
        """
        content = request.get("content")
        prompt = content.get("prompt", "") if isinstance(content, Mapping) else ""
        with anyio.move_on_after(deadline - time.monotonic()):
            value = await self.host_tools.answer(str(prompt))
            await channel.send(input_reply(value, session=self._session_id, parent=request))

    async def _receive(
        self, channel: KernelChannel, fold: ExecutionFold, deadline: float
    ) -> dict[str, Any] | None:
        """The next message, or None at the deadline.

        Reconnects a dropped websocket (same session: the gateway replays what
        was missed), and checks the kernel over REST whenever the websocket has
        been silent for ``liveness_interval``: a deleted or dead kernel does not
        always say so on the websocket.
        """
        reconnects = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            wait = min(remaining, self.liveness_interval)
            message: dict[str, Any] | None = None
            try:
                with anyio.move_on_after(wait):
                    message = await channel.receive()
            except ChannelLost:
                reconnects += 1
                await self._reconnect_or_die(channel, fold, reconnects)
                continue
            if message is None:
                if wait < remaining:
                    await self._check_alive(fold)
                continue
            if kernel_died(message):
                self._kernel_suspect = True
                raise KernelDied(
                    "the kernel died during the execution; the next run uses a fresh kernel", fold.result()
                )
            return message

    async def _check_alive(self, fold: ExecutionFold) -> None:
        gateway = self._open_gateway()
        assert self._kernel_id is not None
        try:
            model = await gateway.get_kernel(self._kernel_id)
        except GatewayNotFound:
            self._kernel_suspect = True
            raise KernelDied("the kernel is gone (the gateway no longer knows it)", fold.result()) from None
        if model.get("execution_state") == "dead":
            self._kernel_suspect = True
            raise KernelDied("the gateway reports the kernel dead", fold.result())

    async def _reconnect_or_die(self, channel: KernelChannel, fold: ExecutionFold, attempt: int) -> None:
        await self._check_alive(fold)
        if attempt > _RECONNECT_ATTEMPTS:
            raise KernelDied("lost the kernel websocket and could not reconnect", fold.result())
        await anyio.sleep(0.05 * 2**attempt)
        logger.info("kernel websocket dropped; reconnecting with the same session to replay")
        await channel.open()
        self._kernel_suspect = False

    async def _recover(self, channel: KernelChannel, fold: ExecutionFold) -> bool:
        """Interrupt the kernel and drain our request; replace it if it stays busy.

        Returns True if the kernel had to be replaced (a fresh kernel: state lost).
        """
        if self._gateway is None or self._kernel_id is None or fold.done:
            return False
        try:
            await self._gateway.interrupt_kernel(self._kernel_id)
            grace = time.monotonic() + self.interrupt_grace
            while not fold.done:
                message = await self._receive(channel, fold, grace)
                if message is None:
                    break
                fold.feed(message)
            if fold.done:
                return False
            logger.warning(
                "kernel %s ignored the interrupt; replacing it with a fresh kernel", self._kernel_id
            )
            await self._replace_kernel()
            return True
        except (KernelDied, GatewayError, ChannelLost, ProtocolError) as exc:
            logger.warning("recovering kernel %s failed: %s", self._kernel_id, exc)
            self._kernel_suspect = True
            return True

    async def ping(self) -> None:
        """Check over REST that the gateway answers and knows the kernel alive (one request).

        Raises:
            KernelDied: the kernel is gone or dead (the next run replaces it).
            GatewayError: the gateway did not answer properly.
            ExecutorStateError: not started, or closed.

        Cancelling the call abandons the request; nothing changes.
        """
        await self._check_alive(ExecutionFold("ping"))

    async def interrupt(self) -> None:
        """Interrupt whatever the kernel is running (like Ctrl-C in a notebook).

        The running :meth:`run` then returns a result whose error is
        ``KeyboardInterrupt``. Does not wait for the execution lock.

        Raises:
            ExecutorStateError: not started, or closed.
            GatewayError: the gateway refused or failed the interrupt.

        Cancelling the call abandons the REST request; the interrupt may or
        may not have reached the kernel.
        """
        gateway = self._open_gateway()
        assert self._kernel_id is not None
        await gateway.interrupt_kernel(self._kernel_id)

    async def restart(self) -> None:
        """Start over on a brand-new kernel: all state is lost, ``kernel_id`` changes.

        Waits for the running execution to finish. The old kernel is deleted
        and a new one created (not the gateway's in-place restart, which can
        lose the first host-tool call: see ``_replace_kernel``); about as fast.

        Raises:
            ExecutorStateError: not started, or closed.
            GatewayError: the gateway failed; the next run tries again.

        Cancelling the call while it waits its turn changes nothing. Later, the
        old kernel may already be deleted; the next run then finishes the job
        and starts on a brand-new kernel.
        """
        async with self._lock:
            self._open_gateway()
            await self._replace_kernel()
