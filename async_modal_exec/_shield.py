"""Run cleanup to completion even when the caller is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
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


class Completion:
    """Idempotent clean-up steps, run to completion in a task of their own.

    Callers of :meth:`run` share that task. A caller's cancellation does not
    stop it (it is re-raised once the task is done). A task that was itself
    cancelled (``asyncio.run`` cancels every task still running when its main
    coroutine returns) is started again, up to ``attempts`` times, so the
    steps must be safe to run again and pick up where they stopped. A failure
    is raised to the callers, and the next call starts over.
    """

    def __init__(self, steps: Callable[[], Coroutine[Any, Any, None]], *, attempts: int = 3) -> None:
        self._steps = steps
        self._attempts = attempts
        self._task: asyncio.Future[None] | None = None
        self.finished = False

    async def run(self) -> None:
        """Run (or join) the steps until they finished; see the class docstring."""
        for _ in range(self._attempts):
            if self.finished:
                return
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._steps())
            task = self._task
            await wait_shielded(task)
            if task.cancelled():
                continue
            error = task.exception()
            if error is not None:
                raise error
            self.finished = True
            return
        raise asyncio.CancelledError("the clean-up task was cancelled again and again")
