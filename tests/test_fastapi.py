"""FastAPI embedding served by a real uvicorn on loopback, driven with httpx over TCP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI

from async_modal_exec import (
    AsyncExecutor,
    AsyncModalExecError,
    GatewayBackend,
    GatewayEndpoint,
    SandboxPool,
    SessionNotFound,
)
from async_modal_exec.fastapi import SessionStore, pool_lifespan, pooled_executor, sessions_router
from async_modal_exec.gateway import GatewayClient

from .helpers import descendants, measure_loop_lag, wait_gone

TOKEN = "test-token-3c9a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[str]:
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


def make_app(gateway: GatewayEndpoint, session_idle_timeout: float = 600, **pool_options: Any) -> FastAPI:
    def pool() -> SandboxPool:
        return SandboxPool(lambda: GatewayBackend(gateway.base_url, gateway.token), **pool_options)

    app = FastAPI(lifespan=pool_lifespan(pool, session_idle_timeout=session_idle_timeout))
    app.include_router(sessions_router(token=TOKEN, max_code_bytes=10_000, run_timeout=60))

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


async def test_example_app_runs_with_one_command_and_shuts_down_clean() -> None:
    # `python examples/agent_server.py`, as a newcomer runs it: offline scripted model, local pool.
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
            response = await client.post("/agent", json={"task": "Sum the numbers 1 to 10."})
            assert response.status_code == 200, response.text
            assert response.json()["answer"] == {"total": 55}
            session = await new_session(client)
            async with client.stream(
                "POST", f"/sessions/{session}/stream", json={"code": "print('streamed')"}, headers=AUTH
            ) as stream:
                body = "".join([chunk async for chunk in stream.aiter_text()])
            assert "event: stdout" in body and "streamed" in body and "event: end" in body
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            await asyncio.wait_for(process.wait(), 60)
    assert process.returncode == 0
    assert await wait_gone([pid for pid in descendants() if pid not in before]) == []


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
