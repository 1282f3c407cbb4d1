"""Start to a ready executor with requirements: first sandbox (installs, snapshots) vs the next (from the snapshot).

Runs the real ``modal`` client against the control-plane double of the tests
(a sandbox is a local gateway process; its pip installs into the sandbox's
own site directory). Per round, in a fresh app:

(b) baseline: ``ModalBackend()`` with no requirements
(f) first: ``ModalBackend(requirements=[...])``: probe, pip install, filesystem snapshot
(s) second: the same requirements again: starts from the snapshot, installs nothing

The requirement is a small local wheel, so (f) - (b) is pip's own overhead
(about a second): a real set (pandas, torch) takes far longer, and (s) stays
where it is. Figures: medians over the rounds, and the ratios s/f and s/b.

Usage: python benchmarks/snapshots.py [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from async_modal_exec import AsyncExecutor, ModalBackend
from tests.helpers import make_wheel
from tests.modal_double import ModalDouble


async def ready_in(backend: ModalBackend) -> float:
    began = time.monotonic()
    async with AsyncExecutor(backend) as executor:
        elapsed = time.monotonic() - began
        result = await executor.run("import os\n1")
        assert result.error is None, result.error
    return elapsed


async def measure(double: ModalDouble, rounds: int, wheels: Path) -> dict[str, float]:
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    baseline, first, second = [], [], []
    for number in range(rounds):
        app = f"bench-snapshots-{os.getpid()}-{number}"
        make = functools.partial(ModalBackend, app_name=app, ssl_context=double.ssl_context(), env=env)
        baseline.append(await ready_in(make()))
        first.append(await ready_in(make(requirements=["ame-bench-pkg"])))
        from_snapshot = make(requirements=["ame-bench-pkg"])
        second.append(await ready_in(from_snapshot))
        assert from_snapshot.snapshot_image_id is not None, "the second start did not use the snapshot"
    b, f, s = (statistics.median(values) for values in (baseline, first, second))
    return {
        "baseline_s": b,
        "first_s": f,
        "second_s": s,
        "second_over_first": s / f,
        "second_over_baseline": s / b,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each in a fresh app (default 3)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    double = ModalDouble().start()
    home = tempfile.TemporaryDirectory(prefix="bmh-")
    os.environ.update(
        MODAL_SERVER_URL=double.url,
        MODAL_TOKEN_ID="ak-double",
        MODAL_TOKEN_SECRET="as-double",
        HOME=home.name,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench-wheels-") as wheels:
            make_wheel(Path(wheels), "ame-bench-pkg", "1.0", "bench")
            figures = await measure(double, args.rounds, Path(wheels))
    finally:
        leaked = double.stop()
        home.cleanup()
    print(f"(b) baseline, no requirements     {figures['baseline_s']:.2f} s")
    print(f"(f) first, installs + snapshots   {figures['first_s']:.2f} s")
    print(f"(s) second, from the snapshot     {figures['second_s']:.2f} s")
    print(f"s/f {figures['second_over_first']:.2f}   s/b {figures['second_over_baseline']:.2f}")
    if args.json:
        print(json.dumps(figures))
    return 1 if leaked else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
