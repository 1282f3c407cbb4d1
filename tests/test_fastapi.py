"""FastAPI embedding served by a real uvicorn on loopback, driven with httpx over TCP."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import io
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import anyio
import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from async_modal_exec import AsyncExecutor, AsyncModalExecError, GatewayBackend, SandboxPool
from async_modal_exec.backends import GatewayEndpoint
from async_modal_exec.backends.local import _process_tree
from async_modal_exec.errors import ExecutorStateError
from async_modal_exec.fastapi import (
    SessionNotFound,
    SessionStore,
    pool_lifespan,
    pooled_executor,
    sessions_router,
)
from async_modal_exec.gateway import GatewayClient

from .helpers import descendants, measure_loop_lag, sleeper, wait_gone

TOKEN = "test-token-3c9a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[str]:
    """Run ``app`` on a real uvicorn server on 127.0.0.1 (a free port); yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)


def make_app(
    gateway: GatewayEndpoint,
    session_idle_timeout: float = 600,
    router_options: dict[str, Any] | None = None,
    **pool_options: Any,
) -> FastAPI:
    def pool() -> SandboxPool:
        return SandboxPool(lambda: GatewayBackend(gateway.base_url, gateway.token), **pool_options)

    app = FastAPI(lifespan=pool_lifespan(pool, session_idle_timeout=session_idle_timeout))
    app.include_router(
        sessions_router(token=TOKEN, max_code_bytes=10_000, run_timeout=60, **(router_options or {}))
    )

    @app.post("/quick")
    async def quick(
        code: str, executor: Annotated[AsyncExecutor, Depends(pooled_executor)]
    ) -> dict[str, Any]:
        return (await executor.run(code)).to_jsonable()

    return app


async def kernels_on(gateway: GatewayEndpoint) -> list[Any]:
    client = GatewayClient(gateway)
    try:
        kernels: list[Any] = await client._json("GET", "/api/kernels")
        return kernels
    finally:
        await client.aclose()


async def new_session(client: httpx.AsyncClient) -> str:
    response = await client.post("/sessions", headers=AUTH)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_twenty_concurrent_sessions_sleep_together(gateway: GatewayEndpoint) -> None:
    app = make_app(gateway, min_idle=20, max_size=21)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=120) as client:
        await app.state.sandbox_pool.wait_ready(120)
        ids = await asyncio.gather(*(new_session(client) for _ in range(20)))
        async with measure_loop_lag() as probe:
            began = time.monotonic()
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"/sessions/{id_}/run",
                        json={"code": f"import time\ntime.sleep(0.5)\n{i}"},
                        headers=AUTH,
                    )
                    for i, id_ in enumerate(ids)
                )
            )
            elapsed = time.monotonic() - began
        assert [r.json()["value"]["data"]["text/plain"] for r in responses] == [str(i) for i in range(20)]
        assert elapsed < 2.5, f"20 concurrent 0.5 s sleeps took {elapsed:.2f} s"
        assert probe.max_callback < 0.02, probe.summary()
        quick = await client.post("/quick", params={"code": "6 * 7"})
        assert quick.json()["value"]["data"]["text/plain"] == "42"
    assert await kernels_on(gateway) == []  # shutdown closed every session and pooled kernel


async def test_sse_events_arrive_in_order_before_the_end(gateway: GatewayEndpoint) -> None:
    async with (
        serve(make_app(gateway, min_idle=1, max_size=2)) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        session = await new_session(client)
        code = "import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')\n1/0"
        began = time.monotonic()
        seen: list[tuple[str, Any, float]] = []
        async with client.stream(
            "POST", f"/sessions/{session}/stream", json={"code": code}, headers=AUTH
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            kind = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    seen.append((kind, json.loads(line[6:]), time.monotonic() - began))
        kinds = [kind for kind, _, _ in seen]
        assert kinds == ["stdout", "stdout", "error", "end"]
        assert seen[0][1] == {"text": "first\n"} and seen[1][1] == {"text": "second\n"}
        assert seen[0][2] < 0.9, "the first event must arrive while the code still sleeps"
        assert seen[2][1]["ename"] == "ZeroDivisionError"
        assert (await client.delete(f"/sessions/{session}", headers=AUTH)).status_code == 204


async def test_auth_and_bad_input_get_clear_4xx(gateway: GatewayEndpoint) -> None:
    async with (
        serve(make_app(gateway, min_idle=0, max_size=1)) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        assert (await client.post("/sessions")).status_code == 401
        assert (await client.post("/sessions", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await client.post("/sessions/nope/run", json={"code": "1"})).status_code == 401
        for route in ("run", "stream", "interrupt"):
            unknown = await client.post(f"/sessions/nope/{route}", json={"code": "1"}, headers=AUTH)
            assert unknown.status_code == 404, route
            assert unknown.json() == {"detail": "no session 'nope' (it may have expired)"}
        session = await new_session(client)
        run = f"/sessions/{session}/run"
        assert (await client.post(run, json={"code": "x" * 20_000}, headers=AUTH)).status_code == 413
        bad_json = await client.post(
            run, content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
        )
        assert bad_json.status_code == 422
        assert (await client.post(run, json={"code": "1", "timeout": -1}, headers=AUTH)).status_code == 422
        assert (await client.post(run, content=b"x" * 3_000_000, headers=AUTH)).status_code == 413
        assert (await client.delete(f"/sessions/{session}", headers=AUTH)).status_code == 204
        deleted = await client.delete(f"/sessions/{session}", headers=AUTH)
        assert deleted.status_code == 404 and deleted.json() == {"detail": f"no session {session!r}"}
        gone = await client.post(run, json={"code": "1"}, headers=AUTH)
        assert gone.status_code == 404 and "expired" in gone.json()["detail"]


async def test_the_store_raises_session_not_found_for_the_router_to_map() -> None:
    store = SessionStore(SandboxPool(min_idle=0))  # never started: lookups need no sandbox
    with pytest.raises(SessionNotFound, match=r"^no session 'nope' \(it may have expired\)$") as caught:
        store.get("nope")
    assert isinstance(caught.value, LookupError) and isinstance(caught.value, AsyncModalExecError)
    with pytest.raises(SessionNotFound):
        async with store.use("nope"):
            pass
    with pytest.raises(SessionNotFound, match=r"^no session 'nope'$"):
        await store.delete("nope")


async def test_client_disconnect_interrupts_the_kernel(gateway: GatewayEndpoint) -> None:
    async with (
        serve(make_app(gateway, min_idle=1, max_size=1)) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        session = await new_session(client)
        await client.post(f"/sessions/{session}/run", json={"code": "kept = 'still here'"}, headers=AUTH)
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                f"/sessions/{session}/run",
                json={"code": "import time\ntime.sleep(60)"},
                headers=AUTH,
                timeout=1,
            )
        began = time.monotonic()
        response = await client.post(f"/sessions/{session}/run", json={"code": "kept"}, headers=AUTH)
        assert response.json()["value"]["data"]["text/plain"] == "'still here'"
        assert time.monotonic() - began < 10, "the abandoned 60 s sleep was not interrupted"


@contextlib.asynccontextmanager
async def example_server() -> AsyncIterator[tuple[asyncio.subprocess.Process, httpx.AsyncClient]]:
    """`python examples/agent_server.py`, as a newcomer runs it (offline scripted model, local
    pool), up and answering. Whatever it started is killed on the way out if it did not exit:
    a failing test leaves no gateway behind."""
    before = set(descendants())
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    env = {**os.environ, "PORT": str(port), "API_TOKEN": TOKEN}
    env.pop("AGENT_MODEL_ID", None)
    script = Path(__file__).parents[1] / "examples" / "agent_server.py"
    process = await asyncio.create_subprocess_exec(sys.executable, str(script), env=env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    (await client.get("/openapi.json")).raise_for_status()
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the example server did not come up"
                    await asyncio.sleep(0.2)
            yield process, client
    finally:
        if process.returncode is None:
            tree = [pid for pid in descendants() if pid not in before]
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except asyncio.TimeoutError:  # not yet the builtin one on Python 3.10
                for pid in tree:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                await process.wait()
                await wait_gone(tree)


async def interrupt_and_wait(process: asyncio.subprocess.Process, limit: float) -> float:
    """SIGINT the server; seconds until it exited, and every process it had started is gone."""
    tree = [pid for pid, _ in _process_tree(process.pid)]  # orphans leave our tree once it exits
    began = time.monotonic()
    process.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(process.wait(), limit)
    except asyncio.TimeoutError:
        pytest.fail(f"the server still ran {limit} s after SIGINT")
    assert await wait_gone(tree) == [], "processes left running after the server exited"
    return time.monotonic() - began


async def test_example_app_runs_with_one_command_and_shuts_down_clean() -> None:
    async with example_server() as (process, client):
        response = await client.post("/agent", json={"task": "Sum the numbers 1 to 10."})
        assert response.status_code == 200, response.text
        assert response.json()["answer"] == {"total": 55}
        session = await new_session(client)
        async with client.stream(
            "POST", f"/sessions/{session}/stream", json={"code": "print('streamed')"}, headers=AUTH
        ) as stream:
            body = "".join([chunk async for chunk in stream.aiter_text()])
        assert "event: stdout" in body and "streamed" in body and "event: end" in body
        await interrupt_and_wait(process, 60)
    assert process.returncode == 0


async def test_example_app_exits_within_seconds_with_sessions_running_code_and_pending_creates() -> None:
    # The example's pool holds 4 sandboxes: 3 idle sessions and one running a 60 s sleep use them
    # all, so 3 more creates wait (its acquire_timeout is 120 s).
    async with example_server() as (process, client):
        ids = await asyncio.gather(*(new_session(client) for _ in range(4)))
        # The example's kernels are jailed: the marker goes into the kernel's
        # own work directory, which the host sees under the backend's private dir.
        name = f"running-{secrets.token_hex(4)}"
        code = f"import pathlib, time\npathlib.Path({name!r}).touch()\ntime.sleep(60)"
        running = asyncio.create_task(
            client.post(f"/sessions/{ids[0]}/run", json={"code": code}, headers=AUTH)
        )
        pending = [asyncio.create_task(client.post("/sessions", headers=AUTH)) for _ in range(3)]
        deadline = time.monotonic() + 30
        while not glob.glob(f"/tmp/ame-*/work/*/{name}"):
            assert time.monotonic() < deadline, "the code never started"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        assert not any(task.done() for task in pending), "the creates should wait for a sandbox"
        took = await interrupt_and_wait(process, 30)
        assert took < 10, f"shutdown took {took:.1f} s"
        answers = await asyncio.gather(running, *pending, return_exceptions=True)
    assert process.returncode == 0
    for answer in answers:  # none hung: uvicorn answers the requests it cancels with 500
        assert isinstance(answer, httpx.TransportError | httpx.Response), answer
        assert not isinstance(answer, httpx.Response) or answer.status_code in (500, 503), answer


async def test_idle_sessions_expire(gateway: GatewayEndpoint) -> None:
    app = make_app(gateway, session_idle_timeout=1, min_idle=1, max_size=2)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        session = await new_session(client)
        assert (
            await client.post(f"/sessions/{session}/run", json={"code": "1"}, headers=AUTH)
        ).status_code == 200
        await asyncio.sleep(2.5)
        expired = await client.post(f"/sessions/{session}/run", json={"code": "1"}, headers=AUTH)
        assert expired.status_code == 404 and "expired" in expired.json()["detail"]
        assert len(app.state.sandbox_sessions) == 0


async def sse_kinds(client: httpx.AsyncClient, session: str, code: str) -> list[str]:
    """The event kinds of one streamed run, in order (the response must be 200)."""
    kinds: list[str] = []
    async with client.stream(
        "POST", f"/sessions/{session}/stream", json={"code": code}, headers=AUTH
    ) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kinds.append(line[7:])
    return kinds


async def test_a_session_running_code_never_expires(gateway: GatewayEndpoint) -> None:
    # Every run below lasts well past the 1 s idle timeout (the store checks every second).
    app = make_app(gateway, session_idle_timeout=1, min_idle=1, max_size=2)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        session = await new_session(client)
        run = f"/sessions/{session}/run"
        long_run = await client.post(run, json={"code": "import time\ntime.sleep(3.5)\n'done'"}, headers=AUTH)
        assert long_run.status_code == 200, long_run.text
        assert long_run.json()["value"]["data"]["text/plain"] == "'done'"
        assert "failure" not in long_run.json()
        # The whole SSE stream counts as running, not just the request that opened it.
        code = "import time\nprint('a', flush=True)\ntime.sleep(3.5)\nprint('b')"
        assert await sse_kinds(client, session, code) == ["stdout", "stdout", "end"]
        # An interrupt that ends while the run goes on leaves the session busy.
        stubborn = "import time\ntry:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    time.sleep(3.5)\n'survived'"
        running = asyncio.create_task(client.post(run, json={"code": stubborn}, headers=AUTH))
        await asyncio.sleep(0.5)
        assert (await client.post(f"/sessions/{session}/interrupt", headers=AUTH)).status_code == 204
        survived = await running
        assert survived.status_code == 200, survived.text
        assert survived.json()["value"]["data"]["text/plain"] == "'survived'"
        assert len(app.state.sandbox_sessions) == 1
        # The idle clock starts when the last request ends.
        await asyncio.sleep(2.5)
        expired = await client.post(run, json={"code": "1"}, headers=AUTH)
        assert expired.status_code == 404 and "expired" in expired.json()["detail"]
        assert len(app.state.sandbox_sessions) == 0


async def give_up_creating(url: str, after: float = 1.0) -> None:
    """POST /sessions, then close the connection after ``after`` seconds without an answer."""
    async with httpx.AsyncClient(base_url=url) as quitter:
        with pytest.raises(httpx.ReadTimeout):
            await quitter.post("/sessions", headers=AUTH, timeout=after)


async def test_an_abandoned_create_gives_the_sandbox_back(gateway: GatewayEndpoint) -> None:
    app = make_app(gateway, min_idle=1, max_size=1, acquire_timeout=8)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        holder = await new_session(client)
        await give_up_creating(url)  # B waits for the one sandbox, then leaves
        assert (await client.delete(f"/sessions/{holder}", headers=AUTH)).status_code == 204
        began = time.monotonic()
        response = await client.post("/sessions", headers=AUTH)
        took = time.monotonic() - began
        assert response.status_code == 201, f"{response.status_code} after {took:.1f} s: {response.text}"
        assert took < 5, f"the next create waited {took:.1f} s"
        assert list(app.state.sandbox_sessions._sessions) == [response.json()["id"]]


async def test_twenty_abandoned_creates_leave_the_capacity_intact(gateway: GatewayEndpoint) -> None:
    app = make_app(gateway, min_idle=1, max_size=1, acquire_timeout=8)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        holder = await new_session(client)
        await asyncio.gather(*(give_up_creating(url) for _ in range(20)))
        assert (await client.delete(f"/sessions/{holder}", headers=AUTH)).status_code == 204
        for _ in range(3):  # the one sandbox serves one session after another, as before
            began = time.monotonic()
            response = await client.post("/sessions", headers=AUTH)
            took = time.monotonic() - began
            assert response.status_code == 201, f"{response.status_code} after {took:.1f} s: {response.text}"
            assert took < 5, f"a create waited {took:.1f} s"
            assert len(app.state.sandbox_sessions) == 1
            session = response.json()["id"]
            assert (await client.delete(f"/sessions/{session}", headers=AUTH)).status_code == 204
        assert app.state.sandbox_pool._waiting == 0, "a create still waits for a sandbox"


class BodyBytesRead:
    """ASGI middleware (test only): counts the request-body bytes the app has received."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.read = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.read += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


async def post_reading_early(url: str, body: io.BytesIO | AsyncIterator[bytes]) -> tuple[int, Any]:
    """POST ``body`` (JSON) with aiohttp; the status and the JSON answer.

    aiohttp reads the answer while it still sends, as curl does.
    httpx reads it only once the whole body is sent, so an early 413 on a
    connection the server then closes reaches it as a ReadError.
    """
    headers = {**AUTH, "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as response:
        return response.status, await response.json()


async def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(gateway: GatewayEndpoint) -> None:
    limit = 2_000_000  # sessions_router's default max_body_bytes
    app = make_app(gateway, min_idle=1, max_size=1)
    counter = BodyBytesRead(app)
    async with serve(counter) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        session = await new_session(client)
        sent = 0

        async def forty_megabytes() -> AsyncIterator[bytes]:
            nonlocal sent
            for part in (b'{"code": "', *([b"x" * 65_536] * 640), b'"}'):  # valid JSON, 40 MiB of code
                sent += len(part)
                yield part

        counter.read = 0
        status, answer = await post_reading_early(f"{url}/sessions/{session}/run", forty_megabytes())
        assert status == 413, answer
        # What one read of the socket brings past the limit, no more; the rest is never read.
        assert counter.read < limit + 2**20, f"the server read {counter.read} bytes (sent {sent})"
        assert sent < 20 * 2**20, f"the client got to send {sent} bytes"
        assert answer == {"detail": f"request body over {limit} bytes"}
        # A body announced too large is refused before any of it is read.
        counter.read = 0
        declared = io.BytesIO(b"x" * 40 * 2**20)  # sent with its Content-Length
        assert await post_reading_early(f"{url}/sessions/{session}/run", declared) == (413, answer)
        assert counter.read == 0
        # The session is fine, and so is the next request on a new connection.
        ok = await client.post(f"/sessions/{session}/run", json={"code": "6 * 7"}, headers=AUTH)
        assert ok.json()["value"]["data"]["text/plain"] == "42"


async def test_sse_sends_keep_alive_comments_while_the_code_is_silent(gateway: GatewayEndpoint) -> None:
    app = make_app(gateway, router_options={"keepalive": 0.5}, min_idle=1, max_size=1)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        session = await new_session(client)
        code = "import time\ntime.sleep(2)\nprint('awake')"
        began = time.monotonic()
        lines: list[tuple[str, float]] = []
        async with client.stream(
            "POST", f"/sessions/{session}/stream", json={"code": code}, headers=AUTH
        ) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append((line, time.monotonic() - began))
        events = [(line[7:], at) for line, at in lines if line.startswith("event: ")]
        assert [kind for kind, _ in events] == ["stdout", "end"]
        awake = events[0][1]
        comments = [at for line, at in lines if line == ": keep-alive"]
        assert len([at for at in comments if at < awake]) >= 2, lines
        assert comments[0] < 1.5, lines
        assert "data: " + json.dumps({"text": "awake\n"}) in [line for line, _ in lines]


async def test_closing_the_store_ends_the_creates_still_waiting(gateway: GatewayEndpoint) -> None:
    # What the lifespan's shutdown does when a server runs it while creates still wait.
    pool = SandboxPool(
        lambda: GatewayBackend(gateway.base_url, gateway.token), min_idle=1, max_size=1, acquire_timeout=30
    )
    async with pool:
        store = SessionStore(pool)
        store.start()
        await store.create()  # holds the one sandbox
        waiting = asyncio.create_task(store.create())
        await asyncio.sleep(0.5)
        assert not waiting.done()
        began = time.monotonic()
        await store.aclose()
        with pytest.raises(ExecutorStateError, match="closed"):
            await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - began < 5
        assert len(store) == 0
        with pytest.raises(ExecutorStateError, match="closed"):
            await store.create()
    assert await kernels_on(gateway) == []


async def test_leaving_an_sse_stream_interrupts_the_kernel(gateway: GatewayEndpoint, tmp_path: Path) -> None:
    app = make_app(gateway, router_options={"keepalive": 0.2}, min_idle=1, max_size=1)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        session = await new_session(client)
        run = f"/sessions/{session}/run"
        await client.post(run, json={"code": "kept = 'still here'"}, headers=AUTH)
        marker = tmp_path / "running"
        async with client.stream(
            "POST", f"/sessions/{session}/stream", json={"code": sleeper(marker, 60)}, headers=AUTH
        ) as response:
            async for line in response.aiter_lines():
                if line == ": keep-alive" and marker.exists():
                    break  # leaves mid-stream: the connection is closed
        began = time.monotonic()
        response = await client.post(run, json={"code": "kept"}, headers=AUTH)
        assert response.json()["value"]["data"]["text/plain"] == "'still here'"
        assert time.monotonic() - began < 10, "the abandoned 60 s sleep was not interrupted"
        assert app.state.sandbox_sessions._sessions[session].busy == 0


async def test_run_and_stream_report_failures_the_same_way(gateway: GatewayEndpoint) -> None:
    app = make_app(gateway, min_idle=1, max_size=2)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        session = await new_session(client)
        run = f"/sessions/{session}/run"
        ok = (await client.post(run, json={"code": "kept = 1\nkept"}, headers=AUTH)).json()
        assert ok["status"] == "ok" and "failure" not in ok
        assert ok["execution_count"] == 1  # numbered per kernel, not always 0
        raised = (await client.post(run, json={"code": "print('before')\n1 / 0"}, headers=AUTH)).json()
        assert raised["status"] == "error" and raised["error"]["ename"] == "ZeroDivisionError"
        assert raised["stdout"] == "before\n" and raised["execution_count"] == 2
        spin = {"code": "print('spinning', flush=True)\nwhile True: pass", "timeout": 1}
        answer = await client.post(run, json=spin, headers=AUTH)
        assert answer.status_code == 200
        timed_out = answer.json()
        assert timed_out["status"] == "failed" and timed_out["stdout"] == "spinning\n"
        failure = timed_out["failure"]
        assert failure["type"] == "ExecutionTimeout" and failure["recovery"] == "interrupted"
        assert failure["state_kept"] is True and "timed out" in failure["message"]
        # The same object as the failure event of a streamed run.
        async with client.stream("POST", f"/sessions/{session}/stream", json=spin, headers=AUTH) as response:
            body = (await response.aread()).decode()
        event = body.split("event: failure\ndata: ", 1)[1].split("\n", 1)[0]
        streamed = json.loads(event)
        assert streamed.keys() == failure.keys() and streamed["type"] == "ExecutionTimeout"
        assert streamed["recovery"] == "interrupted"
        assert (await client.post(run, json={"code": "kept"}, headers=AUTH)).json()["status"] == "ok"


async def test_files_go_in_and_out_of_a_session_over_http(gateway: GatewayEndpoint) -> None:
    limit = 8 * 2**20
    app = make_app(gateway, min_idle=1, max_size=1, router_options={"max_file_bytes": limit})
    folder = f"http-files-{secrets.token_hex(4)}"  # the session gateway's work dir is shared
    data = os.urandom(5 * 2**20 + 3)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        session = await new_session(client)
        files = f"/sessions/{session}/files"

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(data), 100_000):
                yield data[start : start + 100_000]

        put = await client.put(f"{files}/{folder}/blob.bin", content=pieces(), headers=AUTH)
        assert put.status_code == 201, put.text
        assert put.json()["size"] == len(data) and put.json()["name"] == "blob.bin"
        async with client.stream("GET", f"{files}/{folder}/blob.bin", headers=AUTH) as got:
            assert got.status_code == 200
            assert got.headers["content-length"] == str(len(data))
            assert b"".join([chunk async for chunk in got.aiter_bytes()]) == data
        # A client that leaves mid-download lets go of the kernel: the next run is not kept waiting.
        async with client.stream("GET", f"{files}/{folder}/blob.bin", headers=AUTH) as left:
            async for _ in left.aiter_raw(65536):
                break
        with anyio.fail_after(10):
            seen = await client.post(
                f"/sessions/{session}/run",
                json={"code": f"import os\nos.path.getsize('{folder}/blob.bin')"},
                headers=AUTH,
            )
        assert seen.json()["value"]["data"]["text/plain"] == str(len(data))

        assert (await client.get(f"{files}/{folder}/blob.bin")).status_code == 401
        assert (await client.put(f"{files}/%2E%2E/escape.txt", content=b"x", headers=AUTH)).status_code == 403
        assert (await client.get(f"{files}/{folder}/missing", headers=AUTH)).status_code == 404
        assert (await client.get(f"{files}/{folder}", headers=AUTH)).status_code == 400
        assert (await client.get(f"/sessions/nope/files/{folder}/blob.bin", headers=AUTH)).status_code == 404

        async def too_big() -> AsyncIterator[bytes]:
            for _ in range(40):
                yield b"x" * 2**20

        status, _ = await put_reading_early(f"{url}{files}/{folder}/big.bin", too_big())
        assert status == 413
        listing = await client.post(
            f"/sessions/{session}/run",
            json={"code": f"import os\nsorted(os.listdir('{folder}'))"},
            headers=AUTH,
        )
        assert listing.json()["value"]["data"]["text/plain"] == "['blob.bin']", "a partial upload was left"

        assert (await client.delete(f"{files}/{folder}/blob.bin", headers=AUTH)).status_code == 204
        assert (await client.get(f"{files}/{folder}/blob.bin", headers=AUTH)).status_code == 404
        gone = await client.delete(f"{files}/{folder}", params={"recursive": "true"}, headers=AUTH)
        assert gone.status_code == 204


async def put_reading_early(url: str, body: AsyncIterator[bytes]) -> tuple[int, str]:
    """PUT a streamed body with aiohttp, which reads an early answer while it still sends."""
    async with aiohttp.ClientSession() as http, http.put(url, data=body, headers=AUTH) as response:
        return response.status, await response.text()


async def test_a_pool_that_cannot_start_sandboxes_answers_503_with_the_cause_at_once() -> None:
    def pool() -> SandboxPool:
        # A backend that can never start (a URL the backend refuses): permanent.
        return SandboxPool(lambda: GatewayBackend("gateway.example:8888"), acquire_timeout=60)

    app = FastAPI(lifespan=pool_lifespan(pool))
    app.include_router(sessions_router(token=TOKEN))
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        began = asyncio.get_running_loop().time()
        response = await client.post("/sessions", headers=AUTH)
        assert response.status_code == 503, response.text
        assert "gateway url must look like" in response.json()["detail"]
        assert asyncio.get_running_loop().time() - began < 10  # not the pool's 60 s acquire_timeout
