"""Round trip of ``x = 1``: this package vs the ZMQ floor vs smolagents' remote-executor path.

Measured side by side in one run, interleaved in blocks, on one machine:

(a)  ``AsyncExecutor(LocalBackend()).run("x = 1")``, store_history=False (the default)
(a') the same with store_history=True (what the other two use)
(b)  jupyter_client's blocking client on a directly started kernel (``execute_interactive``;
     ZMQ, no gateway, store_history=True): the floor
(b') the same on a kernel started with the launcher's kernel tuning
     (``KERNEL_TUNING_ARGS``: no 0.5 ms sleep before each reply): shows how much of
     the difference is that tuning rather than the transport
(b'') the same tuned kernel with store_history=False: equal settings with (a), the
     comparison that counts
(c)  smolagents 1.26's ModalExecutor code path: a new websocket-client connection per call and
     ``smolagents.remote_executors._websocket_run_code_raise_errors`` against a stock
     ``jupyter kernelgateway`` (store_history=True)

(a) is timed inside the event loop (the anyio portal hop that brings the calls there is not
counted). Targets: (a) <= 1.0 x (b'') (equal settings), and (c) / (a) >= 10. The older
comparison, (a) / (b) with store_history unequal, is still printed, labelled.

Usage: python benchmarks/roundtrip.py [--iterations N] [--block B] [--json] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack, closing
from typing import Any

from anyio.from_thread import start_blocking_portal

from async_modal_exec import AsyncExecutor, LocalBackend
from async_modal_exec.gateway_side.kernel_code import KERNEL_TUNING_ARGS

CODE = "x = 1"


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class StockGateway:
    """A stock ``jupyter kernelgateway`` with one kernel, driven the way smolagents does."""

    def __init__(self, stack: ExitStack) -> None:
        from smolagents.monitoring import AgentLogger, LogLevel

        self.logger = AgentLogger(level=LogLevel.OFF)
        self.port = free_port()
        self.token = secrets.token_urlsafe(16)
        runtime = stack.enter_context(tempfile.TemporaryDirectory(prefix="ame-bench-", dir="/tmp"))
        log = stack.enter_context(open(os.path.join(runtime, "gateway.log"), "wb"))  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter",
                "kernelgateway",
                "--KernelGatewayApp.ip=127.0.0.1",
                f"--KernelGatewayApp.port={self.port}",
            ],
            env={**os.environ, "KG_AUTH_TOKEN": self.token, "JUPYTER_RUNTIME_DIR": runtime},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        stack.callback(self.stop)
        base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/kernelspecs?token={self.token}", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        request = urllib.request.Request(f"{base}/api/kernels?token={self.token}", data=b"{}", method="POST")
        kernel_id = json.loads(urllib.request.urlopen(request, timeout=30).read())["id"]
        self.ws_url = f"ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels?token={self.token}"

    def run_once(self) -> None:
        from smolagents.remote_executors import _websocket_run_code_raise_errors
        from websocket import create_connection

        with closing(create_connection(self.ws_url)) as ws:
            _websocket_run_code_raise_errors(CODE, ws, self.logger)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


class ZmqKernel:
    """jupyter_client's blocking client on a kernel it started itself."""

    def __init__(
        self, stack: ExitStack, extra_arguments: tuple[str, ...] = (), *, store_history: bool = True
    ) -> None:
        from jupyter_client.manager import start_new_kernel

        self.manager, self.client = start_new_kernel(
            kernel_name="python3", extra_arguments=list(extra_arguments)
        )
        self.store_history = store_history
        stack.callback(self.stop)

    def run_once(self) -> None:
        reply = self.client.execute_interactive(
            CODE, timeout=30, output_hook=lambda message: None, store_history=self.store_history
        )
        assert reply["content"]["status"] == "ok"

    def stop(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def time_sync(run_once: Callable[[], None], count: int) -> list[float]:
    timings = []
    for _ in range(count):
        started = time.perf_counter()
        run_once()
        timings.append(time.perf_counter() - started)
    return timings


async def time_async(executor: AsyncExecutor, count: int) -> list[float]:
    timings = []
    for _ in range(count):
        started = time.perf_counter()
        await executor.run(CODE)
        timings.append(time.perf_counter() - started)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--iterations", type=int, default=200, help="executions per side (default 200)")
    parser.add_argument("--block", type=int, default=20, help="executions per side per round (default 20)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()

    samples: dict[str, list[float]] = {
        "a": [],
        "a_history": [],
        "b": [],
        "b_tuned": [],
        "b_equal": [],
        "c": [],
    }
    with ExitStack() as stack:
        portal = stack.enter_context(start_blocking_portal())
        ours = portal.call(AsyncExecutor(LocalBackend()).start)
        stack.callback(portal.call, ours.aclose)
        ours_history = portal.call(AsyncExecutor(LocalBackend(), store_history=True).start)
        stack.callback(portal.call, ours_history.aclose)
        zmq = ZmqKernel(stack)
        zmq_tuned = ZmqKernel(stack, KERNEL_TUNING_ARGS)
        zmq_equal = ZmqKernel(stack, KERNEL_TUNING_ARGS, store_history=False)
        stock = StockGateway(stack)

        sides: dict[str, Callable[[int], list[float]]] = {
            "a": lambda n: portal.call(time_async, ours, n),
            "a_history": lambda n: portal.call(time_async, ours_history, n),
            "b": lambda n: time_sync(zmq.run_once, n),
            "b_tuned": lambda n: time_sync(zmq_tuned.run_once, n),
            "b_equal": lambda n: time_sync(zmq_equal.run_once, n),
            "c": lambda n: time_sync(stock.run_once, n),
        }
        for run in sides.values():  # warm up every side
            run(5)
        done = 0
        while done < args.iterations:
            block = min(args.block, args.iterations - done)
            for name, run in sides.items():
                samples[name] += run(block)
            done += block

    labels = {
        "a": "(a)  async_modal_exec, LocalBackend, store_history=False",
        "a_history": "(a') async_modal_exec, LocalBackend, store_history=True",
        "b": "(b)  jupyter_client blocking client, ZMQ, store_history=True",
        "b_tuned": "(b') the same on a kernel with the launcher's tuning",
        "b_equal": "(b'') that tuned kernel, store_history=False (equal to (a))",
        "c": "(c)  smolagents 1.26 path, stock gateway, store_history=True",
    }
    figures: dict[str, Any] = {}
    print(
        f"round trip of {CODE!r}, {args.iterations} executions per side, interleaved in blocks of {args.block}\n"
    )
    print(f"{'side':<62} {'median ms':>10} {'p95 ms':>8}")
    for name, label in labels.items():
        median = statistics.median(samples[name]) * 1000
        p95 = percentile(samples[name], 0.95) * 1000
        figures[name] = {"median_ms": round(median, 3), "p95_ms": round(p95, 3)}
        print(f"{label:<62} {median:>10.2f} {p95:>8.2f}")
    a, b, c = (figures[k]["median_ms"] for k in ("a", "b", "c"))
    a_history = figures["a_history"]["median_ms"]
    b_tuned = figures["b_tuned"]["median_ms"]
    b_equal = figures["b_equal"]["median_ms"]
    ratios = {
        "a/b_equal": a / b_equal,
        "a/b (unequal)": a / b,
        "a_history/b": a_history / b,
        "a/b_tuned": a / b_tuned,
        "c/a": c / a,
        "c/a_history": c / a_history,
    }
    figures["ratios"] = {key: round(value, 2) for key, value in ratios.items()}
    met = {"(a) <= 1.0 x (b'')": ratios["a/b_equal"] <= 1.0, "(c) / (a) >= 10": ratios["c/a"] >= 10}
    figures["targets_met"] = met
    print()
    for key, value in ratios.items():
        print(f"{key:<16} {value:6.2f}")
    print()
    for target, ok in met.items():
        print(f"target {target}: {'met' if ok else 'MISSED'}")
    if args.json:
        print(json.dumps(figures, indent=2))
    return 1 if args.check and not all(met.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
