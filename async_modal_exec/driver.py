"""The execution driver: one request sent, its messages moved from the websocket into the fold.

An :class:`ExecutionRun` holds everything of one request: the fold, its
:class:`~async_modal_exec.deadline.Deadline`, the messages read ahead after a
reconnect. It talks to the kernel only through two small interfaces,
:class:`KernelLink` (the session: reconnect, interrupt, liveness, what becomes
of the kernel) and :class:`Transport` (the websocket: send, receive, ping), so
its recovery paths can be driven by a scripted transport in unit tests as well
as through real sockets. What to do when a run is cut short is
:mod:`~async_modal_exec.recovery`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from ._shield import run_shielded
from .channel import ChannelLost
from .deadline import Deadline, timed_out
from .errors import ExecutorStateError, GatewayNotFound, GatewayUnreachable
from .fold import ExecutionFold, unaccounted_messages
from .protocol import execute_request, input_reply, kernel_info_request, msg_id_of, parent_msg_id
from .recovery import recover
from .results import Event, KernelDied, RecoveryOutcome
from .transport import KernelLink, Transport

logger = logging.getLogger("async_modal_exec.executor")

__all__ = ["DriverSettings", "ExecutionRun"]

RECONNECT_ATTEMPTS = 3
IOPUB_GRACE = 3.0  # after the execute_reply, how long IOPub may stay silent before idle
# What a started execute_request sends at least (busy, execute_input, execute_reply, idle).
STARTED_REQUEST_MESSAGES = 4


@dataclass(frozen=True)
class DriverSettings:
    """What an executor's configuration says about driving one request.

    Attributes:
        liveness_interval: after this many silent seconds the kernel is checked over REST.
        interrupt_grace: how long the recovery of a cut-short run may take.
        answer_input: answers an ``input_request`` (host tools): prompt -> reply
            (None: the request does not allow stdin).
        store_history: the user's code goes into the kernel's history.
    """

    liveness_interval: float
    interrupt_grace: float
    answer_input: Callable[[str], Awaitable[str]] | None = None
    store_history: bool = False


class ExecutionRun:
    """One ``execute_request`` on a held kernel turn, from send to idle (or to its recovery).

    ``internal`` code (the package's own) is kept out of the kernel's history;
    ``metadata`` goes in the request's metadata (data the code reads);
    ``what`` names the operation in a timeout.
    """

    def __init__(
        self,
        link: KernelLink,
        channel: Transport,
        fold: ExecutionFold,
        deadline: Deadline,
        settings: DriverSettings,
        *,
        metadata: Mapping[str, Any] | None = None,
        internal: bool = False,
        what: str = "execution",
    ) -> None:
        self.link = link
        self.channel = channel
        self.fold = fold
        self.deadline = deadline
        self.settings = settings
        self.metadata = metadata
        self.internal = internal
        self.what = what  # the operation's name in a timeout
        # Messages read ahead while probing after a reconnect.
        self.pending: collections.deque[dict[str, Any]] = collections.deque()

    async def events(self, code: str) -> AsyncGenerator[Event, None]:
        """Send ``code`` and yield its events until the kernel goes idle.

        Raises:
            ExecutionTimeout: the deadline expired (after the recovery, which it names).
            KernelDied: the kernel died, or the websocket could not be reconnected.
            ExecutorStateError: the executor was closed meanwhile.

        Cancelled, left early, or failing, the run recovers the kernel first
        (shielded: see :func:`~async_modal_exec.recovery.recover`).
        """
        fold, link = self.fold, self.link
        request = execute_request(
            code,
            session=link.ws_session,
            store_history=self.settings.store_history and not self.internal,
            allow_stdin=self.settings.answer_input is not None,
            msg_id=fold.msg_id,
            metadata=self.metadata,
        )
        link.running = fold
        try:
            await self.send(request)
            quiet_from: float | None = None  # once replied: when the last message came
            while not fold.done:
                until = (
                    self.deadline.at
                    if quiet_from is None
                    else min(self.deadline.at, quiet_from + IOPUB_GRACE)
                )
                message = await self.receive(until, request)
                if message is None:
                    if quiet_from is not None and not self.deadline.expired:
                        # Like nbclient's iopub_timeout: the kernel answered on
                        # shell, but its idle status never came on IOPub.
                        logger.warning("kernel %s replied but never went idle on IOPub", link.kernel_id)
                        for event in fold.assume_done():  # the closing marker, if output was cut
                            yield event
                    break
                events = fold.feed(message)
                if fold.kernel_dead:
                    link.mark_lost("the kernel died during an execution")
                    raise KernelDied(
                        "the kernel died during the execution; the next run uses a fresh kernel",
                        fold.result(),
                    )
                pending = fold.take_input_request()
                if pending is not None:
                    await self._answer_input(pending)
                for event in events:
                    yield event
                if fold.replied:
                    quiet_from = time.monotonic()
        except KernelDied:
            link.running = None
            raise
        except BaseException as exc:
            link.running = None
            # Cancelled, the consumer left early, or the connection failed:
            # bring the kernel back to idle before anyone else uses it.
            if link.closing and isinstance(exc, Exception):
                raise ExecutorStateError("the executor was closed while the execution ran") from exc
            outcome = await run_shielded(self.recover())
            if outcome is not None:
                logger.info("execution stopped (%r); %s", exc, outcome.describe())
            raise
        link.running = None
        if not fold.done:
            outcome = await run_shielded(self.recover())
            if outcome is None:
                raise ExecutorStateError("the executor was closed while the execution ran")
            error = timed_out(self.deadline, fold.result(), outcome, self.what)
            logger.info("%s", error)
            raise error

    async def recover(self) -> RecoveryOutcome | None:
        """Bring the kernel back to idle after this run was cut short (:func:`.recovery.recover`)."""
        return await recover(self.link, self.channel, self.fold, self.receive, self.settings.interrupt_grace)

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one message; a websocket found closed is reopened (same session) and the send retried once.

        Raises:
            ExecutorStateError: closed meanwhile.
            GatewayError: the websocket cannot be reopened, or fails again.
        """
        try:
            await self.channel.send(message)
            return
        except ChannelLost as exc:
            if self.link.closing:
                raise ExecutorStateError("the executor is closed") from exc
            self.link.dropped(f"sending failed: {exc}")
        await self.link.reconnect()
        try:
            await self.channel.send(message)
        except ChannelLost as exc:
            self.link.dropped(f"sending failed again: {exc}")
            raise GatewayUnreachable(f"cannot send to the kernel websocket: {exc}") from exc

    async def _answer_input(self, request: Mapping[str, Any]) -> None:
        """Answer the kernel's ``input_request``: a host-tool call (or EOF for plain ``input()``).

        The call counts toward the run's deadline; past it, no answer is sent
        and the timeout path interrupts the kernel out of ``input()``.
        """
        answer = self.settings.answer_input
        if answer is None:
            return
        content = request.get("content")
        prompt = content.get("prompt", "") if isinstance(content, Mapping) else ""
        with anyio.move_on_after(self.deadline.remaining()):
            value = await answer(str(prompt))
            await self.send(input_reply(value, session=self.link.ws_session, parent=request))

    async def receive(self, until: float, request: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The next message, or None at ``until`` (a ``time.monotonic()`` time).

        Reconnects a dropped websocket (same session: the gateway replays what
        was missed), and checks the kernel over REST whenever the websocket has
        been silent for ``liveness_interval``: a deleted or dead kernel does not
        always say so on the websocket. If the connection dropped before
        anything of ``request`` came back, the request may never have reached
        the kernel: see :meth:`_resend_if_never_received`.
        """
        reconnects = 0
        while True:
            if self.pending:
                return self.pending.popleft()
            remaining = until - time.monotonic()
            if remaining <= 0:
                return None
            wait = min(remaining, self.settings.liveness_interval)
            message: dict[str, Any] | None = None
            try:
                with anyio.move_on_after(wait):
                    message = await self.channel.receive()
            except ChannelLost as exc:
                if self.link.closing:
                    raise ExecutorStateError("the executor is closed") from exc
                self.link.dropped(f"the websocket closed: {exc}")
                reconnects += 1
                last_seen = self.channel.last_counter
                with anyio.move_on_after(until - time.monotonic()):
                    await self._reconnect_or_die(reconnects)
                    if request is not None and not self.fold.acknowledged and self.channel.is_open:
                        await self._resend_if_never_received(request, last_seen)
                continue
            if message is not None:
                return message
            if wait < remaining:
                with anyio.move_on_after(until - time.monotonic()):
                    await self.check_alive()

    async def _resend_if_never_received(
        self, request: Mapping[str, Any], last_seen: tuple[str, int] | None
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
        probe = kernel_info_request(session=self.link.ws_session)
        try:
            await self.channel.send(probe)
            while parent_msg_id(message := await self.channel.receive()) != msg_id_of(probe):
                self.pending.append(message)
                if self.fold.belongs(message):
                    return  # it did arrive
        except ChannelLost:
            return  # dropped again: the next receive reconnects and asks again
        unexplained = unaccounted_messages(last_seen, message, self.pending)
        if unexplained is not None and 0 <= unexplained < STARTED_REQUEST_MESSAGES:
            logger.info("the request was lost with the connection; sending it again")
            with contextlib.suppress(ChannelLost):
                await self.channel.send(request)
        else:
            logger.info(
                "kernel messages unaccounted for after a reconnect (%s): not sending again", unexplained
            )

    async def check_alive(self) -> None:
        """Raise :class:`KernelDied` if the gateway says the kernel is gone or dead."""
        why = await self.link.check_alive()
        if why is not None:
            raise KernelDied(f"{why}; the next run uses a fresh kernel", self.fold.result())

    async def _reconnect_or_die(self, attempt: int) -> None:
        await self.check_alive()
        if attempt > RECONNECT_ATTEMPTS:
            self.link.mark_lost("the websocket could not be reconnected")
            raise KernelDied("lost the kernel websocket and could not reconnect", self.fold.result())
        await anyio.sleep(0.05 * 2**attempt)
        logger.info("kernel websocket dropped; reconnecting with the same session to replay")
        try:
            await self.link.reconnect()
        except GatewayNotFound:
            self.link.mark_lost("the gateway no longer knows the kernel")
            raise KernelDied(
                "the kernel is gone (the gateway no longer knows it)", self.fold.result()
            ) from None
        except GatewayUnreachable as exc:
            logger.info("reconnecting failed (attempt %d): %s", attempt, exc)
