"""Shared test helpers: event-loop lag probe, process-tree inspection."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from async_modal_exec.backends.local import _process_tree


@dataclass
class LagProbe:
    """Measures how late the event loop wakes a task that sleeps ``interval`` seconds."""

    interval: float = 0.005
    samples: list[float] = field(default_factory=list)

    @property
    def max_lag(self) -> float:
        return max(self.samples, default=0.0)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            self.samples.append(loop.time() - before - self.interval)


@asynccontextmanager
async def measure_loop_lag(interval: float = 0.005) -> AsyncIterator[LagProbe]:
    """Run a lag probe for the duration of the block."""
    probe = LagProbe(interval)
    task = asyncio.create_task(probe._run())
    try:
        yield probe
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def descendants() -> list[int]:
    """PIDs of every live process started (directly or not) by this test process."""
    return [pid for pid, _ in _process_tree(os.getpid()) if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (zombies count as gone)."""
    return _alive(pid)


async def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait until none of ``pids`` is alive; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        await asyncio.sleep(0.05)
