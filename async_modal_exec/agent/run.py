"""run_agent: a synchronous smolagents agent, awaited from async code."""

from __future__ import annotations

import functools
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal

from .._shield import run_shielded
from .facade import Executor

__all__ = ["run_agent"]


async def run_agent(agent: Any, task: str, **run_kwargs: Any) -> Any:
    """Run ``agent.run(task, **run_kwargs)`` without blocking the event loop.

    The agent's synchronous loop runs in a worker thread. If its executor is an
    :class:`Executor` that has not started yet (or lives on this loop), its
    sandbox runs on *this* loop, reached from the worker thread through a
    blocking portal: the loop stays free for other requests.

    Returns:
        What ``agent.run`` returns.

    Cancelling the call returns at once; the worker thread cannot be stopped
    mid-step, so the executor is closed (its sandbox terminated) and the
    agent's next step fails fast.
    """
    executor = getattr(agent, "python_executor", None)
    async with BlockingPortal() as portal:
        attached = isinstance(executor, Executor) and executor.attach_portal(portal)
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(agent.run, task, **run_kwargs), abandon_on_cancel=True
            )
        except anyio.get_cancelled_exc_class():
            if isinstance(executor, Executor):
                await run_shielded(executor.aclose())
            raise
        finally:
            if attached:
                assert isinstance(executor, Executor)
                executor.detach_portal(portal)
