"""CPU time per execution of each process: this package (client, gateway, kernel) vs jupyter_client.

One side per run (``--side``), so each has the machine to itself; the figures are
``/proc/<pid>/stat`` user + system time divided by the executions. The code prints
``--bytes`` characters of output in 1 MB writes (0: ``x += 1``). Both kernels come
from the launcher's tuned spec, unjailed, ``store_history=False`` (see scale.py).

Usage: python benchmarks/cpu.py [--side ours|ref|ref-unsigned] [--bytes N] [--executions N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from scale import SETUP, Ours, Reference, _children, _cpu_seconds, output_code

from async_modal_exec import AsyncExecutor, LocalBackend


async def measure(side: str, total: int, executions: int) -> None:
    runner: Ours | Reference
    if side == "ours":
        runner = Ours(await AsyncExecutor(LocalBackend(isolation="none"), max_output_chars=None).start())
        gateway = runner.executor.backend.pid  # type: ignore[attr-defined]
        pids = {"gateway": gateway, "kernel": _children(gateway)[0]}
    else:
        runner = await Reference(signed=side == "ref").start()
        pids = {"kernel": runner.manager.provisioner.pid}  # type: ignore[union-attr]
    pids["client"] = os.getpid()
    try:
        await runner.run(SETUP + "x = 0")
        code = output_code(total) if total else "x += 1"
        before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        for _ in range(executions):
            await runner.run(code)
        wall = (time.perf_counter() - started) / executions * 1000
        cpu = {name: (_cpu_seconds(pid) - before[name]) / executions * 1000 for name, pid in pids.items()}
    finally:
        await runner.aclose()
    parts = ", ".join(f"{name} {ms:.2f}" for name, ms in cpu.items())
    print(
        f"{side}: {wall:.2f} ms wall per execution; CPU ms per execution: {parts}; sum {sum(cpu.values()):.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--side", choices=("ours", "ref", "ref-unsigned"), default="ours")
    parser.add_argument("--bytes", type=int, default=0, help="output per execution (default 0: x += 1)")
    parser.add_argument("--executions", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(measure(args.side, args.bytes, args.executions))


if __name__ == "__main__":
    main()
