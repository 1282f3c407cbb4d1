"""Fixtures: one real Kernel Gateway on loopback for the session, leak checks."""

from __future__ import annotations

import gc
import glob
import os
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from async_modal_exec import AsyncExecutor, GatewayBackend, LocalBackend
from async_modal_exec.backends import GatewayEndpoint
from async_modal_exec.gateway import GatewayClient

from .agent_helpers import agent_executor  # noqa: F401 - a fixture
from .helpers import LEGACY_TLS_FALSE_WARNING, descendants, wait_gone
from .modal_double.fixtures import modal_double, modal_sandboxes_checked  # noqa: F401 - fixtures


def pytest_configure(config: pytest.Config) -> None:
    """On Python 3.10 only, set aside its false "unclosed transport" TLS warning (see helpers):
    in tests (over the ini's ``error``) and outside them (a collection at session end)."""
    if sys.version_info < (3, 11):
        config.addinivalue_line("filterwarnings", f"ignore:{LEGACY_TLS_FALSE_WARNING}:ResourceWarning")
        warnings.filterwarnings("ignore", LEGACY_TLS_FALSE_WARNING, ResourceWarning)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what imports created (modal, smolagents, ...) out of the GC's reach.

    A full collection over those objects holds the GIL for 60-100 ms; tests
    that measure event-loop lag should measure the package, not that.
    """
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
async def gateway() -> AsyncIterator[GatewayEndpoint]:
    """A real Kernel Gateway (our launcher) on 127.0.0.1, shared by the session.

    It stands for "any gateway" (GatewayBackend tests): kernels not jailed, as
    on a gateway someone else runs. The jail has tests of its own.
    """
    backend = LocalBackend(isolation="none")
    endpoint = (await backend.start()).endpoint
    pid = backend.pid
    try:
        yield endpoint
    finally:
        tree = descendants()
        await backend.aclose()
        assert pid is not None
        assert await wait_gone([pid, *tree]) == [], "the session gateway left processes behind"


@pytest.fixture
async def make_executor(gateway: GatewayEndpoint) -> AsyncIterator[Callable[..., Awaitable[AsyncExecutor]]]:
    """Factory of started executors on the session gateway; all closed after the test.

    Also checks that the test left no kernel running on the gateway.
    """
    made: list[AsyncExecutor] = []

    async def make(**options: Any) -> AsyncExecutor:
        executor = AsyncExecutor(GatewayBackend(gateway.base_url, gateway.token), **options)
        made.append(executor)
        return await executor.start()

    yield make
    for executor in made:
        await executor.aclose()
    client = GatewayClient(gateway)
    try:
        kernels = await client._json("GET", "/api/kernels")
    finally:
        await client.aclose()
    assert kernels == [], f"kernels left running: {kernels}"


@pytest.fixture
async def executor(make_executor: Callable[..., Awaitable[AsyncExecutor]]) -> AsyncExecutor:
    """A started executor on the session gateway."""
    return await make_executor()


@pytest.fixture(autouse=True, scope="session")
def _nothing_leaked() -> Any:
    """After the whole session, nothing this process started may still run or lie around."""
    runtime_dirs_before = set(glob.glob("/tmp/ame-*"))
    cgroups_before = set(glob.glob("/sys/fs/cgroup/pids/ame-*") + glob.glob("/sys/fs/cgroup/ame-*"))
    yield
    leftover = descendants()
    assert leftover == [], f"processes left running after the test session: {leftover}"
    runtime_dirs = set(glob.glob("/tmp/ame-*")) - runtime_dirs_before
    contents = {path: sorted(os.listdir(path)) for path in sorted(runtime_dirs) if os.path.isdir(path)}
    assert not runtime_dirs, f"gateway runtime directories left behind: {contents}"
    cgroups = set(glob.glob("/sys/fs/cgroup/pids/ame-*") + glob.glob("/sys/fs/cgroup/ame-*")) - cgroups_before
    assert not cgroups, f"kernel pids cgroups left behind: {sorted(cgroups)}"


def pytest_report_header() -> str:
    return f"async_modal_exec tests; pid {os.getpid()}"
