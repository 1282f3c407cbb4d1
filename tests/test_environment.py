"""Environment variables per executor and per run, on real kernels."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from async_modal_exec import (
    AsyncExecutor,
    ExecutionTimeout,
    GatewayBackend,
    KernelDied,
    LocalBackend,
    SandboxPool,
)
from async_modal_exec.backends import Backend, GatewayEndpoint

from .modal_double import ModalDouble

MakeExecutor = Callable[..., Awaitable[AsyncExecutor]]


async def env_of(executor: AsyncExecutor, *names: str) -> dict[str, str | None]:
    code = f"import os\n{{name: os.environ.get(name) for name in {list(names)!r}}}"
    result = (await executor.run(code)).raise_for_error()
    assert result.value is not None
    return eval(result.value.text)  # type: ignore[no-any-return]


async def test_a_runs_env_is_seen_in_that_run_only(make_executor: MakeExecutor) -> None:
    executor = await make_executor(env={"SHARED": "executor"})
    code = "import os, subprocess\n(os.environ['TOKEN'], os.environ['SHARED'], subprocess.check_output(['sh', '-c', 'echo $TOKEN']).decode().strip())"
    during = await executor.run(code, env={"TOKEN": "run-secret", "SHARED": "run"})
    assert during.value is not None and eval(during.value.text) == ("run-secret", "run", "run-secret")
    assert await env_of(executor, "TOKEN", "SHARED") == {"TOKEN": None, "SHARED": "executor"}
    streamed = [e async for e in executor.stream("print(os.environ['TOKEN'])", env={"TOKEN": "streamed"})]
    assert [getattr(e, "text", None) for e in streamed] == ["streamed\n"]
    assert await env_of(executor, "TOKEN") == {"TOKEN": None}


async def test_the_values_are_not_in_the_code_history_or_a_traceback(make_executor: MakeExecutor) -> None:
    executor = await make_executor(store_history=True)
    failed = await executor.run("raise RuntimeError('boom')", env={"API_KEY": "sk-very-secret"})
    assert failed.error is not None and "sk-very-secret" not in "".join(failed.error.traceback)
    history = await executor.run("'\\n'.join(In)")
    assert history.value is not None and "sk-very-secret" not in history.value.text


async def test_a_runs_env_is_restored_after_an_error_a_timeout_and_a_cancellation(
    make_executor: MakeExecutor,
) -> None:
    executor = await make_executor(interrupt_grace=3)
    await executor.run("import os\nos.environ['KEEP'] = 'before'")
    failed = await executor.run("raise ValueError(os.environ['KEEP'])", env={"KEEP": "during"})
    assert failed.error is not None and failed.error.evalue == "during"
    assert await env_of(executor, "KEEP") == {"KEEP": "before"}

    with pytest.raises(ExecutionTimeout):
        await executor.run("import time\ntime.sleep(30)", env={"KEEP": "timed-out"}, timeout=0.5)
    assert await env_of(executor, "KEEP") == {"KEEP": "before"}

    with anyio.move_on_after(0.5) as scope:
        await executor.run("import time\ntime.sleep(30)", env={"KEEP": "cancelled", "NEW": "x"})
    assert scope.cancelled_caught
    assert await env_of(executor, "KEEP", "NEW") == {"KEEP": "before", "NEW": None}


async def test_a_kernel_that_dies_mid_run_takes_the_runs_env_with_it(make_executor: MakeExecutor) -> None:
    executor = await make_executor(env={"BASE": "kept"})
    with pytest.raises(KernelDied):
        await executor.run("import os\nos._exit(1)", env={"GONE": "x"})
    assert await env_of(executor, "GONE", "BASE") == {"GONE": None, "BASE": "kept"}


async def test_the_executors_env_reaches_every_kernel_it_gets(make_executor: MakeExecutor) -> None:
    executor = await make_executor(env={"MODE": "production"})
    first = executor.kernel_id
    await executor.restart()
    assert executor.kernel_id != first
    assert await env_of(executor, "MODE") == {"MODE": "production"}


async def test_a_gateway_backends_env_is_set_in_its_kernels(gateway: GatewayEndpoint) -> None:
    backend = GatewayBackend(gateway.base_url, gateway.token, env={"REGION": "eu", "MODE": "backend"})
    async with AsyncExecutor(backend, env={"MODE": "executor"}) as executor:
        assert await env_of(executor, "REGION", "MODE") == {"REGION": "eu", "MODE": "executor"}


async def test_a_local_backends_env_is_in_the_kernel_process() -> None:
    async with AsyncExecutor(LocalBackend(env={"LOCAL_ONLY": "yes"})) as executor:
        assert await env_of(executor, "LOCAL_ONLY") == {"LOCAL_ONLY": "yes"}


async def test_a_runs_env_never_reaches_the_next_pool_session() -> None:
    async with SandboxPool(min_idle=1, max_size=1, reuse_sandboxes=True) as pool:
        async with pool.session() as first:
            seen = await first.run("import os\nos.environ['SECRET']", env={"SECRET": "session-1"})
            assert seen.value is not None and seen.value.text == "'session-1'"
        async with pool.session() as second:
            assert await env_of(second, "SECRET") == {"SECRET": None}


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"A": 1}, TypeError),
        ({1: "a"}, TypeError),
        ({"": "a"}, ValueError),
        ({"A=B": "a"}, ValueError),
        ({"A": "a\0b"}, ValueError),
        ("A=1", TypeError),
    ],
)
async def test_an_env_that_cannot_be_an_environment_is_refused(
    executor: AsyncExecutor, env: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await executor.run("1", env=env)  # type: ignore[arg-type]
    with pytest.raises(error):
        AsyncExecutor(GatewayBackend("http://127.0.0.1:1"), env=env)  # type: ignore[arg-type]
    assert (await executor.run("1")).value is not None


def _command_lines() -> list[bytes]:
    lines = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes())
    return lines


async def _secret_arrives_and_is_in_no_command_line(backend: Backend, value: str) -> None:
    async with AsyncExecutor(backend, timeout=60) as executor:
        seen = (await executor.run("import os\nos.environ['AME_ARGV_SECRET']")).raise_for_error()
        assert seen.value is not None and seen.value.text == repr(value)  # it did arrive
        lines = _command_lines()
        assert len(lines) > 3 and not [line for line in lines if value.encode() in line]


@pytest.mark.parametrize("isolation", ["none", "bwrap"])
async def test_a_secret_in_a_local_backends_env_is_in_no_process_command_line(isolation: str) -> None:
    # Command lines are readable by every user of the machine (ps -eo args).
    value = "argv-secret-" + secrets.token_hex(8)
    backend = LocalBackend(isolation=isolation, env={"AME_ARGV_SECRET": value})  # type: ignore[arg-type]
    await _secret_arrives_and_is_in_no_command_line(backend, value)


async def test_a_secret_in_a_gateway_backends_env_is_in_no_process_command_line(
    gateway: GatewayEndpoint,
) -> None:
    value = "argv-secret-" + secrets.token_hex(8)
    backend = GatewayBackend(gateway.base_url, gateway.token, env={"AME_ARGV_SECRET": value})
    await _secret_arrives_and_is_in_no_command_line(backend, value)


async def test_a_secret_in_modal_backends_env_is_in_no_process_command_line(
    modal_double: ModalDouble,
) -> None:
    from async_modal_exec import ModalBackend

    value = "argv-secret-" + secrets.token_hex(8)
    backend = ModalBackend(ssl_context=modal_double.ssl_context(), env={"AME_ARGV_SECRET": value})
    await _secret_arrives_and_is_in_no_command_line(backend, value)


async def test_a_kernel_that_lost_the_env_helper_gets_it_again(make_executor: MakeExecutor) -> None:
    # The helper is sent once per kernel; a kernel that lost it (restarted in
    # place by the gateway, or code that removed it) gets it sent again.
    executor = await make_executor()
    first = await executor.run("import os\nos.environ['FIRST']", env={"FIRST": "1"})
    assert first.raise_for_error().value is not None and first.value.text == "'1'"
    (await executor.run("import sys\ndel sys.modules['_async_modal_exec_env']")).raise_for_error()
    again = await executor.run("import os\nos.environ['SECOND']", env={"SECOND": "2"})
    assert again.raise_for_error().value is not None and again.value.text == "'2'"
    assert await env_of(executor, "SECOND") == {"SECOND": None}
