"""Exceptions raised by async_modal_exec.

Errors raised *by the user's code* are not exceptions here: they are data on the
:class:`~async_modal_exec.ExecutionResult` (``result.error``), next to the output
printed before them. ``result.raise_for_error()`` turns them into
:class:`CodeError` when an exception is wanted.

Everything this package raises derives from one root::

    AsyncModalExecError
    ├── ExecutorStateError (also RuntimeError)   used before start() or after aclose()
    ├── BackendError                             a sandbox / gateway could not be provided
    │   └── BackendStartError                    it failed while starting
    ├── GatewayError                             the Kernel Gateway answered badly
    │   ├── GatewayUnreachable (also ConnectionError)  refused, reset, DNS, TLS, not ready in time
    │   ├── GatewayAuthError                     401 / 403: wrong or missing token
    │   └── GatewayNotFound                      404: no such kernel or route
    ├── ProtocolError                            a message that breaks the Jupyter protocol
    ├── PackageInstallError                      installing a tool's packages in the sandbox failed
    ├── PoolExhausted (also TimeoutError)        no pooled executor became free in time
    └── ExecutionError                           one execution did not complete normally;
        │                                        ``.result`` holds the output received so far
        ├── CodeError                            the user's code raised (from raise_for_error())
        ├── ExecutionTimeout (also TimeoutError) the timeout expired; the kernel was interrupted
        └── KernelDied                           the kernel process died during the execution

Errors of aiohttp and websockets are translated into this tree where they cross
into the package (``raise ... from exc``), so callers never need to import them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import ExecutionResult

__all__ = [
    "AsyncModalExecError",
    "BackendError",
    "BackendStartError",
    "CodeError",
    "ExecutionError",
    "ExecutionTimeout",
    "ExecutorStateError",
    "GatewayAuthError",
    "GatewayError",
    "GatewayNotFound",
    "GatewayUnreachable",
    "KernelDied",
    "PackageInstallError",
    "ProtocolError",
]


class AsyncModalExecError(Exception):
    """Root of every exception raised by async_modal_exec."""


class ExecutorStateError(AsyncModalExecError, RuntimeError):
    """The executor (or backend) is not in a state that allows the call."""


class BackendError(AsyncModalExecError):
    """A backend could not provide a running gateway."""


class BackendStartError(BackendError):
    """A backend failed while starting its sandbox or gateway."""


class GatewayError(AsyncModalExecError):
    """The Kernel Gateway answered with an error.

    Attributes:
        status: the HTTP status, when there was an HTTP answer.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class GatewayUnreachable(GatewayError, ConnectionError):
    """The gateway could not be reached (refused, reset, DNS, TLS, not ready in time)."""


class GatewayAuthError(GatewayError):
    """The gateway refused the token (HTTP 401 or 403)."""


class GatewayNotFound(GatewayError):
    """The gateway has no such kernel or route (HTTP 404)."""


class ProtocolError(AsyncModalExecError):
    """A message broke the Jupyter messaging protocol."""


class PoolExhausted(AsyncModalExecError, TimeoutError):
    """No executor of a :class:`~async_modal_exec.SandboxPool` became free within the timeout."""


class PackageInstallError(AsyncModalExecError):
    """Installing packages in the sandbox failed.

    Attributes:
        packages: the installer specs that failed (named in the message too).
        output: the end of the installer's output.
    """

    def __init__(self, message: str, *, packages: list[str], output: str) -> None:
        super().__init__(message)
        self.packages = packages
        self.output = output


class ExecutionError(AsyncModalExecError):
    """An execution did not complete normally.

    Attributes:
        result: what the execution produced before it stopped (stdout, stderr,
            displays, error): output printed before a failure is never lost.
    """

    def __init__(self, message: str, result: ExecutionResult) -> None:
        super().__init__(message)
        self.result = result


class CodeError(ExecutionError):
    """The user's code raised; ``result.error`` has its name, value and traceback."""


class ExecutionTimeout(ExecutionError, TimeoutError):
    """The execution's timeout expired.

    The kernel was interrupted, so variables defined before the timed-out code
    survive. If the interrupt did not bring the kernel back (code that swallows
    ``KeyboardInterrupt``), the kernel was replaced by a fresh one and
    ``restarted`` is true: its state is gone.
    """

    def __init__(self, message: str, result: ExecutionResult, *, restarted: bool) -> None:
        super().__init__(message, result)
        self.restarted = restarted


class KernelDied(ExecutionError):
    """The kernel process died during the execution; the next run gets a fresh kernel."""
