"""Settings and limits that make the gateway fast and its output whole.

* :func:`gateway_argv`: the gateway's own settings. The IOPub data-rate limit
  is lifted (the stock limit silently replaces big outputs by a notice; the
  client applies its own, visible cap), kernels talk ZeroMQ over Unix
  sockets (no port race between kernels of gateways started at the same
  time, and less latency), the kernel restarter polls faster (a kernel that
  dies is reported sooner).
* :func:`tune_zmq`: up to ``--max-sockets`` ZeroMQ sockets (libzmq's own cap
  is 1023: about 170 kernels), no high-water mark (at the default, 1000
  queued messages, bursts of output lost messages silently), reconnects
  every 10 ms.
* :func:`raise_open_file_limit`, :func:`skip_slow_imports` (the gateway
  starts in about 0.4 s instead of 1.3 s), :func:`shorten_runtime_dir` (IPC
  socket paths must fit in 107 bytes).

Standard library only at import; the gateway's modules are imported when called.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

__all__ = [
    "DEFAULT_MAX_SOCKETS",
    "gateway_argv",
    "raise_open_file_limit",
    "shorten_runtime_dir",
    "skip_slow_imports",
    "tune_zmq",
]

DEFAULT_MAX_SOCKETS = 16384


def gateway_argv(args: argparse.Namespace) -> list[str]:
    """The gateway's command line for the launcher's parsed ``args``."""
    return [
        f"--KernelGatewayApp.ip={args.ip}",
        f"--KernelGatewayApp.port={args.port}",
        "--KernelGatewayApp.port_retries=0",
        "--ZMQChannelsWebsocketConnection.iopub_data_rate_limit=0",
        "--ZMQChannelsWebsocketConnection.iopub_msg_rate_limit=0",
        # No limits, so no per-message rate bookkeeping on the hot path either.
        "--ZMQChannelsWebsocketConnection.limit_rate=False",
        "--KernelManager.transport=ipc",
        # Token-protected anyway; lets owners see (and reap) what runs.
        "--JupyterWebsocketPersonality.list_kernels=True",
        f"--KernelRestarter.time_to_dead={args.restarter_interval}",
        f"--KernelGatewayApp.log_level={args.log_level}",
    ]


def skip_slow_imports() -> None:
    """Keep modules the gateway never uses from being imported.

    ``jsonschema`` (through jupyter_events and nbformat) builds a grammar for
    its IRI format check when ``rfc3987_syntax`` is installed: 0.8 of the
    1.2 s the gateway took to import. The gateway validates no IRI; without
    the module that one check is simply not registered.
    """
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one (each kernel costs the gateway a dozen)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def tune_zmq(context: Any, max_sockets: int) -> None:
    """Socket cap and high-water marks of the gateway's ZeroMQ context, before its first socket.

    libzmq allows 1023 sockets per context by default: with about six per
    kernel (more while a websocket connects), the 171st kernel failed to
    start. And no high-water mark on the kernels' sockets: at the default
    (1000 messages) the IOPub subscriber's queue overflowed in bursts of
    output and messages were dropped. And a socket that connects before its
    kernel listens retries every 10 ms, not 100: the activity watcher's IOPub
    subscription, made as the kernel starts, was often not live yet when the
    first websocket's check asked the kernel for its status, so the gateway
    believed the kernel still starting and held the websocket 0.5 s (one
    retry of that check) in about a third of the kernel starts.
    """
    import zmq

    context.set(zmq.MAX_SOCKETS, max_sockets)
    context.setsockopt(zmq.RCVHWM, 0)
    context.setsockopt(zmq.SNDHWM, 0)
    context.setsockopt(zmq.RECONNECT_IVL, 10)
    context.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)  # a kernel that is gone: back off to once a second


# A kernel's longest IPC socket path is <runtime dir>/<kernel id>/kernel-ipc-<n>;
# Linux allows 107 bytes for the path of a Unix socket.
_IPC_NAME_LENGTH = len("/00000000-0000-0000-0000-000000000000/kernel-ipc-5")
_UNIX_PATH_MAX = 107


def shorten_runtime_dir() -> str | None:
    """Move the runtime directory to a new short one if IPC paths in it would be too long.

    Kernels could not start under a long ``$HOME`` (``ZMQError: File name
    too long``). Returns the directory made (removed when the gateway stops).
    """
    from jupyter_core.paths import jupyter_runtime_dir

    if len(jupyter_runtime_dir()) + _IPC_NAME_LENGTH <= _UNIX_PATH_MAX:
        return None
    import tempfile

    path = tempfile.mkdtemp(prefix="ame-rt-", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.environ["JUPYTER_RUNTIME_DIR"] = path
    return path
