"""Command line: ``python -m async_modal_exec run ...``.

Commands: ``run`` (code in a fresh kernel, thrown away after it, like
``python -c``; ``--put``/``--get`` copy files in before it and out after it),
``cp`` (copy a file into or out of a sandbox that runs: a gateway, or a Modal
sandbox by id), ``reap`` (terminate Modal sandboxes this package left
running), ``snapshots`` (list or drop the Modal requirement snapshots of an
app).

Exit status (``_EXIT_STATUSES``, shown by ``run --help``): the code's own
(``sys.exit(n)``, ``exit(n)``, ``raise SystemExit``); 0 success; 1 the code
raised (traceback on stderr), or a file could not be copied; 2 bad usage; 3
the backend or gateway failed (Modal's errors included, e.g. refused
credentials; also for ``reap``); 124 the timeout expired; 125 the kernel
process died (``os._exit()``, a crash, out of memory); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import anyio

from ._cli_run import (
    EXIT_BACKEND,
    EXIT_CODE_ERROR,
    EXIT_INTERRUPTED,
    EXIT_KERNEL_DIED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    about_later_runs,
    kernel_died,
    one_shot,
    run,
    timed_out,
)
from .backends import Backend, GatewayBackend, LocalBackend
from .backends.isolation import ISOLATION_MODES
from .backends.modal_defaults import DEFAULT_APP_NAME
from .errors import AsyncModalExecError, RemoteFileError
from .executor import DEFAULT_MAX_OUTPUT_CHARS, AsyncExecutor
from .results import ExecutionTimeout, KernelDied

__all__ = [
    "EXIT_BACKEND",
    "EXIT_CODE_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_KERNEL_DIED",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "main",
]

_EXIT_STATUSES = """\
exit status:
  N    the code's own: sys.exit(N), exit(N), raise SystemExit(N) (no N: 0; a
       message: printed on stderr, 1)
  0    success
  1    the code raised (traceback on stderr), or a file could not be copied
  2    bad usage
  3    the backend or gateway failed
  124  --timeout expired
  125  the kernel process died (os._exit(), a crash, out of memory): the
       code's own status is not known
  130  interrupted (Ctrl-C)
"""

_BACKEND_HELP = {
    "local": "local: a gateway started on this machine, its kernel jailed by bubblewrap",
    "gateway": "gateway: a Kernel Gateway that runs already (--gateway-url)",
    "modal": "modal: a Modal sandbox, which needs the modal extra and Modal credentials",
}


def _add_backend_options(parser: argparse.ArgumentParser, backends: list[str], default: str | None) -> None:
    where = "; ".join(_BACKEND_HELP[name] for name in backends)
    parser.add_argument(
        "--backend",
        choices=backends,
        default=default,
        required=default is None,
        help=f"where the sandbox is: {where}" + (" (default: %(default)s)" if default else ""),
    )
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
    parser = argparse.ArgumentParser(
        prog="python -m async_modal_exec",
        description="Run Python code in a fresh sandboxed kernel; copy files into and out of a sandbox;"
        " clean up Modal sandboxes and snapshots.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run Python code in a fresh sandboxed kernel",
        description="Run Python code in a fresh sandboxed kernel, thrown away afterwards (like python -c).",
        epilog=_EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", dest="code", help="code to run")
    source.add_argument("file", nargs="?", help="a file of code to run, or - for stdin")
    _add_backend_options(run, ["local", "gateway", "modal"], "local")
    run.add_argument(
        "--isolation",
        choices=ISOLATION_MODES,
        default="auto",
        help="with --backend local: jail the kernel with bubblewrap (default: %(default)s, where it works;"
        " bwrap: or fail; refused with the other backends)",
    )
    run.add_argument(
        "--max-output-chars",
        type=_output_cap,
        default=DEFAULT_MAX_OUTPUT_CHARS,
        metavar="N",
        help="characters of output kept, stdout, stderr and displays together; past them the output is"
        " cut and stderr says how much was dropped; the value of the last expression has N of its own"
        " (default: %(default)s; 0: no cap)",
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
    for command in commands.choices.values():
        command.set_defaults(command_parser=command)  # its usage errors show its own usage
    return parser


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _output_cap(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of characters: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative (0: no cap), got {text}")
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
    for name in ("async_modal_exec.executor", "async_modal_exec.session"):
        logging.getLogger(name).addFilter(about_later_runs)


async def _reap(app: str, older_than: float | None, dry_run: bool) -> int:
    from .backends.modal_sandbox import reap_modal_sandboxes

    found = await reap_modal_sandboxes(app, older_than=older_than, dry_run=dry_run)
    for sandbox in found:
        age = "unknown age" if sandbox.age_seconds is None else f"{sandbox.age_seconds:.0f} s old"
        action = "terminated" if sandbox.terminated else "would terminate"
        print(f"{action} {sandbox.sandbox_id} ({age})")
    print(f"{len(found)} sandbox(es) {'found' if dry_run else 'terminated'} in app {app!r}")
    return 0


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


def _argv_of(args: argparse.Namespace) -> list[str]:
    """``sys.argv`` as python sets it: ``['-c']``, ``['-']`` for stdin, or ``[FILE]``."""
    return ["-c"] if args.code is not None else [str(args.file)]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the command line; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    usage: argparse.ArgumentParser = args.command_parser  # errors show the command's usage
    if args.command in ("reap", "snapshots"):
        try:
            if args.command == "reap":
                return anyio.run(_reap, args.app, args.older_than, args.dry_run)
            return anyio.run(_snapshots, args.app, args.action, args.keys, args.older_than)
        except AsyncModalExecError as exc:  # Modal's own errors arrive translated
            sys.stderr.write(f"error: {one_shot(str(exc))}\n")
            return EXIT_BACKEND
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    if args.command == "cp" and args.source.startswith(":") == args.destination.startswith(":"):
        usage.error("exactly one of source and destination is the sandbox's (starts with ':')")
    if args.command == "run" and args.isolation == "bwrap" and args.backend != "local":
        usage.error(
            f"--isolation bwrap jails a kernel of --backend local; --backend {args.backend} cannot honour it"
            " (a Modal sandbox is isolated by Modal, a gateway as it was started)"
        )
    code = ""
    if args.command == "run":
        try:
            code = _read_code(args)
        except OSError as exc:
            usage.error(f"cannot read {args.file}: {exc}")
    _show_startup_progress()
    try:
        backend = _make_backend(args, usage)
        if args.command == "cp":
            return anyio.run(_copy, args.source, args.destination, backend, args.timeout, args.ready_timeout)
        return anyio.run(
            run,
            code,
            _argv_of(args),
            backend,
            args.timeout,
            args.ready_timeout,
            args.max_output_chars or None,
            args.backend == "modal",
            args.put,
            args.get,
        )
    except RemoteFileError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_CODE_ERROR
    except ExecutionTimeout as exc:  # a copy or a setup step (a run's own timeout is handled in _run)
        sys.stderr.write(f"error: {timed_out(exc, 'the operation')}\n")
        return EXIT_TIMEOUT
    except KernelDied as exc:  # before or after the code (while it runs: in _run)
        sys.stderr.write(f"error: {kernel_died(exc)}\n")
        return EXIT_KERNEL_DIED
    except AsyncModalExecError as exc:
        sys.stderr.write(f"error: {one_shot(str(exc))}\n")
        return EXIT_BACKEND
    except OSError as exc:  # a local file to copy (the gateway's connection errors are above)
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_CODE_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
