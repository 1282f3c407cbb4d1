"""One loop for "retire what has been idle too long" (pooled sandboxes, FastAPI sessions)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import anyio

logger = logging.getLogger("async_modal_exec.idle")

T = TypeVar("T")


async def retire_idle(
    max_idle: float,
    idle: Callable[[], Iterable[tuple[T, float]]],
    retire: Callable[[T, float], Awaitable[None]],
) -> None:
    """Every ``min(max_idle, 1)`` seconds, retire each item idle for ``max_idle`` seconds or more.

    Args:
        max_idle: seconds an item may stay idle.
        idle: yields ``(item, idle_since)`` (a ``time.monotonic()`` time) for
            the items that may be retired now, so items in use are left out.
            It is asked again after every retirement: an item taken into use
            while another was being retired is not retired.
        retire: ``retire(item, idle_seconds)``; it must take the item out of
            ``idle()`` before it first awaits. One that raises is logged and
            retried on the next round.

    Runs until cancelled. Cancelling it cancels a retirement in progress, so
    ``retire`` shields what must complete.
    """
    while True:
        await anyio.sleep(min(max_idle, 1.0))
        while True:
            now = time.monotonic()
            stale = next(((item, now - since) for item, since in idle() if now - since >= max_idle), None)
            if stale is None:
                break
            try:
                await retire(*stale)
            except Exception:
                logger.exception("retiring an idle %s failed", type(stale[0]).__name__)
                break  # next round, not a hot loop
