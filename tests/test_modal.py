"""ModalBackend: the real modal client against the control-plane double, TLS tunnels included."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import modal
import pytest
from grpclib import GRPCError, Status

from async_modal_exec import AsyncExecutor, ModalBackend, SandboxPool
from async_modal_exec.backends.modal_sandbox import (
    TAG_APP,
    TAG_CREATED,
    TAG_EXECUTOR,
    TAG_PACKAGE,
    reap_modal_sandboxes,
)
from async_modal_exec.errors import (
    AsyncModalExecError,
    BackendAuthError,
    BackendError,
    BackendInvalidArgument,
    BackendNotFound,
    BackendStartError,
    BackendUnreachable,
)
from async_modal_exec.gateway import GatewayClient

from .helpers import wait_gone
from .modal_double import ModalDouble
from .snooper import snoop_across_sessions

pytestmark = pytest.mark.usefixtures("modal_sandboxes_checked")


def backend_for(double: ModalDouble, **options: object) -> ModalBackend:
    return ModalBackend(ssl_context=double.ssl_context(), **options)  # type: ignore[arg-type]


def sandbox_pids(double: ModalDouble) -> list[int]:
    return [s.process.pid for s in double.sandboxes.values() if s.process is not None]


async def test_create_ready_run_terminate_over_tls(modal_double: ModalDouble) -> None:
    backend = backend_for(modal_double, app_name="contract")
    async with AsyncExecutor(backend) as executor:
        sandbox = modal_double.sandboxes[backend.sandbox.object_id]  # type: ignore[union-attr]
        assert sandbox.alive()
        assert executor.backend is backend
        result = await executor.run("import os\nprint('hello from the sandbox')\nos.getpid()")
        assert result.stdout == "hello from the sandbox\n"
        assert set(backend.timings) == {"app_lookup", "create", "ready", "tunnel"}
        assert set(executor.startup_timings) == {"backend", "gateway_ready", "kernel_created"}
        gateway_url = executor._gateway.endpoint.base_url  # type: ignore[union-attr]
        assert gateway_url.startswith("https://127.0.0.1:")
        kernel_pid = int(result.value.text)  # type: ignore[union-attr]
    assert not sandbox.alive()
    assert await wait_gone([sandbox.process.pid, kernel_pid]) == []  # type: ignore[union-attr]
    assert backend.sandbox is None
    await backend.aclose()  # twice is harmless


async def test_create_kwargs_merge_rules(modal_double: ModalDouble) -> None:
    modal_double.named_secrets["team-aws"] = {"AWS_KEY": "from-named-secret"}
    create_kwargs = {
        "secrets": [modal.Secret.from_dict({"USER_VAR": "kept"}), modal.Secret.from_name("team-aws")],
        "encrypted_ports": [9000],
        "tags": {"team": "research"},
        "cpu": 2.0,
        "memory": 1024,
        "idle_timeout": 120,
        "env": {"PLAIN_ENV": "yes"},
    }
    backend = backend_for(modal_double, app_name="merge-rules", create_kwargs=create_kwargs)
    async with AsyncExecutor(backend) as executor:
        sandbox = modal_double.sandboxes[backend.sandbox.object_id]  # type: ignore[union-attr]
        definition = sandbox.definition
        # User ports kept, the gateway port appended.
        assert [p.port for p in definition.open_ports.ports] == [9000, 8888]
        # User secrets kept, the token added; the token reaches the gateway, not the kernel.
        assert sandbox.env["USER_VAR"] == "kept"
        assert sandbox.env["AWS_KEY"] == "from-named-secret"
        assert sandbox.env["KG_AUTH_TOKEN"] == backend.token
        assert sandbox.env["PLAIN_ENV"] == "yes"
        # Defaults, pass-through and tags.
        assert definition.timeout_secs == 3600  # an hour, not Modal's 300 s
        assert definition.idle_timeout_secs == 120
        assert definition.resources.milli_cpu == 2000
        assert definition.resources.memory_mb == 1024
        assert definition.readiness_probe.tcp_port == 8888
        assert sandbox.tags["team"] == "research"
        assert sandbox.tags[TAG_PACKAGE] == "async_modal_exec"
        assert sandbox.tags[TAG_APP] == "merge-rules"
        assert sandbox.tags[TAG_EXECUTOR] == backend.executor_id
        assert abs(int(sandbox.tags[TAG_CREATED]) - time.time()) < 60
        # The entrypoint is our launcher (TCP_NODELAY, IOPub limit lifted).
        assert definition.entrypoint_args[:2] == ["python", "-c"]
        assert "NoDelayWebsocketConnection" in definition.entrypoint_args[2]
        result = await executor.run("import os\nos.environ.get('USER_VAR'), 'KG_AUTH_TOKEN' in os.environ")
        assert result.value.text == "('kept', False)"  # type: ignore[union-attr]
    # The default image installs the gateway and the kernel.
    assert any("jupyter_kernel_gateway" in str(image) for image in modal_double.images)


async def test_gpu_sandboxes_take_modals_v1_path_and_work(modal_double: ModalDouble) -> None:
    # The client creates GPU sandboxes through the V1 RPCs whatever its setting
    # (found by the docs examples: the double served V2 only).
    backend = backend_for(modal_double, app_name="gpu", create_kwargs={"gpu": "T4"})
    calls_before = len(modal_double.calls)
    async with AsyncExecutor(backend) as executor:
        assert (await executor.run("6 * 7")).value.text == "42"  # type: ignore[union-attr]
        sandbox_id = backend.sandbox.object_id  # type: ignore[union-attr]
        attached = ModalBackend.attach(sandbox_id, backend.token, ssl_context=modal_double.ssl_context())  # type: ignore[arg-type]
        async with AsyncExecutor(attached) as second:
            assert (await second.run("'attached'")).value.text == "'attached'"  # type: ignore[union-attr]
    calls = modal_double.calls[calls_before:]
    assert "SandboxCreate" in calls and "SandboxCreateV2" not in calls, calls
    assert modal_double.sandboxes[sandbox_id].request.definition.resources.gpu_config.gpu_type == "T4"
    assert not modal_double.sandboxes[sandbox_id].alive()


async def test_reattach_by_id_and_terminate_on_close(modal_double: ModalDouble) -> None:
    owner = backend_for(modal_double, app_name="reattach")
    async with AsyncExecutor(owner) as first:
        await first.run("x = 1")
        sandbox_id, token = owner.sandbox.object_id, owner.token  # type: ignore[union-attr]
        attached = ModalBackend.attach(sandbox_id, token, ssl_context=modal_double.ssl_context())  # type: ignore[arg-type]
        async with AsyncExecutor(attached) as second:
            assert (await second.run("'attached'")).value.text == "'attached'"  # type: ignore[union-attr]
        # Attached without terminate_on_close: the sandbox keeps running for its owner.
        assert modal_double.sandboxes[sandbox_id].alive()
        assert (await first.run("x")).value.text == "1"  # type: ignore[union-attr]
    assert not modal_double.sandboxes[sandbox_id].alive()


async def test_list_and_reap_by_tags(modal_double: ModalDouble) -> None:
    backends = [backend_for(modal_double, app_name="reap-me") for _ in range(3)]
    other = backend_for(modal_double, app_name="keep-me")
    await asyncio.gather(*(b.start() for b in [*backends, other]))
    try:
        dry = await reap_modal_sandboxes("reap-me", dry_run=True)
        assert sorted(r.sandbox_id for r in dry) == sorted(b.sandbox.object_id for b in backends)  # type: ignore[union-attr]
        assert all(not r.terminated for r in dry)
        # Three sandboxes and pages of two: the listing followed before_timestamp.
        assert any(req.before_timestamp for req in modal_double.list_requests)
        assert all(req.app_id for req in modal_double.list_requests)
        assert await reap_modal_sandboxes("reap-me", older_than=3600) == []
        reaped = await reap_modal_sandboxes("reap-me")
        assert len(reaped) == 3 and all(r.terminated for r in reaped)
        assert all(not modal_double.sandboxes[b.sandbox.object_id].alive() for b in backends)  # type: ignore[union-attr]
        assert modal_double.sandboxes[other.sandbox.object_id].alive()  # type: ignore[union-attr]
        assert await reap_modal_sandboxes("no-such-app") == []
    finally:
        await asyncio.gather(*(b.aclose() for b in [*backends, other]))


@pytest.mark.parametrize(
    "rpc", ["AppGetOrCreate", "SandboxCreateV2", "SandboxWaitUntilReady", "SandboxGetTunnelsV2", "kernel"]
)
async def test_cancelled_start_leaves_no_sandbox(modal_double: ModalDouble, rpc: str) -> None:
    backend = backend_for(modal_double, app_name=f"cancel-{rpc.lower()}")
    executor = AsyncExecutor(backend)
    known = set(modal_double.sandboxes)
    calls_before = len(modal_double.calls)
    if rpc != "kernel":
        modal_double.pauses[rpc] = 2.0
    try:
        task = asyncio.create_task(executor.start())
        deadline = time.monotonic() + 30
        if rpc == "kernel":
            while "gateway_ready" not in executor.startup_timings and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        else:
            while rpc not in modal_double.calls[calls_before:] and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        modal_double.pauses.pop(rpc, None)
    new = [modal_double.sandboxes[s] for s in set(modal_double.sandboxes) - known]
    if rpc != "AppGetOrCreate":
        assert len(new) == 1, "the phase under test was reached after the sandbox was created"
    assert all(not s.alive() for s in new)
    assert await wait_gone([s.process.pid for s in new if s.process]) == []
    assert executor.state == "closed"


async def test_idle_websocket_is_closed_and_reopened(modal_double: ModalDouble) -> None:
    backend = backend_for(modal_double, app_name="idle", idle_disconnect=0.3)
    async with AsyncExecutor(backend) as executor:
        await executor.run("kept = 5")
        channel = executor._session.channel  # type: ignore[union-attr]
        assert channel is not None and channel.is_open
        await asyncio.sleep(1.0)
        assert not channel.is_open, "an open tunnel connection would keep the sandbox from idling out"
        result = await executor.run("kept")
        assert result.value is not None and result.value.text == "5"
        assert channel.is_open


async def kernel_websockets(executor: AsyncExecutor) -> int:
    """Websockets open on the executor's kernel, as the gateway in the sandbox counts them."""
    assert executor.endpoint is not None and executor.kernel_id is not None
    client = GatewayClient(executor.endpoint)
    try:
        return int((await client.get_kernel(executor.kernel_id))["connections"])
    finally:
        await client.aclose()


async def test_pooled_executors_keep_the_backends_idle_disconnect(modal_double: ModalDouble) -> None:
    def factory() -> ModalBackend:
        return backend_for(modal_double, app_name="pool-idle", idle_disconnect=0.5)

    async with SandboxPool(factory, min_idle=1, max_size=1) as pool, pool.session(timeout=60) as executor:
        await executor.run("kept = 5")
        assert await kernel_websockets(executor) == 1
        await asyncio.sleep(1.5)
        assert await kernel_websockets(executor) == 0, "a lent executor kept its tunnel connection open"
        result = await executor.run("kept")
        assert result.value is not None and result.value.text == "5"
        assert await kernel_websockets(executor) == 1


# Raising the warning leaves modal's inner coroutine un-awaited: exactly that, and only here.
@pytest.mark.filterwarnings("ignore:coroutine '_App.lookup' was never awaited:RuntimeWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_blocking_modal_calls_are_errors_here(modal_double: ModalDouble) -> None:
    # Proves the suite's filter is armed: a blocking call inside a running loop
    # warns, and the warning is an error. The package never makes such calls.
    import gc

    with pytest.raises(modal.exception.AsyncUsageWarning):
        modal.App.lookup("blocking-call", create_if_missing=True)
    gc.collect()  # report the un-awaited coroutine inside this test, under its filters


def test_package_makes_no_blocking_modal_calls() -> None:
    import re
    from pathlib import Path

    # Every module that can reach Modal (imports it); e.g. subprocess.Popen.poll elsewhere is not Modal's.
    source = [
        path
        for path in (Path(__file__).parents[1] / "async_modal_exec").rglob("*.py")
        if re.search(r"^\s*(import modal|from modal)", path.read_text(), re.MULTILINE)
    ]
    assert any(path.name == "modal_sandbox.py" for path in source)
    pattern = re.compile(
        r"(Sandbox\.(create|from_id|list)|App\.lookup|\.(terminate|tunnels|wait_until_ready|poll|get_tags))\("
    )
    offenders = [
        f"{path.name}: {line.strip()}"
        for path in source
        for line in path.read_text().splitlines()
        if pattern.search(line)
    ]
    assert offenders == []


async def test_cli_reap_against_the_double(modal_double: ModalDouble) -> None:
    backend = backend_for(modal_double, app_name="cli-reap")
    await backend.start()
    try:
        for args, expected in ((["--dry-run"], "would terminate"), ([], "terminated")):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "async_modal_exec", "reap", "--app", "cli-reap", *args,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
            )  # fmt: skip
            out, err = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode == 0, err.decode()
            assert f"{expected} {backend.sandbox.object_id}" in out.decode()  # type: ignore[union-attr]
        assert not modal_double.sandboxes[backend.sandbox.object_id].alive()  # type: ignore[union-attr]
    finally:
        await backend.aclose()


async def test_cli_run_with_modal_backend_shows_progress(modal_double: ModalDouble) -> None:
    env = {**os.environ, "SSL_CERT_FILE": str(modal_double.cert)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "async_modal_exec", "run", "--backend", "modal", "--app", "cli-run", "-c", "print('via modal')",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    assert out.decode() == "via modal\n"
    for phase in ("modal app lookup", "modal create", "modal ready", "modal tunnel", "kernel created"):
        assert phase in err.decode()


# Modal's errors, provoked with the real client: the double answers an RPC with a
# gRPC status (ModalDouble.failing). Statuses the client does not retry, except UNAVAILABLE.


@pytest.mark.parametrize("rpc", ["AppGetOrCreate", "SandboxCreateV2"])
async def test_refused_credentials_are_a_backend_auth_error(modal_double: ModalDouble, rpc: str) -> None:
    backend = backend_for(modal_double, app_name=f"auth-{rpc.lower()}")
    executor = AsyncExecutor(backend)
    with (
        modal_double.failing(rpc, Status.UNAUTHENTICATED, "token ak-double is not valid"),
        pytest.raises(BackendAuthError, match="refused the credentials") as caught,
    ):
        await executor.start()
    assert isinstance(caught.value.__cause__, modal.exception.AuthError)
    assert "token ak-double is not valid" in str(caught.value)
    assert executor.state == "closed" and backend.sandbox is None


async def test_attaching_to_an_unknown_sandbox_is_not_found(modal_double: ModalDouble) -> None:
    backend = ModalBackend.attach("sb-v2-nosuchsandbox", "token", ssl_context=modal_double.ssl_context())
    with pytest.raises(BackendNotFound, match="sb-v2-nosuchsandbox") as caught:
        await backend.start()
    assert isinstance(caught.value, LookupError)
    assert isinstance(caught.value.__cause__, modal.exception.NotFoundError)


async def test_an_argument_modal_rejects_is_a_value_error(modal_double: ModalDouble) -> None:
    backend = backend_for(modal_double, app_name="invalid-create")
    with (
        modal_double.failing("SandboxCreateV2", Status.INVALID_ARGUMENT, "memory must be at least 128 MiB"),
        pytest.raises(BackendInvalidArgument, match="memory must be at least 128 MiB") as caught,
    ):
        await backend.start()
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value.__cause__, modal.exception.InvalidError)


async def test_an_unavailable_control_plane_is_a_connection_error(modal_double: ModalDouble) -> None:
    backend = backend_for(modal_double, app_name="unavailable")
    calls_before = len(modal_double.calls)
    with (
        modal_double.failing("AppGetOrCreate", Status.UNAVAILABLE, "down for maintenance"),
        pytest.raises(BackendUnreachable) as caught,
    ):
        await backend.start()
    assert modal_double.calls[calls_before:].count("AppGetOrCreate") > 1, "the client retries UNAVAILABLE"
    assert isinstance(caught.value, ConnectionError)
    assert isinstance(caught.value.__cause__, modal.exception.ServiceError)


@pytest.mark.parametrize(
    ("rpc", "status", "ours", "theirs"),
    [
        (
            "SandboxWaitUntilReady",
            Status.FAILED_PRECONDITION,
            BackendStartError,
            modal.exception.ConflictError,
        ),
        (
            "SandboxGetTunnelsV2",
            Status.PERMISSION_DENIED,
            BackendAuthError,
            modal.exception.PermissionDeniedError,
        ),
    ],
)
async def test_a_modal_error_after_the_create_terminates_the_sandbox(
    modal_double: ModalDouble,
    rpc: str,
    status: Status,
    ours: type[BackendError],
    theirs: type[modal.exception.Error],
) -> None:
    backend = backend_for(modal_double, app_name=f"late-{rpc.lower()}")
    known = set(modal_double.sandboxes)
    with modal_double.failing(rpc, status, "no"), pytest.raises(ours) as caught:
        await backend.start()
    assert type(caught.value.__cause__) is theirs
    new = [modal_double.sandboxes[s] for s in set(modal_double.sandboxes) - known]
    assert len(new) == 1 and not new[0].alive()
    assert await wait_gone([s.process.pid for s in new if s.process]) == []


async def test_reap_translates_modal_errors_and_the_cli_exits_3(modal_double: ModalDouble) -> None:
    with modal_double.failing("AppGetOrCreate", Status.UNAUTHENTICATED, "token expired"):
        with pytest.raises(BackendAuthError, match="reaping the sandboxes of app 'reap-auth'") as caught:
            await reap_modal_sandboxes("reap-auth")
        assert isinstance(caught.value.__cause__, modal.exception.AuthError)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "async_modal_exec", "reap", "--app", "reap-auth",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 3, err.decode()
    assert err.decode().startswith("error: reaping the sandboxes of app 'reap-auth'"), err.decode()
    assert "Traceback" not in err.decode()


def test_every_modal_error_becomes_one_of_ours() -> None:
    # The kinds the double cannot provoke quickly (a refused connection takes
    # the client about a minute of retries): the translation function itself.
    import grpclib.exceptions

    import async_modal_exec
    from async_modal_exec.backends.modal_sandbox import _translate

    cases: list[tuple[Exception, type[BackendError], type[BackendError]]] = [
        # (Modal's error, ours during start(), ours elsewhere)
        (modal.exception.ConnectionError("refused"), BackendUnreachable, BackendUnreachable),
        (grpclib.exceptions.StreamTerminatedError("reset"), BackendUnreachable, BackendUnreachable),
        (modal.exception.SandboxTerminatedError("gone"), BackendStartError, BackendError),
        (modal.exception.SandboxTimeoutError("late"), BackendStartError, BackendError),
        (modal.exception.TimeoutError("Timeout expired"), BackendStartError, BackendError),
        (modal.exception.ResourceExhaustedError("quota"), BackendError, BackendError),
        (modal.exception.ClientClosed("closed"), BackendError, BackendError),
        (GRPCError(Status.INTERNAL, "raw"), BackendError, BackendError),
    ]
    for theirs, during_start, elsewhere in cases:
        for starting, expected in ((True, during_start), (False, elsewhere)):
            ours = _translate(theirs, "doing it", starting=starting)
            assert type(ours) is expected, (theirs, starting)
            assert isinstance(ours, AsyncModalExecError) and str(ours).startswith("doing it: ")
    assert issubclass(BackendUnreachable, ConnectionError) and issubclass(BackendNotFound, LookupError)
    assert issubclass(BackendInvalidArgument, ValueError)
    for name in ("BackendAuthError", "BackendInvalidArgument", "BackendNotFound", "BackendUnreachable"):
        # Grouped in async_modal_exec.errors; the top level still finds them, and says where they moved.
        assert name in async_modal_exec.errors.__all__
        with pytest.warns(DeprecationWarning, match=f"import {name} from async_modal_exec.errors"):
            assert getattr(async_modal_exec, name) is getattr(async_modal_exec.errors, name)


MakeModal = Callable[..., Awaitable[AsyncExecutor]]


async def test_a_process_left_by_one_pooled_sandbox_session_cannot_read_the_next(
    modal_double: ModalDouble, tmp_path: Path
) -> None:
    def factory() -> ModalBackend:
        return backend_for(modal_double, app_name="pool-snoop")

    async with SandboxPool(factory, min_idle=1, max_size=1) as pool:
        heard = await snoop_across_sessions(pool, tmp_path / "report.txt")
    assert "started" in heard
    assert "B-SECRET" not in heard, heard[-2000:]
