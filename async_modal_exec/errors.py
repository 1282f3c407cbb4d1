"""Exceptions raised by async_modal_exec.

Errors raised *by the user's code* are not exceptions here: they are data on the
:class:`~async_modal_exec.ExecutionResult` (``result.error``), next to the output
printed before them. ``result.raise_for_error()`` turns them into
:class:`CodeError` when an exception is wanted.

Everything this package raises derives from one root::

    AsyncModalExecError
    ├── ExecutorStateError (also RuntimeError)   used before start() or after aclose()
    ├── MissingExtra (also ImportError)          a piece used whose optional dependencies are not installed
    ├── BackendError                             a sandbox / gateway could not be provided
    │   ├── BackendStartError                    it failed while starting (exited, terminated, not ready)
    │   ├── BackendAuthError                     the provider (Modal) refused the credentials
    │   ├── BackendNotFound (also LookupError)   no such sandbox, app or secret
    │   ├── BackendInvalidArgument (also ValueError)  the provider rejected an argument
    │   └── BackendUnreachable (also ConnectionError)  the provider's API could not be reached
    ├── GatewayError                             the Kernel Gateway answered badly
    │   ├── GatewayUnreachable (also ConnectionError)  refused, reset, DNS, TLS, not ready, 502-504
    │   ├── GatewayAuthError                     401 / 403: wrong or missing token
    │   └── GatewayNotFound                      404: no such kernel or route
    ├── ProtocolError                            a message that breaks the Jupyter protocol
    ├── PackageInstallError                      installing packages in the sandbox failed
    ├── RemoteFileError                          a file operation in the sandbox failed
    │   ├── RemotePathRefused (also PermissionError)   the path leads outside the work directory
    │   ├── RemoteFileNotFound (also FileNotFoundError)  no such file in the sandbox
    │   └── ChecksumMismatch                     the bytes that arrived differ from those sent
    ├── PoolExhausted (also TimeoutError)        no pooled executor became free in time
    └── ExecutionError                           one execution did not complete normally;
        │                                        (this branch is defined in results.py, beside
        │                                        the ExecutionResult it carries; the root in
        │                                        _root_error.py, so neither imports the other)
        │                                        ``.result`` holds the output received so far
        ├── CodeError                            the user's code raised (from raise_for_error())
        ├── ExecutionTimeout (also TimeoutError) the timeout expired; the kernel was interrupted
        └── KernelDied                           the kernel process died during the execution

The server layer adds one of its own, ``SessionNotFound`` (also
``LookupError``): no such session in the FastAPI session store (import it from
:mod:`async_modal_exec.fastapi`).

One warning, not an error: :class:`BlockingCallWarning` (a ``UserWarning``),
a synchronous call of the smolagents facade made from inside a running event loop.

Errors of aiohttp, websockets and modal are translated into this tree where they
cross into the package (``raise ... from exc``: the original is ``__cause__``),
so callers never need to import them and ``except AsyncModalExecError`` is enough.
An HTTP error status of the gateway maps the same way over REST and websocket
(:func:`gateway_error_for_status`).
"""

from __future__ import annotations

from ._root_error import AsyncModalExecError
from ._usage import BlockingCallWarning
from .results import CodeError, ExecutionError, ExecutionTimeout, KernelDied, RecoveryOutcome

__all__ = [
    "BlockingCallWarning",
    "CodeError",
    "ExecutionError",
    "ExecutionTimeout",
    "KernelDied",
    "RecoveryOutcome",
    "AsyncModalExecError",
    "BackendAuthError",
    "BackendError",
    "BackendInvalidArgument",
    "BackendNotFound",
    "BackendStartError",
    "BackendUnreachable",
    "ChecksumMismatch",
    "ExecutorStateError",
    "MissingExtra",
    "GatewayAuthError",
    "GatewayError",
    "GatewayNotFound",
    "GatewayUnreachable",
    "PackageInstallError",
    "PoolExhausted",
    "ProtocolError",
    "RemoteFileError",
    "RemoteFileNotFound",
    "RemotePathRefused",
]


class ExecutorStateError(AsyncModalExecError, RuntimeError):
    """The executor (or backend) is not in a state that allows the call."""


class BackendError(AsyncModalExecError):
    """A backend could not provide a running gateway."""


class BackendStartError(BackendError):
    """A backend failed while starting its sandbox or gateway.

    For example the gateway process exited, or the Modal sandbox was
    terminated, timed out or exited before it was ready.
    """


class BackendAuthError(BackendError):
    """The sandbox provider refused the credentials (Modal: token missing, wrong or not allowed)."""


class BackendNotFound(BackendError, LookupError):
    """The sandbox provider has no such object (a sandbox id, an app, a named secret)."""


class BackendInvalidArgument(BackendError, ValueError):
    """The sandbox provider rejected an argument (Modal's ``InvalidError``: image, resources, ...)."""


class BackendUnreachable(BackendError, ConnectionError):
    """The sandbox provider's API could not be reached, or stopped answering."""


class GatewayError(AsyncModalExecError):
    """The Kernel Gateway answered with an error.

    Attributes:
        status: the HTTP status, when there was an HTTP answer.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class GatewayUnreachable(GatewayError, ConnectionError):
    """The gateway could not be reached (refused, reset, DNS, TLS, not ready in time).

    Also HTTP 502, 503 and 504: a tunnel or proxy in front found no gateway behind it.
    """


class GatewayAuthError(GatewayError):
    """The gateway refused the token (HTTP 401 or 403)."""


class GatewayNotFound(GatewayError):
    """The gateway has no such kernel or route (HTTP 404)."""


def gateway_error_for_status(status: int, what: str, *, detail: str = "") -> GatewayError:
    """The exception for an HTTP error ``status`` that the gateway answered to ``what``.

    One mapping for the REST calls and the websocket handshake: 401 and 403
    give :class:`GatewayAuthError`, 404 :class:`GatewayNotFound`, 502, 503 and
    504 (a tunnel or proxy in front found no gateway behind it)
    :class:`GatewayUnreachable`, any other status :class:`GatewayError`.

    Args:
        status: the HTTP status of the answer (an error, or anything but 101 to a websocket upgrade).
        what: the request, for the message: ``"GET /api/kernels"``, ``"the kernel websocket"``.
            Never a URL with a token in it.
        detail: appended to the message of the last two kinds (e.g. the start of the body).
    """
    if status in (401, 403):
        return GatewayAuthError(f"gateway refused the token for {what} (HTTP {status})", status=status)
    if status == 404:
        return GatewayNotFound(f"{what}: the gateway has no such kernel or route (HTTP 404)", status=404)
    suffix = f": {detail}" if detail else ""
    if status in (502, 503, 504):
        return GatewayUnreachable(
            f"{what} failed with HTTP {status} (no gateway answered behind the tunnel or proxy){suffix}",
            status=status,
        )
    return GatewayError(f"{what} failed with HTTP {status}{suffix}", status=status)


class ProtocolError(AsyncModalExecError):
    """A message broke the Jupyter messaging protocol."""


class MissingExtra(AsyncModalExecError, ImportError):
    """A piece was used whose optional dependencies are not installed.

    The message holds the exact ``pip install`` line; ``extra`` names the
    extra (``"modal"``, ``"smolagents"``, ``"local"``, ``"fastapi"``).
    """

    def __init__(self, message: str, *, extra: str) -> None:
        super().__init__(message)
        self.extra = extra


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


class RemoteFileError(AsyncModalExecError):
    """A file operation in the sandbox failed (the message has the kernel's error)."""


class RemotePathRefused(RemoteFileError, PermissionError):
    """The path leads outside the sandbox's work directory (``..``, an absolute path, a symlink)."""


class RemoteFileNotFound(RemoteFileError, FileNotFoundError):
    """No such file or directory in the sandbox."""


class ChecksumMismatch(RemoteFileError):
    """The SHA-256 of the bytes that arrived differs from the one of the bytes sent.

    An upload that fails so leaves no file behind (nor the previous one changed).
    """
