"""Where the time of one ``x += 1`` goes: to the kernel, in the kernel, back to the client.

Each execution is split with the kernel's own timestamps (the ``date`` of its
``busy`` and ``idle`` status messages; client and kernel share the clock):

in      request sent -> kernel publishes ``busy`` (the next request is sent
        once the previous reply is in, on both sides)
kernel  ``busy`` -> ``idle`` (the kernel's work, including its thread hand-offs)
out     ``idle`` published -> received by the client
total   request sent -> ``idle`` received (median of each column separately)

Sides, alternating, each on a kernel of its own from the launcher's tuned spec,
unsigned and ``store_history=False`` on both:

ours  a bare websocket client (v1 protocol) through our launcher's gateway: the
      transport without the executor's bookkeeping
ref   jupyter_client's ``AsyncKernelClient`` straight to the kernel's sockets

``--pin kernel`` puts every thread of each kernel on the machine's last CPU
(the gateway and the client stay free), on both sides alike.

Usage: python benchmarks/hops.py [--executions N] [--rounds N] [--pin none|kernel]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import websockets
from scale import Reference, _children

from async_modal_exec import LocalBackend
from async_modal_exec.protocol import decode_v1, encode_v1

V1 = "v1.kernel.websocket.jupyter.org"
COLUMNS = ("in", "kernel", "out", "total")


def pin_to_last_cpu(pid: int) -> None:
    cpu = max(os.sched_getaffinity(0))
    for thread in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(thread), {cpu})


def timestamp(date: Any) -> float:
    if isinstance(date, datetime):
        return date.timestamp()
    return datetime.fromisoformat(str(date).replace("Z", "+00:00")).timestamp()


def execute_request(code: str, session: str) -> dict[str, Any]:
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": "execute_request",
        "session": session,
        "username": "",
        "date": datetime.now().astimezone().isoformat(),
        "version": "5.3",
    }
    content = {
        "code": code,
        "silent": False,
        "store_history": False,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
    }
    return {"channel": "shell", "header": header, "parent_header": {}, "metadata": {}, "content": content}


Row = tuple[float, float, float, float]
Receive = Callable[[], Awaitable[dict[str, Any]]]


async def one_execution(sent: float, msg_id: str, receive: Receive, *, with_reply: bool) -> Row:
    """Timed at ``idle``; with ``with_reply`` (one socket for all channels) also waits for the reply."""
    busy = idle = received = None
    replied = not with_reply
    while idle is None or not replied:
        message = await receive()
        now = time.time()
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        replied = replied or message["header"]["msg_type"] == "execute_reply"
        if message["header"]["msg_type"] != "status":
            continue
        state = message["content"]["execution_state"]
        if state == "busy":
            busy = timestamp(message["header"]["date"])
        elif state == "idle":
            idle, received = timestamp(message["header"]["date"]), now
    assert busy is not None and received is not None
    return (busy - sent, idle - busy, received - idle, received - sent)


async def ours(executions: int, pin: bool) -> list[Row]:
    backend = LocalBackend(isolation="none")
    endpoint = (await backend.start()).endpoint
    try:
        async with aiohttp.ClientSession(headers=endpoint.headers) as http:
            async with http.post(f"{endpoint.base_url}/api/kernels", json={"name": "python3"}) as response:
                kernel_id = (await response.json())["id"]
            if pin:
                pin_to_last_cpu(_children(backend.pid)[0])  # type: ignore[attr-defined]
            url = endpoint.base_url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
            async with websockets.connect(
                url, additional_headers=endpoint.headers, subprotocols=[V1], compression=None, max_size=None
            ) as socket:
                session = uuid.uuid4().hex

                async def receive() -> dict[str, Any]:
                    return decode_v1(await socket.recv())  # type: ignore[arg-type]

                rows = []
                for index in range(executions + 50):
                    request = execute_request("x = 0" if index == 0 else "x += 1", session)
                    sent = time.time()
                    await socket.send(encode_v1(request))
                    row = await one_execution(sent, request["header"]["msg_id"], receive, with_reply=True)
                    if index >= 50:  # warm-up
                        rows.append(row)
                return rows
    finally:
        await backend.aclose()


async def ref(executions: int, pin: bool) -> list[Row]:
    reference = await Reference(signed=False).start()
    try:
        client = reference.client
        if pin:
            pin_to_last_cpu(reference.manager.provisioner.pid)  # type: ignore[union-attr]
        rows = []
        for index in range(executions + 50):
            sent = time.time()
            msg_id = client.execute("x = 0" if index == 0 else "x += 1", store_history=False)
            row = await one_execution(sent, msg_id, client.get_iopub_msg, with_reply=False)
            await client.get_shell_msg()
            if index >= 50:
                rows.append(row)
        return rows
    finally:
        await reference.aclose()


def medians(rows: list[Row]) -> dict[str, float]:
    return {
        name: round(statistics.median(column) * 1000, 3)
        for name, column in zip(COLUMNS, zip(*rows, strict=True), strict=True)
    }


async def main_async(args: argparse.Namespace) -> None:
    pin = args.pin == "kernel"
    for round_number in range(1, args.rounds + 1):
        figures = {
            "ours": medians(await ours(args.executions, pin)),
            "ref": medians(await ref(args.executions, pin)),
        }
        for side, row in figures.items():
            print(
                f"round {round_number} pin={args.pin} {side:4}",
                "  ".join(f"{k} {v:.3f}" for k, v in row.items()),
            )
        print(
            f"round {round_number} pin={args.pin} ours/ref total {figures['ours']['total'] / figures['ref']['total']:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--executions", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pin", choices=("none", "kernel"), default="none")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
