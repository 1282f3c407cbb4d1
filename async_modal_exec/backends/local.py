"""LocalBackend: a Kernel Gateway subprocess on loopback, kernels in bubblewrap jails.

No account and no credentials. Where bubblewrap works (Linux with user
namespaces) each kernel runs jailed: no network, its own PID space, the host
read-only and the home directory hidden, one writable work directory, no host
environment, resource limits (see :mod:`async_modal_exec.backends.isolation`
and ``docs/security.md``). Where it cannot, the default (``isolation="auto"``)
warns once and runs kernels as you, with your files and network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import IO, Literal

import anyio

from .._extras import require
from .._shield import run_shielded
from .._timing import record_phase
from ..environment import checked_env
from ..errors import BackendStartError, ExecutorStateError
from ..gateway_side.auth_token import TOKEN_ENV
from ..gateway_side.main import PORT_LINE_PREFIX
from .base import Backend, GatewayEndpoint
from .isolation import (
    ISOLATION_MODES,
    ROOT_KERNEL_GID,
    ROOT_KERNEL_UID,
    Isolation,
    Limits,
    choose,
    jail_config,
    make_pids_cgroup,
    remove_cgroup_when_empty,
    share_out_pids_cgroup,
    writable_by_kernels,
    write_jail_config,
)


def _launcher() -> ModuleType:
    # Imported on first use, not with this module: ``python -m
    # async_modal_exec.launcher`` imports this package first, and a launcher
    # module imported by then would run a second time as __main__ (runpy warns).
    from .. import launcher

    return launcher


logger = logging.getLogger("async_modal_exec.backends.local")

__all__ = ["LocalBackend"]

_TERM_GRACE = 3.0


def _short_temp_root() -> str:
    # IPC kernel sockets live in the runtime dir and a Unix socket path holds
    # only ~104 bytes: prefer /tmp over a possibly deep $TMPDIR.
    return "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK) else tempfile.gettempdir()


def _process_tree(root: int) -> list[tuple[int, str]]:
    """``(pid, start_time)`` of every descendant of ``root`` (Linux /proc; else empty)."""
    children: dict[int, list[tuple[int, str]]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid ... starttime(22nd).
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found: list[tuple[int, str]] = []
    stack = [root]
    while stack:
        for pid, started in children.get(stack.pop(), []):
            found.append((pid, started))
            stack.append(pid)
    return found


def _kill_if_same(processes: list[tuple[int, str]]) -> None:
    """SIGKILL each process still alive with the same start time (no PID-reuse kills)."""
    for pid, started in processes:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat[stat.rindex(")") + 2 :].split()[19] == started:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


@functools.cache
def _spawner() -> concurrent.futures.ThreadPoolExecutor:
    """One long-lived thread that starts processes, so the loop never waits for a spawn."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="async-modal-exec-spawn")


async def _wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    """Poll (non-blocking ``waitpid``) until ``process`` exits; its status, or None at the timeout."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while (status := process.poll()) is None and time.monotonic() < deadline:
        await anyio.sleep(pause)
        pause = min(pause * 2, 0.1)
    return status


def _readable_by_all(top: str) -> None:
    """Add read (and, on directories, search) permission for everyone under ``top``."""
    for root, dirs, files in os.walk(top):
        for name in dirs:
            path = os.path.join(root, name)
            os.chmod(path, os.stat(path).st_mode | 0o555)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o444)


def _make_private_dir() -> tuple[str, IO[bytes]]:
    """``ame-*/`` with ``gateway.log``, ``rt/`` (Jupyter runtime), ``work/`` and ``packages/``."""
    private_dir = tempfile.mkdtemp(prefix="ame-", dir=_short_temp_root())
    for name in ("rt", "work", "packages"):
        # rt, 0700: the launcher runs kernels unsigned over IPC only in a directory nobody else can enter.
        # packages: readable by kernels that run as another user (root's run as nobody), whatever the umask.
        os.mkdir(os.path.join(private_dir, name))
        os.chmod(os.path.join(private_dir, name), 0o700 if name == "rt" else 0o755)
    log = open(os.path.join(private_dir, "gateway.log"), "wb")  # noqa: SIM115 - owned by the backend
    return private_dir, log


def _prepare_work_dir(work_dir: str, *, for_root_jail: bool) -> None:
    """Make the kernels' directory if missing; as root with a jail, check its kernels can write it.

    ``for_root_jail``: a ``cwd=`` for jailed kernels. When this process is
    root they run as uid/gid 65534: a directory made here is given to them,
    one that exists must let them write.

    Raises:
        BackendStartError: it cannot be made, is not a directory, or the jailed kernels could not write it.
    """
    as_root = for_root_jail and os.geteuid() == 0
    try:
        made = not os.path.isdir(work_dir)
        os.makedirs(work_dir, exist_ok=True)
        if made and as_root:
            os.chown(work_dir, ROOT_KERNEL_UID, ROOT_KERNEL_GID)
    except OSError as exc:
        raise BackendStartError(f"cwd {work_dir!r} cannot be the kernels' directory: {exc}") from exc
    if as_root and not writable_by_kernels(work_dir):
        raise BackendStartError(
            f"cwd {work_dir!r} is not writable by the jailed kernels: as root they run as uid and gid "
            f"{ROOT_KERNEL_UID} (nobody). Give it to them (chown {ROOT_KERNEL_UID}:{ROOT_KERNEL_GID} "
            "DIR), leave cwd out (each kernel then gets a directory of its own), or run as another user"
        )


class LocalBackend(Backend):
    """Starts a Jupyter Kernel Gateway subprocess on 127.0.0.1; jails its kernels.

    The gateway runs through this package's launcher (``TCP_NODELAY`` on kernel
    websockets, IOPub rate limit lifted, IPC kernels) with the current
    interpreter, a free port and a fresh random token (kept out of every
    process's environment). It gets a private, short directory (Jupyter
    runtime files, the work directory, installed packages) that is removed on
    close.

    **Isolation** (``isolation=``): ``"auto"`` (default) jails every kernel with
    bubblewrap where it works and otherwise logs one warning and runs kernels
    as you; ``"bwrap"`` insists (:class:`BackendStartError` where it cannot
    work); ``"none"`` runs kernels as you, with your files, network and
    environment. :attr:`isolated` says which one you got after :meth:`start`.
    A jailed kernel has no network, sees only its own processes (all of them
    die with it), sees only the system directories, its interpreter and a
    made-up ``/etc`` (read-only) with an empty home and ``/tmp``, writes only
    in its own work directory, cannot reach the backend's other kernels,
    runs as a non-root user (uid 65534 when you are root), gets no host
    environment variable but ``PATH``/``LANG`` and ``env=``, and runs within
    ``limits``. Packages installed for it (:meth:`install`) go into the
    backend's own directory.

    Closing stops the gateway and every process it started (kernels run in
    their own sessions, so the whole tree is tracked). If this Python process
    exits without closing, the gateway notices its stdin closing and stops
    itself and its kernels.

    Args:
        python: interpreter with jupyter_kernel_gateway and ipykernel (default: this one).
        cwd: working directory shared by the backend's kernels (jailed: the
            one writable host directory; as root it must be writable by uid
            65534, which jailed kernels run as). Created with its parents if
            missing, and left in place on close. Default: jailed kernels
            each get a fresh one of their own, removed with the kernel;
            unjailed kernels share a fresh one removed on close.
        env: environment variables for the kernels (jailed: the only ones
            besides ``PATH``, ``HOME``, ``LANG``, ``TMPDIR`` and ``PYTHONPATH``).
        isolation: ``"auto"``, ``"bwrap"`` or ``"none"`` (see above).
        limits: resource limits of each jailed kernel (default :class:`Limits`).
        startup_timeout: seconds to wait for the gateway to listen.
        nice: niceness added to the gateway and its kernels (default 5): code in
            the kernels gets less CPU than the host process when both want it,
            so a busy kernel cannot starve the host's event loop. 0 disables it.
    """

    def __init__(
        self,
        *,
        python: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 60.0,
        nice: int = 5,
        isolation: Isolation = "auto",
        limits: Limits | None = None,
    ) -> None:
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
        self.python = python or sys.executable
        self.isolation: Isolation = isolation
        self.limits = limits or Limits()
        self.isolated: bool | None = None  # known after start()
        self._pids_cgroup: str | None = None
        self.cwd = cwd
        self.env = checked_env(env)
        self._work_dir: str | None = None  # known after start()
        self.startup_timeout = startup_timeout
        self.nice = nice
        self.timings: dict[str, float] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._private_dir: str | None = None
        self._log: IO[bytes] | None = None
        self._endpoint: GatewayEndpoint | None = None
        self._started = False

    @property
    def work_dir(self) -> str | None:
        """The kernels' working directory as they see it, the only one file operations reach.

        None before start. Jailed kernels of a backend without ``cwd=`` each
        see their own directory there (:meth:`kernel_work_dir` on the host).
        """
        return self._work_dir

    @property
    def isolates(self) -> Literal["kernel", "sandbox"]:
        """``"kernel"`` once started jailed without ``cwd=``: each kernel has a jail and a work
        directory of its own (a shared ``cwd`` would carry files from one kernel to the next)."""
        return "kernel" if self.isolated and self.cwd is None else "sandbox"

    def kernel_work_dir(self, kernel_id: str) -> str:
        """Where a kernel's work directory is on the host (removed with the kernel when its own).

        Jailed kernels without ``cwd=`` get one each, ``<work_dir>/<kernel id>``
        on the host, bound at :attr:`work_dir` in their jail; otherwise the
        kernels share :attr:`work_dir`.

        Raises:
            ExecutorStateError: the backend is not started.
        """
        if self._work_dir is None:
            raise ExecutorStateError("the LocalBackend is not started")
        if self.isolated and self.cwd is None:
            return os.path.join(self._work_dir, kernel_id)
        return self._work_dir

    @property
    def pid(self) -> int | None:
        """The gateway's process id while it runs."""
        return self._process.pid if self._process else None

    async def _start_gateway(self) -> GatewayEndpoint:
        """Start the gateway and return its endpoint once it listens.

        Raises:
            ExecutorStateError: started before.
            BackendStartError: the gateway exited or did not listen in time
                (the message quotes the end of its log).

        Cancelling the call kills the gateway started so far.
        """
        if self._started:
            raise ExecutorStateError("a LocalBackend can be started once")
        if self.python == sys.executable:
            require("local", "LocalBackend")
        self._started = True
        begin = time.monotonic()
        token = secrets.token_urlsafe(32)
        try:
            bwrap = await choose(self.isolation)
            self.isolated = bwrap is not None
            # A few syscalls on /tmp: cheaper than handing them to a worker thread.
            self._private_dir, self._log = _make_private_dir()
            private_dir = self._private_dir
            runtime_dir = os.path.join(private_dir, "rt")
            work_dir = os.fspath(self.cwd) if self.cwd is not None else os.path.join(private_dir, "work")
            self._work_dir = work_dir
            _prepare_work_dir(work_dir, for_root_jail=bwrap is not None and self.cwd is not None)
            env = {
                **os.environ,
                # Jailed kernels get env= from the jail config, not the gateway's environment.
                **(self.env if bwrap is None else {}),
                TOKEN_ENV: token,
                "JUPYTER_RUNTIME_DIR": runtime_dir,
            }
            # Spawned on the one spawner thread: Popen waits for the child's
            # exec (vfork), which takes 10-20 ms when the CPUs are busy, and
            # asyncio's create_subprocess_exec also waits for a new watcher
            # thread per process on Python < 3.12. The exit is observed by
            # polling (see _wait_exit).
            options = [
                "--ip=127.0.0.1",
                "--port=0",
                "--exit-on-stdin-eof",
                f"--remove-dir={private_dir}",
                f"--nice={self.nice}",
            ]
            if bwrap is not None:
                self._pids_cgroup = make_pids_cgroup(os.path.basename(private_dir), self.limits.max_processes)
                per_kernel = (
                    self._pids_cgroup is not None
                    and self.limits.max_processes is not None
                    and share_out_pids_cgroup(self._pids_cgroup, self.limits.max_processes)
                )
                config = jail_config(
                    bwrap,
                    work_dir=work_dir,
                    # No cwd given: each kernel gets a work directory of its own.
                    work_root=work_dir if self.cwd is None else None,
                    runtime_dir=runtime_dir,
                    packages_dir=self.packages_dir,
                    env=self.env,
                    limits=self.limits,
                    pids_cgroup=self._pids_cgroup,
                    pids_per_kernel=per_kernel,
                )
                # A file, never argv: the config holds env= (argv is public in /proc).
                config_path = os.path.join(private_dir, "jail.json")
                write_jail_config(config_path, config)
                options.append(f"--kernel-jail={config_path}")
            log = self._log

            def spawn() -> subprocess.Popen[bytes]:
                # The gateway side from this package's files, without importing the package.
                return subprocess.Popen(
                    _launcher().local_command(self.python, options),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=env,
                    cwd=work_dir,
                    start_new_session=True,
                )

            async def spawn_and_keep() -> None:
                # Kept even when start() is cancelled meanwhile, so aclose() kills it.
                self._process = await asyncio.get_running_loop().run_in_executor(_spawner(), spawn)

            await run_shielded(spawn_and_keep())
            port = await self._read_port()
        except BaseException:
            await self.aclose()
            raise
        self._endpoint = GatewayEndpoint(f"http://127.0.0.1:{port}", token)
        seconds = record_phase(self.timings, "gateway_process", begin, logger, "local ")
        logger.debug("local gateway (pid %s) listening on port %s after %.2f s", self.pid, port, seconds)
        return self._endpoint

    async def _read_port(self) -> int:
        """Read the launcher's port line from its stdout (an asyncio pipe reader, no thread)."""
        process = self._process
        assert process is not None and process.stdout is not None
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), process.stdout
        )
        try:
            with anyio.move_on_after(self.startup_timeout):
                while True:
                    line = await reader.readline()
                    if not line:
                        status = await _wait_exit(process, _TERM_GRACE)
                        raise BackendStartError(
                            f"the gateway exited with status {status} before listening:\n"
                            f"{await self._log_tail()}"
                        )
                    text = line.decode(errors="replace").strip()
                    if text.startswith(PORT_LINE_PREFIX):
                        return int(text[len(PORT_LINE_PREFIX) :])
        finally:
            # The launcher sends nothing more to stdout after the port line.
            transport.close()
        raise BackendStartError(
            f"the gateway did not listen within {self.startup_timeout} s:\n{await self._log_tail()}"
        )

    async def _log_tail(self) -> str:
        if self._private_dir is None:
            return ""
        text = await anyio.Path(self._private_dir, "gateway.log").read_text(errors="replace")
        return text[-3000:]

    @property
    def packages_dir(self) -> str:
        """Where :meth:`install` puts packages (first on the kernels' ``sys.path`` when jailed)."""
        if self._private_dir is None:
            raise ExecutorStateError("the LocalBackend is not started")
        return os.path.join(self._private_dir, "packages")

    @property
    def installs_on_host(self) -> bool:
        """Jailed kernels have no network: packages are installed from the host (:meth:`install`)."""
        return bool(self.isolated)

    async def install(self, specs: list[str], timeout: float) -> tuple[int, str]:
        """Install ``specs`` with pip into :attr:`packages_dir`, never the host's environment.

        ``--upgrade`` makes a version that replaces an older one in the
        directory take its place (with ``--target`` pip otherwise keeps the old).

        Returns the installer's exit status and the end of its output. Runs
        on the host (the jail has no network); the directory is mounted
        read-only in the kernels. Cancelling the call (or ``timeout``) kills
        the installer.
        """
        command = [
            self.python, "-m", "pip", "install", "--disable-pip-version-check",
            "--no-input", "--upgrade", "--target", self.packages_dir, *specs,
        ]  # fmt: skip
        with anyio.move_on_after(timeout):
            done = await anyio.run_process(command, check=False, stderr=subprocess.STDOUT)
            if self.isolated and os.geteuid() == 0:
                # Jailed kernels run as nobody: what pip wrote under root's umask must be readable.
                await anyio.to_thread.run_sync(_readable_by_all, self.packages_dir)
            return done.returncode, done.stdout.decode(errors="replace")[-4000:]
        return -1, f"the installer did not finish within {timeout} s (stopped)"

    async def aclose(self) -> None:
        """Stop the gateway and all its kernels, remove the runtime dir. Safe to call twice.

        Runs to completion when cancelled; the cancellation is re-raised after.
        """
        await run_shielded(self._stop())

    async def _stop(self) -> None:
        # Each step leaves its field set until it is done, so a stop cut short
        # (its task cancelled, as asyncio.run does when it ends) can run again.
        process = self._process
        if process is not None:
            if process.poll() is None:
                tree = await anyio.to_thread.run_sync(_process_tree, process.pid)
                process.send_signal(signal.SIGTERM)
                if await _wait_exit(process, _TERM_GRACE) is None:
                    process.kill()
                    await _wait_exit(process, math.inf)
                await anyio.to_thread.run_sync(_kill_if_same, tree)
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    pipe.close()
            self._process = None
        log, self._log = self._log, None
        private_dir, self._private_dir = self._private_dir, None
        cgroup, self._pids_cgroup = self._pids_cgroup, None
        if log is not None:
            log.close()
        if private_dir is not None:
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(private_dir, ignore_errors=True))
        if cgroup is not None:
            await remove_cgroup_when_empty(cgroup)

    def __repr__(self) -> str:
        return f"LocalBackend(pid={self.pid})"
