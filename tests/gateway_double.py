"""A scripted Kernel Gateway on loopback: REST kernels API and channels websocket, no kernels.

It serves what :class:`~async_modal_exec.session.KernelSession` and the
executor use (create, get, delete, interrupt a kernel; the channels websocket
with the JSON protocol) and answers like a gateway with an idle IPython
kernel: ``kernel_info_request`` and ``execute_request`` get their shell reply
and an IOPub ``busy``/``idle`` pair. Tests script the faults a real gateway
cannot be made to produce on demand: a slow or failing kernel creation, a
failing delete, a websocket refused or closed, a kernel that vanishes. It is
a double of the outermost boundary, used where the real gateway cannot show a
transition; the user-level paths run against the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web


@dataclass
class GatewayDouble:
    """State and script of the double; ``url`` is set while it runs."""

    url: str = ""
    kernels: dict[str, dict[str, Any]] = field(default_factory=dict)
    create_requests: int = 0  # POST /api/kernels received (answered or not)
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    interrupts: list[str] = field(default_factory=list)
    ws_sessions: list[tuple[str, str]] = field(default_factory=list)  # (kernel id, session id) per connect
    create_delay: float = 0.0
    create_status: int = 201
    delete_status: int = 204
    delete_delay: float = 0.0
    delete_requests: int = 0
    ws_status: int | None = None  # refuse the websocket handshake with this HTTP status
    execute_delay: float = 0.0  # seconds an execute_request "runs" before going idle
    sockets: list[web.WebSocketResponse] = field(default_factory=list)

    async def drop_websockets(self) -> None:
        """Close every open websocket from the gateway's side."""
        for ws in list(self.sockets):
            await ws.close()

    # -- handlers ------------------------------------------------------------------

    async def _kernelspecs(self, request: web.Request) -> web.Response:
        return web.json_response({"default": "python3", "kernelspecs": {}})

    async def _create(self, request: web.Request) -> web.Response:
        self.create_requests += 1
        await asyncio.sleep(self.create_delay)  # the kernel is created even if the client left
        if self.create_status >= 400:
            return web.Response(status=self.create_status, text="scripted failure")
        body = await request.json() if request.can_read_body else {}
        kernel_id = str(body.get("kernel_id") or uuid.uuid4())  # honoured, as Jupyter Server does
        self.kernels[kernel_id] = {"id": kernel_id, "execution_state": "idle", "connections": 0}
        self.created.append(kernel_id)
        return web.json_response(self.kernels[kernel_id], status=201)

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.kernels.values()))

    async def _get(self, request: web.Request) -> web.Response:
        model = self.kernels.get(request.match_info["kernel_id"])
        return web.json_response(model) if model else web.Response(status=404)

    async def _delete(self, request: web.Request) -> web.Response:
        kernel_id = request.match_info["kernel_id"]
        self.delete_requests += 1
        await asyncio.sleep(self.delete_delay)
        if self.delete_status >= 400:
            return web.Response(status=self.delete_status, text="scripted failure")
        if self.kernels.pop(kernel_id, None) is None:
            return web.Response(status=404)
        self.deleted.append(kernel_id)
        return web.Response(status=204)

    async def _interrupt(self, request: web.Request) -> web.Response:
        kernel_id = request.match_info["kernel_id"]
        if kernel_id not in self.kernels:
            return web.Response(status=404)
        self.interrupts.append(kernel_id)
        return web.Response(status=204)

    async def _channels(self, request: web.Request) -> web.StreamResponse:
        kernel_id = request.match_info["kernel_id"]
        if kernel_id not in self.kernels:
            return web.Response(status=404)
        if self.ws_status is not None:
            return web.Response(status=self.ws_status)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws_sessions.append((kernel_id, request.query.get("session_id", "")))
        self.sockets.append(ws)
        answers: set[asyncio.Task[None]] = set()
        try:
            async for frame in ws:  # answered in tasks, so close frames are read meanwhile
                if frame.type is WSMsgType.TEXT:
                    answer = asyncio.create_task(self._answer(ws, json.loads(frame.data)))
                    answers.add(answer)
                    answer.add_done_callback(answers.discard)
        finally:
            self.sockets.remove(ws)
            for answer in list(answers):
                answer.cancel()
            await asyncio.gather(*answers, return_exceptions=True)
        return ws

    async def _answer(self, ws: web.WebSocketResponse, message: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError):  # the client left meanwhile
            await self._answer_unguarded(ws, message)

    async def _answer_unguarded(self, ws: web.WebSocketResponse, message: dict[str, Any]) -> None:
        msg_type = message["header"]["msg_type"]
        if msg_type == "execute_request":
            await ws.send_str(_reply(message, "status", "iopub", {"execution_state": "busy"}))
            await asyncio.sleep(self.execute_delay)
            await ws.send_str(
                _reply(message, "execute_reply", "shell", {"status": "ok", "execution_count": 1})
            )
        elif msg_type == "kernel_info_request":
            await ws.send_str(_reply(message, "status", "iopub", {"execution_state": "busy"}))
            await ws.send_str(_reply(message, "kernel_info_reply", "shell", {"status": "ok"}))
        else:
            return
        await ws.send_str(_reply(message, "status", "iopub", {"execution_state": "idle"}))


def _reply(request: dict[str, Any], msg_type: str, channel: str, content: dict[str, Any]) -> str:
    return json.dumps(
        {
            "header": {"msg_id": uuid.uuid4().hex, "msg_type": msg_type},
            "parent_header": request["header"],
            "metadata": {},
            "content": content,
            "channel": channel,
        }
    )


@asynccontextmanager
async def running_gateway_double() -> AsyncIterator[GatewayDouble]:
    """Serve a :class:`GatewayDouble` on a free loopback port for the block."""
    double = GatewayDouble()
    app = web.Application()
    app.router.add_get("/api/kernelspecs", double._kernelspecs)
    app.router.add_post("/api/kernels", double._create)
    app.router.add_get("/api/kernels", double._list)
    app.router.add_get("/api/kernels/{kernel_id}", double._get)
    app.router.add_delete("/api/kernels/{kernel_id}", double._delete)
    app.router.add_post("/api/kernels/{kernel_id}/interrupt", double._interrupt)
    app.router.add_get("/api/kernels/{kernel_id}/channels", double._channels)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    double.url = f"http://127.0.0.1:{port}"
    try:
        yield double
    finally:
        await double.drop_websockets()
        await runner.cleanup()
