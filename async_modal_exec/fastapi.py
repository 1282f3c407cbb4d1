"""FastAPI embedding: a lifespan-owned pool, per-request executors, a sessions router.

Install with the ``fastapi`` extra. The app's lifespan owns a
:class:`~async_modal_exec.SandboxPool` and the open code sessions; shutting the
app down closes every session and terminates every sandbox::

    app = FastAPI(lifespan=pool_lifespan(lambda: SandboxPool(min_idle=2)))
    app.include_router(sessions_router(token=os.environ["API_TOKEN"]), prefix="/v1")

    @app.post("/run")
    async def run(code: str, executor: AsyncExecutor = Depends(pooled_executor)) -> dict:
        return (await executor.run(code)).to_jsonable()

Routes of :func:`sessions_router` (bearer token on each; 401 without it):

* ``POST /sessions`` -> ``201 {"id": ...}``: a fresh kernel from the pool
* ``POST /sessions/{id}/run`` ``{"code", "timeout"}`` -> the result as JSON
* ``POST /sessions/{id}/stream`` ``{"code", "timeout"}`` -> Server-Sent Events:
  ``stdout``, ``stderr``, ``display``, ``result``, ``error`` as they happen, then ``end``
* ``POST /sessions/{id}/interrupt`` -> 204; ``DELETE /sessions/{id}`` -> 204

A client that disconnects mid-run gets its execution cancelled, which
interrupts the kernel. Sessions idle for ``idle_timeout`` seconds are closed; a
session is idle from the end of its last request, never while its code runs.
An unknown, deleted or expired session is answered with 404.
"""

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from ._idle import retire_idle
from ._shield import run_shielded
from .errors import ExecutionError, PoolExhausted, SessionNotFound
from .executor import AsyncExecutor
from .pool import SandboxPool
from .results import ErrorEvent, Event, ResultEvent, StderrEvent, StdoutEvent

logger = logging.getLogger("async_modal_exec.fastapi")

__all__ = ["SessionStore", "agent_executor", "pool_lifespan", "pooled_executor", "sessions_router"]

POOL_STATE = "sandbox_pool"
SESSIONS_STATE = "sandbox_sessions"


@dataclass(eq=False)
class _Session:
    id: str
    executor: AsyncExecutor
    stack: AsyncExitStack
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # requests using it now (an interrupt can overlap a run)


class SessionStore:
    """Open code sessions, each holding one pooled executor; idle ones are closed.

    A session is idle from the end of its last request: one whose code is
    running (a run, or an SSE stream until its last event) is never closed by
    the expiry, however long it runs.
    """

    def __init__(self, pool: SandboxPool, *, idle_timeout: float = 600.0) -> None:
        self.pool = pool
        self.idle_timeout = idle_timeout
        self._sessions: dict[str, _Session] = {}
        self._expiry: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start closing sessions idle for ``idle_timeout`` seconds (in a task :meth:`aclose` stops)."""
        self._expiry = asyncio.create_task(retire_idle(self.idle_timeout, self._idle_since, self._close_idle))

    async def create(self) -> _Session:
        """A new session on a pooled executor (raises PoolExhausted if none frees up)."""
        stack = AsyncExitStack()
        executor = await stack.enter_async_context(self.pool.session())
        session = _Session(secrets.token_urlsafe(16), executor, stack)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> _Session:
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
    async def use(self, session_id: str) -> AsyncIterator[_Session]:
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
        """Close every session (shielded from cancellation)."""
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await run_shielded(session.stack.aclose())

    def __len__(self) -> int:
        return len(self._sessions)

    def _idle_since(self) -> Iterator[tuple[_Session, float]]:
        return ((s, s.last_used) for s in self._sessions.values() if not s.busy)

    async def _close_idle(self, session: _Session, idle: float) -> None:
        logger.info("closing session %s, idle for %.0f s", session.id, idle)
        self._sessions.pop(session.id, None)
        await run_shielded(session.stack.aclose())


def pool_lifespan(
    pool_factory: Callable[[], SandboxPool], *, session_idle_timeout: float = 600.0
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """A FastAPI ``lifespan`` that starts the pool with the app and drains it on shutdown.

    The pool and the session store are on ``app.state``; shutdown closes the
    sessions, then terminates every sandbox (also when shutdown is cancelled).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with pool_factory() as pool:
            sessions = SessionStore(pool, idle_timeout=session_idle_timeout)
            sessions.start()
            setattr(app.state, POOL_STATE, pool)
            setattr(app.state, SESSIONS_STATE, sessions)
            try:
                yield
            finally:
                await sessions.aclose()

    return lifespan


def _pool(request: Request) -> SandboxPool:
    pool = getattr(request.app.state, POOL_STATE, None)
    if not isinstance(pool, SandboxPool):
        raise RuntimeError("no SandboxPool on app.state: create the app with lifespan=pool_lifespan(...)")
    return pool


async def pooled_executor(request: Request) -> AsyncIterator[AsyncExecutor]:
    """Dependency: an executor on a fresh kernel for this request (503 if the pool is exhausted)."""
    try:
        session = _pool(request).session()
        executor = await session.__aenter__()
    except PoolExhausted as exc:
        raise HTTPException(503, str(exc)) from exc
    try:
        yield executor
    finally:
        await session.__aexit__(None, None, None)


async def agent_executor(executor: Annotated[AsyncExecutor, Depends(pooled_executor)]) -> Any:
    """Dependency: a smolagents ``Executor`` on a pooled kernel, bound to the app's loop.

    Pass it to ``CodeAgent(executor=...)`` and run the agent with
    ``await run_agent(agent, task)``: the loop stays free.
    """
    from .agent import Executor

    return Executor(core=executor)


class RunRequest(BaseModel):
    """Code to run in a session."""

    code: str
    timeout: float | None = Field(default=None, gt=0)


def _event_jsonable(event: Event) -> dict[str, Any]:
    if isinstance(event, StdoutEvent | StderrEvent):
        return {"text": event.text}
    if isinstance(event, ErrorEvent):
        error = event.error
        return {"ename": error.ename, "evalue": error.evalue, "traceback": list(error.traceback)}
    data = event.output.to_jsonable()
    if isinstance(event, ResultEvent):
        data["execution_count"] = event.execution_count
    return data


@contextlib.contextmanager
def _not_found_as_404() -> Iterator[None]:
    """The store's SessionNotFound becomes HTTP 404 with the same message."""
    try:
        yield
    except SessionNotFound as exc:
        raise HTTPException(404, str(exc)) from exc


def _sse(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def sessions_router(
    *,
    token: str,
    max_code_bytes: int = 1_000_000,
    max_body_bytes: int = 2_000_000,
    run_timeout: float | None = 300.0,
) -> APIRouter:
    """An ``APIRouter`` for code-execution sessions (see the module docstring).

    Args:
        token: the bearer token every request must carry.
        max_code_bytes: longest code accepted (413 beyond).
        max_body_bytes: largest request body accepted (413 beyond, before parsing).
        run_timeout: default and maximum execution timeout in seconds.
    """
    if not token:
        raise ValueError("sessions_router needs a non-empty token")
    bearer = HTTPBearer(auto_error=False)

    async def authorised(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials, token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise HTTPException(413, f"request body over {max_body_bytes} bytes")

    def store(request: Request) -> SessionStore:
        sessions = getattr(request.app.state, SESSIONS_STATE, None)
        if not isinstance(sessions, SessionStore):
            raise RuntimeError("no session store on app.state: use lifespan=pool_lifespan(...)")
        return sessions

    def checked(body: RunRequest) -> tuple[str, float | None]:
        if len(body.code.encode()) > max_code_bytes:
            raise HTTPException(413, f"code over {max_code_bytes} bytes")
        timeout = body.timeout if body.timeout is not None else run_timeout
        if run_timeout is not None and timeout is not None:
            timeout = min(timeout, run_timeout)
        return body.code, timeout

    router = APIRouter(prefix="/sessions", dependencies=[Depends(authorised)], tags=["sessions"])
    Store = Annotated[SessionStore, Depends(store)]

    @router.post("", status_code=201)
    async def create_session(sessions: Store) -> dict[str, str]:
        try:
            session = await sessions.create()
        except PoolExhausted as exc:
            raise HTTPException(503, str(exc)) from exc
        return {"id": session.id}

    @router.post("/{session_id}/run")
    async def run(session_id: str, body: RunRequest, request: Request, sessions: Store) -> Response:
        code, timeout = checked(body)
        result: dict[str, Any] | None = None
        with _not_found_as_404():
            async with sessions.use(session_id) as session, anyio.create_task_group() as group:

                async def watch_disconnect() -> None:
                    # The body is read: the next ASGI message can only be the disconnect.
                    while (await request.receive())["type"] != "http.disconnect":
                        pass
                    logger.info("client left session %s mid-run: interrupting", session_id)
                    group.cancel_scope.cancel()  # cancelling the run interrupts the kernel

                group.start_soon(watch_disconnect)
                try:
                    result = (await session.executor.run(code, timeout=timeout)).to_jsonable()
                except ExecutionError as exc:
                    result = {**exc.result.to_jsonable(), "failure": f"{type(exc).__name__}: {exc}"}
                group.cancel_scope.cancel()
        if result is None:
            return Response(status_code=499)  # the client is gone
        return Response(json.dumps(result), media_type="application/json")

    @router.post("/{session_id}/stream")
    async def stream(session_id: str, body: RunRequest, sessions: Store) -> StreamingResponse:
        code, timeout = checked(body)
        with _not_found_as_404():
            sessions.get(session_id)  # restarts its idle clock: events() takes over in a moment

        async def events() -> AsyncIterator[bytes]:
            # The session is in use until the stream's last event. A client
            # that disconnects cancels this generator, which closes the stream
            # and so interrupts the kernel.
            try:
                async with (
                    sessions.use(session_id) as session,
                    aclosing(session.executor.stream(code, timeout=timeout)) as stream,
                ):
                    async for event in stream:
                        yield _sse(event.kind, _event_jsonable(event))
            except (ExecutionError, SessionNotFound) as exc:  # SessionNotFound: deleted meanwhile
                yield _sse("failure", {"type": type(exc).__name__, "message": str(exc)})
            yield _sse("end", {})

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @router.post("/{session_id}/interrupt", status_code=204)
    async def interrupt(session_id: str, sessions: Store) -> None:
        with _not_found_as_404():
            async with sessions.use(session_id) as session:
                await session.executor.interrupt()

    @router.delete("/{session_id}", status_code=204)
    async def delete(session_id: str, sessions: Store) -> None:
        with _not_found_as_404():
            await sessions.delete(session_id)

    return router
