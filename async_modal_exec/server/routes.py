"""The FastAPI pieces: the lifespan that owns the pool and the sessions, dependencies, the sessions router.

See :mod:`async_modal_exec.fastapi` (which re-exports them) for the routes and
what a disconnect, a limit or a shutdown does.
"""

import contextlib
import dataclasses
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import (
    BackendError,
    ChecksumMismatch,
    ExecutorStateError,
    GatewayAuthError,
    MissingExtra,
    PoolExhausted,
    RemoteFileError,
    RemoteFileNotFound,
    RemotePathRefused,
)
from ..executor import AsyncExecutor
from ..pool import SandboxPool
from ..results import ExecutionError, ExecutionTimeout
from .errors import SessionNotFound
from .models import Limits, RunRequest, failure, status
from .sessions import SessionStore
from .streaming import produced_by_a_task, sse_events

logger = logging.getLogger("async_modal_exec.fastapi")

# No executor to give: the pool is exhausted, shutting down (ExecutorStateError),
# or cannot start sandboxes at all (the cause is in the 503's detail).
_UNAVAILABLE = (PoolExhausted, ExecutorStateError, BackendError, GatewayAuthError, MissingExtra)

__all__ = [
    "POOL_STATE",
    "SESSIONS_STATE",
    "agent_executor",
    "pool_lifespan",
    "pooled_executor",
    "sessions_router",
]

POOL_STATE = "sandbox_pool"
SESSIONS_STATE = "sandbox_sessions"


def pool_lifespan(
    pool_factory: Callable[[], SandboxPool], *, session_idle_timeout: float = 600.0
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """A FastAPI ``lifespan`` that starts the pool with the app and drains it on shutdown.

    The pool and the session store are on ``app.state``; shutdown ends the
    creates still waiting for an executor, closes the sessions (all at once),
    then terminates every sandbox (also when shutdown is cancelled).

    uvicorn starts the lifespan shutdown only once every request has ended:
    give it ``timeout_graceful_shutdown`` (``--timeout-graceful-shutdown``),
    after which it cancels the requests still running (a cancelled run
    interrupts its kernel, a cancelled create gives its executor back).
    Without it, shutdown waits as long as the longest request.
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


def _store(request: Request) -> SessionStore:
    sessions = getattr(request.app.state, SESSIONS_STATE, None)
    if not isinstance(sessions, SessionStore):
        raise RuntimeError("no session store on app.state: use lifespan=pool_lifespan(...)")
    return sessions


async def pooled_executor(request: Request) -> AsyncIterator[AsyncExecutor]:
    """Dependency: an executor on a fresh kernel for this request.

    503 if the pool is exhausted, closed (the app is shutting down), or
    cannot start sandboxes (a missing extra, refused credentials: the detail
    says which).
    """
    try:
        session = _pool(request).session()
        executor = await session.__aenter__()
    except _UNAVAILABLE as exc:
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
    from ..agent import Executor

    return Executor(core=executor)


@contextlib.contextmanager
def _not_found_as_404() -> Iterator[None]:
    """The store's SessionNotFound becomes HTTP 404 with the same message."""
    try:
        yield
    except SessionNotFound as exc:
        raise HTTPException(404, str(exc)) from exc


@contextlib.contextmanager
def _file_errors_as_http() -> Iterator[None]:
    """A file operation's refusal as an HTTP status with the same message."""
    try:
        yield
    except ExecutionTimeout as exc:
        raise HTTPException(504, str(exc)) from exc
    except ExecutionError as exc:  # the kernel died mid-transfer
        raise HTTPException(503, str(exc)) from exc
    except RemotePathRefused as exc:
        raise HTTPException(403, str(exc)) from exc
    except RemoteFileNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except ChecksumMismatch as exc:
        raise HTTPException(502, str(exc)) from exc
    except RemoteFileError as exc:
        raise HTTPException(400, str(exc)) from exc


@dataclass
class _Client:
    """Whether the HTTP client of a request is gone (see :func:`_cancelled_on_disconnect`)."""

    gone: bool = False


@asynccontextmanager
async def _cancelled_on_disconnect(request: Request) -> AsyncIterator[_Client]:
    """Run the block; cancel it when the client disconnects (``client.gone`` says so after).

    Call it once the request body is read (or for a route without one): the
    watcher takes every ASGI message that arrives meanwhile.
    """
    client = _Client()
    error: Exception | None = None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            client.gone = True
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            yield client
        except Exception as exc:  # raised as it is, not wrapped in the task group's ExceptionGroup
            error = exc
        group.cancel_scope.cancel()
    if error is not None:
        raise error


def sessions_router(
    *,
    token: str,
    max_code_bytes: int = 1_000_000,
    max_body_bytes: int = 2_000_000,
    run_timeout: float | None = 300.0,
    keepalive: float | None = 15.0,
    max_file_bytes: int = 100 * 2**20,
) -> APIRouter:
    """An ``APIRouter`` for code-execution sessions (its routes: see ``async_modal_exec.fastapi``).

    Args:
        token: the bearer token every request must carry.
        max_code_bytes: longest code accepted (413 beyond).
        max_body_bytes: largest request body accepted: 413 as soon as more has
            arrived (or a larger ``Content-Length`` is announced), without
            reading the rest; the connection is then closed.
        run_timeout: default and maximum execution timeout in seconds.
        keepalive: seconds without an event after which an SSE stream sends a
            ``: keep-alive`` comment, so proxies do not cut a stream whose code
            runs silently (None: never).
        max_file_bytes: largest file a ``PUT .../files/{path}`` accepts (413
            beyond, refused as the body limit is); the upload streams to the
            sandbox as it arrives, so memory stays flat.
    """
    if not token:
        raise ValueError("sessions_router needs a non-empty token")
    if keepalive is not None and keepalive <= 0:
        raise ValueError("keepalive must be positive (or None)")
    limits = Limits(max_code_bytes, max_body_bytes, run_timeout, max_file_bytes)
    bearer = HTTPBearer(auto_error=False)

    async def authorised(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials, token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        limits.refuse_announced(request)

    router = APIRouter(prefix="/sessions", dependencies=[Depends(authorised)], tags=["sessions"])
    Store = Annotated[SessionStore, Depends(_store)]
    # The body is read by Limits.run_request(), so the schema is declared here for the docs.
    body_schema = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": RunRequest.model_json_schema()}},
        }
    }

    @router.post("", status_code=201, response_model=dict[str, str])
    async def create_session(request: Request, sessions: Store) -> dict[str, str] | Response:
        # Waiting for a free executor can take up to the pool's acquire_timeout:
        # a client that gives up meanwhile must not take the next free one
        # into a session nobody knows about.
        try:
            async with _cancelled_on_disconnect(request) as client:
                session = await sessions.create()
        except _UNAVAILABLE as exc:
            raise HTTPException(503, str(exc)) from exc
        if client.gone:
            logger.info("client left while waiting for a session: nothing was created")
            return Response(status_code=499)
        return {"id": session.id}

    @router.post("/{session_id}/run", openapi_extra=body_schema)
    async def run(session_id: str, request: Request, sessions: Store) -> Response:
        code, timeout = await limits.run_request(request)
        result: dict[str, Any] | None = None
        with _not_found_as_404():
            async with sessions.use(session_id) as session, _cancelled_on_disconnect(request) as client:
                try:
                    # A disconnect cancels the run, which interrupts the kernel.
                    result = (await session.executor.run(code, timeout=timeout)).to_jsonable()
                except ExecutionError as exc:
                    result = {**exc.result.to_jsonable(), "failure": failure(exc)}
        if client.gone:
            logger.info("client left session %s mid-run: interrupted", session_id)
        if result is None:
            return Response(status_code=499)  # the client is gone
        return Response(json.dumps({"status": status(result), **result}), media_type="application/json")

    @router.post("/{session_id}/stream", openapi_extra=body_schema)
    async def stream(session_id: str, request: Request, sessions: Store) -> StreamingResponse:
        code, timeout = await limits.run_request(request)
        with _not_found_as_404():
            sessions.get(session_id)  # restarts its idle clock: sse_events() takes over in a moment
        return StreamingResponse(
            sse_events(sessions, session_id, code, timeout, keepalive),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
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

    @router.put("/{session_id}/files/{path:path}", status_code=201)
    async def put_file(session_id: str, path: str, request: Request, sessions: Store) -> dict[str, Any]:
        with _not_found_as_404(), _file_errors_as_http():
            async with sessions.use(session_id) as session:
                info = await session.executor.upload(limits.file_body(request), path, timeout=run_timeout)
        return dataclasses.asdict(info)

    @router.get("/{session_id}/files/{path:path}")
    async def get_file(session_id: str, path: str, sessions: Store) -> StreamingResponse:
        # Checked first, so a refusal is an HTTP status; the body streams from
        # the response's own task (the kernel is held there, until the last byte).
        with _not_found_as_404(), _file_errors_as_http():
            async with sessions.use(session_id) as session:
                info = await session.executor.stat(path, timeout=run_timeout)
        if info.is_dir:
            raise HTTPException(400, f"{path!r} is a directory")

        async def read() -> AsyncIterator[bytes]:
            async with (
                sessions.use(session_id) as session,
                session.executor.reading(path, timeout=run_timeout) as (now, chunks),
            ):
                if now.size != info.size:  # changed meanwhile: the announced length would lie
                    raise RemoteFileError(f"{path!r} changed while it was being sent")
                async for chunk in chunks:
                    yield chunk

        name = info.name.replace('"', "")
        return StreamingResponse(
            produced_by_a_task(read),
            media_type="application/octet-stream",
            headers={
                "Content-Length": str(info.size),
                "Content-Disposition": f'attachment; filename="{name}"',
            },
        )

    @router.delete("/{session_id}/files/{path:path}", status_code=204)
    async def delete_file(session_id: str, path: str, sessions: Store, recursive: bool = False) -> None:
        with _not_found_as_404(), _file_errors_as_http():
            async with sessions.use(session_id) as session:
                await session.executor.remove(path, recursive=recursive, timeout=run_timeout)

    return router
