"""One held turn of the kernel: the user's run and the package's own setup steps on it.

:meth:`KernelSession.turn` hands out a connected websocket to one caller at a
time; a :class:`HeldTurn` is what that caller does with it: run code through
the driver (:class:`~async_modal_exec.driver.ExecutionRun`), and the setup
steps a kernel needs before the user's code (its environment, the host-tool
stubs, the files helper) and after it (a run's environment restored).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

import anyio

from . import environment
from .channel import ChannelLost, KernelChannel
from .deadline import Deadline
from .driver import DriverSettings, ExecutionRun
from .errors import AsyncModalExecError
from .fold import ExecutionFold
from .host_tools import HostTools
from .protocol import new_msg_id
from .results import Event, ExecutionError, ExecutionResult
from .session import KernelSession, KernelState

logger = logging.getLogger("async_modal_exec.executor")

__all__ = ["SETUP_TIMEOUT", "HeldTurn"]

SETUP_TIMEOUT = 10.0  # longest a setup step (env, host-tool stubs, files helper) may take


class HeldTurn:
    """The kernel of ``session``, held through ``channel`` for one call."""

    def __init__(self, session: KernelSession, channel: KernelChannel, settings: DriverSettings) -> None:
        self.session = session
        self.channel = channel
        self.settings = settings

    @property
    def connected(self) -> bool:
        """The kernel is still reachable through this turn's websocket."""
        return self.session.state is KernelState.CONNECTED and self.channel.is_open

    async def execute(
        self,
        code: str,
        fold: ExecutionFold,
        deadline: Deadline,
        metadata: Mapping[str, Any] | None = None,
        *,
        internal: bool = False,
        what: str = "execution",
    ) -> AsyncGenerator[Event, None]:
        """Drive ``code`` to idle, yielding its events (see :meth:`ExecutionRun.events`).

        ``what`` names the operation in a timeout ("file operation").
        """
        run = ExecutionRun(
            self.session,
            self.channel,
            fold,
            deadline,
            self.settings,
            metadata=metadata,
            internal=internal,
            what=what,
        )
        async with aclosing(run.events(code)) as events:
            async for event in events:
                yield event

    async def internal(
        self,
        code: str,
        deadline: Deadline,
        metadata: Mapping[str, Any] | None = None,
        what: str = "execution",
    ) -> ExecutionResult:
        """Run the package's own ``code``: no output cap, nothing of it is the user's."""
        fold = ExecutionFold(new_msg_id())
        async with aclosing(self.execute(code, fold, deadline, metadata, internal=True, what=what)) as events:
            async for _ in events:
                pass
        return fold.result()

    async def setup(
        self, code: str, deadline: Deadline, what: str, env: Mapping[str, str] | None = None
    ) -> None:
        """A setup step (at most ``SETUP_TIMEOUT`` of ``deadline``); its error raises ExecutionError.

        ``env`` goes in the request's metadata for :mod:`~async_modal_exec.environment`'s code.
        """
        metadata = {environment.METADATA_KEY: dict(env)} if env is not None else None
        result = await self.internal(code, deadline.capped(SETUP_TIMEOUT, what), metadata)
        if result.error is not None:
            raise ExecutionError(
                f"{what} in the kernel failed: {result.error.ename}: {result.error.evalue}", result
            )

    async def set_env(self, env: Mapping[str, str], deadline: Deadline, *, save: bool) -> None:
        """Set ``env`` in the kernel (``save``: remember the old values for :meth:`restore_env`)."""
        prepared = self.session.prepared
        if "env module" in prepared:
            try:
                await self.setup(
                    environment.apply_code(save=save, define=False), deadline, "setting env", env
                )
                return
            except ExecutionError:  # the kernel lost it (restarted in place): define it again below
                prepared.discard("env module")
        await self.setup(environment.apply_code(save=save), deadline, "setting env", env)
        prepared.add("env module")

    async def prepare(self, env: Mapping[str, str], host_tools: HostTools, deadline: Deadline) -> None:
        """Set ``env`` and define the host-tool stubs in a kernel that lacks them (a new kernel)."""
        session = self.session
        if "env" not in session.prepared:
            if env:
                await self.set_env(env, deadline, save=False)
            session.prepared.add("env")
        stubbed = session.stubbed
        missing = [name for name in host_tools.names if stubbed is None or name not in stubbed]
        if missing:
            # Off the loop: the first call reads and tokenizes source files (tens of ms).
            setup = functools.partial(host_tools.setup_code, missing, install_bridge=stubbed is None)
            code = await anyio.to_thread.run_sync(setup)
            await self.setup(code, deadline, "defining the host tools")
            session.stubbed = (stubbed or set()) | set(missing)

    async def restore_env(self) -> None:
        """Put back the environment a run changed; if that cannot be done, the kernel is replaced.

        Bounded like the interrupt (a run's end waits for it): at most
        ``min(SETUP_TIMEOUT, interrupt_grace)``.
        """
        session = self.session
        kernel = session.kernel_id
        try:
            if not self.connected:
                raise ChannelLost("the kernel is not connected")
            bound = Deadline.after(min(SETUP_TIMEOUT, self.settings.interrupt_grace))
            await self.setup(environment.restore_code(), bound, "restoring env")
        except (AsyncModalExecError, ChannelLost, TimeoutError) as exc:
            if session.kernel_id == kernel and not session.closing:
                logger.warning("restoring a run's env failed (%s); the kernel will be replaced", exc)
                session.mark_lost("a run's environment could not be restored")
