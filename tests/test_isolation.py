"""LocalBackend's jail, tried the way model-written code would try to get out.

Each test runs real code in a real kernel behind a real gateway, jailed by the
real bubblewrap binary, and checks from the host that the attempt failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from async_modal_exec import AsyncExecutor, ExecutionTimeout, GatewayBackend, KernelDied, LocalBackend
from async_modal_exec.backends import isolation
from async_modal_exec.backends.isolation import Limits
from async_modal_exec.errors import BackendStartError

from .helpers import descendants, wait_gone

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bubblewrap is Linux only")

HOST_SECRET = "AME_HOST_SECRET"


@pytest.fixture
async def jailed(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AsyncExecutor]:
    # Planted in this process's environment before the gateway starts: the
    # kernel must not see it.
    monkeypatch.setenv(HOST_SECRET, "host-" + secrets.token_hex(8))
    backend = LocalBackend(
        isolation="bwrap", limits=Limits(memory_bytes=2 << 30, max_processes=64), env={"GIVEN": "yes"}
    )
    async with AsyncExecutor(backend, timeout=30) as executor:
        assert backend.isolated is True
        yield executor


async def value_of(executor: AsyncExecutor, code: str) -> str:
    result = await executor.run(code)
    result.raise_for_error()
    assert result.value is not None, result
    return result.value.text


def gateway_port(executor: AsyncExecutor) -> int:
    backend = executor.backend
    assert isinstance(backend, LocalBackend) and backend._endpoint is not None
    return int(backend._endpoint.base_url.rsplit(":", 1)[1])


async def test_no_tcp_to_the_gateway_or_a_host_listener(jailed: AsyncExecutor) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ports = [gateway_port(jailed), listener.getsockname()[1]]
        # Reachable from the host: the attempts below would succeed unjailed.
        for port in ports:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        outcome = await value_of(
            jailed,
            "import socket\n"
            "def attempt(port):\n"
            "    try:\n"
            "        socket.create_connection(('127.0.0.1', port), timeout=2).close()\n"
            "        return 'connected'\n"
            "    except OSError as exc:\n"
            "        return type(exc).__name__\n"
            f"[attempt(port) for port in {ports!r}]",
        )
    assert "connected" not in outcome and "ConnectionRefusedError" in outcome


async def test_writes_land_only_in_the_work_directory(jailed: AsyncExecutor, tmp_path: Path) -> None:
    backend = jailed.backend
    assert isinstance(backend, LocalBackend)
    targets = [tmp_path / "escape.txt", Path(sys.prefix) / "escape.txt", Path.home() / "escape.txt"]
    outcome = await value_of(
        jailed,
        "import os\n"
        "def attempt(path):\n"
        "    try:\n"
        "        with open(path, 'w') as f: f.write('out')\n"
        "        return 'written'\n"
        "    except OSError as exc:\n"
        "        return type(exc).__name__\n"
        "open('inside.txt', 'w').write('in')\n"
        f"[attempt(p) for p in {[str(t) for t in targets]!r}], os.getcwd()",
    )
    for target in targets:
        assert not target.exists(), f"{target} was written from the jail ({outcome})"
    # The home and /tmp are private (writable, gone afterwards); the host stays as it was.
    work_dir = outcome.rsplit(",", 1)[1].strip().strip("')")
    assert work_dir == backend.work_dir
    assert jailed.kernel_id is not None
    own = Path(backend.kernel_work_dir(jailed.kernel_id))
    assert own.parent == Path(work_dir) and (own / "inside.txt").read_text() == "in"
    assert "OSError" in outcome or "Read-only" in outcome or "FileNotFoundError" in outcome


async def test_files_under_the_host_home_are_hidden(jailed: AsyncExecutor) -> None:
    planted = Path.home() / f"ame-planted-{secrets.token_hex(4)}.txt"
    planted.write_text("host secret")
    try:
        outcome = await value_of(
            jailed,
            f"import os\ntry:\n    r = open({str(planted)!r}).read()\nexcept OSError as exc:\n"
            f"    r = type(exc).__name__\nr",
        )
    finally:
        planted.unlink()
    assert outcome == "'FileNotFoundError'"


async def test_no_host_environment_and_no_gateway_token(jailed: AsyncExecutor) -> None:
    backend = jailed.backend
    assert isinstance(backend, LocalBackend) and backend._endpoint is not None
    token = backend._endpoint.token
    assert token
    outcome = await value_of(
        jailed,
        "import os\n"
        "found = []\n"
        "for pid in os.listdir('/proc'):\n"
        "    for name in ('environ', 'cmdline'):\n"
        "        try:\n"
        "            found.append(open(f'/proc/{pid}/{name}', 'rb').read().decode(errors='replace'))\n"
        "        except OSError:\n"
        "            pass\n"
        "'\\n'.join(found + [repr(dict(os.environ))])",
    )
    assert token not in outcome and "KG_AUTH_TOKEN" not in outcome
    assert os.environ[HOST_SECRET] not in outcome and HOST_SECRET not in outcome
    assert "GIVEN" in outcome  # what env= passes does arrive
    # Nor does the gateway hold it in its environment, seen from the host.
    assert backend.pid is not None
    assert token.encode() not in Path(f"/proc/{backend.pid}/environ").read_bytes()


async def test_a_backend_env_value_is_in_no_process_command_line() -> None:
    # It travelled as JSON in the launcher's --kernel-jail= argument: readable
    # by every user (ps -eo args) for the gateway's whole life.
    value = "env-secret-" + secrets.token_hex(8)
    backend = LocalBackend(isolation="bwrap", env={"AME_GIVEN_SECRET": value})
    async with AsyncExecutor(backend) as executor:
        assert await value_of(executor, "import os\nos.environ['AME_GIVEN_SECRET']") == repr(value)
        command_lines = [_cmdline(int(pid)) for pid in os.listdir("/proc") if pid.isdigit()]
        assert command_lines and not [line for line in command_lines if value.encode() in line]
        # Nor is it in the gateway's environment: the jail config (a 0600 file) carries it.
        assert backend.pid is not None
        assert value.encode() not in Path(f"/proc/{backend.pid}/environ").read_bytes()


async def test_host_processes_are_invisible_and_out_of_reach(jailed: AsyncExecutor) -> None:
    host_pids = [os.getpid(), os.getppid()]
    outcome = await value_of(
        jailed,
        "import os, signal\n"
        "seen = [open(f'/proc/{p}/cmdline','rb').read() for p in os.listdir('/proc') if p.isdigit()]\n"
        "def attempt(pid):\n"
        "    try:\n"
        "        os.kill(pid, 0)\n"
        "        return 'reachable'\n"
        "    except OSError as exc:\n"
        "        return type(exc).__name__\n"
        f"len(seen), any(b'pytest' in s for s in seen), [attempt(p) for p in {host_pids!r}]",
    )
    count, saw_pytest, attempts = outcome.strip("()").split(", ", 2)
    assert int(count) < 10, outcome  # the kernel and what it started, nothing else
    assert saw_pytest == "False"
    assert "reachable" not in attempts or all(p == 1 for p in host_pids), outcome


async def test_no_process_outlives_its_kernel(jailed: AsyncExecutor) -> None:
    marker = f"ame-detached-{secrets.token_hex(4)}"
    await value_of(
        jailed,
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', {marker!r}],"
        " start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,"
        " stderr=subprocess.DEVNULL)\np.pid",
    )
    detached = [pid for pid in descendants() if marker.encode() in _cmdline(pid)]
    assert detached, "the detached process should run while its kernel runs"
    old_kernel = jailed.kernel_id
    await jailed.restart()
    assert jailed.kernel_id != old_kernel
    assert await wait_gone(detached) == [], "a detached process survived its kernel"
    assert await value_of(jailed, "'still usable'") == "'still usable'"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


async def test_a_fork_bomb_is_contained_and_reported(jailed: AsyncExecutor) -> None:
    outcome = await value_of(
        jailed,
        "import os, signal, time\n"
        "children = []\n"
        "try:\n"
        "    while len(children) < 10_000:\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        children.append(pid)\n"
        "    stopped_by = 'nothing'\n"
        "except OSError as exc:\n"
        "    stopped_by = type(exc).__name__\n"
        "for pid in children:\n"
        "    os.kill(pid, signal.SIGKILL)\n"
        "    os.waitpid(pid, 0)\n"
        "len(children), stopped_by",
    )
    forked, stopped_by = outcome.strip("()").split(", ")
    assert stopped_by == "'BlockingIOError'", outcome
    assert int(forked) < 64
    assert await value_of(jailed, "1 + 1") == "2"


HOLD_EVERY_PROCESS = (
    "import os, time\n"
    "held = []\n"
    "try:\n"
    "    while len(held) < 10_000:\n"
    "        pid = os.fork()\n"
    "        if pid == 0:\n"
    "            time.sleep(120)\n"
    "            os._exit(0)\n"
    "        held.append(pid)\n"
    "except OSError:\n"
    "    pass\n"
    "len(held)"
)
RELEASE = (
    "import os, signal\nfor pid in held:\n    os.kill(pid, signal.SIGKILL)\n    os.waitpid(pid, 0)\nlen(held)"
)


async def test_each_kernel_of_a_backend_has_its_own_process_limit() -> None:
    # As root the limit is a pids cgroup: it was one per backend, so one
    # kernel that used up Limits.max_processes left none to the backend's
    # other kernels (at 256, about 40 idle IPython kernels filled it).
    if os.geteuid() != 0:
        pytest.skip("pids cgroups are made as root (RLIMIT_NPROC otherwise)")
    backend = LocalBackend(isolation="bwrap", limits=Limits(max_processes=48))
    async with AsyncExecutor(backend, timeout=60) as first:
        cgroup = backend._pids_cgroup
        if cgroup is None:
            pytest.skip("no writable pids cgroup on this machine")
        assert backend._endpoint is not None
        endpoint = backend._endpoint
        async with AsyncExecutor(GatewayBackend(endpoint.base_url, endpoint.token), timeout=60) as second:
            kernels = [entry for entry in os.listdir(cgroup) if entry.startswith("kernel-")]
            if not kernels:
                pytest.skip("this machine's pids cgroups cannot have children: one per backend")
            assert len(kernels) == 2
            try:
                taken = int(await value_of(first, HOLD_EVERY_PROCESS))
                assert 10 < taken < 48
                # The other kernel of the same gateway and jail still has its
                # own (give or take a thread a kernel starts late).
                other = int(await value_of(second, HOLD_EVERY_PROCESS))
                assert abs(other - taken) <= 3, (other, taken)
                assert await value_of(second, RELEASE) == str(other)
            finally:
                await value_of(first, RELEASE)
    assert not os.path.exists(cgroup)


def test_a_starting_kernel_removes_only_the_cgroups_of_ended_kernels(tmp_path: Path) -> None:
    # A plain directory stands in for the backend's cgroup (cgroupfs itself
    # is the outer boundary here); the choice of what to remove is the point:
    # a kernel's cgroup is empty between its mkdir and its join, and removing
    # it then would fail that kernel's start.
    from async_modal_exec import kernel_jail

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    # pid 1 stands for a kernel that still runs; this process's pid for an
    # ended kernel's cgroup left with the pid this kernel now has.
    for pid in (ended.pid, 1, os.getpid()):
        (tmp_path / f"kernel-{pid}").mkdir()
    own = kernel_jail._own_cgroup(str(tmp_path), 48)
    assert own == str(tmp_path / f"kernel-{os.getpid()}")
    assert sorted(entry.name for entry in tmp_path.iterdir()) == sorted(["kernel-1", f"kernel-{os.getpid()}"])
    assert (Path(own) / "pids.max").read_text() == "48"


async def test_a_memory_bomb_is_a_memory_error_and_the_kernel_lives(jailed: AsyncExecutor) -> None:
    result = await jailed.run("hoard = []\nwhile True:\n    hoard.append(bytearray(50 * 2**20))")
    assert result.error is not None and result.error.ename == "MemoryError", result
    assert await value_of(jailed, "n = len(hoard)\ndel hoard\nn > 0") == "True"
    result = await jailed.run("bytearray(8 * 2**30)")
    assert result.error is not None and result.error.ename == "MemoryError", result
    assert await value_of(jailed, "1 + 1") == "2"


async def test_bwrap_that_cannot_work_fails_clearly_and_auto_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Outermost boundary: a machine without a working bwrap is simulated by
    # pointing at a binary that does not exist; the real probe then fails.
    monkeypatch.setattr(isolation, "find_bwrap", lambda: "/nonexistent/bwrap")
    with pytest.raises(BackendStartError, match="isolation='bwrap' cannot work here"):
        async with LocalBackend(isolation="bwrap"):
            pass
    isolation._warn_once.cache_clear()
    backend = LocalBackend()
    with caplog.at_level(logging.WARNING, logger="async_modal_exec.backends.local"):
        async with AsyncExecutor(backend) as executor:
            assert await value_of(executor, "6 * 7") == "42"
    assert backend.isolated is False
    warnings = [r for r in caplog.records if "WITHOUT isolation" in r.getMessage()]
    assert len(warnings) == 1


async def test_unjailed_kernels_cannot_read_the_token_either() -> None:
    backend = LocalBackend(isolation="none")
    async with AsyncExecutor(backend) as executor:
        assert backend._endpoint is not None and backend.pid is not None
        token = backend._endpoint.token
        assert token
        outcome = await value_of(
            executor,
            f"import os\nopen('/proc/{backend.pid}/environ', 'rb').read().decode() + repr(dict(os.environ))",
        )
        assert token not in outcome and "KG_AUTH_TOKEN" not in outcome
    with pytest.raises(ValueError, match="isolation must be"):
        LocalBackend(isolation="docker")  # type: ignore[arg-type]


async def test_default_local_backend_is_jailed_here() -> None:
    backend = LocalBackend()
    async with AsyncExecutor(backend) as executor:
        assert backend.isolated is True
        assert await value_of(executor, "import os\nos.getpid()") == "2"
    assert await wait_gone([p for p in descendants() if b"kernel_jail" in _cmdline(p)]) == []


async def test_host_tools_still_cross_the_jail(tmp_path: Path) -> None:
    # The sanctioned way out: a host tool runs on the host (over the kernel's
    # stdin channel) and can read what the jailed code cannot.
    planted = tmp_path / "host-only.txt"
    planted.write_text("seen by the host tool")

    def read_host_file(name: str) -> str:
        return (tmp_path / name).read_text()

    backend = LocalBackend(isolation="bwrap")
    async with AsyncExecutor(backend, host_tools=[read_host_file]) as executor:
        assert backend.isolated
        assert await value_of(executor, "read_host_file('host-only.txt')") == "'seen by the host tool'"
        direct = await executor.run(f"open({str(planted)!r}).read()")
        assert direct.error is not None and direct.error.ename == "FileNotFoundError"


def test_read_only_paths_inside_the_work_directory_stay_read_only(tmp_path: Path) -> None:
    # E.g. a project's .venv under the cwd given to LocalBackend: the writable
    # work directory must not make the interpreter writable.
    from async_modal_exec import kernel_jail

    work = tmp_path / "project"
    venv = work / ".venv"
    venv.mkdir(parents=True)
    kernel_dir = tmp_path / "rt" / "kernel-id"
    kernel_dir.mkdir(parents=True)
    as_root = os.geteuid() == 0
    if as_root:  # the jailed kernel then runs as nobody: its directories are given to it
        for path in (work, kernel_dir):
            os.chown(path, 65534, 65534)
    bwrap = isolation.find_bwrap()
    assert bwrap is not None
    config = {"bwrap": bwrap, "work_dir": str(work), "ro_binds": [str(venv)]}
    probe = (
        "import pathlib\n"
        "pathlib.Path('inside.txt').write_text('ok')\n"
        "try:\n"
        "    pathlib.Path('.venv/escape.txt').write_text('no')\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    argv = kernel_jail.bwrap_argv(
        config,
        [sys.executable, "-c", probe],
        kernel_dir=str(kernel_dir),
        work=str(work),
        uid=65534 if as_root else kernel_jail.JAILED_UID,
        gid=65534 if as_root else kernel_jail.JAILED_UID,
        as_root=as_root,
    )
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
        pass_fds=_data_fds(argv),
    )
    assert done.returncode == 0, done.stderr
    assert (work / "inside.txt").read_text() == "ok"
    assert not (venv / "escape.txt").exists() and "OSError" in done.stdout, (done.stdout, done.stderr)


def _data_fds(argv: list[str]) -> tuple[int, ...]:
    """The pipes bwrap_argv made for --ro-bind-data and --seccomp (subprocess closes the others)."""
    return tuple(
        int(argv[index + 1]) for index, arg in enumerate(argv) if arg in ("--ro-bind-data", "--seccomp")
    )


def _run_bpf(program: bytes, data: bytes) -> int:
    """A classic-BPF interpreter for the few instructions the jail's seccomp filter uses."""
    import struct

    instructions = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    accumulator, pc = 0, 0
    while True:
        code, if_true, if_false, k = instructions[pc]
        if code == 0x20:  # ld [k]
            accumulator = struct.unpack_from("<I", data, k)[0]
        elif code == 0x06:  # ret k
            return int(k)
        elif code in (0x15, 0x35, 0x45):  # jeq, jge, jset
            taken = {0x15: accumulator == k, 0x35: accumulator >= k, 0x45: bool(accumulator & k)}[code]
            pc += if_true if taken else if_false
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")
        pc += 1


def _seccomp_data(arch: int, number: int, arg0: int = 0) -> bytes:
    import struct

    return struct.pack("<iIQ6Q", number, arch, 0, arg0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("machine", "arch", "calls"),
    [("x86_64", 0xC000003E, {"socket": 41, "clone": 56, "unshare": 272, "read": 0}),
     ("aarch64", 0xC00000B7, {"socket": 198, "clone": 220, "unshare": 97, "read": 63})],
)  # fmt: skip
def test_the_seccomp_filter_decides_as_documented(machine: str, arch: int, calls: dict[str, int]) -> None:
    import errno

    from async_modal_exec import kernel_jail

    program = kernel_jail.seccomp_filter(machine)
    assert program is not None and kernel_jail.seccomp_filter("riscv64") is None
    allow, refused = 0x7FFF0000, 0x00050000

    def decide(number: int, arg0: int = 0, on: int = arch) -> int:
        return _run_bpf(program, _seccomp_data(on, number, arg0))

    for family in (1, 2, 10, 16):  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK
        assert decide(calls["socket"], family) == allow
    for family in (40, 17, 31, 38):  # AF_VSOCK, AF_PACKET, AF_BLUETOOTH, AF_ALG
        assert decide(calls["socket"], family) == refused | errno.EAFNOSUPPORT
    for call in ("clone", "unshare"):
        assert decide(calls[call], 0x00020000 | 0x11) == allow  # CLONE_NEWNS, SIGCHLD: no new user
        assert decide(calls[call], 0x10000000 | 0x11) == refused | errno.EPERM  # CLONE_NEWUSER
    for number in (425, 426, 427, 435):  # io_uring_setup/enter/register, clone3
        assert decide(number) == refused | errno.ENOSYS
    assert decide(calls["read"]) == allow
    assert decide(calls["read"] | 0x40000000) == refused | errno.ENOSYS  # x32
    assert decide(calls["read"], on=0x40000003) == refused | errno.ENOSYS  # i386 (int 0x80)


async def test_a_kernel_cannot_make_root_follow_a_link_it_planted_on_restart(tmp_path: Path) -> None:
    # The kernel can write in its own runtime directory; when the gateway
    # restarts it, kernel_jail (root) used to chown every entry there,
    # following symlinks: a planted link gave any host file to nobody.
    if os.geteuid() != 0:
        pytest.skip("only root hands the kernel's files over")
    target = tmp_path / "root-owned.txt"
    target.write_text("root's")
    backend = LocalBackend(isolation="bwrap")
    async with AsyncExecutor(backend, timeout=30) as executor:
        kernel_id = executor.kernel_id
        result = await executor.run(
            "import os\nfrom ipykernel.connect import get_connection_file\n"
            "own = os.path.dirname(get_connection_file())\n"
            f"os.symlink({str(target)!r}, os.path.join(own, 'planted'))\n"
            "os.mkdir(os.path.join(own, 'subdir'))\n"
            "sorted(os.listdir(own))"
        )
        assert result.value is not None and "'planted'" in result.value.text, result
        with pytest.raises(KernelDied):  # the gateway restarts it, same id and directory
            await executor.run("import os\nos._exit(1)")
        deadline = anyio.current_time() + 30
        while True:  # the executor reconnects to the restarted kernel, or replaces it
            again = await executor.run(
                "import os\nfrom ipykernel.connect import get_connection_file\n"
                "sorted(os.listdir(os.path.dirname(get_connection_file())))"
            )
            if again.error is None or anyio.current_time() > deadline:
                break
            await anyio.sleep(0.2)
        assert again.error is None, again
        assert "planted" not in again.value.text and "subdir" not in again.value.text  # type: ignore[union-attr]
        assert executor.kernel_id == kernel_id or executor.kernel_id is not None
    assert target.stat().st_uid == 0 and target.read_text() == "root's"


@pytest.mark.parametrize("kernel_id", ["..", ".", "/etc", "not-a-uuid"])
async def test_a_kernel_id_that_is_not_a_uuid_is_refused(kernel_id: str) -> None:
    # It names the kernel's directories: ".." made the backend's whole private
    # directory (the jail config, every kernel's files) the kernel's own.
    import aiohttp

    backend = LocalBackend(isolation="bwrap")
    async with backend as sandbox:
        endpoint = sandbox.endpoint
        async with aiohttp.ClientSession(headers=endpoint.headers) as http:
            async with http.post(
                f"{endpoint.base_url}/api/kernels", json={"kernel_id": kernel_id}
            ) as response:
                assert response.status == 400, await response.text()
            async with http.get(f"{endpoint.base_url}/api/kernels") as response:
                assert await response.json() == []
        assert backend._private_dir is not None
        assert sorted(os.listdir(backend._private_dir)) == [
            "gateway.log",
            "jail.json",
            "packages",
            "rt",
            "work",
        ]


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
async def test_timeouts_and_interrupts_report_no_loss_when_none_happened(isolation: str) -> None:
    # A jailed kernel is interrupted by a message: its reply goes to the
    # gateway, and took a message number this client never sees. Every
    # timeout and interrupt reported lost_messages=1 and "output incomplete".
    async with AsyncExecutor(LocalBackend(isolation=isolation), timeout=30) as executor:  # type: ignore[arg-type]
        for _ in range(10):
            with pytest.raises(ExecutionTimeout) as caught:
                await executor.run("print('before', flush=True)\nimport time\ntime.sleep(10)", timeout=0.5)
            result = caught.value.result
            assert result is not None and result.stdout.startswith("before"), result
            assert result.lost_messages == 0 and "incomplete" not in result.stdout, result
        for _ in range(10):
            running = asyncio.create_task(
                executor.run("print('before', flush=True)\nimport time\ntime.sleep(10)", timeout=30)
            )
            await asyncio.sleep(0.3)
            await executor.interrupt()
            result = await running
            assert result.error is not None and result.error.ename == "KeyboardInterrupt", result
            assert result.lost_messages == 0 and "incomplete" not in result.stdout, result
        assert await value_of(executor, "'still usable'") == "'still usable'"
