"""Backends and the gateway client: lifecycle, cleanup, clear errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from async_modal_exec import AsyncExecutor, GatewayBackend, LocalBackend
from async_modal_exec.backends import GatewayEndpoint
from async_modal_exec.backends.local import _process_tree
from async_modal_exec.channel import KernelChannel
from async_modal_exec.errors import (
    BackendStartError,
    ExecutorStateError,
    GatewayAuthError,
    GatewayError,
    GatewayNotFound,
    GatewayUnreachable,
    gateway_error_for_status,
)
from async_modal_exec.gateway import GatewayClient
from async_modal_exec.gateway_side.kernel_code import KERNEL_BOOTSTRAP, KERNEL_TUNING_ARGS
from async_modal_exec.gateway_side.patches import tuned_kernel_spec_manager_class

from .helpers import pid_alive, sleeper, until_running, wait_gone


async def test_local_backend_close_leaves_nothing() -> None:
    backend = LocalBackend()  # jailed: the kernel's pid is only known from the host's side
    async with AsyncExecutor(backend) as executor:
        await executor.run("import os\nos.getpid()")
        gateway_pid = backend.pid
        assert gateway_pid is not None
        runtime_dir = backend._private_dir
        assert runtime_dir is not None and os.path.isdir(runtime_dir)
        tree = [pid for pid, _ in _process_tree(gateway_pid)]
        assert tree, "the kernel (and its jail) run under the gateway"
        # The kernel runs in its own session, so killing the gateway's group would miss it.
        assert any(os.getsid(pid) != os.getsid(gateway_pid) for pid in tree)
    assert await wait_gone([gateway_pid, *tree], timeout=5) == []
    assert not os.path.exists(runtime_dir)
    await backend.aclose()  # twice is harmless


async def test_local_backend_kills_kernels_that_survive_the_gateway() -> None:
    # Unjailed (a jailed kernel's processes die with it, see test_isolation).
    backend = LocalBackend(isolation="none")
    executor = AsyncExecutor(backend)
    await executor.start()
    # A kernel child that ignores SIGTERM and detaches into its own session.
    result = await executor.run(
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'], start_new_session=True)\n"
        "p.pid"
    )
    stubborn = int(result.value.text)  # type: ignore[union-attr]
    assert pid_alive(stubborn)
    await executor.aclose()
    assert await wait_gone([stubborn], timeout=5) == []


async def test_gateway_stops_when_its_parent_dies() -> None:
    # A parent process starts a local executor and is then SIGKILLed without
    # cleanup: the gateway sees stdin close and stops itself and its kernels.
    script = textwrap.dedent(
        """
        import asyncio, os, sys
        from async_modal_exec import AsyncExecutor, LocalBackend
        from async_modal_exec.backends.local import _process_tree
        async def main():
            backend = LocalBackend()
            executor = await AsyncExecutor(backend).start()
            await executor.run("import os; os.getpid()")
            tree = ",".join(str(pid) for pid, _ in _process_tree(backend.pid))
            print(backend.pid, tree, backend._private_dir, flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
        """
    )
    parent = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=subprocess.PIPE)
    assert parent.stdout is not None
    line = await asyncio.wait_for(parent.stdout.readline(), 60)
    gateway, tree, runtime_dir = line.decode().split()
    assert tree, "the kernel runs under the gateway"
    parent.send_signal(signal.SIGKILL)
    await parent.wait()
    assert await wait_gone([int(gateway), *map(int, tree.split(","))], timeout=15) == []
    assert not os.path.exists(runtime_dir), "the gateway's runtime dir was left behind"


async def test_local_backend_start_failure_is_clear() -> None:
    backend = LocalBackend(
        python=sys.executable, env={"PYTHONPATH": "/nonexistent"}, cwd="/", isolation="none"
    )
    backend.python = "/bin/false"
    with pytest.raises(BackendStartError, match="exited with status 1"):
        await backend.start()
    with pytest.raises(ExecutorStateError):
        await backend.start()
    await backend.aclose()


async def test_a_missing_cwd_is_created_and_kept_a_file_is_refused(tmp_path: Path) -> None:
    # Found by the docs examples: LocalBackend(cwd="/tmp/work") raised a bare FileNotFoundError.
    work = tmp_path / "new" / "work"
    async with AsyncExecutor(LocalBackend(cwd=work)) as executor:
        result = await executor.run("import os\nopen('made-here', 'w').close()\nos.getcwd()")
    assert result.value is not None and result.value.text == repr(str(work))
    assert (work / "made-here").is_file()  # the user's directory stays after close
    (tmp_path / "a-file").write_text("")
    with pytest.raises(BackendStartError, match="cannot be the kernels' directory"):
        await LocalBackend(cwd=tmp_path / "a-file").start()


async def test_cancelled_local_start_leaves_nothing() -> None:
    backend = LocalBackend()
    task = asyncio.create_task(backend.start())
    deadline = time.monotonic() + 10
    while backend.pid is None:  # spawned, not yet listening
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    pid = backend.pid
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_gone([pid], timeout=5) == []


async def test_wrong_token_is_a_clear_auth_error(gateway: GatewayEndpoint) -> None:
    executor = AsyncExecutor(GatewayBackend(gateway.base_url, "wrong-token"))
    with pytest.raises(GatewayAuthError) as caught:
        await executor.start()
    assert caught.value.status in (401, 403)
    assert "wrong-token" not in str(caught.value)
    assert executor.state == "closed"


async def test_refused_connection_is_a_clear_error() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    executor = AsyncExecutor(GatewayBackend(f"http://127.0.0.1:{port}", "t"), gateway_timeout=0.5)
    with pytest.raises(GatewayUnreachable, match="not ready") as caught:
        await executor.start()
    assert isinstance(caught.value, ConnectionError)


async def test_unknown_kernel_is_not_found(gateway: GatewayEndpoint) -> None:
    client = GatewayClient(gateway)
    try:
        with pytest.raises(GatewayNotFound):
            await client.interrupt_kernel("00000000-0000-0000-0000-000000000000")
        await client.delete_kernel("00000000-0000-0000-0000-000000000000")  # already gone: fine
    finally:
        await client.aclose()


async def test_rest_and_websocket_map_http_statuses_alike(gateway: GatewayEndpoint) -> None:
    unknown = "00000000-0000-0000-0000-000000000000"
    client = GatewayClient(gateway)
    wrong = GatewayClient(GatewayEndpoint(gateway.base_url, "wrong-token"))
    try:
        for refusing, url in (
            (client, client.websocket_url(unknown, "s")),
            (wrong, wrong.websocket_url(unknown, "s")),
        ):
            expected = GatewayNotFound if refusing is client else GatewayAuthError
            with pytest.raises(expected) as rest:
                await refusing.get_kernel(unknown)
            channel = KernelChannel(
                url, headers=refusing.endpoint.headers, ssl_context=None, max_message_bytes=None
            )
            with pytest.raises(expected) as websocket:
                await channel.open()
            assert rest.value.status == websocket.value.status
            assert "wrong-token" not in str(rest.value) + str(websocket.value)
    finally:
        await client.aclose()
        await wrong.aclose()
    # Statuses the local gateway does not produce: a proxy in front of it that finds no gateway.
    for status in (502, 503, 504):
        assert type(gateway_error_for_status(status, "GET /api/kernels")) is GatewayUnreachable
    other = gateway_error_for_status(500, "DELETE /api/kernels/k", detail="Traceback ...")
    assert type(other) is GatewayError and other.status == 500
    assert str(other) == "DELETE /api/kernels/k failed with HTTP 500: Traceback ..."


def test_gateway_backend_rejects_bad_urls() -> None:
    with pytest.raises(ValueError):
        GatewayBackend("localhost:8888")
    with pytest.raises(ValueError, match="token"):
        GatewayBackend("http://user:secret@host:8888")
    with pytest.raises(ValueError, match="token"):
        GatewayBackend("http://host:8888/?token=abc")
    assert "secret" not in repr(GatewayBackend("http://host:1", "secret"))
    assert "secret" not in repr(GatewayEndpoint("http://host:1", "secret"))


async def test_websocket_url_has_no_token(gateway: GatewayEndpoint) -> None:
    client = GatewayClient(gateway)
    try:
        url = client.websocket_url("k", "s")
    finally:
        await client.aclose()
    assert url.startswith("ws://127.0.0.1:") and gateway.token is not None and gateway.token not in url


async def test_launcher_starts_ipython_kernels_without_the_reply_sleep(executor: AsyncExecutor) -> None:
    result = await executor.run(
        "import sys\nfrom IPython import get_ipython\n(get_ipython().kernel._execute_sleep, sys.argv[-1])"
    )
    assert result.value is not None and result.value.text == "(0.0, '--Kernel._execute_sleep=0')"
    # Without the sleep, output printed last still arrives before the execution ends.
    for i in range(30):
        last = await executor.run(f"print('a' * {i}, end='')\nprint('end', {i})")
        assert last.stdout == "a" * i + f"end {i}\n"


def test_kernel_tuning_applies_to_ipython_kernel_specs_only(tmp_path: Path) -> None:
    specs = {
        "py": ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "other": ["/usr/bin/R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"],
    }
    for name, argv in specs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "kernel.json").write_text(
            json.dumps({"argv": argv, "display_name": name, "language": name})
        )
    manager = tuned_kernel_spec_manager_class(None)(kernel_dirs=[str(tmp_path)], ensure_native_kernel=False)
    # IPython kernels start through the bootstrap (IOPub limits), with the same arguments after it.
    tuned = ["/usr/bin/python3", "-c", KERNEL_BOOTSTRAP, "-f", "{connection_file}", *KERNEL_TUNING_ARGS]
    assert manager.get_kernel_spec("py").argv == tuned
    assert manager.get_kernel_spec("py").argv == tuned  # not appended twice
    assert manager.get_kernel_spec("other").argv == specs["other"]
    # Jailed: every kernel (not only IPython) runs behind the jail, interrupted by message.
    jail = ["/usr/bin/python3", "-I", "-S", "kernel_jail.py", "{}"]
    manager = tuned_kernel_spec_manager_class(jail)(kernel_dirs=[str(tmp_path)], ensure_native_kernel=False)
    for name in specs:
        spec = manager.get_kernel_spec(name)
        assert spec.argv[: len(jail)] == jail and spec.interrupt_mode == "message"
    assert manager.get_kernel_spec("py").argv == [*jail, *tuned]


async def test_gateway_tracks_kernel_activity(
    executor: AsyncExecutor, gateway: GatewayEndpoint, tmp_path: Path
) -> None:
    # The launcher's lighter activity watcher keeps the kernel model the REST
    # API reports. It sees IOPub on its own socket, in parallel with the
    # websocket, so the model is polled for rather than read once.
    client = GatewayClient(gateway)
    kernel_id = executor.kernel_id
    assert kernel_id is not None

    async def model_when(state: str) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while (model := await client.get_kernel(kernel_id))["execution_state"] != state:
            assert time.monotonic() < deadline, f"the kernel model stayed {model['execution_state']!r}"
            await asyncio.sleep(0.02)
        return model

    try:
        await executor.run("pass")
        before = await model_when("idle")
        run = asyncio.create_task(executor.run(sleeper(tmp_path / "running", seconds=2)))
        await until_running(tmp_path / "running")
        await model_when("busy")
        await run
        after = await model_when("idle")
        assert after["last_activity"] > before["last_activity"]
    finally:
        await client.aclose()
