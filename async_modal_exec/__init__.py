"""async_modal_exec: run model-written Python in remote Jupyter kernels, asyncio-native."""

from .backends import Backend, GatewayBackend, GatewayEndpoint, LocalBackend
from .errors import (
    AsyncModalExecError,
    BackendError,
    BackendStartError,
    CodeError,
    ExecutionError,
    ExecutionTimeout,
    ExecutorStateError,
    GatewayAuthError,
    GatewayError,
    GatewayNotFound,
    GatewayUnreachable,
    KernelDied,
    ProtocolError,
)
from .executor import AsyncExecutor
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

__version__ = "0.1.0"

__all__ = [
    "AsyncExecutor",
    "AsyncModalExecError",
    "Backend",
    "BackendError",
    "BackendStartError",
    "CodeError",
    "DisplayEvent",
    "ErrorEvent",
    "Event",
    "ExecutionError",
    "ExecutionResult",
    "ExecutionTimeout",
    "ExecutorStateError",
    "GatewayAuthError",
    "GatewayBackend",
    "GatewayEndpoint",
    "GatewayError",
    "GatewayNotFound",
    "GatewayUnreachable",
    "KernelDied",
    "LocalBackend",
    "ProtocolError",
    "RemoteError",
    "ResultEvent",
    "RichOutput",
    "StderrEvent",
    "StdoutEvent",
    "__version__",
]
