"""SandboxPool: warm sandboxes, a fresh kernel for every session.

Modal's cold start is seconds (create to first command), a local gateway's
about one; an agent server cannot pay that per request. The pool keeps
``min_idle`` executors started in the background, each a fresh kernel on a
fresh sandbox, so ``async with pool.session() as executor`` costs one health
check. After a session its sandbox is terminated and a new one warmed in the
background: no session can reach what another left running (a detached
process, a file, the sandbox's gateway). On a backend that isolates each
kernel (``isolates == "kernel"``: a jailed ``LocalBackend``) the session's
kernel is deleted instead, with everything it started and wrote, and the
sandbox gets a fresh kernel (up to ``max_uses`` sessions). A sandbox is also
retired after ``max_idle_time`` unused, or when it fails a health check.

``reuse_sandboxes=True`` (trusted code only, e.g. one tenant) keeps a sandbox
for up to ``max_uses`` sessions, each on a fresh kernel: cheaper, but a process
a session leaves behind shares the sandbox with the next one.

Every sandbox has one owner, the pool: :meth:`SandboxPool.aclose` (also when
cancelled) terminates all of them, including those lent to running sessions.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from ._extras import require
from ._idle import retire_idle
from ._shield import run_shielded
from .backends.base import Backend, Sandbox
from .errors import (
    AsyncModalExecError,
    BackendAuthError,
    BackendInvalidArgument,
    BackendNotFound,
    BackendStartError,
    ExecutorStateError,
    GatewayAuthError,
    MissingExtra,
    PoolExhausted,
)
from .executor import AsyncExecutor
from .gateway import GatewayClient

logger = logging.getLogger("async_modal_exec.pool")

__all__ = ["SandboxPool"]

_RETRY_PAUSE = 1.0  # after a transient start failure; doubled at each failure in a row
_MAX_RETRY_PAUSE = 30.0
# Start failures that fail again however often they are tried: a missing extra,
# refused credentials (Modal's, or the gateway's token), an argument the provider
# rejects, an app or secret that does not exist, a backend factory called with
# wrong arguments.
_PERMANENT = (
    MissingExtra,
    BackendAuthError,
    GatewayAuthError,
    BackendInvalidArgument,
    BackendNotFound,
    TypeError,
    ValueError,
)


class _PoolState(enum.Enum):
    """Where a :class:`SandboxPool` is in its life."""

    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(eq=False)
class _Sandbox:
    """A started sandbox the pool owns, and how many sessions it served."""

    started: Sandbox
    uses: int = 0

    @property
    def backend(self) -> Backend:
        return self.started.backend


@dataclass(eq=False)
class _Warm:
    sandbox: _Sandbox
    executor: AsyncExecutor
    since: float = field(default_factory=time.monotonic)


async def _no_kernels(sandbox: _Sandbox) -> bool:
    """Whether the sandbox's gateway runs no kernel (False when it cannot tell)."""
    client = GatewayClient(sandbox.started.endpoint)
    try:
        with anyio.fail_after(10):
            return await client.list_kernels() == []
    except (AsyncModalExecError, TimeoutError) as exc:
        logger.warning("cannot list the kernels of a sandbox (%s): retiring it", exc)
        return False
    finally:
        await client.aclose()


class SandboxPool:
    """Keeps sandboxes warm and lends each session a fresh kernel.

    Args:
        backend_factory: makes one unstarted backend per sandbox (default
            :class:`~async_modal_exec.LocalBackend`; e.g. ``lambda: ModalBackend(...)``).
        min_idle: executors kept ready in the background.
        max_size: most sandboxes alive at once (idle, lent or starting).
        reuse_sandboxes: give a sandbox to more than one session (a fresh
            kernel each time). Off by default: only for code you trust.
        max_uses: sessions per sandbox before it is retired (reusing, or on a
            backend that isolates kernels; ``max_uses=1`` gives every session a
            sandbox of its own there too).
        max_idle_time: seconds a ready executor may wait unused before its
            sandbox is retired and replaced (None: forever).
        acquire_timeout: default seconds :meth:`session` waits for a free executor.
        executor_options: passed to each :class:`~async_modal_exec.AsyncExecutor`
            (``timeout``, ``host_tools``, ...).
    """

    def __init__(
        self,
        backend_factory: Callable[[], Backend] | None = None,
        *,
        min_idle: int = 1,
        max_size: int = 4,
        reuse_sandboxes: bool = False,
        max_uses: int = 100,
        max_idle_time: float | None = None,
        acquire_timeout: float = 120.0,
        executor_options: Mapping[str, Any] | None = None,
    ) -> None:
        if max_size < 1 or not 0 <= min_idle <= max_size:
            raise ValueError("need max_size >= 1 and 0 <= min_idle <= max_size")
        if max_uses < 1:
            raise ValueError("max_uses must be at least 1")
        if (executor_options or {}).get("host_tools"):
            require("smolagents", "host tools")  # now, not in every sandbox start
        if backend_factory is None:
            from .backends.local import LocalBackend

            backend_factory = LocalBackend
        self.backend_factory = backend_factory
        self.min_idle = min_idle
        self.max_size = max_size
        self.reuse_sandboxes = reuse_sandboxes
        self.max_uses = max_uses
        self.max_idle_time = max_idle_time
        self.acquire_timeout = acquire_timeout
        self.executor_options = dict(executor_options or {})
        self.retired = 0  # sandboxes terminated so far (for monitoring and tests)
        self.last_error: Exception | None = None  # why the last sandbox start failed
        self._broken: Exception | None = None  # a permanent start failure: no more starts
        self._failures = 0  # transient start failures in a row (the retry pause doubles)
        self._retry_at = 0.0  # after a transient failure: no new start before this time.monotonic()
        self._sandboxes: set[_Sandbox] = set()
        self._idle: collections.deque[_Warm] = collections.deque()
        self._lent: set[AsyncExecutor] = set()
        self._starting = 0
        self._waiting = 0
        self._changed = anyio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._state = _PoolState.UNOPENED

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> SandboxPool:
        """Start the background work that keeps ``min_idle`` executors ready (returns at once).

        The pool owns that work: :meth:`aclose` stops it; nothing here waits,
        so there is nothing for a cancellation to interrupt.
        """
        if self._state is not _PoolState.UNOPENED:
            raise ExecutorStateError(f"cannot start a pool that is {self._state.value}")
        self._state = _PoolState.OPEN
        if self.max_idle_time is not None:
            self._spawn(retire_idle(self.max_idle_time, self._idle_since, self._retire_idle))
        self._replenish()
        return self

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until ``min_idle`` executors are ready (e.g. before serving traffic).

        Raises:
            TimeoutError: not ready within ``timeout`` seconds (the pool keeps warming up).
            MissingExtra, BackendError: a sandbox start failed for good (see :meth:`session`).
            ExecutorStateError: the pool is not started, or closed (also while waiting).

        Cancelling the call only stops the waiting; the pool keeps warming up.
        """
        with anyio.fail_after(timeout):
            async with self._changed:
                while len(self._idle) < self.min_idle:
                    if self._state is not _PoolState.OPEN:
                        raise ExecutorStateError(f"the pool is {self._state.value}")
                    self._raise_if_broken()
                    await self._changed.wait()

    async def aclose(self) -> None:
        """Stop replenishing and terminate every sandbox, lent ones included; safe twice.

        Runs to completion when cancelled; the cancellation is re-raised after.
        """
        if self._state is _PoolState.CLOSED:
            return
        self._state = _PoolState.CLOSED
        await run_shielded(self._drain())

    async def _drain(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async with self._changed:
            self._changed.notify_all()  # waiters see the pool closed
        executors = [warm.executor for warm in self._idle] + list(self._lent)
        self._idle.clear()
        self._lent.clear()
        sandboxes = list(self._sandboxes)
        async with anyio.create_task_group() as group:
            for executor in executors:
                group.start_soon(executor.aclose)
        async with anyio.create_task_group() as group:
            for sandbox in sandboxes:
                group.start_soon(self._retire, sandbox)

    async def __aenter__(self) -> SandboxPool:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def size(self) -> int:
        """Sandboxes alive now (idle, lent or recycling), plus those starting."""
        return len(self._sandboxes) + self._starting

    @property
    def idle(self) -> int:
        """Executors ready to lend."""
        return len(self._idle)

    # -- sessions ------------------------------------------------------------------

    @asynccontextmanager
    async def session(self, *, timeout: float | None = None) -> AsyncIterator[AsyncExecutor]:
        """Borrow an executor on a fresh kernel for the block.

        Waits up to ``timeout`` (default ``acquire_timeout``) when ``max_size``
        sandboxes are busy, then raises :class:`PoolExhausted`. A sandbox start
        that failed for good (a missing extra, refused credentials, a rejected
        argument, no such app or secret) is raised at once instead, and again
        by every later session: the pool stops starting sandboxes. Other
        start failures are retried, the pause doubling from 1 s to 30 s. On exit the
        sandbox is terminated in the background, or (reusing, or on a backend
        that isolates kernels, when the session installed nothing and its
        kernel is gone) the kernel is deleted and the sandbox gets a new one.
        Cancelling the wait
        leaves nothing behind.
        """
        warm = await self._acquire(self.acquire_timeout if timeout is None else timeout)
        self._lent.add(warm.executor)
        try:
            yield warm.executor
        finally:
            self._lent.discard(warm.executor)
            if self._state is _PoolState.OPEN:
                self._spawn(self._recycle(warm.sandbox, warm.executor))
            else:  # the pool closed meanwhile and already closed the executor
                await run_shielded(warm.executor.aclose())

    async def _acquire(self, timeout: float) -> _Warm:
        if self._state is not _PoolState.OPEN:
            raise ExecutorStateError(f"the pool is {self._state.value}")
        try:
            with anyio.fail_after(timeout):
                while True:
                    warm = await self._next_idle()
                    try:
                        await warm.executor.ping()
                    except AsyncModalExecError as exc:
                        logger.warning("retiring an unhealthy sandbox: %s", exc)
                        await run_shielded(self._discard(warm.sandbox, warm.executor))
                        continue
                    except BaseException:
                        # Cancelled (or timed out) during the check: give it back.
                        await run_shielded(self._put_idle(warm))
                        raise
                    return warm
        except TimeoutError:
            why = f"; the last sandbox start failed: {self.last_error}" if self.last_error else ""
            busy = f"{self.size} of {self.max_size} sandboxes busy"
            raise PoolExhausted(f"no executor became free within {timeout} s ({busy}){why}") from None

    async def _next_idle(self) -> _Warm:
        async with self._changed:
            self._waiting += 1
            try:
                while not self._idle:
                    # Checked before every wait: the pool can close while this
                    # waits for the lock, or between health checks in _acquire.
                    if self._state is not _PoolState.OPEN:
                        raise ExecutorStateError("the pool closed")
                    self._raise_if_broken()
                    self._replenish()
                    await self._changed.wait()
                warm = self._idle.popleft()
            finally:
                self._waiting -= 1
        self._replenish()
        return warm

    # -- background work -------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task the pool owns: aclose() cancels and awaits it."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _replenish(self) -> None:
        """Start sandboxes while fewer are ready or coming than wanted, within max_size."""
        if self._state is not _PoolState.OPEN or self._broken is not None:
            return
        if time.monotonic() < self._retry_at:  # the failed start's task replenishes after its pause
            return
        wanted = max(self.min_idle, self._waiting)
        while len(self._idle) + self._starting < wanted and self.size < self.max_size:
            self._starting += 1
            self._spawn(self._start_sandbox())

    async def _start_sandbox(self) -> None:
        backend: Backend | None = None
        sandbox: _Sandbox | None = None
        try:
            backend = self.backend_factory()
            sandbox = _Sandbox(await backend.start())
            self._sandboxes.add(sandbox)
            executor = await self._new_executor(sandbox)
        except BaseException as exc:
            self._starting -= 1
            if sandbox is not None:
                await run_shielded(self._retire(sandbox))
            elif backend is not None:
                await run_shielded(backend.aclose())
            if not isinstance(exc, Exception):
                raise
            await self._start_failed(exc)
            return
        self._starting -= 1
        self._failures = 0
        await self._put_idle(_Warm(sandbox, executor))

    async def _start_failed(self, exc: Exception) -> None:
        """A permanent failure stops the starts and reaches every waiting session; others are retried."""
        self.last_error = exc
        if isinstance(exc, _PERMANENT):
            if self._broken is None:
                logger.error(
                    "starting a sandbox failed and would fail again; the pool starts no more: %s",
                    exc,
                    exc_info=exc,
                )
            self._broken = exc
            async with self._changed:
                self._changed.notify_all()
            return
        self._failures += 1
        pause = min(_RETRY_PAUSE * 2 ** (self._failures - 1), _MAX_RETRY_PAUSE)
        self._retry_at = max(self._retry_at, time.monotonic() + pause)
        logger.warning("starting a sandbox failed (trying again in %g s): %s", pause, exc)
        await anyio.sleep(pause)  # no hot loop when every start fails
        self._replenish()

    def _raise_if_broken(self) -> None:
        """Raise the permanent start failure, if any: ours as a copy, others as BackendStartError."""
        broken = self._broken
        if broken is None:
            return
        if isinstance(broken, AsyncModalExecError):
            # A copy per waiter (an __init__ with keyword-only arguments rules out copy.copy):
            # each gets its own traceback; none piles up on the original.
            failure = type(broken).__new__(type(broken))
            failure.__dict__.update(broken.__dict__)
            failure.args = broken.args
            raise failure from broken
        raise BackendStartError(
            f"the pool cannot start sandboxes: {type(broken).__name__}: {broken}"
        ) from broken

    async def _new_executor(self, sandbox: _Sandbox) -> AsyncExecutor:
        # On the started backend itself: its installer, env, work dir and idle
        # policy come along; the sandbox's first kernel installs its
        # requirements (unless it started from a snapshot).
        return await AsyncExecutor(sandbox.started, **self.executor_options).start()

    async def _put_idle(self, warm: _Warm) -> None:
        if self._state is not _PoolState.OPEN:  # closed meanwhile: nothing may outlive the drain
            await self._discard(warm.sandbox, warm.executor)
            return
        async with self._changed:
            self._idle.append(warm)
            self._changed.notify()
        self._replenish()

    async def _recycle(self, sandbox: _Sandbox, executor: AsyncExecutor) -> None:
        """Retire the session's sandbox, or give it a fresh kernel: when reusing, or when
        its kernels are isolated from each other (nothing of the session outlives its kernel)."""
        installed = bool(executor.packages.installed)
        await executor.aclose()
        sandbox.uses += 1
        if self.reuse_sandboxes:
            reuse = True
        else:
            # Kernel-isolated: only if the session left nothing behind, i.e. its
            # kernel is really gone (a failed delete is only logged) and it
            # installed no package (they stay in the sandbox's package directory).
            reuse = sandbox.started.isolates == "kernel" and not installed and await _no_kernels(sandbox)
        if not reuse or sandbox.uses >= self.max_uses:
            await self._retire(sandbox)
        else:
            try:
                fresh = await self._new_executor(sandbox)
            except Exception as exc:  # a background task: report, never leave it unretrieved
                logger.warning("retiring a sandbox that could not start a kernel: %s", exc)
                await self._retire(sandbox)
            else:
                await self._put_idle(_Warm(sandbox, fresh))
                return
        self._replenish()

    def _idle_since(self) -> Iterator[tuple[_Warm, float]]:
        return ((warm, warm.since) for warm in self._idle)

    async def _retire_idle(self, warm: _Warm, idle: float) -> None:
        self._idle.remove(warm)
        logger.info("retiring a sandbox idle for %.0f s", idle)
        await self._discard(warm.sandbox, warm.executor)

    async def _discard(self, sandbox: _Sandbox, executor: AsyncExecutor) -> None:
        await executor.aclose()
        await self._retire(sandbox)
        self._replenish()

    async def _retire(self, sandbox: _Sandbox) -> None:
        if sandbox not in self._sandboxes:
            return
        self._sandboxes.discard(sandbox)
        self.retired += 1
        try:
            await sandbox.backend.aclose()
        except Exception as exc:
            logger.warning("terminating a sandbox failed: %s", exc)
