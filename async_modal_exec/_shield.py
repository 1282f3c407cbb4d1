"""Run cleanup to completion even when the caller is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


async def run_shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` to completion, then re-raise any cancellation received meanwhile.

    ``anyio.CancelScope(shield=True)`` alone only holds off anyio's own scope
    cancellation; a plain ``Task.cancel()`` (``asyncio.wait_for``, a second
    Ctrl-C, a server shutting down) would still cut the cleanup short. Here the
    work runs in its own task, which this coroutine owns and waits for however
    often it is cancelled; the cancellation is re-raised once the work is done.
    """
    task = asyncio.ensure_future(coro)
    cancelled: BaseException | None = None
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError as exc:
                cancelled = exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation takes precedence
        raise cancelled
    return task.result()


async def wait_shielded(task: asyncio.Future[Any]) -> None:
    """Wait until ``task`` is done without cancelling it; re-raise a cancellation of the caller after.

    Unlike awaiting the task, this neither cancels it when the caller is
    cancelled nor raises what it raised: look at ``task`` afterwards.
    """
    await run_shielded(_done(task))


async def _done(task: asyncio.Future[Any]) -> None:
    await asyncio.wait({task})
