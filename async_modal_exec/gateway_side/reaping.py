"""Nothing the gateway started outlives it: a child subreaper, and a stop when stdin closes.

* On Linux the gateway becomes a child subreaper: processes that kernels
  start and abandon (even in new sessions) stay in the gateway's process
  tree, so whoever stops the gateway can find and stop them too. Abandoned
  processes that exit are reaped once a second.
* ``--exit-on-stdin-eof``: the gateway stops (and stops its kernels) when its
  standard input closes, i.e. when the process that started it goes away.

Standard library only at import; tornado is imported when called.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

__all__ = ["become_subreaper", "watch_stdin"]


def watch_stdin(app: Any) -> None:
    """Stop the gateway when stdin reaches end of file (the parent went away)."""
    from tornado.ioloop import IOLoop

    loop = IOLoop.current()
    fd = sys.stdin.fileno()

    def on_readable(fd: int, events: int) -> None:
        if not os.read(fd, 4096):
            loop.remove_handler(fd)
            app.stop()

    loop.add_handler(fd, on_readable, IOLoop.READ | IOLoop.ERROR)


def become_subreaper(app: Any) -> None:
    """Adopt orphaned descendants (Linux), and reap those that exit."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    from tornado.ioloop import PeriodicCallback

    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        return
    me = os.getpid()

    def reap_adopted() -> None:
        # Kernels are our own children too, and jupyter_client waits for them:
        # leave their pids alone, reap only zombies we adopted.
        kernel_pids = set()
        for manager in getattr(app.kernel_manager, "_kernels", {}).values():
            pid = getattr(getattr(manager, "provisioner", None), "pid", None)
            if pid is not None:
                kernel_pids.add(pid)
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in kernel_pids:
                continue
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == me:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(entry), os.WNOHANG)

    PeriodicCallback(reap_adopted, 1000).start()
