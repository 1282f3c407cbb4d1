"""Code sessions, each holding one pooled executor, and the store that keeps them by id.

The router and the SSE stream use a store only through this interface:

* ``start()`` and ``await aclose()``: the app's lifespan;
* ``await create()`` -> :class:`Session`, ``get(id)``, ``async with use(id)``,
  ``await delete(id)`` (the last three raise :class:`SessionNotFound`);
* ``len(store)``.

:class:`MemorySessionStore` keeps the sessions in this process, and is the only
store today (``SessionStore`` names it). A store that keeps them elsewhere, so
that any replica can carry a session on, offers the same calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.lowlevel import checkpoint

from .._idle import retire_idle
from .._shield import run_shielded
from ..errors import ExecutorStateError
from ..executor import AsyncExecutor
from ..pool import SandboxPool
from .errors import SessionNotFound

logger = logging.getLogger("async_modal_exec.fastapi")

__all__ = ["MemorySessionStore", "Session", "SessionStore"]


@dataclass(eq=False)
class Session:
    """One open session: its id, its executor, and what gives the executor back."""

    id: str
    executor: AsyncExecutor
    stack: AsyncExitStack
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # requests using it now (an interrupt can overlap a run)


class MemorySessionStore:
    """Open code sessions, each holding one pooled executor; idle ones are closed.

    A session is idle from the end of its last request: one whose code is
    running (a run, or an SSE stream until its last event) is never closed by
    the expiry, however long it runs.

    ``SessionStore`` (in ``async_modal_exec.fastapi``) is this class today.
    """

    def __init__(self, pool: SandboxPool, *, idle_timeout: float = 600.0) -> None:
        self.pool = pool
        self.idle_timeout = idle_timeout
        self._sessions: dict[str, Session] = {}
        self._expiry: asyncio.Task[None] | None = None
        self._creating: set[anyio.CancelScope] = set()  # creates waiting for an executor
        self._closed = False

    def start(self) -> None:
        """Start closing sessions idle for ``idle_timeout`` seconds (in a task :meth:`aclose` stops)."""
        self._expiry = asyncio.create_task(retire_idle(self.idle_timeout, self._idle_since, self._close_idle))

    async def create(self) -> Session:
        """A new session on a pooled executor, waiting for one up to the pool's ``acquire_timeout``.

        Raises:
            PoolExhausted: no executor became free in time.
            ExecutorStateError: the store or the pool is closed, or closed while
                this call waited.

        Cancelling the call at any point before it returns leaves nothing
        behind: no session is registered, and an executor it already had goes
        straight back to the pool. (The sessions router cancels it when the
        client disconnects.)
        """
        if self._closed:
            raise ExecutorStateError("the session store is closed")
        stack = AsyncExitStack()
        try:
            with anyio.CancelScope() as waiting:  # aclose() cancels it
                self._creating.add(waiting)
                try:
                    executor = await stack.enter_async_context(self.pool.session())
                    # A cancellation already on its way when the executor came
                    # (a client that left at that moment) lands here, before
                    # the session exists.
                    await checkpoint()
                finally:
                    self._creating.discard(waiting)
            if waiting.cancel_called:
                raise ExecutorStateError("the session store closed while this session was being created")
        except BaseException:
            await run_shielded(stack.aclose())
            raise
        session = Session(secrets.token_urlsafe(16), executor, stack)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        """The session, its idle clock restarted.

        Raises:
            SessionNotFound: no such session (never created, deleted or expired).
        """
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r} (it may have expired)")
        session.last_used = time.monotonic()
        return session

    @asynccontextmanager
    async def use(self, session_id: str) -> AsyncIterator[Session]:
        """The session, kept from expiring for the block; its idle clock restarts at the end.

        Raises:
            SessionNotFound: no such session (never created, deleted or expired).

        Cancelling the block still marks the session idle from then (nothing
        here waits). :meth:`delete` and :meth:`aclose` close a session in use.
        """
        session = self.get(session_id)
        session.busy += 1
        try:
            yield session
        finally:
            session.busy -= 1
            session.last_used = time.monotonic()

    async def delete(self, session_id: str) -> None:
        """End a session, also one in use, and give its executor back.

        Raises:
            SessionNotFound: no such session (never created, deleted or expired).

        Shielded: when cancelled, the session is still closed, then the
        cancellation is re-raised.
        """
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        await run_shielded(session.stack.aclose())

    async def aclose(self) -> None:
        """Close every session, all at once, and end the creates still waiting; safe twice.

        A create waiting for an executor raises ExecutorStateError at once, and
        so does every later one. A session that fails to close is logged; the
        others are closed all the same. Runs to completion when cancelled; the
        cancellation is re-raised after.
        """
        self._closed = True
        for waiting in list(self._creating):
            waiting.cancel()
        await run_shielded(self._close_all())

    async def _close_all(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        sessions, self._sessions = list(self._sessions.values()), {}
        async with anyio.create_task_group() as group:
            for session in sessions:
                group.start_soon(self._close, session)

    @staticmethod
    async def _close(session: Session) -> None:
        try:
            await session.stack.aclose()
        except Exception:  # one failing close must not keep the others (or the pool) open
            logger.exception("closing session %s failed", session.id)

    def __len__(self) -> int:
        return len(self._sessions)

    def _idle_since(self) -> Iterator[tuple[Session, float]]:
        return ((s, s.last_used) for s in self._sessions.values() if not s.busy)

    async def _close_idle(self, session: Session, idle: float) -> None:
        logger.info("closing session %s, idle for %.0f s", session.id, idle)
        self._sessions.pop(session.id, None)
        await run_shielded(session.stack.aclose())


SessionStore = MemorySessionStore
"""The session store the server uses: today :class:`MemorySessionStore`."""
