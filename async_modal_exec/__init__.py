"""async_modal_exec: run model-written Python in remote Jupyter kernels, asyncio-native.

The top level holds what most programs need (30 names). The rest is grouped:
every exception and warning in :mod:`async_modal_exec.errors`, the streamed
events in :mod:`async_modal_exec.results`, the FastAPI layer in
:mod:`async_modal_exec.fastapi`.

``ModalBackend``, ``SnapshotPolicy``, ``reap_modal_sandboxes`` and the
smolagents integration (``Executor``, ``create_*_executor``, ``run_agent``)
are imported on first use: importing ``modal`` and ``smolagents`` takes
seconds that core users need not pay.
"""

import warnings
from typing import TYPE_CHECKING, Any

from . import errors
from . import results as _results
from .backends import Backend, GatewayBackend, LocalBackend, Sandbox
from .backends.isolation import Limits
from .errors import AsyncModalExecError, BackendError, GatewayError
from .executor import AsyncExecutor
from .files import RemoteFile
from .host_tools import HostTools
from .packages import InstallReport
from .pool import SandboxPool
from .results import (
    CodeError,
    Event,
    ExecutionError,
    ExecutionResult,
    ExecutionTimeout,
    KernelDied,
    RecoveryOutcome,
)

if TYPE_CHECKING:
    from .agent import (
        Executor,
        create_gateway_executor,
        create_local_executor,
        create_modal_executor,
        run_agent,
    )
    from .backends.modal_sandbox import ModalBackend, reap_modal_sandboxes
    from .backends.modal_snapshots import SnapshotPolicy

__version__ = "0.1.0"

_LAZY = {
    "ModalBackend": ".backends.modal_sandbox",
    "reap_modal_sandboxes": ".backends.modal_sandbox",
    "SnapshotPolicy": ".backends.modal_snapshots",
    "Executor": ".agent",
    "create_modal_executor": ".agent",
    "create_local_executor": ".agent",
    "create_gateway_executor": ".agent",
    "run_agent": ".agent",
}

# Names the top level had before it was trimmed: where they live now.
_MOVED = {
    "reap": (".backends.modal_sandbox", "reap_modal_sandboxes"),
    "ExecutorState": (".executor", "ExecutorState"),
    "KernelState": (".session", "KernelState"),
    "GatewayEndpoint": (".backends", "GatewayEndpoint"),
    "SessionNotFound": (".fastapi", "SessionNotFound"),
    **{name: (".results", name) for name in _results.__all__ if name not in globals()},
    **{name: (".errors", name) for name in errors.__all__ if name not in globals()},
}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in _MOVED:
        module, attribute = _MOVED[name]
        where = f"{__name__}{module}"
        warnings.warn(
            f"{__name__}.{name} moved: import {attribute} from {where}", DeprecationWarning, stacklevel=2
        )
        return getattr(importlib.import_module(module, __name__), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsyncExecutor",
    "AsyncModalExecError",
    "Backend",
    "BackendError",
    "CodeError",
    "Event",
    "ExecutionError",
    "ExecutionResult",
    "ExecutionTimeout",
    "Executor",
    "GatewayBackend",
    "GatewayError",
    "HostTools",
    "InstallReport",
    "KernelDied",
    "Limits",
    "LocalBackend",
    "ModalBackend",
    "RecoveryOutcome",
    "RemoteFile",
    "Sandbox",
    "SandboxPool",
    "SnapshotPolicy",
    "__version__",
    "create_gateway_executor",
    "create_local_executor",
    "create_modal_executor",
    "errors",
    "reap_modal_sandboxes",
    "run_agent",
]
