"""What the bubblewrap jail costs: LocalBackend with isolation="bwrap" vs "none", in one run.

(s) cold start: ``AsyncExecutor(LocalBackend(isolation=...)).start()`` plus the
    first ``run("1")`` (a new gateway process, kernel, websocket)
(r) round trip: ``run("x = 1")`` on a started executor, median of N

Both sides alternate within every round (jailed first in odd rounds, unjailed
first in even ones), with equal settings, so a noisy machine shifts both.
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


async def one_round(mode: Isolation, iterations: int) -> tuple[float, float]:
    began = time.perf_counter()
    async with AsyncExecutor(LocalBackend(isolation=mode)) as executor:
        (await executor.run("1")).raise_for_error()
        cold = time.perf_counter() - began
        for _ in range(20):  # warm-up
            await executor.run("x = 1")
        samples = []
        for _ in range(iterations):
            start = time.perf_counter()
            await executor.run("x = 1")
            samples.append(time.perf_counter() - start)
    return cold, statistics.median(samples)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=6, help="cold starts per side (default 6)")
    parser.add_argument("--iterations", type=int, default=200, help="round trips per round (default 200)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()

    cold: dict[str, list[float]] = {mode: [] for mode in MODES}
    trip: dict[str, list[float]] = {mode: [] for mode in MODES}
    for index in range(args.rounds):
        for mode in MODES if index % 2 == 0 else reversed(MODES):
            start, median = await one_round(mode, args.iterations)
            cold[mode].append(start)
            trip[mode].append(median)

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
