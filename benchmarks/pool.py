"""Time to a ready executor: a warm SandboxPool vs a cold LocalBackend start, in one run.

(w) ``async with pool.session()`` on a pool whose ``min_idle`` executors are ready
    (one health check; the kernel was started in the background)
(r) the first ``run("x = 1")`` in such a session (the kernel's websocket has
    been idle since it was warmed, so it is pinged before the request)
(c) ``AsyncExecutor(LocalBackend()).start()``: a new gateway process and kernel

Sessions release their executor between samples and the pool refills in the
background before the next warm sample. Target: warm median under 10 ms.

Usage: python benchmarks/pool.py [--warm N] [--cold N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from async_modal_exec import AsyncExecutor, LocalBackend, SandboxPool


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--warm", type=int, default=50, help="warm acquisitions (default 50)")
    parser.add_argument("--cold", type=int, default=5, help="cold starts (default 5)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()

    warm: list[float] = []
    first_run: list[float] = []
    cold: list[float] = []
    async with SandboxPool(min_idle=2, max_size=3) as pool:
        await pool.wait_ready(120)
        for round_ in range(args.warm):
            await pool.wait_ready(120)
            started = time.perf_counter()
            async with pool.session() as executor:
                warm.append(time.perf_counter() - started)
                started = time.perf_counter()
                await executor.run("x = 1")
                first_run.append(time.perf_counter() - started)
            if round_ < args.cold:  # interleave the cold starts with the warm ones
                started = time.perf_counter()
                fresh = await AsyncExecutor(LocalBackend()).start()
                cold.append(time.perf_counter() - started)
                await fresh.aclose()

    figures = {
        side: {"median_ms": statistics.median(values) * 1000, "p95_ms": percentile(values, 0.95) * 1000}
        for side, values in (("warm", warm), ("first_run", first_run), ("cold", cold))
    }
    print(f"{len(warm)} warm acquisitions, {len(cold)} cold starts\n")
    print(f"{'side':<44} {'median ms':>10} {'p95 ms':>9}")
    for side, label in (
        ("warm", "(w) warm pool session"),
        ("first_run", "(r) first run in that session"),
        ("cold", "(c) cold LocalBackend start + kernel"),
    ):
        print(f"{label:<44} {figures[side]['median_ms']:>10.2f} {figures[side]['p95_ms']:>9.2f}")
    ratio = figures["cold"]["median_ms"] / figures["warm"]["median_ms"]
    met = figures["warm"]["median_ms"] < 10
    print(f"\ncold / warm: {ratio:.0f}x; target warm median < 10 ms: {'met' if met else 'MISSED'}")
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
