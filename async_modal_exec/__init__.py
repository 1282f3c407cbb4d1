"""async_modal_exec: run model-written Python in remote Jupyter kernels, asyncio-native.

``ModalBackend``, ``reap`` and the smolagents integration (``Executor``,
``create_*_executor``, ``run_agent``) are imported on first use: importing
``modal`` and ``smolagents`` takes seconds that core users need not pay.
"""

from typing import TYPE_CHECKING, Any

from ._usage import BlockingCallWarning
from .backends import Backend, GatewayBackend, GatewayEndpoint, LocalBackend, Sandbox
from .errors import (
    AsyncModalExecError,
    BackendAuthError,
    BackendError,
    BackendInvalidArgument,
    BackendNotFound,
    BackendStartError,
    BackendUnreachable,
    ChecksumMismatch,
    CodeError,
    ExecutionError,
    ExecutionTimeout,
    ExecutorStateError,
    GatewayAuthError,
    GatewayError,
    GatewayNotFound,
    GatewayUnreachable,
    KernelDied,
    MissingExtra,
    PackageInstallError,
    PoolExhausted,
    ProtocolError,
    RecoveryOutcome,
    RemoteFileError,
    RemoteFileNotFound,
    RemotePathRefused,
    SessionNotFound,
)
from .executor import AsyncExecutor, ExecutorState
from .files import RemoteFile
from .host_tools import HostTools
from .packages import InstallReport
from .pool import SandboxPool
from .results import (
    DisplayEvent,
    ErrorEvent,
    Event,
    ExecutionResult,
    RemoteError,
    ResultEvent,
    RichOutput,
    StderrEvent,
    StdoutEvent,
)
from .session import KernelState

if TYPE_CHECKING:
    from .agent import (
        Executor,
        create_gateway_executor,
        create_local_executor,
        create_modal_executor,
        run_agent,
    )
    from .backends.modal_sandbox import ModalBackend, reap

__version__ = "0.1.0"

_LAZY = {
    "ModalBackend": ".backends.modal_sandbox",
    "reap": ".backends.modal_sandbox",
    "Executor": ".agent",
    "create_modal_executor": ".agent",
    "create_local_executor": ".agent",
    "create_gateway_executor": ".agent",
    "run_agent": ".agent",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsyncExecutor",
    "ExecutorState",
    "KernelState",
    "RecoveryOutcome",
    "HostTools",
    "PoolExhausted",
    "SandboxPool",
    "AsyncModalExecError",
    "Backend",
    "BackendAuthError",
    "BackendError",
    "BackendInvalidArgument",
    "BackendNotFound",
    "BackendStartError",
    "BackendUnreachable",
    "BlockingCallWarning",
    "ChecksumMismatch",
    "CodeError",
    "DisplayEvent",
    "ErrorEvent",
    "Event",
    "ExecutionError",
    "ExecutionResult",
    "Executor",
    "ExecutionTimeout",
    "ExecutorStateError",
    "GatewayAuthError",
    "GatewayBackend",
    "GatewayEndpoint",
    "Sandbox",
    "GatewayError",
    "GatewayNotFound",
    "GatewayUnreachable",
    "InstallReport",
    "KernelDied",
    "MissingExtra",
    "LocalBackend",
    "ModalBackend",
    "PackageInstallError",
    "ProtocolError",
    "RemoteError",
    "RemoteFile",
    "RemoteFileError",
    "RemoteFileNotFound",
    "RemotePathRefused",
    "ResultEvent",
    "RichOutput",
    "SessionNotFound",
    "StderrEvent",
    "StdoutEvent",
    "__version__",
    "create_gateway_executor",
    "create_local_executor",
    "create_modal_executor",
    "run_agent",
    "reap",
]
