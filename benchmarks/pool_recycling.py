"""A saturated pool: kernel recycling vs sandbox recycling, jailed LocalBackend, in one run.

``SandboxPool(max_size=4, min_idle=4)``, warmed up, then 8 sessions at once,
each running ``time.sleep(0.5)``: the second four wait for the first four to
end. Two sides with the same jailed ``LocalBackend``:

(k) kernel recycling: the backend isolates kernels (``isolates == "kernel"``),
    so a session's end deletes its kernel and the sandbox gets a fresh one
(s) sandbox recycling: the same backend made to say ``isolates == "sandbox"``,
    so a session's end terminates the gateway and the pool starts another

Rounds alternate which side goes first. Target: (k) under 3 s.

Usage: python benchmarks/pool_recycling.py [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Literal

from async_modal_exec import LocalBackend, SandboxPool

SESSIONS, MAX_SIZE = 8, 4


class WholeSandboxBackend(LocalBackend):
    """A jailed LocalBackend the pool treats like a Modal sandbox: one per session."""

    @property
    def isolates(self) -> Literal["kernel", "sandbox"]:
        return "sandbox"


async def saturate(side: str) -> float:
    factory = LocalBackend if side == "kernel" else WholeSandboxBackend
    async with SandboxPool(factory, min_idle=MAX_SIZE, max_size=MAX_SIZE) as pool:
        await pool.wait_ready(120)

        async def one() -> None:
            async with pool.session(timeout=120) as executor:
                (await executor.run("import time\ntime.sleep(0.5)")).raise_for_error()

        began = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(SESSIONS)))
        return time.perf_counter() - began


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side (default 3)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    sides = ("kernel", "sandbox")
    times: dict[str, list[float]] = {side: [] for side in sides}
    for index in range(args.rounds):
        for side in sides if index % 2 == 0 else reversed(sides):
            times[side].append(await saturate(side))
    medians = {side: statistics.median(values) for side, values in times.items()}
    for side in sides:
        rounds = " ".join(f"{value:.2f}" for value in times[side])
        print(f"{side:>7} recycling: {medians[side]:.2f} s median for {SESSIONS} sessions ({rounds})")
    print(f"sandbox/kernel: {medians['sandbox'] / medians['kernel']:.2f}x; kernel target < 3 s")
    if args.json:
        print(json.dumps({"seconds": times, "medians": medians}))
    return 0 if medians["kernel"] < 3 else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
