"""Round trip of one host-tool call on LocalBackend, measured side by side in one run.

Each execution calls a tool N times in a loop inside the kernel; per-call cost
is the execution's time divided by N. Sides, interleaved in rounds:

(h)  a host tool: every call crosses kernel -> gateway -> this process and back
     (``input_request`` / ``input_reply`` over the kernel's stdin channel)
(k)  the same function defined in the kernel (no crossing): the loop's own cost
(x)  one plain execution per call (``AsyncExecutor.run``), for scale

The host-tool overhead per call is (h) - (k).

Usage: python benchmarks/host_tools.py [--calls N] [--rounds R] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from async_modal_exec import AsyncExecutor, LocalBackend


def echo(value: int) -> int:
    return value


KERNEL_ECHO = "def kernel_echo(value):\n    return value\n"


async def per_call(executor: AsyncExecutor, code: str, calls: int) -> float:
    started = time.perf_counter()
    result = await executor.run(code)
    elapsed = time.perf_counter() - started
    if result.error is not None:
        raise RuntimeError(f"{result.error.ename}: {result.error.evalue}")
    return elapsed / calls


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per execution (default 100)")
    parser.add_argument("--rounds", type=int, default=20, help="executions per side (default 20)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()

    samples: dict[str, list[float]] = {"h": [], "k": [], "x": []}
    async with AsyncExecutor(LocalBackend(), host_tools=[echo]) as executor:
        await executor.run(KERNEL_ECHO)
        loop = f"for i in range({args.calls}):\n    {{}}(i)"
        for _ in range(3):  # warm up
            await per_call(executor, loop.format("echo"), args.calls)
        for _ in range(args.rounds):
            samples["h"].append(await per_call(executor, loop.format("echo"), args.calls))
            samples["k"].append(await per_call(executor, loop.format("kernel_echo"), args.calls))
            started = time.perf_counter()
            for i in range(args.calls // 10):
                await executor.run(f"kernel_echo({i})")
            samples["x"].append((time.perf_counter() - started) / (args.calls // 10))

    medians = {name: statistics.median(values) * 1000 for name, values in samples.items()}
    overhead = medians["h"] - medians["k"]
    print(f"{args.calls} calls per execution, {args.rounds} executions per side, LocalBackend\n")
    print(f"{'side':<54} {'median ms per call':>20}")
    print(f"{'(h) host tool (kernel -> host -> kernel)':<54} {medians['h']:>20.3f}")
    print(f"{'(k) the same function defined in the kernel':<54} {medians['k']:>20.4f}")
    print(f"{'(x) one plain execution, for scale':<54} {medians['x']:>20.3f}")
    print(
        f"\nhost-tool overhead per call: {overhead:.3f} ms ({medians['h'] / medians['x']:.2f} x one execution)"
    )
    if args.json:
        print(json.dumps({"median_ms": medians, "overhead_ms": overhead}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
