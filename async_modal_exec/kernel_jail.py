"""Start one kernel inside a bubblewrap sandbox, with resource limits.

Self-contained (standard library only) and run with ``python -I -S``, as the
prefix the gateway launcher puts before an isolated kernel's command::

    python -I -S kernel_jail.py '<config json>' <kernel argv...>

It sets the resource limits (inherited by the sandbox and everything in it),
moves itself into a ``pids`` cgroup of its own under the backend's (or
into the backend's, shared, where that cannot have children) when there
is one (Linux ignores ``RLIMIT_NPROC`` for root, so a fork bomb is only
contained that way there), then replaces itself with ``bwrap``, with only
the kernel's environment. The config is built by
:mod:`async_modal_exec.backends.isolation` and completed by the launcher;
its keys are documented there.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys

_LIMITS = {
    "memory_bytes": resource.RLIMIT_AS,
    "file_size_bytes": resource.RLIMIT_FSIZE,
    "cpu_seconds": resource.RLIMIT_CPU,
}


def _own_processes() -> int:
    """Processes (threads count too, for RLIMIT_NPROC) of this user now."""
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


def _own_cgroup(backend_cgroup: str, processes: int) -> str:
    """A pids cgroup for this kernel under the backend's, limited to ``processes``.

    The cgroups of kernels that have ended are removed first, so a
    long-lived backend does not pile them up: only those whose process is
    gone (another kernel's, made but not joined yet, is empty too), and
    removing one still in use fails.
    """
    name = f"kernel-{os.getpid()}"
    for entry in os.listdir(backend_cgroup):
        pid = entry.removeprefix("kernel-")
        if not (entry.startswith("kernel-") and pid.isdigit()):
            continue
        # Also an ended kernel's that had this kernel's pid.
        if entry == name or not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(backend_cgroup, entry))
    own = os.path.join(backend_cgroup, name)
    os.mkdir(own)
    with open(os.path.join(own, "pids.max"), "w") as limit:
        limit.write(str(processes))
    return own


def apply_limits(config: dict) -> None:  # type: ignore[type-arg]
    for key, which in _LIMITS.items():
        value = config.get(key)
        if value:
            resource.setrlimit(which, (int(value), int(value)))
    processes = config.get("max_processes")
    if not processes:
        return
    cgroup = config.get("pids_cgroup")
    if cgroup:
        # Root: the cgroup limit is the one that holds. The kernel's own when
        # the backend's cgroup can have children (it then has no limit: a
        # failure here stops the start), else the backend's, shared.
        if config.get("pids_per_kernel"):
            cgroup = _own_cgroup(cgroup, int(processes))
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
    else:
        # RLIMIT_NPROC counts every process of the user, so the limit is what
        # runs now plus the allowance.
        limit = _own_processes() + int(processes)
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))


def bwrap_argv(config: dict, kernel: list[str]) -> list[str]:  # type: ignore[type-arg]
    argv = [config["bwrap"], "--unshare-all", "--die-with-parent", "--new-session"]
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for hidden in config.get("hide", []):
        if os.path.isdir(hidden):
            argv += ["--tmpfs", hidden]
    # Writable binds first, read-only ones over them: an interpreter (a venv)
    # inside the work directory stays read-only.
    for path in config.get("binds", []):
        argv += ["--bind", path, path]
    for path in config.get("ro_binds", []):
        if os.path.exists(path):
            argv += ["--ro-bind", path, path]
    argv += ["--chdir", config["work_dir"]]
    return [*argv, "--", *kernel]


def main() -> None:
    config = json.loads(sys.argv[1])
    kernel = sys.argv[2:]
    apply_limits(config)
    argv = bwrap_argv(config, kernel)
    # bwrap itself gets the kernel's environment, not the host's: its process
    # inside the namespaces (PID 1 there) would show the host's in /proc/1/environ.
    os.execve(argv[0], argv, dict(config.get("env", {})))


if __name__ == "__main__":
    main()
