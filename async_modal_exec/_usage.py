"""Warnings about how the package is used (not errors: the call still happens)."""

from __future__ import annotations

__all__ = ["BlockingCallWarning"]


class BlockingCallWarning(UserWarning):
    """A synchronous call blocks the event loop running in the calling thread.

    Emitted by the smolagents facade (:class:`~async_modal_exec.Executor`)
    when it is called, e.g. ``executor(code)`` or ``agent.run(task)``, inside
    ``async def`` code while its sandbox lives on another loop: the call waits
    for the sandbox (seconds) and every other task on the calling loop waits
    with it. The fix is ``await run_agent(agent, task)``, or running the call in
    a worker thread (``await asyncio.to_thread(...)``). Like Modal's
    ``AsyncUsageWarning``; turn it into an error with
    ``warnings.simplefilter("error", BlockingCallWarning)``.
    """
