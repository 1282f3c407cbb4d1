"""The gateway side's pure parts, in process: the v1 codec, cleanup helpers, the token, shipping."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from async_modal_exec import launcher
from async_modal_exec.gateway_side import auth_token
from async_modal_exec.gateway_side.bootstrap import load_from_directory, load_from_sources
from async_modal_exec.gateway_side.cleanup import remove_cgroup, remove_trees
from async_modal_exec.gateway_side.v1_codec import SMALL_PIECE, decode_v1, encode_v1, v1_frame
from async_modal_exec.protocol import execute_request


def _websocket_payload(pieces: list[bytes]) -> bytes:
    """The payload of one unmasked binary websocket frame (what a server writes)."""
    frame = b"".join(pieces)
    assert frame[0] == 0x82
    length = frame[1]
    start = 2 if length < 126 else 4 if length == 126 else 10
    return frame[start:]


@pytest.mark.parametrize(
    "parts",
    [
        [b'{"msg_type":"status"}', b"{}", b"{}", b'{"execution_state":"idle"}'],
        [b"{}", b"{}", b"{}", b'{"text":"' + b"x" * 100_000 + b'"}', b"buffer", b"b" * 70_000],
        [b"", b"", b"", b""],
        [b"h" * 125, b"", b"", b""],
        [b"h" * 65_400, b"", b"", b""],
    ],
)
def test_a_v1_frame_written_in_pieces_is_the_frame_the_server_would_write(parts: list[bytes]) -> None:
    from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1

    payload = serialize_msg_to_ws_v1(parts, "iopub")
    size = len(payload)
    if size < 126:
        length = bytes([size])
    elif size <= 0xFFFF:
        length = bytes([126]) + size.to_bytes(2, "big")
    else:
        length = bytes([127]) + size.to_bytes(8, "big")
    pieces = v1_frame("iopub", parts)
    assert b"".join(pieces) == b"\x82" + length + payload  # FIN, binary, unmasked
    big = [part for part in parts if len(part) >= SMALL_PIECE]
    assert len(pieces) <= 2 * len(big) + 1  # small parts are joined, big ones written as they are


def test_what_the_client_encodes_decodes_and_the_gateways_frames_too() -> None:
    message = execute_request("print('é\\ud800')", session="s")
    message["buffers"] = [b"\x00\x01raw", b"b" * (SMALL_PIECE + 1)]
    encoded = encode_v1(message)
    decoded = decode_v1(encoded)
    assert decoded["channel"] == "shell"
    assert decoded["header"] == message["header"] and decoded["content"] == message["content"]
    assert decoded["parent_header"] == {} and decoded["metadata"] == {}
    assert decoded["buffers"] == message["buffers"]
    assert decoded["msg_type"] == "execute_request"
    # The gateway's frame of the same parts carries the same bytes, so the client reads it alike.
    parts = [json.dumps(message[name]).encode() for name in ("header", "parent_header", "metadata")]
    parts += [json.dumps(message["content"]).encode(), *message["buffers"]]
    parts[1:3] = [b"{}", b"{}"]  # encode_v1 writes empty parts as {}
    assert _websocket_payload(v1_frame("shell", parts)) == encoded
    assert decode_v1(_websocket_payload(v1_frame("iopub", [b"", b"", b"", b""])))["header"] == {}


@pytest.mark.parametrize("frame", [b"", (6).to_bytes(8, "little") + (10**9).to_bytes(8, "little") * 6])
def test_a_malformed_v1_frame_raises_value_error(frame: bytes) -> None:
    with pytest.raises(ValueError):
        decode_v1(frame)


def test_remove_cgroup_removes_empty_kernel_cgroups_then_itself(tmp_path: Path) -> None:
    # cgroup directories are removed with rmdir only: a busy one (here, not
    # empty) stays, and so does anything not named kernel-*.
    cgroup = tmp_path / "ame-backend"
    for name in ("kernel-1", "kernel-2", "other"):
        (cgroup / name).mkdir(parents=True)
    (cgroup / "kernel-2" / "cgroup.procs").write_text("123")
    assert remove_cgroup(str(cgroup)) is False
    assert sorted(p.name for p in cgroup.iterdir()) == ["kernel-2", "other"]
    (cgroup / "kernel-2" / "cgroup.procs").unlink()
    (cgroup / "other").rmdir()
    assert remove_cgroup(str(cgroup)) is True
    assert not cgroup.exists() and tmp_path.exists()
    assert remove_cgroup(str(cgroup)) is True  # already gone


def test_remove_trees_takes_back_permissions_only_inside(tmp_path: Path) -> None:
    top = tmp_path / "kernel-dir"
    locked = top / "locked"
    locked.mkdir(parents=True)
    (locked / "file").write_text("x")
    locked.chmod(0o500)  # what a kernel may do to its own directory
    top.chmod(0o500)
    tmp_path.chmod(0o755)
    (tmp_path / "beside").mkdir()
    remove_trees([str(top), str(tmp_path / "missing")])
    assert not top.exists()
    assert (tmp_path / "beside").is_dir() and tmp_path.stat().st_mode & 0o777 == 0o755


# An interpreter another user may run (this suite's may live under /root).
_SYSTEM_PYTHON = next(
    (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None
)


@pytest.mark.skipif(
    os.geteuid() != 0 or _SYSTEM_PYTHON is None,
    reason="needs root and a system python to run as another user",
)
def test_a_tree_its_owner_cannot_read_is_removed_by_a_non_root_gateway() -> None:
    # A non-root gateway (its kernels run as the same user) removing a kernel's
    # directory where the kernel took away read and search permission: shutil
    # fails to open it, and the retry of that open raised TypeError (no flags),
    # leaving the tree behind.
    nobody = 65534
    reachable = Path(tempfile.mkdtemp(prefix="ame-test-cleanup-", dir="/tmp"))  # pytest's tmp is 0700
    reachable.chmod(0o755)
    top = reachable / "kernel-dir"
    sealed = top / "sealed" / "deeper"
    sealed.mkdir(parents=True)
    (sealed / "file").write_text("x")
    for path in (reachable, top, top / "sealed", sealed, sealed / "file"):  # the gateway's own dir, too
        os.chown(path, nobody, nobody)
    (top / "sealed").chmod(0o000)
    source = (Path(launcher.GATEWAY_SIDE_DIR) / "cleanup.py").read_text()
    assert _SYSTEM_PYTHON is not None
    done = subprocess.run(
        [_SYSTEM_PYTHON, "-I", "-c", f"{source}\nremove_trees([{str(top)!r}])"],
        user=nobody,
        group=nobody,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        assert done.returncode == 0, done.stderr
        assert not top.exists()
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(reachable)], check=True)


def test_a_symlink_swapped_in_is_never_given_permissions(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    outside.chmod(0o755)
    top = tmp_path / "kernel-dir"
    top.mkdir()
    (top / "link").symlink_to(outside)
    from async_modal_exec.gateway_side.cleanup import _allow

    _allow(str(top / "link"))  # what the remover does to a directory it could not open
    assert outside.stat().st_mode & 0o777 == 0o755
    remove_trees([str(top)])
    assert not top.exists() and outside.is_dir()


def test_the_token_leaves_the_environment_it_is_given_in(monkeypatch: pytest.MonkeyPatch) -> None:
    env = auth_token.scrubbed_environment({auth_token.TOKEN_ENV: "secret", "PATH": "/bin"}, 7)
    assert env == {"PATH": "/bin", "ASYNC_MODAL_EXEC_TOKEN_FD": "7"}
    assert "secret" not in repr(env)
    # After the exec: read from the pipe named in the environment, which then names it no more.
    read_end, write_end = os.pipe()
    os.write(write_end, b"secret")
    os.close(write_end)
    monkeypatch.setenv("ASYNC_MODAL_EXEC_TOKEN_FD", str(read_end))
    assert auth_token.take_token() == "secret"
    assert "ASYNC_MODAL_EXEC_TOKEN_FD" not in os.environ
    monkeypatch.delenv(auth_token.TOKEN_ENV, raising=False)
    assert auth_token.take_token() is None


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="needs /proc")
def test_take_token_execs_itself_without_the_token(tmp_path: Path) -> None:
    source = Path(launcher.GATEWAY_SIDE_DIR, "bootstrap.py").read_text() + (
        "\npackage = load_from_directory(sys.argv.pop(1))\n"
        "token = importlib.import_module(package.__name__ + '.auth_token').take_token()\n"
        "print(token, 'secret' in open('/proc/self/environ').read(), 'secret' in repr(os.environ))\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", source, launcher.GATEWAY_SIDE_DIR],
        env={"PATH": os.environ.get("PATH", ""), auth_token.TOKEN_ENV: "secret"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # The token arrived, and neither /proc/<pid>/environ (the exec'd start) nor os.environ holds it.
    assert done.stdout.split() == ["secret", "False", "False"]


def _imports_in_a_bare_python(tmp_path: Path, load: str) -> list[str]:
    """Load the gateway side in ``python -S`` (no site-packages: async_modal_exec is not importable),
    import every module, and return the async_modal_exec modules that got imported."""
    names = sorted(launcher.gateway_side_sources())
    source = Path(launcher.GATEWAY_SIDE_DIR, "bootstrap.py").read_text() + (
        f"\npackage = {load}\n"
        f"for name in {names!r}:\n"
        "    if name != '__init__':\n"
        "        importlib.import_module(package.__name__ + '.' + name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('async_modal_exec'))))\n"
    )
    source = source.replace("import importlib\n", "import importlib\nimport json\n", 1)
    done = subprocess.run(
        [sys.executable, "-S", "-c", source, launcher.GATEWAY_SIDE_DIR],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return list(json.loads(done.stdout))


def test_the_gateway_side_loads_without_this_package_from_files_and_from_sources(tmp_path: Path) -> None:
    assert _imports_in_a_bare_python(tmp_path, "load_from_directory(sys.argv.pop(1))") == []
    sources = launcher.gateway_side_sources()
    assert _imports_in_a_bare_python(tmp_path, f"load_from_sources({sources!r})") == []


def test_shipped_sources_load_in_process_under_another_name() -> None:
    package = load_from_sources(launcher.gateway_side_sources(), name="_test_shipped_gateway_side")
    try:
        codec = importlib.import_module(package.__name__ + ".v1_codec")
        assert codec.decode_v1(codec.encode_v1({"header": {"msg_type": "x"}}))["msg_type"] == "x"
        patches = importlib.import_module(package.__name__ + ".patches")
        with pytest.raises(RuntimeError, match="kernel-jail"):
            patches.jail_prefix("/config.json")  # no files shipped: no kernel_jail.py beside them
        from_files = load_from_directory(launcher.GATEWAY_SIDE_DIR, name="_test_files_gateway_side")
        jail = importlib.import_module(from_files.__name__ + ".patches").jail_prefix("c.json")
        assert jail[1:3] == ["-I", "-S"] and jail[-1] == "c.json"
        assert jail[3] == os.path.join(os.path.dirname(launcher.GATEWAY_SIDE_DIR), "kernel_jail.py")
        assert os.path.isfile(jail[3])
    finally:
        for name in list(sys.modules):
            if name.startswith(("_test_shipped_gateway_side", "_test_files_gateway_side")):
                del sys.modules[name]
        sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "name", None) != package.__name__]


@pytest.mark.parametrize("command", ["local", "sandbox"])
def test_both_commands_run_the_launcher(command: str) -> None:
    # --help exits before the gateway would start: the launcher's own code ran.
    argv = (
        launcher.local_command(sys.executable, ["--help"])
        if command == "local"
        else list(launcher.sandbox_command(sys.executable, ["--help"]))
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    assert "Kernel Gateway launcher" in done.stdout and "--kernel-jail" in done.stdout


def test_the_local_command_line_is_short_and_names_no_jail() -> None:
    # Command lines are public and tests pick processes by theirs: the
    # gateway's must not look like a jailed kernel's (b"kernel_jail").
    argv = launcher.local_command("python", ["--port=0"])
    assert len(" ".join(argv)) < 600 and not any("kernel_jail" in arg for arg in argv)
    assert argv[3:] == [
        os.path.join(launcher.GATEWAY_SIDE_DIR, "bootstrap.py"),
        launcher.GATEWAY_SIDE_DIR,
        "--port=0",
    ]


def test_the_sandbox_command_fits_in_one_argument_with_room_to_grow() -> None:
    # Linux caps one argument at 128 KiB (MAX_ARG_STRLEN); Modal's process runs it as one.
    python, flag, source, *options = launcher.sandbox_command("python", ["--port=8888"])
    assert (python, flag, options) == ("python", "-c", ["--port=8888"])
    assert len(source.encode()) < 96 * 1024
    assert "NoDelayWebsocketConnection" in source  # readable, not packed: a sandbox's command says what runs
