"""Link and process faults between the executor and a real gateway, injected for real.

The executor talks to the session's real Kernel Gateway through the TCP proxy
of ``tests/faults.py`` (reset, black-hole, stall, cut an answer); processes are
frozen with SIGSTOP. Each test is a case measured in the project's issue 11.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlsplit

import pytest

from async_modal_exec import AsyncExecutor, ExecutionTimeout, GatewayBackend, GatewayError, RecoveryOutcome
from async_modal_exec.backends import GatewayEndpoint
from async_modal_exec.gateway import GatewayClient

from .faults import FaultProxy, fault_proxy

Proxied = Callable[..., Awaitable[tuple[AsyncExecutor, FaultProxy]]]


async def kernels_on(gateway: GatewayEndpoint) -> list[Any]:
    client = GatewayClient(gateway)
    try:
        return list(await client._json("GET", "/api/kernels"))
    finally:
        await client.aclose()


@pytest.fixture
async def proxied(gateway: GatewayEndpoint) -> AsyncIterator[Proxied]:
    """Factory: an executor reaching the session gateway through a fresh fault proxy.

    After the test: every executor closed, no kernel left on the gateway.
    """
    port = urlsplit(gateway.base_url).port
    assert port is not None
    async with AsyncExitStack() as stack:
        made: list[AsyncExecutor] = []

        async def make(*, start: bool = True, **options: Any) -> tuple[AsyncExecutor, FaultProxy]:
            proxy = await stack.enter_async_context(fault_proxy(port))
            executor = AsyncExecutor(GatewayBackend(proxy.url, gateway.token), **options)
            made.append(executor)
            if start:
                await executor.start()
            return executor, proxy

        yield make
        for executor in made:
            await executor.aclose()
    deadline = time.monotonic() + 10
    while (left := await kernels_on(gateway)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert left == [], f"kernels left running: {left}"


async def test_a_reset_idle_websocket_is_reopened_before_the_request(proxied: Proxied) -> None:
    executor, proxy = await proxied()
    await executor.run("x = 41")
    await asyncio.sleep(1.2)  # idle
    proxy.reset()
    began = time.monotonic()
    result = await executor.run("x + 1", timeout=15)
    assert result.value is not None and result.value.text == "42", "the kernel's state is kept"
    assert time.monotonic() - began < 5


async def test_a_silently_dead_idle_websocket_is_noticed_before_the_request(proxied: Proxied) -> None:
    executor, proxy = await proxied()
    await executor.run("x = 41")
    await asyncio.sleep(1.2)  # idle
    proxy.stall_existing()  # no FIN, no RST: a send into it would vanish
    began = time.monotonic()
    result = await executor.run("x + 1", timeout=15)
    assert result.value is not None and result.value.text == "42", "the kernel's state is kept"
    assert time.monotonic() - began < 5


async def test_the_deadline_holds_during_an_outage_and_the_state_survives_it(proxied: Proxied) -> None:
    executor, proxy = await proxied(interrupt_grace=2.0)
    await executor.run("x = 41")
    proxy.black_hole()
    began = time.monotonic()
    with pytest.raises(ExecutionTimeout) as caught:
        await executor.run("x + 1", timeout=4)
    took = time.monotonic() - began
    assert took < 4 + 2.0 + 1.5, f"the deadline stretched to {took:.1f} s"
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.recovery is RecoveryOutcome.UNREACHABLE
    assert "could not be reached" in str(caught.value)
    proxy.heal()
    result = await executor.run("x + 1", timeout=30)
    assert result.value is not None and result.value.text == "42", "the kernel's state survives the outage"


async def test_a_lost_answer_to_the_kernel_creation_leaks_no_kernel(
    proxied: Proxied, gateway: GatewayEndpoint
) -> None:
    executor, proxy = await proxied(start=False)
    proxy.cut_response_to(b"POST /api/kernels")
    with pytest.raises(GatewayError):
        await executor.start()
    await executor.aclose()
    await asyncio.sleep(0.5)
    assert await kernels_on(gateway) == [], "the kernel the gateway made is deleted"


async def test_a_frozen_kernel_times_out_within_the_deadline_and_the_grace(proxied: Proxied) -> None:
    executor, _ = await proxied(interrupt_grace=2.0)
    result = await executor.run("import os\nos.getpid()")
    assert result.value is not None
    pid = int(result.value.text)
    os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(ExecutionTimeout) as caught:
            await executor.run("1 + 1", timeout=3)
        took = time.monotonic() - began
        assert took < 3 + 2.0 + 1.5, f"the deadline stretched to {took:.1f} s"
        assert caught.value.restarted, "a frozen kernel cannot keep its state"
    finally:
        os.kill(pid, signal.SIGCONT)
    after = await executor.run("2 + 2", timeout=60)
    assert after.value is not None and after.value.text == "4"


@pytest.mark.parametrize("round_", range(3))
async def test_output_across_websocket_cuts_is_whole_or_marked(proxied: Proxied, round_: int) -> None:
    executor, proxy = await proxied()
    code = "import time\nfor i in range(200):\n    print(i, flush=True)\n    time.sleep(0.01)"
    running = asyncio.create_task(executor.run(code, timeout=60))
    while not running.done():
        await asyncio.sleep(0.3)
        proxy.reset()
    result = running.result()
    whole = "".join(f"{i}\n" for i in range(200))
    if result.stdout != whole:
        assert result.incomplete, "output was lost without a mark"
        assert result.lost_messages > 0


async def test_a_clean_link_reports_no_loss(make_executor: Callable[..., Awaitable[AsyncExecutor]]) -> None:
    # The loss count reads the kernel's message counters: every kind of output,
    # errors, displays, host-tool calls (stdin) and thread output must add up.
    def echo(text: str) -> str:
        return text

    executor = await make_executor(host_tools=[echo])
    snippets = [
        "x = 1",
        "print('a'); print('b', file=__import__('sys').stderr); 42",
        "from IPython.display import display, HTML\ndisplay(HTML('<b>x</b>'))\nfor i in range(50): print(i)",
        "1/0",
        "echo('host') + echo('tool')",
        "import threading\nt = threading.Thread(target=print, args=('thread',))\nt.start(); t.join()",
    ]
    for _ in range(3):
        for code in snippets:
            result = await executor.run(code, timeout=30)
            assert result.lost_messages == 0, (code, result)
            assert not result.incomplete


async def test_a_request_lost_in_a_stalled_link_is_sent_again_after_the_reconnect(proxied: Proxied) -> None:
    # The link stalls (no FIN, no RST) right before the request, which is
    # lost; then only the client's side of it is reset. The gateway still
    # believes the old websocket open when the client reconnects, so it makes
    # new kernel streams for the new one. Their IOPub subscription is greeted
    # (iopub_welcome), a numbered message the client never sees (the
    # gateway's own check takes it): counted as "a message nobody saw", it
    # kept the request from being sent again, and the run waited for its
    # deadline.
    executor, proxy = await proxied()
    await executor.run("x = 41")
    proxy.stall_existing()
    running = asyncio.create_task(executor.run("x + 1", timeout=20))
    await asyncio.sleep(0.5)  # the request went into the stalled link
    for link in list(proxy.links):
        link.client.transport.abort()  # the gateway's side stays open, stalled
    result = await running
    assert result.value is not None and result.value.text == "42"
