"""The facade closes what it started, whichever thread or loop asks, as a new user would write it.

Each case is the snippet of an async ``main`` run with ``asyncio.run``: an agent
awaited with ``run_agent`` (so the sandbox starts on ``main``'s loop), then
closed in one of the ways users close it. Afterwards nothing may be left: no
gateway process, no Modal sandbox, no unclosed aiohttp session (its
``ResourceWarning`` is recorded here after a full garbage collection).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from smolagents import CodeAgent
from smolagents.monitoring import AgentLogger, LogLevel

from async_modal_exec import (
    LocalBackend,
    ModalBackend,
    create_local_executor,
    create_modal_executor,
    run_agent,
)
from async_modal_exec.agent import Executor
from async_modal_exec.errors import ExecutorStateError
from async_modal_exec.executor import ExecutorState

from .agent_helpers import ScriptedModel
from .helpers import real_unclosed, wait_gone
from .modal_double import ModalDouble

QUIET = AgentLogger(level=LogLevel.OFF)
WAYS = ["loop_thread", "worker_thread", "agent_cleanup", "with_agent"]


async def snippet(make: Callable[[], Executor], way: str) -> tuple[Any, Executor, list[int]]:
    executor = make()
    agent = CodeAgent(
        tools=[],
        model=ScriptedModel(["final_answer(6 * 7)"]),
        executor=executor,
        max_steps=2,
        verbosity_level=0,
    )
    pids: list[int] = []
    if way == "with_agent":
        with agent:
            answer = await run_agent(agent, "answer")
            pids = _gateway_pids(executor)
    else:
        answer = await run_agent(agent, "answer")
        pids = _gateway_pids(executor)
        if way == "loop_thread":
            executor.cleanup()
        elif way == "worker_thread":
            await asyncio.to_thread(executor.cleanup)
        else:
            agent.cleanup()
    return answer, executor, pids


def _gateway_pids(executor: Executor) -> list[int]:
    backend = executor.core.backend
    return [backend.pid] if isinstance(backend, LocalBackend) and backend.pid is not None else []


def run_snippet(make: Callable[[], Executor], way: str) -> tuple[Any, Executor, list[int], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        answer, executor, pids = asyncio.run(snippet(make, way))
        gc.collect()
    unclosed = real_unclosed([str(w.message) for w in caught if issubclass(w.category, ResourceWarning)])
    return answer, executor, pids, unclosed


@pytest.mark.parametrize("way", WAYS)
def test_local_snippet_leaves_nothing(way: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="async_modal_exec.agent"):
        answer, executor, pids, unclosed = run_snippet(lambda: create_local_executor(logger=QUIET), way)
    assert answer == 42
    assert pids, "the gateway should have run"
    assert asyncio.run(wait_gone(pids)) == [], "the gateway process is still running"
    assert executor.core.state is ExecutorState.CLOSED
    assert unclosed == []
    on_loop_thread = way in ("loop_thread", "agent_cleanup", "with_agent")
    said = any("closing it in the background" in record.getMessage() for record in caplog.records)
    assert said is on_loop_thread, "a close scheduled on the loop is said so (and only then)"


@pytest.mark.usefixtures("modal_sandboxes_checked")
@pytest.mark.parametrize("way", WAYS)
def test_modal_snippet_leaves_nothing(way: str, modal_double: ModalDouble) -> None:
    def make() -> Executor:
        return create_modal_executor(
            [], QUIET, app_name=f"cleanup-{way}", ssl_context=modal_double.ssl_context()
        )

    answer, executor, _, unclosed = run_snippet(make, way)
    assert answer == 42
    backend = executor.core.backend
    assert isinstance(backend, ModalBackend)
    assert executor.core.state is ExecutorState.CLOSED
    assert modal_double.live_sandboxes() == [] or all(
        not modal_double.sandboxes[sid].alive() for sid in modal_double.live_sandboxes()
    )
    assert unclosed == []


def test_cleanup_while_its_loop_is_stopped_says_so_and_does_not_claim_closed() -> None:
    async def started() -> Executor:
        executor = create_local_executor(logger=QUIET)
        agent = CodeAgent(
            tools=[],
            model=ScriptedModel(["final_answer(1)"]),
            executor=executor,
            max_steps=2,
            verbosity_level=0,
        )
        await run_agent(agent, "answer")
        return executor

    loop = asyncio.new_event_loop()
    try:
        executor = loop.run_until_complete(started())
        pids = _gateway_pids(executor)
        with pytest.raises(ExecutorStateError, match="has stopped"):
            executor.cleanup()  # the sandbox's loop is not running: nothing can close it now
        assert executor.core.state is ExecutorState.OPEN
        loop.run_until_complete(executor.aclose())  # on its loop again, it closes
        assert executor.core.state is ExecutorState.CLOSED
        executor.cleanup()  # and a later cleanup is a no-op
    finally:
        loop.close()
    assert asyncio.run(wait_gone(pids)) == []
