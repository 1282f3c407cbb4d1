"""LoopBridge: how synchronous code reaches the event loop an async core lives on.

An async core (its aiohttp session, websocket, subprocesses, Modal client) is
bound to the loop it started on. The bridge knows that loop and gets each call
there from whichever thread makes it:

* through a portal handed in at construction (the app's loop owns the core),
* through a portal attached for a while (:func:`~async_modal_exec.run_agent`
  attaches one on the caller's loop, so the core starts there),
* through the bridge's own background loop thread (anyio's
  ``start_blocking_portal``), started on first use when nothing else is there,
* once a portal is detached, with :func:`asyncio.run_coroutine_threadsafe`
  while the core's loop runs.

A call from the core's own loop thread cannot wait for that loop: :meth:`call`
refuses it, and :meth:`close` schedules the close on the loop instead, as a
task that the loop's shutdown (``asyncio.run`` ending) waits for rather than
cancels. A call from a thread running another event loop works, but blocks
that loop until it returns: :meth:`call` warns with
:class:`~async_modal_exec.errors.BlockingCallWarning` first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractContextManager
from types import FrameType
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from .._usage import BlockingCallWarning
from ..errors import ExecutorStateError

logger = logging.getLogger("async_modal_exec.agent")

__all__ = ["LoopBridge"]

T = TypeVar("T")
_CANCEL_WAIT = 30.0
_BACKGROUND_CLOSES: set[asyncio.Task[None]] = set()  # strong references until they end


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _CloseTask(asyncio.Task[None]):
    """A close that must finish: ``cancel()`` is refused.

    ``asyncio.run`` cancels every task left when its main coroutine returns;
    a close scheduled just before (``agent.cleanup()`` at the end of an async
    ``main``) would die before its first step and leave the sandbox running.
    Refusing the cancellation makes the shutdown wait for it instead; every
    wait inside the close is bounded. It only awaits the close's own task,
    so timeouts inside the close still work.
    """

    def cancel(self, msg: Any = None) -> bool:
        logger.debug("a background close refused a cancellation; it finishes first")
        return False


class LoopBridge:
    """Gets synchronous calls onto the loop of one async core.

    Args:
        portal: an anyio ``BlockingPortal`` on the loop that will own the core.
        loop: the loop the core already lives on (a core started elsewhere).
    """

    def __init__(
        self, portal: BlockingPortal | None = None, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._portal = portal
        self._owned: AbstractContextManager[BlockingPortal] | None = None
        self.loop = loop
        self._lock = threading.Lock()
        self._closing: asyncio.Task[None] | None = None

    @property
    def closing_task(self) -> asyncio.Task[None] | None:
        """A close scheduled by :meth:`close` on the core's own loop thread, while it runs."""
        return self._closing

    def on_core_loop(self) -> bool:
        """True when called on the thread running the core's loop."""
        loop = running_loop()
        return loop is not None and loop is self.loop

    def bind(self) -> None:
        """Record the running loop as the core's (call it where the core starts)."""
        self.loop = asyncio.get_running_loop()

    def attach(self, portal: BlockingPortal, loop: asyncio.AbstractEventLoop) -> bool:
        """Use ``portal`` (on ``loop``) for calls, unless the core lives on another loop.

        Returns:
            True if attached; :meth:`detach` then undoes it.
        """
        with self._lock:
            if self.loop not in (None, loop) or self._owned is not None or self._portal is not None:
                return False
            self._portal = portal
            return True

    def detach(self, portal: BlockingPortal) -> None:
        """Stop using ``portal``; calls then reach the core's loop while it runs."""
        with self._lock:
            if self._portal is portal:
                self._portal = None

    def call(
        self, func: Callable[..., Awaitable[T]], *args: Any, fix: str = "await run_agent(agent, task)"
    ) -> T:
        """Run ``func(*args)`` on the core's loop and wait for it; Ctrl-C cancels it cleanly.

        Warns:
            BlockingCallWarning: an event loop runs in the calling thread (not
                the core's): the call blocks it until it returns. ``fix`` is the
                async way named in the message.

        Raises:
            ExecutorStateError: called on the core's own loop thread (it would
                deadlock), or that loop has stopped.
        """
        if self.on_core_loop():
            raise ExecutorStateError(
                "Executor called synchronously from the event-loop thread that runs its sandbox: "
                "that would deadlock. From async code use `await run_agent(agent, task)`, "
                "and `await executor.aclose()` to close it."
            )
        if running_loop() is not None and not self._portal_on_this_thread():
            # Before anything is submitted: with warnings as errors, nothing runs.
            warnings.warn(
                BlockingCallWarning(
                    "Executor called synchronously inside a running event loop: the loop (and every "
                    "task on it) is blocked until the sandbox answers. From async code use "
                    f"`{fix}`, or make the call in a worker thread (`await asyncio.to_thread(...)`)."
                ),
                stacklevel=_caller_stacklevel(),
            )
        finished = threading.Event()

        async def call() -> T:
            try:
                return await func(*args)
            finally:
                finished.set()

        future = self._submit(call)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            finished.wait(_CANCEL_WAIT)
            raise

    def _portal_on_this_thread(self) -> bool:
        # A portal on the calling thread's own loop refuses the call itself
        # (ExecutorStateError from _submit): no warning before that error.
        portal = self._portal
        return portal is not None and getattr(portal, "_event_loop_thread_id", None) == threading.get_ident()

    def _submit(self, call: Callable[[], Coroutine[Any, Any, T]]) -> concurrent.futures.Future[T]:
        portal = self._portal_for_call()
        if portal is not None:
            try:
                return portal.start_task_soon(call)
            except RuntimeError as exc:
                raise ExecutorStateError(f"cannot reach the executor's event loop: {exc}") from exc
        loop = self.loop
        assert loop is not None
        if loop.is_closed() or not loop.is_running():
            raise ExecutorStateError(
                "the event loop this executor's sandbox lives on has stopped; "
                "close it before its loop ends (`await executor.aclose()`)"
            )
        return asyncio.run_coroutine_threadsafe(call(), loop)

    def _portal_for_call(self) -> BlockingPortal | None:
        with self._lock:
            if self._portal is None and self.loop is None:
                # Nothing owns the core yet: a loop thread of our own. It is
                # stopped before the interpreter joins non-daemon threads (see
                # the facade's exit hook).
                self._owned = start_blocking_portal()
                self._portal = self._owned.__enter__()
            return self._portal

    @property
    def owns_portal(self) -> bool:
        """True once the bridge started a background loop thread of its own."""
        return self._owned is not None

    def close(self, close_core: Callable[[], Coroutine[Any, Any, None]] | None) -> asyncio.Task[None] | None:
        """Close the core (``close_core``, None if it never started), then stop the own loop thread.

        From any thread but the core loop's, this waits for the close. On the
        core's loop thread it cannot wait: it schedules the close as a task on
        that loop and returns it (``asyncio.run`` waits for it at its end).

        Raises:
            ExecutorStateError: the core's loop has stopped, so nothing can close it.
        """
        if close_core is not None:
            if self.on_core_loop():
                return self._close_in_background(close_core)
            self.call(close_core, fix="await executor.aclose()")
        self.stop()
        return None

    def _close_in_background(self, close_core: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        if self._closing is None:
            loop = self.loop
            assert loop is not None
            task = self._closing = _CloseTask(_finish(close_core), loop=loop)
            _BACKGROUND_CLOSES.add(task)
            task.add_done_callback(_BACKGROUND_CLOSES.discard)
            task.add_done_callback(_report_failure)
        return self._closing

    def stop(self) -> None:
        """Stop the bridge's own loop thread, if it started one; safe to call twice."""
        with self._lock:
            owned, self._owned = self._owned, None
            if owned is not None:
                self._portal = None
        if owned is not None:
            owned.__exit__(None, None, None)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` (for a warning issued by the caller of this) of the first frame outside
    this package and smolagents: the user's line that made the blocking call."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if not (module == "async_modal_exec" or module.startswith(("async_modal_exec.", "smolagents"))):
            return level
        frame = frame.f_back
        level += 1
    return level


async def _finish(close_core: Callable[[], Coroutine[Any, Any, None]], attempts: int = 3) -> None:
    # The close runs in a task of its own, so anyio's timeouts inside it can
    # cancel what they bound (this task refuses every cancellation). When
    # asyncio.run ends it cancels that task too, once: the close is then run
    # again, and picks up where it was cut short.
    for _ in range(attempts):
        inner = asyncio.ensure_future(close_core())
        await asyncio.wait({inner})
        if not inner.cancelled():
            inner.result()
            return
        logger.debug("the background close was cancelled; running it again to finish")


def _report_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("closing the executor in the background failed: %r", task.exception())
