"""KernelSession: one kernel on a gateway, its websocket, and every step of its lifecycle.

The kernel's lifecycle is one explicit state machine; :meth:`KernelSession._move`
is the only place the state changes, and it refuses a transition the table
does not allow::

    NEW ──open──> CREATING ──connected──> CONNECTED <──reconnect── DISCONNECTED
                     │                      │  └──idle close / websocket drop──┘
                  failed                    │
                     v                      │ died, vanished, ignored an interrupt,
                   LOST <───────────────────┘ could not be recovered, restart()
                     └──replace: delete it, then CREATING again
    any state but CLOSED ──close──> CLOSING ──> CLOSED

* ``CREATING`` covers the kernel creation (shielded: a cancellation never loses
  the new kernel's id), the websocket connection on a fresh Jupyter session id
  and the IOPub check (:meth:`KernelChannel.confirm_iopub`).
* ``DISCONNECTED``: the kernel is fine but its websocket is closed (closed
  while idle on purpose, or dropped). The next use reconnects with the same
  session id, so the gateway replays what was sent meanwhile.
* ``LOST``: the kernel cannot be trusted any more. The next use deletes it and
  creates a brand-new one. A delete that fails keeps the old id, so the next
  attempt (or :meth:`close`) deletes it: none is left on a shared gateway.
* ``CLOSING``: :meth:`close` closes the websocket first (a running execution
  stops at once with :class:`ExecutorStateError`), waits for a kernel creation
  in flight, then for the running operation to let go, then deletes the kernel.

One operation at a time holds the session (:meth:`turn`): an execution, a
restart, the idle close. Callers queue in call order.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from ._shield import Completion, wait_shielded
from .channel import KernelChannel
from .deadline import Deadline
from .errors import AsyncModalExecError, ExecutorStateError, GatewayError, GatewayNotFound
from .fold import ExecutionFold
from .gateway import GatewayClient
from .protocol import new_session_id

logger = logging.getLogger("async_modal_exec.session")

__all__ = ["KernelSession", "KernelState"]

CONFIRM_TIMEOUT = 30.0  # a new websocket: how long until the kernel's IOPub must answer
CLOSE_WAIT = 10.0  # close(): longest wait for a creation in flight, then for the running operation
REUSE_CHECK_AFTER = 1.0  # a websocket idle this long is pinged before the next request
PING_TIMEOUT = 1.0


class KernelState(enum.Enum):
    """Where one kernel session is in its lifecycle (see the module docstring)."""

    NEW = "new"
    CREATING = "creating"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    LOST = "lost"
    CLOSING = "closing"
    CLOSED = "closed"


_S = KernelState
ALLOWED: dict[KernelState, frozenset[KernelState]] = {
    _S.NEW: frozenset({_S.CREATING, _S.CLOSING}),
    _S.CREATING: frozenset({_S.CONNECTED, _S.LOST, _S.CLOSING}),
    _S.CONNECTED: frozenset({_S.DISCONNECTED, _S.LOST, _S.CLOSING}),
    _S.DISCONNECTED: frozenset({_S.CONNECTED, _S.LOST, _S.CLOSING}),
    _S.LOST: frozenset({_S.CREATING, _S.CLOSING}),
    _S.CLOSING: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}


class KernelSession:
    """Owns one kernel on a gateway: its id, its websocket, its Jupyter session id.

    Args:
        gateway: the REST client of the gateway (owned by the caller).
        kernel_name: kernel spec to start (None: the gateway's default).
        max_message_bytes: largest websocket message accepted (None: unlimited).
    """

    def __init__(
        self, gateway: GatewayClient, *, kernel_name: str | None, max_message_bytes: int | None
    ) -> None:
        self.gateway = gateway
        self.kernel_name = kernel_name
        self._interrupt_mode: str | None = None  # from the kernel spec, on the first interrupt
        self._max_message_bytes = max_message_bytes
        self._state = KernelState.NEW
        self.why = ""  # what caused the last transition (e.g. why the kernel is LOST)
        self._lock = anyio.Lock()
        self._kernel_id: str | None = None
        self._channel: KernelChannel | None = None
        self._ws_session = new_session_id()
        self._creation: asyncio.Future[None] | None = None
        self._closer = Completion(self._close)
        self._idle_watch: asyncio.Task[None] | None = None
        self._replacing: asyncio.Task[None] | None = None
        self.last_activity = time.monotonic()
        # Host-tool stubs defined in the current kernel; None: not even the bridge.
        self.stubbed: set[str] | None = None
        # What the executor set up in the current kernel (its environment, the files helper).
        self.prepared: set[str] = set()
        self.running: ExecutionFold | None = None  # the execution on the kernel now (for interrupt())

    # -- what it is ----------------------------------------------------------------

    @property
    def state(self) -> KernelState:
        """The current state."""
        return self._state

    @property
    def kernel_id(self) -> str | None:
        """The id of the current kernel (None before it is created, or once a replacement deleted it)."""
        return self._kernel_id

    @property
    def ws_session(self) -> str:
        """The Jupyter session id of the websocket (requests carry it)."""
        return self._ws_session

    @property
    def channel(self) -> KernelChannel | None:
        """The websocket of the current kernel, if one was made."""
        return self._channel

    @property
    def closing(self) -> bool:
        """True once :meth:`close` began."""
        return self._state in (KernelState.CLOSING, KernelState.CLOSED)

    def _move(self, to: KernelState, why: str = "") -> None:
        """The one place the state changes."""
        if to not in ALLOWED[self._state]:
            raise ExecutorStateError(f"kernel session cannot go from {self._state.value} to {to.value}")
        logger.debug("kernel %s: %s -> %s %s", self._kernel_id, self._state.value, to.value, why)
        self._state = to
        self.why = why

    # -- transitions -----------------------------------------------------------------

    async def open(self) -> None:
        """Create the kernel and connect to it (``NEW`` -> ``CONNECTED``).

        Raises:
            GatewayError: the gateway refused or failed; the session is ``LOST``
                (a kernel that was created is deleted by :meth:`close`).
            ExecutorStateError: closed meanwhile.

        Cancelling the call lets a kernel creation in flight finish (so its id
        is known and :meth:`close` deletes it) and leaves the session ``LOST``.
        """
        async with self._lock:
            if self._state is not KernelState.NEW:
                raise ExecutorStateError(f"kernel session already {self._state.value}")
            await self._create_and_connect("open")

    @asynccontextmanager
    async def turn(
        self, *, fresh: bool = False, deadline: Deadline | None = None
    ) -> AsyncIterator[KernelChannel]:
        """Hold the session for one operation and yield a connected websocket.

        Waits for the operations called before (FIFO). A ``DISCONNECTED``
        session reconnects; a ``LOST`` one (or any, with ``fresh``) gets a
        brand-new kernel first. A connection idle for a while is pinged
        before it is used, and replaced if the ping is not answered: a request
        sent into a dead link would be lost.

        Args:
            fresh: replace the kernel first (``restart()``).
            deadline: when the websocket must be ready (waiting for the turn
                included); None: no limit.

        Raises:
            TimeoutError: not ready by ``deadline``.
            ExecutorStateError: the session is closing or closed.
            GatewayError: reconnecting or replacing the kernel failed (the next
                turn tries again).

        Cancelling the call while it waits its turn changes nothing; during a
        replacement, the session stays ``LOST`` and the next turn finishes it.
        """
        deadline = deadline or Deadline.after(None)
        with anyio.fail_after(deadline.seconds()):
            await self._lock.acquire()
        try:
            self._check_usable()
            with anyio.fail_after(deadline.seconds()):
                if fresh:
                    self.mark_lost("restart requested")
                channel = await self._ready()
            yield channel
        finally:
            self.last_activity = time.monotonic()
            self._lock.release()

    def _check_usable(self) -> None:
        if self.closing:
            raise ExecutorStateError("the executor is closed")
        if self._state is KernelState.NEW:
            raise ExecutorStateError("the executor is not started: use 'async with' or await start()")

    async def _ready(self) -> KernelChannel:
        if self._state is KernelState.CONNECTED:
            channel = self._usable_channel()
            if not channel.is_open:
                self._move(KernelState.DISCONNECTED, "the websocket closed while idle")
            elif time.monotonic() - self.last_activity > REUSE_CHECK_AFTER and not await channel.ping(
                PING_TIMEOUT
            ):
                self.discard_connection(f"no pong within {PING_TIMEOUT} s after idling")
        if self._state is KernelState.DISCONNECTED:
            try:
                await self.reconnect()
            except GatewayNotFound:
                self.mark_lost("the gateway no longer knows the kernel")
                logger.warning("kernel %s is gone; starting a fresh kernel", self._kernel_id)
        if self._state is KernelState.LOST:
            old = self._kernel_id
            await self.replace()
            logger.info("kernel %s replaced by a fresh kernel %s", old, self._kernel_id)
        return self._usable_channel()

    def _usable_channel(self) -> KernelChannel:
        if self.closing:
            raise ExecutorStateError("the executor is closed")
        assert self._channel is not None, self._state
        return self._channel

    async def _create_and_connect(self, why: str) -> None:
        """``CREATING``: a new kernel, a websocket on a new session id, IOPub confirmed."""
        self._move(KernelState.CREATING, why)
        try:
            await self._create_kernel()
            self.stubbed = None
            self.prepared = set()
            # A new session makes the gateway build new kernel streams instead
            # of replaying a buffer meant for another.
            self._ws_session = new_session_id()
            assert self._kernel_id is not None
            self._channel = KernelChannel(
                self.gateway.websocket_url(self._kernel_id, self._ws_session),
                headers=self.gateway.endpoint.headers,
                ssl_context=self.gateway.endpoint.ssl,
                max_message_bytes=self._max_message_bytes,
            )
            await self._channel.open()
            await self._channel.confirm_iopub(session=self._ws_session, timeout=CONFIRM_TIMEOUT)
        except BaseException as exc:
            if self._state is KernelState.CREATING:
                self._move(KernelState.LOST, f"creating the kernel failed: {exc!r}")
            if self.closing and isinstance(exc, AsyncModalExecError):
                raise ExecutorStateError("the executor was closed while its kernel started") from exc
            raise
        if self.closing:  # close() ran meanwhile; it deletes the kernel
            raise ExecutorStateError("the executor was closed while its kernel started")
        self._move(KernelState.CONNECTED, f"kernel {self._kernel_id} ready")

    async def _create_kernel(self) -> None:
        # The id is chosen here and known before the request: if the answer
        # is lost (the connection drops after the gateway acted), close() and
        # the next replacement still delete that kernel (a 404 is fine).
        chosen = str(uuid.uuid4())
        self._kernel_id = chosen

        async def create() -> None:
            # Shielded: a cancellation (or close()) that lands while the gateway
            # creates the kernel must not lose the id it answers with.
            try:
                self._kernel_id = await self.gateway.create_kernel(self.kernel_name, kernel_id=chosen)
            except GatewayError as exc:
                if exc.status is not None and 400 <= exc.status < 500:
                    self._kernel_id = None  # refused: nothing was created
                raise

        creation = self._creation = asyncio.ensure_future(create())
        try:
            await wait_shielded(creation)
        finally:
            self._creation = None
        creation.result()

    async def reconnect(self) -> None:
        """Reopen the websocket with the same session id (``DISCONNECTED`` -> ``CONNECTED``).

        The gateway replays what the kernel sent while it was closed.

        Raises:
            GatewayNotFound: the kernel is gone (the caller marks it lost).
            GatewayError: the websocket cannot be opened.

        Cancelling the call leaves the session ``DISCONNECTED``.
        """
        channel = self._usable_channel()
        await channel.open()
        self._move(KernelState.CONNECTED, "reconnected with the same session")

    def discard_connection(self, why: str) -> None:
        """Drop a websocket that cannot be trusted (-> ``DISCONNECTED``); the next turn reconnects."""
        if self._channel is not None:
            self._channel.abort()
        self.dropped(why)

    def replace_soon(self, why: str) -> None:
        """Mark the kernel lost and start replacing it in the background.

        The replacement is a task the session owns; it takes its turn like
        any operation, so a turn queued before it replaces the kernel itself.
        A failure is logged and leaves the session ``LOST`` (the next turn
        tries again). :meth:`close` stops it.
        """
        self.mark_lost(why)
        if self._state is KernelState.LOST and (self._replacing is None or self._replacing.done()):
            self._replacing = asyncio.create_task(self._replace_when_free())

    async def _replace_when_free(self) -> None:
        try:
            async with self._lock:
                if self._state is KernelState.LOST:
                    old = self._kernel_id
                    await self.replace()
                    logger.info("kernel %s replaced by a fresh kernel %s", old, self._kernel_id)
        except AsyncModalExecError as exc:
            logger.warning("replacing kernel %s failed: %s; the next run tries again", self._kernel_id, exc)

    def dropped(self, why: str) -> None:
        """The websocket closed under a running operation (``CONNECTED`` -> ``DISCONNECTED``)."""
        if self._state is KernelState.CONNECTED:
            self._move(KernelState.DISCONNECTED, why)

    def mark_lost(self, why: str) -> None:
        """The kernel cannot be trusted any more: the next turn replaces it."""
        if self._state in (KernelState.CREATING, KernelState.CONNECTED, KernelState.DISCONNECTED):
            self._move(KernelState.LOST, why)

    async def replace(self) -> None:
        """Delete the current kernel and start a brand-new one (``LOST`` -> ``CONNECTED``).

        Called with the session held (inside :meth:`turn`). The gateway's own
        in-place restart is not used: it answers before the new kernel process
        listens, so the streams of a websocket opened then connect later, each
        on its own ZeroMQ reconnect timer, and an ``input_request`` sent before
        the stdin stream connects is dropped (a host-tool call then waited
        forever, seen once in CI). A created kernel listens before the gateway
        completes its websocket.

        Raises:
            GatewayError: the delete or the creation failed; the session stays
                ``LOST`` (a failed delete keeps the old id, so nothing is orphaned).
            ExecutorStateError: closed meanwhile.

        Cancelling the call leaves the session ``LOST``; the next turn finishes the job.
        """
        self.mark_lost("replacing the kernel")
        if self._state is not KernelState.LOST:
            raise ExecutorStateError(f"cannot replace a kernel session that is {self._state.value}")
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.aclose()
        if self._kernel_id is not None:
            await self.gateway.delete_kernel(self._kernel_id)  # already gone: fine
            self._kernel_id = None
        await self._create_and_connect("replacing the kernel")

    def watch_idle(self, idle: float) -> None:
        """Close the websocket after ``idle`` quiet seconds (the next turn reopens it).

        The watcher is a task the session owns; :meth:`close` ends it.
        """
        if self._idle_watch is None and not self.closing:
            self._idle_watch = asyncio.create_task(self._close_when_idle(idle))

    async def _close_when_idle(self, idle: float) -> None:
        while True:
            quiet = time.monotonic() - self.last_activity
            if quiet < idle or self._state is not KernelState.CONNECTED:
                await anyio.sleep(idle - quiet if quiet < idle else idle)
                continue
            async with self._lock:
                quiet = time.monotonic() - self.last_activity
                if quiet >= idle and self._state is KernelState.CONNECTED and self._channel is not None:
                    await self._channel.aclose()
                    self._move(KernelState.DISCONNECTED, f"idle for {quiet:.0f} s")

    async def interrupt(self) -> bool:
        """Interrupt what the kernel runs (REST; does not wait for the session).

        Returns whether the interrupt was a message (the kernel's reply then
        goes to the gateway: see :meth:`ExecutionFold.interrupted_by_message`).

        Raises:
            ExecutorStateError: not started, or closed.
            GatewayError: the gateway refused or failed the interrupt.
        """
        self._check_usable()
        assert self._kernel_id is not None
        await self.gateway.interrupt_kernel(self._kernel_id)
        if self._interrupt_mode is None:
            # After the interrupt, best effort and briefly: it only decides
            # how a reply we never see is counted.
            self._interrupt_mode = "signal"
            with contextlib.suppress(AsyncModalExecError, TimeoutError), anyio.fail_after(2):
                self._interrupt_mode = await self.gateway.interrupt_mode(self.kernel_name)
        return self._interrupt_mode == "message"

    async def check_alive(self) -> str | None:
        """Ask the gateway about the kernel; if it is gone or dead, mark it lost and say why.

        Raises:
            ExecutorStateError: not started, or closed.
            GatewayError: the gateway did not answer properly.
        """
        self._check_usable()
        assert self._kernel_id is not None
        try:
            model = await self.gateway.get_kernel(self._kernel_id)
        except GatewayNotFound:
            why = "the kernel is gone (the gateway no longer knows it)"
        else:
            if model.get("execution_state") != "dead":
                return None
            why = "the gateway reports the kernel dead"
        self.mark_lost(why)
        return why

    async def close(self) -> None:
        """Close the websocket, then delete the kernel (-> ``CLOSED``). Safe to call twice.

        A running operation is stopped by closing its websocket (it raises
        :class:`ExecutorStateError`); a kernel creation in flight is waited for
        and its kernel deleted. Each wait is bounded (10 s); a kernel that
        cannot be deleted is logged.

        Runs to completion when cancelled; the cancellation is re-raised after.
        A close that was itself cut short (its task cancelled, as ``asyncio.run``
        does to every task when it ends) is finished by the next call.
        """
        if self._state is KernelState.CLOSED:
            return
        if self._state is not KernelState.CLOSING:
            self._move(KernelState.CLOSING, "close requested")
        await self._closer.run()

    async def _close(self) -> None:
        """The steps of :meth:`close`; each can run again after a cut-short attempt."""
        for task in (self._idle_watch, self._replacing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._idle_watch = self._replacing = None
        if self._channel is not None:
            await self._channel.close_for_good()  # wakes a running execution
        creation = self._creation
        if creation is not None:
            await asyncio.wait({creation}, timeout=CLOSE_WAIT)
        held = False
        with anyio.move_on_after(CLOSE_WAIT):
            await self._lock.acquire()
            held = True
        try:
            if self._channel is not None:  # a replacement may have made a new one meanwhile
                await self._channel.close_for_good()
            if self._kernel_id is not None:
                with anyio.move_on_after(CLOSE_WAIT):
                    try:
                        await self.gateway.delete_kernel(self._kernel_id)
                        self._kernel_id = None
                    except AsyncModalExecError as exc:
                        logger.warning("could not delete kernel %s: %s", self._kernel_id, exc)
        finally:
            if held:
                self._lock.release()
        self._move(KernelState.CLOSED, "closed")
