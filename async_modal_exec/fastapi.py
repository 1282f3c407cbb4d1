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
expired session is answered with 404 (the store itself raises
:class:`SessionNotFound`).

The pieces live in the server layer (``async_modal_exec.server``: sessions,
request models and limits, streaming, routes); this module is their public
import path.
"""

from ._extras import require

require("fastapi", "async_modal_exec.fastapi")

from .server.errors import SessionNotFound
from .server.models import RunRequest as RunRequest  # importable from here as before
from .server.routes import POOL_STATE as POOL_STATE  # the app.state attribute names
from .server.routes import SESSIONS_STATE as SESSIONS_STATE
from .server.routes import agent_executor, pool_lifespan, pooled_executor, sessions_router
from .server.sessions import SessionStore

__all__ = [
    "SessionNotFound",
    "SessionStore",
    "agent_executor",
    "pool_lifespan",
    "pooled_executor",
    "sessions_router",
]
