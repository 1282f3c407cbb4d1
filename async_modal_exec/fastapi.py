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
* ``PUT /sessions/{id}/files/{path}`` (the raw bytes as the body) -> ``201`` and
  the file as JSON; ``GET /sessions/{id}/files/{path}`` -> the bytes, streamed
  (``application/octet-stream``); ``DELETE /sessions/{id}/files/{path}`` -> 204.
  Paths are relative to the sandbox's work directory: one outside it is 403,
  a missing file 404, a directory (or other refusal) 400; a body over
  ``max_file_bytes`` is 413 as soon as that many bytes arrived.

A client that disconnects mid-run gets its execution cancelled, which
interrupts the kernel; one that disconnects while its ``POST /sessions`` waits
for a free executor gets that wait cancelled, and no session is made for it.
Request bodies over ``max_body_bytes`` are refused with 413 as soon as that
many bytes arrived (chunked bodies too), before the rest is read. SSE streams
send a ``: keep-alive`` comment after ``keepalive`` seconds without an event.
Sessions idle for ``idle_timeout`` seconds are closed; a session is idle from
the end of its last request, never while its code runs. An unknown, deleted or
expired session is answered with 404.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from anyio.lowlevel import checkpoint

from ._extras import require

require("fastapi", "async_modal_exec.fastapi")

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import ClientDisconnect

from ._idle import retire_idle
from ._shield import run_shielded, wait_shielded
from .errors import (
    ChecksumMismatch,
    ExecutionError,
    ExecutionTimeout,
    ExecutorStateError,
    PoolExhausted,
    RemoteFileError,
    RemoteFileNotFound,
    RemotePathRefused,
    SessionNotFound,
)
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
        self._creating: set[anyio.CancelScope] = set()  # creates waiting for an executor
        self._closed = False

    def start(self) -> None:
        """Start closing sessions idle for ``idle_timeout`` seconds (in a task :meth:`aclose` stops)."""
        self._expiry = asyncio.create_task(retire_idle(self.idle_timeout, self._idle_since, self._close_idle))

    async def create(self) -> _Session:
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
    async def _close(session: _Session) -> None:
        try:
            await session.stack.aclose()
        except Exception:  # one failing close must not keep the others (or the pool) open
            logger.exception("closing session %s failed", session.id)

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


async def pooled_executor(request: Request) -> AsyncIterator[AsyncExecutor]:
    """Dependency: an executor on a fresh kernel for this request.

    503 if the pool is exhausted, or closed (the app is shutting down).
    """
    try:
        session = _pool(request).session()
        executor = await session.__aenter__()
    except (PoolExhausted, ExecutorStateError) as exc:
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


def _body_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors for a request body, located as FastAPI locates them (``("body", ...)``).

    Malformed JSON carries the raw body as its input: it is not echoed back.
    """
    errors: list[dict[str, Any]] = []
    for error in exc.errors(include_url=False):
        located = {**error, "loc": ("body", *error["loc"])}
        if error["type"] == "json_invalid":
            located["input"] = {}
        errors.append(located)
    return errors


def _sse(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


_KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic


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


def _failure(exc: Exception) -> dict[str, Any]:
    """The ``failure`` object of ``/run`` and of ``/stream``'s ``failure`` event (one shape for both).

    ``type`` is the exception class (``ExecutionTimeout``, ``KernelDied``,
    ``ExecutionError``, ``SessionNotFound``), ``message`` its text; a timeout
    adds ``recovery`` (a :class:`~async_modal_exec.RecoveryOutcome` value) and
    ``state_kept`` (whether the kernel's variables survived).
    """
    failure: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, ExecutionTimeout):
        failure["recovery"] = exc.recovery.value
        failure["state_kept"] = exc.recovery.state_kept
    return failure


def _status(result: dict[str, Any]) -> str:
    """``ok``, ``error`` (the code raised) or ``failed`` (the execution did not complete)."""
    if "failure" in result:
        return "failed"
    return "error" if result.get("error") is not None else "ok"


async def _produced_by_a_task(produce: Callable[[], AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
    """The chunks of ``produce()``, iterated by a task of its own.

    What ``produce`` holds (a session's turn: an ``anyio.Lock``, owned by the
    task that took it) is then taken and let go in one task, however the
    response ends: Starlette may leave this generator to be finalised in
    another task when the client disconnects. Closing it cancels the task.
    """
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)  # None: nothing more

    async def drive() -> None:
        try:
            async with aclosing(produce()) as produced:  # type: ignore[type-var]
                async for chunk in produced:
                    await chunks.put(chunk)
        except Exception:
            await chunks.put(None)  # the generator raises it, as it would have raised it itself
            raise
        await chunks.put(None)

    producer = asyncio.create_task(drive())
    try:
        while (chunk := await chunks.get()) is not None:
            yield chunk
    finally:
        producer.cancel()  # a no-op once it is done
        await wait_shielded(producer)
    failed = None if producer.cancelled() else producer.exception()
    if failed is not None:
        raise failed


async def _sse_events(
    sessions: SessionStore, session_id: str, code: str, timeout: float | None, keepalive: float | None
) -> AsyncIterator[bytes]:
    """The SSE body of one streamed run: its events, ``failure`` if it failed, then ``end``.

    The execution is driven by a task of its own, so that a silent stretch
    can be filled with keep-alive comments without cancelling it. The session
    is in use until the last event. Closing (or cancelling) the generator,
    which Starlette does when the client disconnects, cancels that task: the
    stream is closed, which interrupts the kernel, and the generator returns
    once it is done.
    """
    # A small queue: the execution is read no faster than the client takes it.
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)  # None: nothing more

    async def produce() -> None:
        try:
            async with (
                sessions.use(session_id) as session,
                aclosing(session.executor.stream(code, timeout=timeout)) as stream,
            ):
                async for event in stream:
                    await chunks.put(_sse(event.kind, _event_jsonable(event)))
        except (ExecutionError, SessionNotFound) as exc:  # SessionNotFound: deleted meanwhile
            await chunks.put(_sse("failure", _failure(exc)))
        except Exception:
            await chunks.put(None)  # the generator raises it, as it would have raised it itself
            raise
        await chunks.put(_sse("end", {}))
        await chunks.put(None)

    producer = asyncio.create_task(produce())
    try:
        while True:
            chunk: bytes | None = _KEEPALIVE
            with anyio.move_on_after(math.inf if keepalive is None else keepalive):
                chunk = await chunks.get()  # cancelled by the deadline: nothing is lost
            if chunk is None:
                break
            yield chunk
    finally:
        producer.cancel()  # a no-op once it is done
        await wait_shielded(producer)
        failed = None if producer.cancelled() else producer.exception()
    if failed is not None:
        raise failed


def sessions_router(
    *,
    token: str,
    max_code_bytes: int = 1_000_000,
    max_body_bytes: int = 2_000_000,
    run_timeout: float | None = 300.0,
    keepalive: float | None = 15.0,
    max_file_bytes: int = 100 * 2**20,
) -> APIRouter:
    """An ``APIRouter`` for code-execution sessions (see the module docstring).

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
    bearer = HTTPBearer(auto_error=False)

    def too_large_error(limit: int) -> HTTPException:
        # Closing the connection is what stops the client sending the rest:
        # on a kept-alive connection the server would have to read it all.
        return HTTPException(413, f"request body over {limit} bytes", headers={"Connection": "close"})

    too_large = too_large_error(max_body_bytes)

    async def authorised(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials, token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        limit = max_file_bytes if request.method == "PUT" else max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large_error(limit)

    async def run_request(request: Request) -> RunRequest:
        # Read here rather than declared as a body parameter: FastAPI reads a
        # declared body whole, before any dependency (the token check too) runs.
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    raise too_large
        except ClientDisconnect as exc:
            raise HTTPException(400, "the client disconnected while sending the body") from exc
        try:
            return RunRequest.model_validate_json(bytes(body))
        except ValidationError as exc:  # FastAPI's 422, as for a declared body
            raise RequestValidationError(_body_errors(exc)) from None

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
    # The body is read by run_request(), so the schema is declared here for the docs.
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
        except (PoolExhausted, ExecutorStateError) as exc:  # ExecutorStateError: shutting down
            raise HTTPException(503, str(exc)) from exc
        if client.gone:
            logger.info("client left while waiting for a session: nothing was created")
            return Response(status_code=499)
        return {"id": session.id}

    @router.post("/{session_id}/run", openapi_extra=body_schema)
    async def run(session_id: str, request: Request, sessions: Store) -> Response:
        code, timeout = checked(await run_request(request))
        result: dict[str, Any] | None = None
        with _not_found_as_404():
            async with sessions.use(session_id) as session, _cancelled_on_disconnect(request) as client:
                try:
                    # A disconnect cancels the run, which interrupts the kernel.
                    result = (await session.executor.run(code, timeout=timeout)).to_jsonable()
                except ExecutionError as exc:
                    result = {**exc.result.to_jsonable(), "failure": _failure(exc)}
        if client.gone:
            logger.info("client left session %s mid-run: interrupted", session_id)
        if result is None:
            return Response(status_code=499)  # the client is gone
        return Response(json.dumps({"status": _status(result), **result}), media_type="application/json")

    @router.post("/{session_id}/stream", openapi_extra=body_schema)
    async def stream(session_id: str, request: Request, sessions: Store) -> StreamingResponse:
        code, timeout = checked(await run_request(request))
        with _not_found_as_404():
            sessions.get(session_id)  # restarts its idle clock: events() takes over in a moment
        return StreamingResponse(
            _sse_events(sessions, session_id, code, timeout, keepalive),
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

    async def limited_body(request: Request) -> AsyncIterator[bytes]:
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_file_bytes:
                    raise too_large_error(max_file_bytes)
                yield chunk
        except ClientDisconnect as exc:
            raise HTTPException(400, "the client disconnected while sending the file") from exc

    @router.put("/{session_id}/files/{path:path}", status_code=201)
    async def put_file(session_id: str, path: str, request: Request, sessions: Store) -> dict[str, Any]:
        with _not_found_as_404(), _file_errors_as_http():
            async with sessions.use(session_id) as session:
                info = await session.executor.upload(limited_body(request), path, timeout=run_timeout)
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
            _produced_by_a_task(read),
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
