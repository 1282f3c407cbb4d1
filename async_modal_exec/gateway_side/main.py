"""The launcher's command line and its run: set up, start Kernel Gateway, clean up after.

* ``--port 0`` binds a free port; the bound port is printed on stdout as
  ``ASYNC_MODAL_EXEC_GATEWAY_PORT=<port>`` (:data:`PORT_LINE_PREFIX`) once the
  gateway listens.
* ``--nice N`` lowers the CPU priority of the gateway and its kernels, so
  busy sandboxed code cannot starve the host's event loop of CPU.
* ``--remove-runtime-dir`` deletes ``$JUPYTER_RUNTIME_DIR`` when the gateway
  stops, also when it stops because its parent died (``--remove-dir DIR``:
  that directory too).
* ``--kernel-jail CONFIG_FILE`` runs every kernel through ``kernel_jail.py``
  (see :mod:`async_modal_exec.backends.isolation`); the config stays in its
  file (it holds the kernels' environment, and argv is public). Its
  ``pids_cgroup`` is removed when the gateway stops, if empty by then.
* ``--sign-messages``, ``--max-sockets``: see :mod:`.kernel_manager` and
  :mod:`.tuning`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Any

from .auth_token import take_token
from .cleanup import remove_cgroup, remove_trees
from .kernel_manager import light_activity_kernel_manager_class
from .patches import jail_prefix, no_delay_connection_class, tuned_kernel_spec_manager_class
from .reaping import become_subreaper, watch_stdin
from .tuning import (
    DEFAULT_MAX_SOCKETS,
    gateway_argv,
    raise_open_file_limit,
    shorten_runtime_dir,
    skip_slow_imports,
    tune_zmq,
)

__all__ = ["PORT_LINE_PREFIX", "main"]

PORT_LINE_PREFIX = "ASYNC_MODAL_EXEC_GATEWAY_PORT="
_DESCRIPTION = "Kernel Gateway launcher, tuned for low latency and whole outputs."


def main(argv: list[str] | None = None) -> None:
    """Start the gateway and serve until it stops; ``argv`` defaults to ``sys.argv[1:]``.

    Before the gateway starts, the process may replace itself once (same pid,
    :func:`.auth_token.take_token`) to drop the token from its environment.
    """
    parser = argparse.ArgumentParser(description=_DESCRIPTION)
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--restarter-interval", type=float, default=0.5)
    parser.add_argument("--log-level", default="WARN")
    parser.add_argument("--exit-on-stdin-eof", action="store_true")
    parser.add_argument(
        "--remove-runtime-dir", action="store_true", help="delete $JUPYTER_RUNTIME_DIR when the gateway stops"
    )
    parser.add_argument(
        "--nice", type=int, default=0, help="lower the CPU priority of the gateway and kernels"
    )
    parser.add_argument("--remove-dir", help="delete this directory when the gateway stops")
    parser.add_argument(
        "--kernel-jail", help="path of a JSON config file: run kernels in kernel_jail.py (see its docstring)"
    )
    parser.add_argument(
        "--sign-messages",
        action="store_true",
        help="sign kernel messages even over IPC in a runtime directory only we can enter (docs/security.md)",
    )
    parser.add_argument(
        "--max-sockets",
        type=int,
        default=DEFAULT_MAX_SOCKETS,
        help=f"ZeroMQ sockets the gateway may open (default {DEFAULT_MAX_SOCKETS}; about 6 per kernel)",
    )
    args = parser.parse_args(argv)
    runtime_dir = os.environ.get("JUPYTER_RUNTIME_DIR")  # the one to remove, even if replaced below
    token = take_token()
    if args.nice:
        os.nice(args.nice)
    raise_open_file_limit()
    skip_slow_imports()
    # A jailed kernel sees the runtime directory its jail binds: that one stays
    # (LocalBackend keeps it short).
    short_runtime_dir = None if args.kernel_jail else shorten_runtime_dir()
    from jupyter_core.paths import jupyter_runtime_dir

    # Made here: ours alone (see kernel_manager.only_ours).
    os.makedirs(jupyter_runtime_dir(), mode=0o700, exist_ok=True)
    # Inherited by kernels: silences debugpy's frozen-modules warning on stderr.
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")

    from kernel_gateway.gatewayapp import KernelGatewayApp
    from traitlets.config import Config

    config = Config()
    config.KernelGatewayApp.kernel_websocket_connection_class = no_delay_connection_class()
    if token is not None:
        config.KernelGatewayApp.auth_token = token
    jail_config: dict[str, Any] = {}
    if args.kernel_jail:
        with open(args.kernel_jail) as file:
            jail_config = json.load(file)
    jail = jail_prefix(args.kernel_jail) if args.kernel_jail else None
    config.KernelGatewayApp.kernel_spec_manager_class = tuned_kernel_spec_manager_class(jail)
    config.KernelGatewayApp.kernel_manager_class = light_activity_kernel_manager_class(
        sign_messages=args.sign_messages, work_root=jail_config.get("work_root")
    )
    app = KernelGatewayApp.instance(config=config)
    app.initialize(gateway_argv(args))
    tune_zmq(app.kernel_manager.context, args.max_sockets)
    # What the gateway calls when it stops: every kernel, tolerating those gone meanwhile.
    app.personality.kernel_pool.shutdown = functools.partial(app.kernel_manager.shutdown_all, now=True)
    port = next(iter(app.http_server._sockets.values())).getsockname()[1]
    become_subreaper(app)
    if args.exit_on_stdin_eof:
        watch_stdin(app)
    # Printed before the loop starts; the socket already listens, so a client
    # that reads this line can connect at once (the backlog holds it).
    print(f"{PORT_LINE_PREFIX}{port}", flush=True)
    if args.exit_on_stdin_eof:
        # Whoever started us read the port line and will not read stdout again:
        # send later writes (ours, and kernels' inherited fd 1) to stderr so a
        # full pipe can never block them.
        os.dup2(2, 1)
    try:
        app.start()
    finally:
        remove_trees(
            [
                *([runtime_dir] if args.remove_runtime_dir and runtime_dir else []),
                *([args.remove_dir] if args.remove_dir else []),
                *([short_runtime_dir] if short_runtime_dir else []),
            ]
        )
        cgroup = jail_config.get("pids_cgroup")
        if cgroup:
            # Empty once the kernels are stopped (their own cgroups first);
            # whoever started us removes what is left.
            remove_cgroup(cgroup)
