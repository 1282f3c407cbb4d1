"""Throughput and scale: this package vs jupyter_client's AsyncKernelClient, side by side in one run.

Both sides drive the same kind of kernel: started from the launcher's tuned spec
(``KERNEL_BOOTSTRAP``, ``KERNEL_TUNING_ARGS``), ZeroMQ over IPC, not jailed, and
every execution with ``store_history=False``. Ours goes client -> websocket ->
gateway (our launcher) -> kernel; the reference talks ZeroMQ to its kernel
directly. Ratios are reference time / our time (above 1: ours is faster), or our
cost / reference cost where it says so.

Sections (``--only`` picks some):

latency     ``x += 1`` on one session, median of interleaved blocks
output      one execution printing 0 B to 10 MB (1 MB writes), and 20 MB: throughput
burst       20,000 ``print(..., flush=True)``: lines that arrived, per run
sessions    10/50/100 sessions, each one ``x += 1`` at once: wall time, client memory per idle session
kernels     kernels on one gateway (``--kernels``, default 100): memory and gateway CPU per kernel
cold        cold start to the first result (a new gateway and kernel vs a new kernel)
pool        a SandboxPool(max_size=4) under saturation (8 clients): sessions per second, vs a
            variant that starts the replacement as a session ends (tried, not kept), and reusing

Usage: python benchmarks/scale.py [--rounds N] [--only SECTION ...] [--kernels N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from async_modal_exec import AsyncExecutor, GatewayBackend, LocalBackend, SandboxPool
from async_modal_exec.gateway_side.kernel_code import KERNEL_TUNING_ARGS, bootstrapped

SECTIONS = ("latency", "output", "burst", "sessions", "kernels", "cold", "pool")
MB = 1_000_000
SETUP = "import sys\nchunk = 'x' * 1_000_000\n"


def output_code(total: int) -> str:
    whole, rest = divmod(total, MB)
    return (
        f"for _ in range({whole}):\n    sys.stdout.write(chunk)\n    sys.stdout.flush()\n"
        f"sys.stdout.write('y' * {rest})\n"
    )


BURST_LINES = 20_000
BURST = f"for i in range({BURST_LINES}):\n    print(f'line {{i:05d}}', flush=True)\n"


class Reference:
    """jupyter_client's AsyncKernelClient on a kernel it starts from the launcher's tuned spec."""

    def __init__(self, *, signed: bool = True) -> None:
        from jupyter_client import AsyncKernelManager

        self.manager = AsyncKernelManager(kernel_name="python3", transport="ipc")
        if not signed:  # as our launcher runs kernels in a private runtime directory
            self.manager.session.key = b""
        spec = self.manager.kernel_spec
        assert spec is not None
        spec.argv = [*bootstrapped(spec.argv), *KERNEL_TUNING_ARGS]
        self.client: Any = None

    async def start(self) -> Reference:
        await self.manager.start_kernel()
        self.client = self.manager.client()
        self.client.start_channels()
        await self.client.wait_for_ready(timeout=60)
        return self

    async def run(self, code: str) -> int:
        """Characters of stdout received."""
        received = 0

        def hook(message: dict[str, Any]) -> None:
            nonlocal received
            if message["header"]["msg_type"] == "stream":
                received += len(message["content"]["text"])

        reply = await self.client.execute_interactive(
            code, store_history=False, timeout=600, output_hook=hook
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        return received

    async def aclose(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
        await self.manager.shutdown_kernel(now=True)


class Ours:
    """An AsyncExecutor on a gateway of our launcher (shared by several, or its own)."""

    def __init__(self, executor: AsyncExecutor) -> None:
        self.executor = executor

    async def start(self) -> Ours:
        await self.executor.start()
        return self

    async def run(self, code: str) -> int:
        result = await self.executor.run(code)
        assert result.error is None, result.error
        return len(result.stdout)

    async def aclose(self) -> None:
        await self.executor.aclose()


async def timed(run: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await run()
    return time.perf_counter() - started


async def interleaved(
    sides: dict[str, Callable[[], Awaitable[Any]]], count: int, block: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for run in sides.values():
        await run()  # warm up
    done = 0
    while done < count:
        for name, run in sides.items():
            for _ in range(min(block, count - done)):
                samples[name].append(await timed(run))
        done += block
    return samples


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 3)


async def section_latency(ours: Ours, ref: Reference, rounds: int) -> dict[str, Any]:
    await ours.run("x = 0")
    await ref.run("x = 0")
    sides = {"ours": lambda: ours.run("x += 1"), "ref": lambda: ref.run("x += 1")}
    rows = [await interleaved(sides, 300, 20) for _ in range(rounds)]
    ratios = [statistics.median(r["ours"]) / statistics.median(r["ref"]) for r in rows]
    return {
        "ours_ms": [median_ms(r["ours"]) for r in rows],
        "ref_ms": [median_ms(r["ref"]) for r in rows],
        "ours/ref per round": [round(r, 3) for r in ratios],
        "ours/ref median": round(statistics.median(ratios), 3),
    }


async def section_output(ours: Ours, ref: Reference, rounds: int) -> dict[str, Any]:
    unsigned = await Reference(signed=False).start()
    try:
        sides = {"ours": ours, "ref": ref, "ref_unsigned": unsigned}
        for side in sides.values():
            await side.run(SETUP)
        figures: dict[str, Any] = {}
        for total in (0, 1_000, 100_000, MB, 10 * MB, 20 * MB):
            code = output_code(total)
            times: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(rounds):
                for name, side in sides.items():
                    times[name].append(
                        await timed(lambda side=side, code=code, total=total: _expect(side.run(code), total))
                    )
            row: dict[str, Any] = {f"{name}_ms": [round(t * 1000, 1) for t in times[name]] for name in sides}
            for name in ("ref", "ref_unsigned"):
                ratios = [r / o for r, o in zip(times[name], times["ours"], strict=True)]
                row[f"{name}/ours per round"] = [round(r, 2) for r in ratios]
                row[f"{name}/ours median"] = round(statistics.median(ratios), 2)
            row["ours MB/s"] = round(total / MB / statistics.median(times["ours"]), 1) if total else None
            figures[f"{total} B"] = row
        return figures
    finally:
        await unsigned.aclose()


async def _expect(run: Awaitable[int], total: int) -> None:
    received = await run
    assert received == total, f"{received} of {total} characters arrived"


async def section_burst(ours: Ours, ref: Reference, rounds: int) -> dict[str, Any]:
    expected = sum(len(f"line {i:05d}\n") for i in range(BURST_LINES))
    figures: dict[str, Any] = {"ours": [], "ref": []}
    for _ in range(max(rounds, 10)):
        for name, side in (("ours", ours), ("ref", ref)):
            started = time.perf_counter()
            received = await side.run(BURST)
            figures[name].append(
                {
                    "whole": received == expected,
                    "chars": received,
                    "s": round(time.perf_counter() - started, 2),
                }
            )
    for name in ("ours", "ref"):
        figures[f"{name} whole runs"] = f"{sum(r['whole'] for r in figures[name])}/{len(figures[name])}"
    return figures


async def section_sessions(base_url: str, token: str, counts: list[int]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for count in counts:
        async with AsyncExitStack() as stack:
            gc.collect()
            threads_before = len(os.listdir("/proc/self/task"))
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            ours = []
            for _ in range(count):
                executor = AsyncExecutor(GatewayBackend(base_url, token))
                await executor.start()
                stack.push_async_callback(executor.aclose)
                ours.append(executor)
            gc.collect()
            ours_bytes = (tracemalloc.get_traced_memory()[0] - before) / count
            ours_threads = len(os.listdir("/proc/self/task")) - threads_before
            refs = []
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(count):
                ref = await Reference().start()
                stack.push_async_callback(ref.aclose)
                refs.append(ref)
            gc.collect()
            ref_bytes = (tracemalloc.get_traced_memory()[0] - before) / count
            ref_threads = len(os.listdir("/proc/self/task")) - threads_before - ours_threads
            tracemalloc.stop()
            for executor in ours:
                await executor.run("x = 0")
            for ref in refs:
                await ref.run("x = 0")
            ours_wall, ref_wall = [], []
            for _ in range(5):
                ours_wall.append(
                    await timed(lambda ours=ours: asyncio.gather(*(e.run("x += 1") for e in ours)))
                )
                ref_wall.append(
                    await timed(lambda refs=refs: asyncio.gather(*(r.run("x += 1") for r in refs)))
                )
            figures[str(count)] = {
                "ours_ms": median_ms(ours_wall),
                "ref_ms": median_ms(ref_wall),
                "ref/ours": round(statistics.median(ref_wall) / statistics.median(ours_wall), 2),
                "client KB per idle session, ours": round(ours_bytes / 1024, 1),
                "client KB per idle session, ref": round(ref_bytes / 1024, 1),
                "client threads added, ours": ours_threads,
                "client threads added, ref": ref_threads,
            }
    return figures


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                continue
    return found


async def section_kernels(count: int) -> dict[str, Any]:
    backend = LocalBackend(isolation="none")
    figures: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        endpoint = (await backend.start()).endpoint
        stack.push_async_callback(backend.aclose)
        assert backend.pid is not None
        gateway_rss = _rss(backend.pid)
        executors = []
        started = time.perf_counter()
        for index in range(count):
            executor = AsyncExecutor(GatewayBackend(endpoint.base_url, endpoint.token))
            await executor.start()
            stack.push_async_callback(executor.aclose)
            executors.append(executor)
            if (index + 1) % 50 == 0 or index + 1 == count:
                kernels = _children(backend.pid)
                figures[str(index + 1)] = {
                    "seconds": round(time.perf_counter() - started, 1),
                    "gateway MB": round(_rss(backend.pid) / MB, 1),
                    "kernel MB (mean)": round(sum(_rss(k) for k in kernels) / len(kernels) / MB, 1),
                }
        cpu_before = _cpu_seconds(backend.pid)
        wall = await timed(lambda: asyncio.gather(*(e.run("x = 1") for e in executors)))
        cpu = _cpu_seconds(backend.pid) - cpu_before
        idle_before = _cpu_seconds(backend.pid)
        await asyncio.sleep(5)
        idle = _cpu_seconds(backend.pid) - idle_before
        figures["all at once"] = {
            "kernels": count,
            "wall ms": round(wall * 1000, 1),
            "gateway CPU ms per execution": round(cpu * 1000 / count, 3),
            "gateway idle CPU % (5 s)": round(idle / 5 * 100, 1),
            "gateway MB per kernel": round((_rss(backend.pid) - gateway_rss) / count / MB, 3),
        }
    return figures


async def to_first_result(side: Ours | Reference) -> float:
    """Seconds from nothing to the first result; closing (kernel and gateway stopped) is not counted."""
    started = time.perf_counter()
    try:
        await side.start()
        await side.run("x = 1")
        return time.perf_counter() - started
    finally:
        await side.aclose()


async def section_cold(rounds: int) -> dict[str, Any]:
    ours_s, ref_s, ratios = [], [], []
    for _ in range(max(rounds, 5)):
        ours_time = await to_first_result(Ours(AsyncExecutor(LocalBackend(isolation="none"))))
        ref_time = await to_first_result(Reference())
        ours_s.append(ours_time)
        ref_s.append(ref_time)
        ratios.append(ours_time / ref_time)
    return {
        "ours_ms": [round(t * 1000) for t in ours_s],
        "ref_ms": [round(t * 1000) for t in ref_s],
        "ours/ref median": round(statistics.median(ratios), 2),
    }


class EarlyReplacementPool(SandboxPool):
    """The order tried and not kept: a retired sandbox stops counting before it is closed."""

    async def _recycle(self, sandbox: Any, executor: AsyncExecutor) -> None:
        if self.reuse_sandboxes or sandbox not in self._sandboxes:
            await super()._recycle(sandbox, executor)
            return
        self._sandboxes.discard(sandbox)
        self.retired += 1
        self._replenish()
        try:
            await executor.aclose()
        finally:
            await sandbox.backend.aclose()


async def saturated_sessions_per_second(
    pool_class: type[SandboxPool], seconds: float, *, reuse: bool = False
) -> float:
    def backend() -> LocalBackend:
        return LocalBackend(isolation="none")

    async with pool_class(backend, min_idle=4, max_size=4, reuse_sandboxes=reuse) as pool:
        await pool.wait_ready(120)
        done = 0
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                async with pool.session(timeout=120) as executor:
                    await executor.run("x = 1")
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(8)))
        return done / (time.perf_counter() - started)


async def section_pool(rounds: int) -> dict[str, Any]:
    ours, early = [], []
    for _ in range(rounds):
        ours.append(await saturated_sessions_per_second(SandboxPool, 15))
        early.append(await saturated_sessions_per_second(EarlyReplacementPool, 15))
    reused = [await saturated_sessions_per_second(SandboxPool, 15, reuse=True) for _ in range(rounds)]
    return {
        "sessions/s": [round(x, 2) for x in ours],
        "sessions/s, replacement started at the session's end": [round(x, 2) for x in early],
        "ours/early median": round(statistics.median(o / e for o, e in zip(ours, early, strict=True)), 2),
        "sessions/s, reuse_sandboxes (a fresh kernel per session)": [round(x, 2) for x in reused],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    only = set(args.only or SECTIONS)
    async with AsyncExitStack() as stack:
        backend = LocalBackend(isolation="none")
        endpoint = (await backend.start()).endpoint
        stack.push_async_callback(backend.aclose)
        if only & {"latency", "output", "burst"}:
            ours = Ours(
                await AsyncExecutor(
                    GatewayBackend(endpoint.base_url, endpoint.token), max_output_chars=None
                ).start()
            )
            stack.push_async_callback(ours.aclose)
            ref = await Reference().start()
            stack.push_async_callback(ref.aclose)
            for name, section in (
                ("latency", section_latency),
                ("output", section_output),
                ("burst", section_burst),
            ):
                if name in only:
                    figures[name] = await section(ours, ref, args.rounds)
                    print(name, json.dumps(figures[name], indent=1), flush=True)
        if "sessions" in only:
            figures["sessions"] = await section_sessions(
                endpoint.base_url, endpoint.token or "", [10, 50, 100]
            )
            print("sessions", json.dumps(figures["sessions"], indent=1), flush=True)
    if "kernels" in only:
        figures["kernels"] = await section_kernels(args.kernels)
        print("kernels", json.dumps(figures["kernels"], indent=1), flush=True)
    if "cold" in only:
        figures["cold"] = await section_cold(args.rounds)
        print("cold", json.dumps(figures["cold"], indent=1), flush=True)
    if "pool" in only:
        figures["pool"] = await section_pool(args.rounds)
        print("pool", json.dumps(figures["pool"], indent=1), flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per comparison (default 3)")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="sections to run (default all)")
    parser.add_argument("--kernels", type=int, default=100, help="kernels on one gateway (default 100)")
    parser.add_argument(
        "--json", action="store_true", help="print all figures as one JSON document at the end"
    )
    args = parser.parse_args()
    figures = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
