"""Many executors at once: nothing blocks the loop, everything comes up, work overlaps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from async_modal_exec import AsyncExecutor, LocalBackend

from .helpers import descendants, measure_loop_lag, wait_gone

MakeExecutor = Callable[..., Awaitable[AsyncExecutor]]
# Nothing the package runs may hold the loop for 20 ms. Wake-up lag also counts
# time the OS gave both cores to the kernels starting: a generous bound only.
MAX_BLOCK = 0.020
MAX_WAKEUP_LAG = 0.150


@pytest.mark.slow
async def test_eight_local_backends_start_together_without_blocking_the_loop() -> None:
    before = set(descendants())
    executors = [AsyncExecutor(LocalBackend()) for _ in range(8)]
    try:
        async with measure_loop_lag() as probe:
            await asyncio.gather(*(executor.start() for executor in executors))
            results = await asyncio.gather(*(ex.run(f"{i} * 2") for i, ex in enumerate(executors)))
            started = time.monotonic()
            await asyncio.gather(*(ex.run("import time\ntime.sleep(0.5)") for ex in executors))
            elapsed = time.monotonic() - started
        assert [r.value.text for r in results] == [str(i * 2) for i in range(8)]  # type: ignore[union-attr]
        assert elapsed < 2.0, f"8 concurrent 0.5 s sleeps took {elapsed:.2f} s"
        assert probe.max_callback < MAX_BLOCK, probe.summary()
        assert probe.max_lag < MAX_WAKEUP_LAG, probe.summary()
    finally:
        await asyncio.gather(*(executor.aclose() for executor in executors))
    started_here = [pid for pid in descendants() if pid not in before]
    assert await wait_gone(started_here) == []


@pytest.mark.parametrize("round_", range(8))
async def test_eight_kernels_start_together_on_one_gateway(make_executor: MakeExecutor, round_: int) -> None:
    # IPC transport: no port race between kernels started at the same moment
    # (with TCP, about 1 run in 13 hung one kernel for ~60 s).
    async with measure_loop_lag() as probe:
        executors = await asyncio.wait_for(asyncio.gather(*(make_executor() for _ in range(8))), 60)
        results = await asyncio.gather(*(ex.run("'up'", timeout=30) for ex in executors))
    assert all(r.value is not None and r.value.text == "'up'" for r in results)
    assert probe.max_callback < MAX_BLOCK, probe.summary()
    assert probe.max_lag < MAX_WAKEUP_LAG, probe.summary()


async def test_the_probe_sees_a_blocking_call() -> None:
    # The probe must be able to fail: a blocking sleep inside a task step is caught.
    async with measure_loop_lag() as probe:
        await asyncio.sleep(0.02)
        time.sleep(0.03)  # noqa: ASYNC251 - blocking on purpose
        await asyncio.sleep(0.02)
    assert probe.max_callback >= 0.025
    assert probe.max_lag >= 0.02


async def test_the_probe_sees_a_busy_computation() -> None:
    # Computing on the loop counts too; only time spent waiting for a CPU is excluded.
    async with measure_loop_lag() as probe:
        await asyncio.sleep(0.02)
        deadline = time.perf_counter() + 0.03
        while time.perf_counter() < deadline:
            pass
        await asyncio.sleep(0.02)
    assert probe.max_callback >= 0.025, probe.summary()


async def test_the_probe_sees_a_thread_holding_the_gil() -> None:
    # The wake-up lag excuses only waiting for a CPU: a worker thread that keeps
    # the GIL (one long C call) stalls the loop's thread and is counted.
    started = time.perf_counter()
    sum(range(2_000_000))
    per_item = (time.perf_counter() - started) / 2_000_000
    items = int(0.3 / per_item)  # about 300 ms inside one C call
    async with measure_loop_lag() as probe:
        await asyncio.sleep(0.02)
        await asyncio.to_thread(sum, range(items))
        await asyncio.sleep(0.02)
    assert probe.max_lag >= 0.1, probe.summary()
