"""What the bubblewrap jail costs: LocalBackend with isolation="bwrap" vs "none", in one run.

(s) cold start: ``AsyncExecutor(LocalBackend(isolation=...)).start()`` plus the
    first ``run("1")`` (a new gateway process, kernel, websocket)
(r) round trip: ``run("x = 1")`` on a started executor, median of N; both
    executors stay open and take turns in batches of 20

Both sides alternate (jailed first in odd rounds, unjailed first in even
ones), with equal settings, so a noisy machine shifts both.
Targets: round trip jailed/unjailed <= 1.10, cold start <= 1.20.

Usage: python benchmarks/isolation.py [--rounds N] [--iterations N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from async_modal_exec import AsyncExecutor, LocalBackend
from async_modal_exec.backends.isolation import Isolation

MODES: tuple[Isolation, Isolation] = ("bwrap", "none")


async def cold_start(mode: Isolation) -> float:
    began = time.perf_counter()
    async with AsyncExecutor(LocalBackend(isolation=mode)) as executor:
        (await executor.run("1")).raise_for_error()
        return time.perf_counter() - began


async def batch(executor: AsyncExecutor, size: int) -> list[float]:
    samples = []
    for _ in range(size):
        start = time.perf_counter()
        await executor.run("x = 1")
        samples.append(time.perf_counter() - start)
    return samples


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=6, help="cold starts per side (default 6)")
    parser.add_argument("--iterations", type=int, default=1000, help="round trips per side (default 1000)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()

    cold: dict[str, list[float]] = {mode: [] for mode in MODES}
    for index in range(args.rounds):
        for mode in MODES if index % 2 == 0 else reversed(MODES):
            cold[mode].append(await cold_start(mode))
    # Round trips: both executors open at once, short batches taking turns,
    # so drift in the machine's load reaches both sides alike.
    trip: dict[str, list[float]] = {mode: [] for mode in MODES}
    async with (
        AsyncExecutor(LocalBackend(isolation="bwrap")) as jailed,
        AsyncExecutor(LocalBackend(isolation="none")) as unjailed,
    ):
        executors = {"bwrap": jailed, "none": unjailed}
        for executor in executors.values():
            await batch(executor, 30)  # warm-up
        size = 20
        for index in range(max(1, args.iterations // size)):
            for mode in MODES if index % 2 == 0 else reversed(MODES):
                trip[mode] += await batch(executors[mode], size)

    figures = {
        mode: {
            "cold_start_ms": statistics.median(cold[mode]) * 1000,
            "round_trip_ms": statistics.median(trip[mode]) * 1000,
        }
        for mode in MODES
    }
    cold_ratio = figures["bwrap"]["cold_start_ms"] / figures["none"]["cold_start_ms"]
    trip_ratio = figures["bwrap"]["round_trip_ms"] / figures["none"]["round_trip_ms"]
    for mode in MODES:
        print(
            f"{mode:>5}: cold start {figures[mode]['cold_start_ms']:7.1f} ms   "
            f"round trip {figures[mode]['round_trip_ms']:.2f} ms (medians)"
        )
    print(
        f"jailed/unjailed: cold start {cold_ratio:.2f} (target <= 1.20), round trip {trip_ratio:.2f} (<= 1.10)"
    )
    if args.json:
        print(json.dumps({"figures": figures, "cold_ratio": cold_ratio, "round_trip_ratio": trip_ratio}))
    return 0 if cold_ratio <= 1.2 and trip_ratio <= 1.1 else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
