"""Fake sandboxes: local processes standing in for Modal containers."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from modal_proto import api_pb2

from async_modal_exec.backends.local import _kill_if_same, _process_tree

from .tls import TlsProxy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class FakeSandbox:
    """One sandbox: its create request, its process, its ports and its fate.

    Its filesystem is the host's, except for ``root``: the container's own
    site-packages (``root/site``, first on ``PYTHONPATH``), where pip installs
    (``PIP_TARGET``), so a sandbox's installs stay in the sandbox. A
    filesystem snapshot copies ``root``; a sandbox created from the snapshot
    starts with that copy. pip's log goes to ``pip_log`` (outside ``root``):
    a sandbox whose pip never ran has none.
    """

    sandbox_id: str
    task_id: str
    app_id: str
    request: api_pb2.SandboxCreateV2Request
    env: dict[str, str]
    tags: dict[str, str]
    home: Path
    created_at: float = field(default_factory=time.time)
    process: asyncio.subprocess.Process | None = None
    host_ports: dict[int, int] = field(default_factory=dict)
    proxies: dict[int, TlsProxy] = field(default_factory=dict)
    exit_code: int | None = None
    terminated: bool = False
    _timeout_task: asyncio.Task[None] | None = None

    @property
    def root(self) -> Path:
        return self.home / "root"

    @property
    def work_dir(self) -> Path:
        """The container's working directory (not snapshotted: like ``/root``, it is the user's)."""
        return self.home / "work"

    @property
    def pip_log(self) -> Path:
        return self.home / "pip.log"

    def make_filesystem(self, snapshot: Path | None) -> None:
        """An empty ``root``, or a copy of ``snapshot`` (a filesystem snapshot)."""
        self.home.mkdir(parents=True)
        self.work_dir.mkdir()
        if snapshot is not None:
            shutil.copytree(snapshot, self.root, symlinks=True)
        (self.root / "site").mkdir(parents=True, exist_ok=True)

    def container_env(self) -> dict[str, str]:
        site = str(self.root / "site")
        path = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH", "")) if p)
        return {"PYTHONPATH": path, "PIP_TARGET": site, "PIP_LOG": str(self.pip_log)}

    @property
    def definition(self) -> api_pb2.Sandbox:
        return self.request.definition

    @property
    def encrypted_ports(self) -> list[int]:
        return [spec.port for spec in self.definition.open_ports.ports if not spec.unencrypted]

    def argv(self) -> list[str]:
        args = list(self.definition.entrypoint_args)
        if args and args[0] in ("python", "python3"):
            args[0] = sys.executable
        rewritten = []
        for arg in args:
            for container, host in self.host_ports.items():
                if arg == str(container):
                    arg = str(host)
                elif arg.endswith(f"={container}"):
                    arg = arg[: -len(str(container))] + str(host)
            rewritten.append(arg)
        return rewritten

    async def start(self, tls: ssl.SSLContext) -> None:
        for port in self.encrypted_ports:
            self.host_ports[port] = free_port()
        self.process = await asyncio.create_subprocess_exec(
            *self.argv(),
            env={**os.environ, **self.container_env(), **self.env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.work_dir,
        )
        for container, host in self.host_ports.items():
            proxy = TlsProxy(tls, host)
            await proxy.start()
            self.proxies[container] = proxy
        if self.definition.timeout_secs:
            self._timeout_task = asyncio.create_task(self._expire(self.definition.timeout_secs))
        asyncio.create_task(self._reap())  # noqa: RUF006 - ends with the process

    async def _reap(self) -> None:
        assert self.process is not None
        code = await self.process.wait()
        if self.exit_code is None:
            self.exit_code = code

    async def _expire(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.terminate()

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None and not self.terminated

    async def ready(self) -> bool:
        """The readiness probe: the probed container port accepts TCP."""
        probe_port = self.definition.readiness_probe.tcp_port
        host = self.host_ports.get(probe_port)
        if host is None:
            return self.alive()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", host)
        except OSError:
            return False
        writer.close()
        return True

    async def terminate(self) -> None:
        """Kill the process and everything it started (kernels run in their own sessions)."""
        if self.terminated:
            return
        self.terminated = True
        if self._timeout_task is not None and self._timeout_task is not asyncio.current_task():
            self._timeout_task.cancel()
        process = self.process
        if process is not None and process.returncode is None:
            tree = _process_tree(process.pid)
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()
            _kill_if_same(tree)
        if self.exit_code is None:
            self.exit_code = -signal.SIGTERM
        for proxy in self.proxies.values():
            await proxy.close()

    def result(self) -> api_pb2.GenericResult:
        if self.alive() or (self.exit_code is None and not self.terminated):
            return api_pb2.GenericResult()
        if self.terminated:
            return api_pb2.GenericResult(
                status=api_pb2.GenericResult.GENERIC_STATUS_TERMINATED, exitcode=self.exit_code or 0
            )
        status = (
            api_pb2.GenericResult.GENERIC_STATUS_SUCCESS
            if self.exit_code == 0
            else api_pb2.GenericResult.GENERIC_STATUS_FAILURE
        )
        return api_pb2.GenericResult(status=status, exitcode=self.exit_code or 0)
