"""Shared test helpers: event-loop lag probe, process-tree inspection."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from async_modal_exec.backends.local import _process_tree


@dataclass
class LagProbe:
    """Watches the running event loop for blocking.

    Two measures:

    * ``max_callback``: the longest single callback or task step run by this
      loop's thread: its wall time minus the time the thread was runnable but
      waiting for a CPU (Linux ``schedstat``), so preemption on a busy machine
      does not count but computing or waiting does. Code that blocks the loop
      (a synchronous HTTP call, ``time.sleep``, a blocking Modal call) shows up
      here directly. Time the garbage collector ran (in any thread: it holds
      the GIL) during a callback is not counted either; what earlier tests
      left is collected and frozen before the measurement starts.
    * ``max_lag``: how late a task sleeping ``interval`` seconds wakes up,
      minus the time the loop's thread was runnable but waiting for a CPU and
      the time the garbage collector ran meanwhile. What remains is the loop
      being busy (many callbacks in one iteration) or its thread waiting for
      the GIL that another thread of this process holds. ``max_raw_lag`` keeps
      the plain measure: on a 2-core machine, eight kernels starting at once
      keep both cores busy and stretch it by hundreds of milliseconds, which
      no asyncio code can prevent (one CI run in ten saw 250 ms).
    """

    interval: float = 0.005
    samples: list[float] = field(default_factory=list)
    raw_samples: list[float] = field(default_factory=list)
    not_ours: Callable[[], float] = lambda: 0.0  # seconds of CPU wait and GC so far
    callbacks: list[float] = field(default_factory=list)
    callbacks_wall: list[float] = field(default_factory=list)
    slowest: str = ""

    @property
    def max_lag(self) -> float:
        return max(self.samples, default=0.0)

    @property
    def max_raw_lag(self) -> float:
        return max(self.raw_samples, default=0.0)

    @property
    def max_callback(self) -> float:
        return max(self.callbacks, default=0.0)

    @property
    def max_callback_wall(self) -> float:
        return max(self.callbacks_wall, default=0.0)

    def summary(self) -> str:
        return (
            f"longest callback {self.max_callback * 1000:.1f} ms ({self.slowest}), "
            f"longest including preemption {self.max_callback_wall * 1000:.1f} ms, "
            f"wake-up lag {self.max_lag * 1000:.1f} ms "
            f"({self.max_raw_lag * 1000:.1f} ms including preemption), "
            f"garbage collections {len(GC_PAUSES)} (longest {max(GC_PAUSES, default=0) * 1000:.1f} ms, not counted)"
        )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before, excused = loop.time(), self.not_ours()
            await asyncio.sleep(self.interval)
            lag = loop.time() - before - self.interval
            self.raw_samples.append(lag)
            self.samples.append(max(0.0, lag - (self.not_ours() - excused)))


@asynccontextmanager
async def measure_loop_lag(interval: float = 0.005) -> AsyncIterator[LagProbe]:
    """Run a lag probe, and time every callback of this loop, for the duration of the block."""
    # What earlier tests left behind is not collected during the measurement.
    gc.collect()
    gc.freeze()
    probe = LagProbe(interval)
    loop_thread = threading.get_ident()
    original = asyncio.events.Handle._run

    with _runqueue_clock() as waiting_for_cpu, _gc_clock() as collecting:
        probe.not_ours = lambda: waiting_for_cpu() + collecting()

        def timed_run(handle: asyncio.events.Handle) -> None:
            if threading.get_ident() != loop_thread:
                original(handle)
                return
            started = time.perf_counter()
            queued = waiting_for_cpu()
            collected = collecting()
            try:
                original(handle)
            finally:
                wall = time.perf_counter() - started
                took = wall - (waiting_for_cpu() - queued) - (collecting() - collected)
                probe.callbacks_wall.append(wall)
                if took > probe.max_callback:
                    callback = handle._callback  # type: ignore[attr-defined]
                    probe.slowest = repr(getattr(callback, "__self__", callback))[:300]
                probe.callbacks.append(took)

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]
        task = asyncio.create_task(probe._run())
        try:
            yield probe
        finally:
            asyncio.events.Handle._run = original  # type: ignore[method-assign]
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


GC_PAUSES: list[float] = []  # the collections of the last measurement, for its summary


@contextlib.contextmanager
def _gc_clock() -> Iterator[Callable[[], float]]:
    """Seconds the garbage collector has run, in any thread: a collection holds the
    GIL, so one in the agent's worker thread stalls the loop thread too (a full
    collection late in the suite can take 100+ ms). It is the interpreter's
    pause, not the code under test."""
    total = 0.0
    began = 0.0

    def on_gc(phase: str, info: dict[str, int]) -> None:
        nonlocal total, began
        if phase == "start":
            began = time.perf_counter()
        else:
            pause = time.perf_counter() - began
            total += pause
            pauses.append(pause)

    pauses: list[float] = []
    gc.callbacks.append(on_gc)
    try:
        yield lambda: total
    finally:
        gc.callbacks.remove(on_gc)
        GC_PAUSES[:] = pauses


@contextlib.contextmanager
def _runqueue_clock() -> Iterator[Callable[[], float]]:
    """Seconds this thread has spent runnable but not running (always 0 where unknown)."""
    try:
        fd = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
    except OSError:
        yield lambda: 0.0
        return
    try:
        yield lambda: int(os.pread(fd, 100, 0).split()[1]) / 1e9
    finally:
        os.close(fd)


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


def legacy_binary_frame(*parts: bytes) -> bytes:
    """Parts (a message as JSON, then its buffers) framed as the JSON websocket protocol's binary frames."""
    offsets = [4 * (len(parts) + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    return b"".join(n.to_bytes(4, "big") for n in [len(parts), *offsets]) + b"".join(parts)


async def until_running(marker: Path) -> None:
    """Wait until the kernel runs the code (it touches ``marker``): an interrupt
    sent before the kernel starts executing is swallowed by ipykernel."""
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "the code never started"
        await asyncio.sleep(0.02)


def sleeper(marker: Path, seconds: int = 30) -> str:
    return f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep({seconds})"


# CPython 3.10's asyncio TLS transport is not marked closed when the peer ends
# the connection, so its finalizer warns "unclosed transport" about a transport
# whose socket is closed (python/cpython#90476; 3.11's rewritten sslproto fixed
# it). Only that exact false warning is set aside, and only on 3.10.
LEGACY_TLS_FALSE_WARNING = r"unclosed transport <asyncio\.sslproto\._SSLProtocolTransport"


def real_unclosed(messages: list[str]) -> list[str]:
    """The "unclosed ..." warnings that are real on this Python."""
    if sys.version_info >= (3, 11):
        return messages
    return [message for message in messages if not re.match(LEGACY_TLS_FALSE_WARNING, message)]


def make_wheel(directory: Path, name: str, version: str, value: object) -> Path:
    """Write a pure-Python wheel of distribution ``name`` (module ``name`` with ``VALUE = value``).

    A wheel is a zip with a dist-info; pip installs it offline, with no build step.
    """
    import base64
    import hashlib
    import zipfile

    module = name.replace("-", "_")
    files = {
        f"{module}/__init__.py": f"VALUE = {value!r}\n__version__ = {version!r}\n",
        f"{module}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{module}-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{module}-{version}.dist-info/RECORD,,")
    files[f"{module}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    """Make VmHWM (peak RSS) start again from the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def peak_rss_bytes() -> int:
    """Peak resident set size since start or :func:`reset_peak_rss` (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
