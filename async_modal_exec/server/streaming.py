"""Response bodies produced while they are sent: a streamed run as Server-Sent Events, file bytes.

Each body is driven by a task of its own and handed over through a queue of
one chunk, so the source is read no faster than the client takes it, and
closing the body (Starlette does when the client disconnects) cancels that
task and waits for it.
"""

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import anyio

from .._shield import wait_shielded
from ..results import ExecutionError
from .errors import SessionNotFound
from .models import event_jsonable, failure
from .sessions import SessionStore

__all__ = ["KEEPALIVE", "produced_by_a_task", "sse", "sse_events"]

KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic


def sse(kind: str, data: Any) -> bytes:
    """One SSE event: ``kind`` as its ``event``, ``data`` as JSON."""
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def produced_by_a_task(produce: Callable[[], AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
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


async def sse_events(
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
                    await chunks.put(sse(event.kind, event_jsonable(event)))
        except (ExecutionError, SessionNotFound) as exc:  # SessionNotFound: deleted meanwhile
            await chunks.put(sse("failure", failure(exc)))
        except Exception:
            await chunks.put(None)  # the generator raises it, as it would have raised it itself
            raise
        await chunks.put(sse("end", {}))
        await chunks.put(None)

    producer = asyncio.create_task(produce())
    try:
        while True:
            chunk: bytes | None = KEEPALIVE
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
