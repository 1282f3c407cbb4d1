"""Recovery of a kernel whose execution was cut short (timeout, cancellation, a consumer that left).

:func:`recover` interrupts the kernel and drains the request until its idle
status, then says what became of the kernel (a
:class:`~async_modal_exec.RecoveryOutcome`). It is bounded by the recovery
budget of :mod:`~async_modal_exec.deadline`: the interrupt and the drain share
one ``interrupt_grace``, and a websocket ping (is it the link or the kernel?)
takes at most ``LAST_LOOK`` more. A kernel that stays busy, or died, is
replaced in the background, so no caller waits for a new kernel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from .channel import ChannelLost
from .deadline import LAST_LOOK
from .errors import AsyncModalExecError, GatewayUnreachable
from .fold import ExecutionFold
from .results import KernelDied, RecoveryOutcome
from .transport import KernelLink, Transport

logger = logging.getLogger("async_modal_exec.executor")

__all__ = ["recover"]


async def recover(
    link: KernelLink,
    channel: Transport,
    fold: ExecutionFold,
    receive: Callable[[float], Awaitable[dict[str, Any] | None]],
    grace: float,
) -> RecoveryOutcome | None:
    """Interrupt the kernel and drain ``fold``'s request; say what became of the kernel.

    ``receive(until)`` is the run's own receive (it reconnects a dropped
    websocket and notices a dead kernel); ``grace`` is ``interrupt_grace``.
    Returns None when there is nothing to do (the request is done, or the
    executor is closing).

    An interrupt sent as a message (a kernel whose spec asks for it) makes
    the kernel number one message the client never sees: it is credited to
    the fold, so the result reports no loss that did not happen.
    """
    if fold.done or link.closing:
        return None
    until = time.monotonic() + grace
    try:
        try:
            with anyio.fail_after(grace):
                if await link.interrupt():
                    fold.interrupted_by_message()
        except (GatewayUnreachable, TimeoutError) as exc:
            logger.warning("cannot reach the gateway to interrupt kernel %s: %r", link.kernel_id, exc)
            link.discard_connection("the gateway is unreachable")
            return RecoveryOutcome.UNREACHABLE
        while not fold.done and not fold.kernel_dead:
            message = await receive(until)
            if message is None:
                break
            fold.feed(message)
            fold.take_input_request()  # the interrupt ends input(): nothing to answer
        if fold.done and not fold.kernel_dead:
            return RecoveryOutcome.INTERRUPTED
        if not fold.kernel_dead and not await channel.ping(LAST_LOOK):
            # Not the kernel: the link is dead (no pong). Keep the kernel.
            link.discard_connection("the websocket went dead")
            return RecoveryOutcome.UNREACHABLE
        why = "the kernel died" if fold.kernel_dead else "the kernel ignored an interrupt"
        logger.warning("%s (kernel %s); replacing it with a fresh kernel", why, link.kernel_id)
        link.replace_soon(why)
        return RecoveryOutcome.REPLACED
    except KernelDied as exc:
        link.replace_soon(str(exc))
        return RecoveryOutcome.REPLACED
    except (AsyncModalExecError, ChannelLost, TimeoutError) as exc:
        logger.warning(
            "recovering kernel %s failed (%r); the next run starts on a fresh kernel", link.kernel_id, exc
        )
        link.mark_lost(f"recovery failed: {exc!r}")
        return RecoveryOutcome.DEFERRED
