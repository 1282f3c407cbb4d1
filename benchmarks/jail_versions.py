"""What a change to the bubblewrap jail costs: LocalBackend(isolation="bwrap") of two versions, in one run.

"before" is the package at a git revision (``--before``, default e850cf7),
checked out with ``git worktree add`` into a temporary directory; "after" is
this working tree. Each side runs in a worker process of its own (this
interpreter, ``PYTHONPATH`` set to that side's checkout), which the parent
drives with JSON lines over stdin/stdout.

(s) cold start: ``AsyncExecutor(LocalBackend(isolation="bwrap")).start()`` plus
    the first ``run("1")`` (a new gateway process, jailed kernel, websocket)
(r) round trip: ``run("x = 1")`` on a started executor, median of N; both
    workers keep one executor open and take turns in batches of 20

Both sides alternate (before first in odd rounds, after first in even ones),
with equal settings, so a noisy machine shifts both.
Targets: after/before <= 1.10 for cold start and round trip.

Usage: python benchmarks/jail_versions.py [--before REV] [--rounds N] [--iterations N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
SIDES = ("before", "after")
BATCH = 20
WARM_UP = 30
TARGET = 1.10


# --- worker: one version of the package, driven over stdin/stdout -----------


def worker(root: Path) -> None:
    """Import the package from ``root`` (or fail loudly) and serve the parent's commands."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends us with EOF, after cleaning up
    # Replies go to a copy of stdout; fd 1 itself now points at stderr, so a
    # stray print (ours or a library's) cannot corrupt the replies.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import async_modal_exec

    imported = Path(async_modal_exec.__file__).resolve()
    if not imported.is_relative_to(root.resolve()):
        raise SystemExit(f"worker for {root}: async_modal_exec was imported from {imported}")
    asyncio.run(serve(replies, imported))


async def serve(replies: TextIO, imported: Path) -> None:
    """Answer the parent's commands, one JSON line each; close everything at "close" or EOF."""
    from async_modal_exec import AsyncExecutor, LocalBackend

    def answer(reply: dict[str, Any]) -> None:
        replies.write(json.dumps(reply) + "\n")

    answer({"ready": str(imported)})
    async with contextlib.AsyncExitStack() as stack:
        executor: AsyncExecutor | None = None
        while line := await asyncio.to_thread(sys.stdin.readline):
            command = json.loads(line)
            if command["cmd"] == "cold":
                began = time.perf_counter()
                async with AsyncExecutor(LocalBackend(isolation="bwrap")) as cold:
                    (await cold.run("1")).raise_for_error()
                    seconds = time.perf_counter() - began
                # Answered once closed, so the other side's start never overlaps our close.
                answer({"seconds": seconds})
            elif command["cmd"] == "open":
                executor = await stack.enter_async_context(AsyncExecutor(LocalBackend(isolation="bwrap")))
                answer({"open": True})
            elif command["cmd"] == "batch":
                assert executor is not None, "batch before open"
                samples = []
                for _ in range(command["n"]):
                    start = time.perf_counter()
                    result = await executor.run("x = 1")
                    samples.append(time.perf_counter() - start)
                    result.raise_for_error()
                answer({"seconds": samples})
            elif command["cmd"] == "close":
                break
            else:
                raise ValueError(f"unknown command {command!r}")


# --- parent: the checkout, the workers, the measurements -----------------------


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """A detached worktree of ``revision`` in a temporary directory, removed at the end."""
    git = ["git", "-C", str(REPO), "worktree"]
    path = Path(tempfile.mkdtemp(prefix="jail-versions-"))
    try:
        subprocess.run([*git, "add", "--detach", str(path), revision], check=True, capture_output=True)
        yield path
    finally:
        removed = subprocess.run([*git, "remove", "--force", str(path)], capture_output=True)
        if removed.returncode != 0:  # e.g. `worktree add` failed: no worktree to remove
            shutil.rmtree(path, ignore_errors=True)
            subprocess.run([*git, "prune"], capture_output=True)


class Worker:
    """A worker process importing the package from ``root``; its stderr is ours."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        try:
            self._reply()  # {"ready": ...} once the right version is imported
        except BaseException:
            self.close()
            raise

    def ask(self, cmd: str, **fields: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker ended (status {self.process.wait()}); see its stderr")
        return json.loads(line)

    def close(self) -> None:
        """EOF: the worker closes its executors and exits; killed if it has not within 60 s."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # type: ignore[union-attr]
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()  # type: ignore[union-attr]


def measure(workers: dict[str, Worker], rounds: int, iterations: int) -> dict[str, dict[str, float]]:
    cold: dict[str, list[float]] = {side: [] for side in SIDES}
    for index in range(rounds):
        for side in SIDES if index % 2 == 0 else reversed(SIDES):
            cold[side].append(workers[side].ask("cold")["seconds"])
    # Round trips: both executors open at once, short batches taking turns,
    # so drift in the machine's load reaches both sides alike.
    trip: dict[str, list[float]] = {side: [] for side in SIDES}
    for worker in workers.values():  # isolation="bwrap" fails to start without a usable bwrap
        worker.ask("open")
        worker.ask("batch", n=WARM_UP)
    for index in range(max(1, iterations // BATCH)):
        for side in SIDES if index % 2 == 0 else reversed(SIDES):
            trip[side] += workers[side].ask("batch", n=BATCH)["seconds"]
    return {
        side: {
            "cold_start_ms": statistics.median(cold[side]) * 1000,
            "round_trip_ms": statistics.median(trip[side]) * 1000,
        }
        for side in SIDES
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--before", default="e850cf7", help="git revision of the 'before' side (default e850cf7)"
    )
    parser.add_argument("--rounds", type=int, default=6, help="cold starts per side (default 6)")
    parser.add_argument("--iterations", type=int, default=1000, help="round trips per side (default 1000)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--worker", metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker))
        return 0

    # SIGTERM unwinds like Ctrl-C: workers closed, worktree removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    revision = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", args.before],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with contextlib.ExitStack() as stack:
        roots = {"before": stack.enter_context(checkout(revision)), "after": REPO}
        workers = {}
        for side in SIDES:
            workers[side] = Worker(side, roots[side])
            stack.callback(workers[side].close)
        figures = measure(workers, args.rounds, args.iterations)

    labels = {"before": revision, "after": "working tree"}
    ratios = {
        key: figures["after"][key] / figures["before"][key] for key in ("cold_start_ms", "round_trip_ms")
    }
    print(f"{'':14}{'':14}{'cold start':>12}{'round trip':>12}  (medians)")
    for side in SIDES:
        print(
            f"{side:14}{labels[side]:14}{figures[side]['cold_start_ms']:9.1f} ms"
            f"{figures[side]['round_trip_ms']:9.2f} ms"
        )
    print(
        f"{'after/before':28}{ratios['cold_start_ms']:12.2f}{ratios['round_trip_ms']:12.2f}"
        f"  (targets <= {TARGET:.2f})"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "before": revision,
                    "figures": figures,
                    "cold_ratio": ratios["cold_start_ms"],
                    "round_trip_ratio": ratios["round_trip_ms"],
                }
            )
        )
    return 0 if all(ratio <= TARGET for ratio in ratios.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
