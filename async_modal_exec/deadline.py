"""One deadline per call: made once by the public method, passed down, never converted back.

A :class:`Deadline` is made by :meth:`AsyncExecutor.run`, :meth:`~AsyncExecutor.stream`,
each file operation and :meth:`~AsyncExecutor.install` from the caller's
``timeout``. Everything below (waiting for the kernel's turn, the setup steps,
the execution, a reconnect) takes what is left of it. When it expires, the
call is cut short and :func:`timed_out` builds the one
:class:`~async_modal_exec.ExecutionTimeout` the caller sees.

The **recovery budget** comes on top: after the deadline (or a cancellation)
the kernel is interrupted and drained for at most ``interrupt_grace`` seconds,
plus at most :data:`LAST_LOOK` seconds for a websocket ping that tells a dead
link from a stuck kernel. So a call with ``timeout=t`` returns or raises within
``t + interrupt_grace + LAST_LOOK`` seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .results import ExecutionResult, ExecutionTimeout, RecoveryOutcome

__all__ = ["LAST_LOOK", "Deadline", "timed_out"]

LAST_LOOK = 1.0  # recovery: how long a websocket ping may take (a dead link, or a stuck kernel?)


@dataclass(frozen=True)
class Deadline:
    """When one call must be done.

    Attributes:
        timeout: the seconds the caller gave (None: no limit).
        at: the ``time.monotonic()`` time it expires (``math.inf``: never).
        step: what a shorter bound made by :meth:`capped` is for
            (``"defining the host tools"``); empty for the caller's own.
    """

    timeout: float | None
    at: float
    step: str = ""

    @classmethod
    def after(cls, timeout: float | None) -> Deadline:
        """A deadline ``timeout`` seconds from now (None: none).

        Raises:
            ValueError: ``timeout`` is not a positive number or None.
        """
        if timeout is not None and not timeout > 0:  # also refuses NaN
            raise ValueError("timeout must be positive or None")
        return cls(timeout, math.inf if timeout is None else time.monotonic() + timeout)

    @classmethod
    def of(cls, timeout: float | Deadline | None, default: float | None = None) -> Deadline:
        """``timeout`` itself if it is a deadline (shared by several calls), else :meth:`after`.

        ``default`` stands in for a ``timeout`` of None.
        """
        if isinstance(timeout, Deadline):
            return timeout
        return cls.after(default if timeout is None else timeout)

    def remaining(self) -> float:
        """Seconds left (``math.inf`` without a limit; 0 once expired)."""
        return max(self.at - time.monotonic(), 0.0)

    def seconds(self) -> float | None:
        """Seconds left for ``anyio.fail_after`` / ``move_on_after`` (None: no limit)."""
        return None if self.at == math.inf else self.remaining()

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def capped(self, seconds: float, step: str) -> Deadline:
        """A deadline for one ``step`` of this call: at most ``seconds`` from now, never later than this one.

        When the cap is what expires, the timeout names the step and its
        bound, not the caller's timeout.
        """
        at = time.monotonic() + seconds
        if at >= self.at:
            return self
        return Deadline(seconds, at, step)


def timed_out(
    deadline: Deadline,
    result: ExecutionResult,
    recovery: RecoveryOutcome,
    what: str = "execution",
) -> ExecutionTimeout:
    """The :class:`ExecutionTimeout` for ``deadline``: the one place one is built.

    ``what`` names the operation ("execution", "file operation"); a capped
    step's deadline names the step instead.
    """
    limit = "its deadline" if deadline.timeout is None else f"{deadline.timeout:g} s"
    if deadline.step:
        message = f"{deadline.step} in the kernel took longer than {limit}"
    else:
        message = f"{what} timed out after {limit}"
    return ExecutionTimeout(
        f"{message}; {recovery.describe()}",
        result,
        recovery=recovery,
        timeout=None if deadline.step else deadline.timeout,
        step=deadline.step,
    )
