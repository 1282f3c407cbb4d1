"""SandboxPool with real local gateways: warm sessions, fresh kernels, retirement, exhaustion, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import anyio
import pytest

from async_modal_exec import AsyncExecutor, GatewayBackend, LocalBackend, SandboxPool
from async_modal_exec.backends import GatewayEndpoint
from async_modal_exec.errors import BackendStartError, ExecutorStateError, GatewayAuthError, PoolExhausted
from async_modal_exec.gateway import GatewayClient

from .helpers import descendants, measure_loop_lag, wait_gone
from .snooper import snoop_across_sessions


def gateway_url(executor: AsyncExecutor) -> str:
    assert executor.endpoint is not None
    return executor.endpoint.base_url


def unjailed() -> LocalBackend:
    # Kernels that can reach each other: the pool gives every session a sandbox of its own.
    return LocalBackend(isolation="none")


async def test_warm_session_runs_code_on_a_fresh_sandbox_each_time() -> None:
    before = set(descendants())
    async with SandboxPool(unjailed, min_idle=1, max_size=1) as pool:
        await pool.wait_ready(60)
        async with measure_loop_lag() as probe:
            began = time.perf_counter()
            async with pool.session() as first:
                acquired = time.perf_counter() - began
                await first.run("secret = 'user A'")
                url = gateway_url(first)
        assert acquired < 1.0, f"a warm acquire took {acquired:.3f} s"
        async with pool.session(timeout=60) as second:
            result = await second.run("'secret' in dir()")
            assert result.value is not None and result.value.text == "False"  # no state leaks
            assert gateway_url(second) != url  # a sandbox of its own
        assert pool.retired == 1
        assert probe.max_callback < 0.02, probe.summary()
    assert pool.size == 0
    assert await wait_gone([pid for pid in descendants() if pid not in before]) == []


async def test_reused_sandbox_gets_a_fresh_kernel_and_retires_after_max_uses() -> None:
    async with SandboxPool(min_idle=1, max_size=1, reuse_sandboxes=True, max_uses=2) as pool:
        urls = []
        for _ in range(3):
            async with pool.session(timeout=60) as executor:
                urls.append(gateway_url(executor))
                assert (await executor.run("'kept' in dir()")).value.text == "False"  # type: ignore[union-attr]
                await executor.run("kept = 1")
        assert urls[0] == urls[1] != urls[2]
        assert pool.retired == 1


async def test_unhealthy_sandboxes_are_replaced() -> None:
    # Reusing, so that only unhealthy sandboxes are retired.
    async with SandboxPool(min_idle=1, max_size=2, reuse_sandboxes=True) as pool:
        await pool.wait_ready(60)
        # A kernel deleted behind the pool's back fails the health check on acquire.
        warm = pool._idle[0]
        client = GatewayClient(warm.sandbox.started.endpoint)
        try:
            await client.delete_kernel(warm.executor.kernel_id or "")
        finally:
            await client.aclose()
        async with pool.session(timeout=60) as executor:
            assert executor is not warm.executor
            assert (await executor.run("'ok'")).value.text == "'ok'"  # type: ignore[union-attr]
        assert pool.retired == 1
        # A dead gateway too.
        await pool.wait_ready(60)
        warm = pool._idle[0]
        backend = warm.sandbox.backend
        assert isinstance(backend, LocalBackend) and backend.pid is not None
        pid = backend.pid
        os.kill(pid, signal.SIGTERM)
        assert await wait_gone([pid]) == []
        async with pool.session(timeout=60) as executor:
            assert (await executor.run("'ok again'")).value.text == "'ok again'"  # type: ignore[union-attr]
        assert pool.retired == 2


async def test_exhaustion_waits_then_times_out_clearly() -> None:
    async with SandboxPool(min_idle=0, max_size=1) as pool:
        async with pool.session(timeout=60) as held:
            with pytest.raises(PoolExhausted, match=r"1 of 1 sandboxes busy"):
                async with pool.session(timeout=0.5):
                    pass
            waiter = asyncio.create_task(_run_in_session(pool, "'second'"))
            await asyncio.sleep(0.3)
            assert not waiter.done()  # waiting for the held one
            await held.run("1")
        assert await asyncio.wait_for(waiter, 60) == "'second'"


async def _run_in_session(pool: SandboxPool, code: str) -> str:
    async with pool.session(timeout=60) as executor:
        value = (await executor.run(code)).value
        assert value is not None
        return value.text


async def test_cancelled_close_still_terminates_everything_lent_ones_too() -> None:
    before = set(descendants())
    pool = await SandboxPool(min_idle=2, max_size=3).start()
    await pool.wait_ready(60)
    session = pool.session(timeout=60)
    lent = await session.__aenter__()
    with anyio.move_on_after(0.01):  # cancelled right away: the drain still completes
        await pool.aclose()
    assert pool.size == 0 and pool.retired >= 2  # a third may have been starting
    started_here = [pid for pid in descendants() if pid not in before]
    assert await wait_gone(started_here) == []
    assert lent.state == "closed"
    await session.__aexit__(None, None, None)  # the session ends after the pool: harmless
    with pytest.raises(ExecutorStateError, match="closed"):
        async with pool.session():
            pass


async def test_idle_sandboxes_are_retired_after_max_idle_time_and_replaced() -> None:
    async with SandboxPool(min_idle=1, max_size=2, max_idle_time=1.0) as pool:
        await pool.wait_ready(60)
        first = pool._idle[0].executor
        await asyncio.sleep(2.5)
        assert pool.retired >= 1
        await pool.wait_ready(60)
        async with pool.session(timeout=60) as executor:
            assert executor is not first
            assert (await executor.run("'fresh'")).value.text == "'fresh'"  # type: ignore[union-attr]


async def test_wait_ready_stops_with_a_clear_error_when_the_pool_closes() -> None:
    before = set(descendants())
    pool = SandboxPool(min_idle=1, max_size=1)
    with pytest.raises(ExecutorStateError, match="unopened"):
        await pool.wait_ready(5)
    await pool.start()
    waiter = asyncio.create_task(pool.wait_ready(60))
    await asyncio.sleep(0.2)  # the first sandbox is still starting (~2 s)
    assert not waiter.done()
    await pool.aclose()
    with pytest.raises(ExecutorStateError, match="closed"):
        await asyncio.wait_for(waiter, 5)  # at once, not after the 60 s timeout
    assert await wait_gone([pid for pid in descendants() if pid not in before]) == []


async def test_a_process_left_by_one_session_cannot_read_the_next(tmp_path: Path) -> None:
    # Unjailed, so that the snooper can report to the host: this proves the
    # pool's own guarantee (a sandbox per session), the jail is a second one.
    async with SandboxPool(lambda: LocalBackend(isolation="none"), min_idle=1, max_size=1) as pool:
        heard = await snoop_across_sessions(pool, tmp_path / "report.txt")
    assert "started" in heard
    assert "B-SECRET" not in heard, heard[-2000:]


async def test_a_jailed_pool_recycles_kernels_and_serves_8_sessions_on_4_sandboxes() -> None:
    # Jailed kernels cannot reach each other (tests/test_jail_corpus.py), so a
    # session's end deletes its kernel and the sandbox gets a fresh one; it
    # used to terminate the whole gateway and start another.
    async with SandboxPool(min_idle=4, max_size=4) as pool:
        await pool.wait_ready(120)

        async def session(index: int) -> tuple[str, str | None, str]:
            async with pool.session(timeout=120) as executor:
                assert executor.backend.isolates == "kernel"
                result = await executor.run(
                    f"import time\nleak = globals().get('leak')\ntime.sleep(0.5)\nleak = {index}\nleak"
                )
                result.raise_for_error()
                seen = await executor.run("import os\nsorted(os.listdir('.'))")
                await executor.run(f"open('left-by-{index}', 'w').close()")
                assert seen.value is not None and result.value is not None
                assert (
                    result.value.text == str(index) and seen.value.text == "[]"
                )  # nothing of an earlier session
                return gateway_url(executor), executor.kernel_id, seen.value.text

        began = time.perf_counter()
        outcomes = await asyncio.gather(*(session(index) for index in range(8)))
        took = time.perf_counter() - began
        assert len({url for url, _, _ in outcomes}) <= 4  # no sandbox started for a session
        assert len({kernel for _, kernel, _ in outcomes}) == 8  # a kernel each
        assert pool.retired == 0
        assert took < 60, f"8 sessions took {took:.1f} s"


async def test_a_pooled_executor_on_a_jailed_backend_installs_from_the_host(tmp_path: Path) -> None:
    # The pool wrapped the started backend in a GatewayBackend and lost its
    # installer: pip ran in the jail (no network) and failed.
    from .test_agent import _dummy_wheel

    spec = f"ame_dummy_pkg @ {_dummy_wheel(tmp_path).as_uri()}"
    async with SandboxPool(min_idle=1, max_size=1) as pool:
        async with pool.session(timeout=120) as executor:
            backend = executor.backend
            assert isinstance(backend, LocalBackend) and backend.isolated
            report = await executor.install([spec], timeout=120)
            assert report.installed == (spec,), report
            value = (
                await executor.run("import ame_dummy_pkg\name_dummy_pkg.VALUE, ame_dummy_pkg.__file__")
            ).value
            assert value is not None and value.text.startswith("(42, "), value
            assert backend.packages_dir in value.text
        # What it installed stays in the sandbox's package directory: that
        # sandbox is retired, not lent again with a fresh kernel.
        async with pool.session(timeout=120) as following:
            assert following.backend is not backend
            assert (
                await following.run(
                    "import importlib.util\nimportlib.util.find_spec('ame_dummy_pkg') is None"
                )
            ).value.text == "True"  # type: ignore[union-attr]
        assert pool.retired >= 1


async def test_only_a_backend_whose_kernels_each_have_their_own_files_isolates_kernels(
    tmp_path: Path,
) -> None:
    # A cwd= is shared by the backend's kernels: a file one session leaves
    # there (a json.py first on sys.path) would reach the next.
    own = LocalBackend(isolation="bwrap")
    shared = LocalBackend(isolation="bwrap", cwd=tmp_path / "shared")
    async with own, shared:
        assert own.isolates == "kernel" and shared.isolates == "sandbox"
    assert LocalBackend(isolation="none").isolates == "sandbox"


async def test_a_permanent_start_failure_reaches_the_waiting_session_at_once_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "async_modal_exec.pool")
    pool = SandboxPool(
        lambda: GatewayBackend("gateway.example:8888"), min_idle=2, max_size=2, acquire_timeout=60
    )
    async with pool:
        with anyio.fail_after(10):  # not the 60 s acquire_timeout
            with pytest.raises(
                BackendStartError, match="cannot start sandboxes: ValueError: gateway url must"
            ):
                async with pool.session():
                    pass
        await anyio.sleep(2.5)  # time for retries, had there been any
        with pytest.raises(BackendStartError, match="gateway url must look like"):
            async with pool.session():
                pass
        assert pool.size == 0 and isinstance(pool.last_error, ValueError)
    failed = [r for r in caplog.records if "starting a sandbox failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR


async def test_a_transient_start_failure_is_retried_with_a_growing_pause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "async_modal_exec.pool")
    # Nothing listens on port 1: every start fails with GatewayUnreachable (it may come back).
    pool = SandboxPool(
        lambda: GatewayBackend("http://127.0.0.1:1"),
        min_idle=1,
        max_size=1,
        executor_options={"gateway_timeout": 0.2},
    )
    async with pool:
        with pytest.raises(PoolExhausted, match="the last sandbox start failed"):
            async with pool.session(timeout=4.5):
                pass
    pauses = [r.getMessage() for r in caplog.records if "starting a sandbox failed" in r.getMessage()]
    # 1 s, 2 s, 4 s: three or so tries in 4.5 s, not one a second.
    assert 2 <= len(pauses) <= 4, pauses
    assert "trying again in 1 s" in pauses[0] and "trying again in 2 s" in pauses[1]


async def test_a_refused_gateway_token_is_permanent_and_each_waiter_gets_its_own_copy(
    gateway: GatewayEndpoint,
) -> None:
    pool = SandboxPool(lambda: GatewayBackend(gateway.base_url, "wrong-token"), min_idle=1, max_size=1)
    async with pool:

        async def one_session() -> BaseException:
            try:
                async with pool.session(timeout=30):
                    pass
            except GatewayAuthError as exc:
                return exc
            raise AssertionError("the session started")

        with anyio.fail_after(20):  # not the 30 s timeout: the first failure reaches everyone
            first, second = await asyncio.gather(one_session(), one_session())
    assert first is not second and first.__cause__ is second.__cause__ is pool.last_error
    assert isinstance(pool.last_error, GatewayAuthError)
