"""KernelChannel.confirm_iopub: a new websocket is used only once the kernel's IOPub reaches it.

Whether the gateway's first IOPub messages are lost is a race with ZeroMQ's
subscription, which a real gateway cannot be made to lose on demand. The retry
and the failure paths are therefore shown against a scripted websocket server
on loopback (a double of the gateway, the outermost boundary); the working path
runs against the real gateway.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from async_modal_exec import GatewayError
from async_modal_exec.backends import GatewayEndpoint
from async_modal_exec.channel import KernelChannel
from async_modal_exec.errors import GatewayUnreachable
from async_modal_exec.fold import ExecutionFold
from async_modal_exec.gateway import GatewayClient
from async_modal_exec.protocol import execute_request, msg_id_of, new_session_id

from .helpers import legacy_binary_frame


def _answer(request: dict[str, Any], msg_type: str, channel: str, content: dict[str, Any]) -> str:
    return json.dumps(
        {
            "header": {"msg_id": new_session_id(), "msg_type": msg_type},
            "parent_header": request["header"],
            "metadata": {},
            "content": content,
            "channel": channel,
        }
    )


class ScriptedGateway:
    """Answers ``kernel_info_request`` on shell; on IOPub only from request ``lose_first + 1`` on.

    That is what a client sees while the gateway's IOPub subscription is not in
    effect yet: the kernel replies, but its status messages are lost. The
    server offers no subprotocol, so the client speaks the JSON protocol.
    """

    def __init__(
        self,
        lose_first: float = 0,
        *,
        close_at_first: bool = False,
        dies: bool = False,
        silent: bool = False,
        binary_iopub: bool = False,
    ) -> None:
        self.lose_first = lose_first
        self.close_at_first = close_at_first
        self.dies = dies
        self.silent = silent
        self.binary_iopub = binary_iopub
        self.requests = 0
        self.url = ""

    async def handle(self, websocket: ServerConnection) -> None:
        async for frame in websocket:
            request = json.loads(frame)
            assert request["header"]["msg_type"] == "kernel_info_request"
            self.requests += 1
            if self.close_at_first:
                await websocket.close()
                return
            if self.silent:
                continue
            if self.dies:
                # What the gateway broadcasts when its restarter finds the kernel dead.
                dead = {
                    "header": {"msg_type": "status"},
                    "content": {"execution_state": "dead"},
                    "channel": "iopub",
                }
                await websocket.send(json.dumps(dead))
                continue
            # Unrelated traffic first: the check must wait for its own answer.
            await websocket.send(
                json.dumps({"header": {"msg_type": "status"}, "parent_header": {}, "channel": "iopub"})
            )
            await websocket.send(_answer(request, "kernel_info_reply", "shell", {"status": "ok"}))
            if self.requests > self.lose_first:
                status = _answer(request, "status", "iopub", {"execution_state": "idle"})
                await websocket.send(
                    legacy_binary_frame(status.encode(), b"\x00\xff") if self.binary_iopub else status
                )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ScriptedGateway]:
        async with serve(self.handle, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            self.url = f"ws://127.0.0.1:{port}/api/kernels/k/channels"
            yield self


@asynccontextmanager
async def connected(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[KernelChannel]:
    channel = KernelChannel(url, headers=headers or {}, ssl_context=None, max_message_bytes=None)
    await channel.open()
    try:
        yield channel
    finally:
        await channel.aclose()


async def test_confirm_iopub_asks_again_when_the_reply_comes_without_iopub() -> None:
    async with ScriptedGateway(lose_first=2).running() as gateway, connected(gateway.url) as channel:
        began = time.monotonic()
        await channel.confirm_iopub(session="s", timeout=10)
        elapsed = time.monotonic() - began
    # Asked again soon after each IOPub-less reply (not after retry_every = 1 s):
    # two or, on a very slow machine, a few more repeats.
    assert gateway.requests >= 3
    assert elapsed < 1.9


async def test_confirm_iopub_asks_again_when_nothing_answers() -> None:
    async with ScriptedGateway(silent=True).running() as gateway, connected(gateway.url) as channel:
        with pytest.raises(GatewayUnreachable, match=r"did not answer kernel_info_request within 0\.5 s"):
            await channel.confirm_iopub(session="s", timeout=0.5, retry_every=0.1)
    assert gateway.requests >= 3


async def test_confirm_iopub_gives_up_with_a_clear_error() -> None:
    async with ScriptedGateway(lose_first=math.inf).running() as gateway, connected(gateway.url) as channel:
        with pytest.raises(GatewayUnreachable, match=r"answered, but nothing .* on IOPub within 0\.3 s"):
            await channel.confirm_iopub(session="s", timeout=0.3)
    assert gateway.requests >= 3


async def test_confirm_iopub_reports_a_closed_websocket() -> None:
    scripted = ScriptedGateway(close_at_first=True)
    async with scripted.running() as gateway, connected(gateway.url) as channel:
        with pytest.raises(GatewayUnreachable, match="closed before IOPub answered"):
            await channel.confirm_iopub(session="s", timeout=10)


async def test_confirm_iopub_stops_when_the_kernel_dies() -> None:
    async with ScriptedGateway(dies=True).running() as gateway, connected(gateway.url) as channel:
        with pytest.raises(GatewayError, match="died before it answered"):
            await channel.confirm_iopub(session="s", timeout=10)
    assert gateway.requests == 1


async def test_json_protocol_binary_frames_are_decoded() -> None:
    # Without the v1 subprotocol, a message with buffers comes as a binary frame.
    async with ScriptedGateway(binary_iopub=True).running() as gateway, connected(gateway.url) as channel:
        await channel.confirm_iopub(session="s", timeout=10)
    assert gateway.requests == 1


async def test_confirm_iopub_on_a_real_gateway_then_execute(gateway: GatewayEndpoint) -> None:
    """The check passes on a real gateway, and its late answers do not disturb the next execution.

    (On a fresh idle kernel the gateway makes its own check too, so this does
    not show the race; test_executor's restart test is where it once showed.)
    """
    client = GatewayClient(gateway)
    kernel_id = await client.create_kernel()
    try:
        session = new_session_id()
        async with connected(client.websocket_url(kernel_id, session), gateway.headers) as channel:
            await channel.confirm_iopub(session=session, timeout=30)
            request = execute_request("print('after the check')\n6 * 7", session=session)
            fold = ExecutionFold(msg_id_of(request))
            await channel.send(request)
            while not fold.done:
                fold.feed(await channel.receive())  # late kernel-info answers are not ours: ignored
        result = fold.result()
        assert result.stdout == "after the check\n"
        assert result.value is not None and result.value.text == "42"
    finally:
        await client.delete_kernel(kernel_id)
        await client.aclose()
