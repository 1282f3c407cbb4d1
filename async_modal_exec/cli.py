"""Command line: ``python -m async_modal_exec run ...``.

Commands: ``run`` (code in a fresh kernel; ``--put``/``--get`` copy files in
before it and out after it), ``cp`` (copy a file into or out of a sandbox that
runs: a gateway, or a Modal sandbox by id), ``reap`` (terminate Modal
sandboxes this package left running), ``snapshots`` (list or drop the Modal
requirement snapshots of an app).

Exit status: 0 success; 1 the code raised (traceback on stderr), or a file
could not be copied; 2 bad usage; 3 the backend or gateway failed (Modal's
errors included, e.g. refused credentials; also for ``reap``); 124 the
timeout expired; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import anyio

from .backends import Backend, GatewayBackend, LocalBackend
from .backends.isolation import ISOLATION_MODES
from .backends.modal_defaults import DEFAULT_APP_NAME
from .errors import AsyncModalExecError, RemoteFileError
from .executor import AsyncExecutor
from .results import (
    DisplayEvent,
    ErrorEvent,
    ExecutionTimeout,
    ResultEvent,
    RichOutput,
    StderrEvent,
    StdoutEvent,
)

EXIT_CODE_ERROR = 1
EXIT_USAGE = 2
EXIT_BACKEND = 3
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130


def _add_backend_options(parser: argparse.ArgumentParser, backends: list[str], default: str | None) -> None:
    parser.add_argument("--backend", choices=backends, default=default, required=default is None)
    parser.add_argument(
        "--app",
        default=DEFAULT_APP_NAME,
        help="with --backend modal: the Modal app name (default: %(default)s)",
    )
    parser.add_argument(
        "--gateway-url", help="with --backend gateway: http(s)://host:port of a running gateway"
    )
    parser.add_argument(
        "--token-env",
        default="ASYNC_MODAL_EXEC_GATEWAY_TOKEN",
        help="environment variable holding the gateway token (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=None,
        help="seconds before the run or copy is interrupted",
    )
    parser.add_argument(
        "--ready-timeout",
        type=_positive_seconds,
        default=120.0,
        help="seconds to wait for the gateway (default: %(default)s)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m async_modal_exec", description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run Python code in a fresh sandboxed kernel")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", dest="code", help="code to run")
    source.add_argument("file", nargs="?", help="a file of code to run, or - for stdin")
    _add_backend_options(run, ["local", "gateway", "modal"], "local")
    run.add_argument(
        "--isolation",
        choices=ISOLATION_MODES,
        default="auto",
        help="with --backend local: jail the kernel with bubblewrap (default: %(default)s, where it works)",
    )
    run.add_argument(
        "--put",
        nargs=2,
        action="append",
        default=[],
        metavar=("LOCAL", "REMOTE"),
        help="copy a local file into the sandbox's work directory before the code runs (repeatable)",
    )
    run.add_argument(
        "--get",
        nargs=2,
        action="append",
        default=[],
        metavar=("REMOTE", "LOCAL"),
        help="copy a file out of the sandbox after the code ran (repeatable)",
    )
    cp = commands.add_parser(
        "cp",
        help="copy a file into or out of a running sandbox; the sandbox side starts with ':' (:data/in.csv)",
    )
    cp.add_argument("source")
    cp.add_argument("destination")
    _add_backend_options(cp, ["gateway", "modal"], None)
    cp.add_argument(
        "--sandbox-id", help="with --backend modal: the sandbox (its gateway token is read from --token-env)"
    )
    reap = commands.add_parser("reap", help="terminate Modal sandboxes this package left running")
    reap.add_argument("--app", default=DEFAULT_APP_NAME, help="the Modal app name (default: %(default)s)")
    reap.add_argument("--older-than", type=_duration, default=None, help="e.g. 30s, 15m, 2h, 1d")
    reap.add_argument("--dry-run", action="store_true", help="list, terminate nothing")
    snapshots = commands.add_parser(
        "snapshots", help="list or drop the Modal requirement snapshots of an app"
    )
    snapshots.add_argument("action", choices=["list", "drop"])
    snapshots.add_argument("keys", nargs="*", help="with drop: the keys to drop (default: all)")
    snapshots.add_argument(
        "--app", default=DEFAULT_APP_NAME, help="the Modal app name (default: %(default)s)"
    )
    snapshots.add_argument(
        "--older-than", type=_duration, default=None, help="with drop: only entries older than this (e.g. 7d)"
    )
    return parser


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90s, 15m, 2h, 1d)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a duration cannot be negative")
    return value


def _read_code(args: argparse.Namespace) -> str:
    if args.code is not None:
        return str(args.code)
    if args.file == "-":
        return sys.stdin.read()
    with open(args.file, encoding="utf-8") as handle:
        return handle.read()


def _make_backend(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Backend:
    if args.backend == "gateway":
        if not args.gateway_url:
            parser.error("--backend gateway needs --gateway-url")
        try:
            return GatewayBackend(args.gateway_url, os.environ.get(args.token_env))
        except ValueError as exc:
            parser.error(str(exc))
    if args.backend == "modal":
        from .backends.modal_sandbox import ModalBackend

        if getattr(args, "sandbox_id", None):
            token = os.environ.get(args.token_env)
            if not token:
                parser.error(f"--sandbox-id needs the sandbox's gateway token in ${args.token_env}")
            return ModalBackend.attach(args.sandbox_id, token)
        if args.command == "cp":
            parser.error("cp with --backend modal needs --sandbox-id")
        return ModalBackend(app_name=args.app)
    return LocalBackend(isolation=args.isolation)


def _show_startup_progress() -> None:
    """Startup phases (logged by backends and the executor) as short stderr lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    startup = logging.getLogger("async_modal_exec.startup")
    startup.addHandler(handler)
    startup.setLevel(logging.INFO)


async def _reap(app: str, older_than: float | None, dry_run: bool) -> int:
    from .backends.modal_sandbox import reap_modal_sandboxes

    found = await reap_modal_sandboxes(app, older_than=older_than, dry_run=dry_run)
    for sandbox in found:
        age = "unknown age" if sandbox.age_seconds is None else f"{sandbox.age_seconds:.0f} s old"
        action = "terminated" if sandbox.terminated else "would terminate"
        print(f"{action} {sandbox.sandbox_id} ({age})")
    print(f"{len(found)} sandbox(es) {'found' if dry_run else 'terminated'} in app {app!r}")
    return 0


def _describe(output: RichOutput) -> str:
    if output.text is not None:
        return output.text
    return ", ".join(
        f"[{mime}: {len(value)} bytes]" if isinstance(value, bytes) else f"[{mime}]"
        for mime, value in output.data.items()
    )


class _LiveProgress:
    """On a terminal: one line, rewritten in place, naming the phase and its elapsed seconds."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.phase: str | None = None
        self.began = time.monotonic()

    def __call__(self, phase: str, seconds: float | None) -> None:
        self.stream.write("\r\x1b[K")  # the phase's own log line follows when it ends
        self.stream.flush()
        self.phase, self.began = (phase, time.monotonic()) if seconds is None else (None, 0.0)

    async def tick(self) -> None:
        while True:
            if self.phase is not None:
                elapsed = time.monotonic() - self.began
                self.stream.write(f"\r\x1b[K  {self.phase.replace('_', ' ')}... {elapsed:.1f} s")
                self.stream.flush()
            await anyio.sleep(0.2)


async def _start(executor: AsyncExecutor, err: TextIO, *, modal_output: bool) -> None:
    """Start ``executor``; on a terminal, with a live progress line meanwhile.

    With ``modal_output`` (a Modal backend, stdout a terminal too), Modal's own
    display shows an image build's output as it is written.
    """
    if not err.isatty():
        await executor.start()
        return
    progress = _LiveProgress(err)
    executor.on_progress = progress
    with _modal_display() if modal_output and sys.stdout.isatty() else contextlib.nullcontext():
        async with anyio.create_task_group() as group:
            group.start_soon(progress.tick)
            try:
                await executor.start()
            finally:
                group.cancel_scope.cancel()
                progress("", 0.0)  # clear the line


def _modal_display() -> contextlib.AbstractContextManager[None]:
    import modal

    return modal.enable_output()


async def _snapshots(app: str, action: str, keys: list[str], older_than: float | None) -> int:
    from .backends.modal_sandbox import _modal_errors
    from .backends.modal_snapshots import SnapshotPolicy, SnapshotStore

    with _modal_errors(f"reading the requirement snapshots of app {app!r}"):
        store = SnapshotStore(app, SnapshotPolicy(), create=False)  # listing creates nothing
        entries = await store.entries()
        if action == "list":
            for entry in entries:
                print(
                    f"{entry.key}  {entry.image_id}  {entry.age():.0f} s old  {' '.join(entry.requirements)}"
                )
            print(f"{len(entries)} snapshot(s) in {store.name!r}")
            return 0
        chosen = [
            e for e in entries if (not keys or e.key in keys) and (older_than is None or e.age() > older_than)
        ]
        for entry in chosen:
            await store.drop(entry.key)
            print(f"dropped {entry.key} ({entry.image_id})")
        print(f"{len(chosen)} snapshot(s) dropped from {store.name!r}")
        return 0


async def _copy(
    source: str, destination: str, backend: Backend, timeout: float | None, ready_timeout: float
) -> int:
    """``cp``: exactly one side is the sandbox's (it starts with ``:``)."""
    async with AsyncExecutor(backend, gateway_timeout=ready_timeout) as executor:
        if source.startswith(":"):
            info = await executor.download(source[1:], destination, timeout=timeout)
            sys.stderr.write(f"copied {info.path} ({info.size} bytes) to {destination}\n")
        else:
            info = await executor.upload(source, destination[1:], timeout=timeout)
            sys.stderr.write(f"copied {source} to {info.path} ({info.size} bytes)\n")
    return 0


async def _run(
    code: str,
    backend: Backend,
    timeout: float | None,
    ready_timeout: float,
    modal_output: bool,
    put: Sequence[Sequence[str]] = (),
    get: Sequence[Sequence[str]] = (),
) -> int:
    out, err = sys.stdout, sys.stderr
    started = time.monotonic()
    err.write(f"starting {type(backend).__name__}...\n")
    err.flush()
    status = 0
    executor = AsyncExecutor(backend, timeout=timeout, gateway_timeout=ready_timeout)
    try:
        await _start(executor, err, modal_output=modal_output)
        err.write(f"kernel ready in {time.monotonic() - started:.1f} s\n")
        err.flush()
        for local, remote in put:
            info = await executor.upload(local, remote)
            err.write(f"put {local} -> {info.path} ({info.size} bytes)\n")
        try:
            async for event in executor.stream(code):
                if isinstance(event, StdoutEvent):
                    out.write(event.text)
                    out.flush()
                elif isinstance(event, StderrEvent):
                    err.write(event.text)
                    err.flush()
                elif isinstance(event, ResultEvent | DisplayEvent):
                    out.write(_describe(event.output) + "\n")
                    out.flush()
                elif isinstance(event, ErrorEvent):
                    err.write(str(event.error) + "\n")
                    status = EXIT_CODE_ERROR
        except ExecutionTimeout as exc:
            err.write(f"error: {exc}\n")
            status = EXIT_TIMEOUT
        if status != EXIT_TIMEOUT:
            for remote, local in get:
                info = await executor.download(remote, local)
                err.write(f"get {info.path} -> {local} ({info.size} bytes)\n")
    finally:
        await executor.aclose()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the command line; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command in ("reap", "snapshots"):
        try:
            if args.command == "reap":
                return anyio.run(_reap, args.app, args.older_than, args.dry_run)
            return anyio.run(_snapshots, args.app, args.action, args.keys, args.older_than)
        except AsyncModalExecError as exc:  # Modal's own errors arrive translated
            sys.stderr.write(f"error: {exc}\n")
            return EXIT_BACKEND
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    if args.command == "cp" and args.source.startswith(":") == args.destination.startswith(":"):
        parser.error("exactly one of source and destination is the sandbox's (starts with ':')")
    code = ""
    if args.command == "run":
        try:
            code = _read_code(args)
        except OSError as exc:
            parser.error(f"cannot read {args.file}: {exc}")
    _show_startup_progress()
    try:
        backend = _make_backend(args, parser)
        if args.command == "cp":
            return anyio.run(_copy, args.source, args.destination, backend, args.timeout, args.ready_timeout)
        modal_output = args.backend == "modal"
        return anyio.run(
            _run, code, backend, args.timeout, args.ready_timeout, modal_output, args.put, args.get
        )
    except RemoteFileError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_CODE_ERROR
    except ExecutionTimeout as exc:  # a copy (a run's own timeout is handled in _run)
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_TIMEOUT
    except AsyncModalExecError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_BACKEND
    except OSError as exc:  # a local file to copy (the gateway's connection errors are above)
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_CODE_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
