"""One-line executors for CodeAgent, one per backend."""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from typing import Any

from smolagents.monitoring import AgentLogger

from ..backends.local import LocalBackend
from ..backends.modal_defaults import DEFAULT_APP_NAME
from ..backends.remote import GatewayBackend
from .facade import Executor

__all__ = ["create_gateway_executor", "create_local_executor", "create_modal_executor"]


def create_modal_executor(
    additional_imports: Sequence[str] = (),
    logger: AgentLogger | None = None,
    app_name: str = DEFAULT_APP_NAME,
    create_kwargs: Mapping[str, Any] | None = None,
    *,
    port: int = 8888,
    ssl_context: ssl.SSLContext | None = None,
    **options: Any,
) -> Executor:
    """An :class:`Executor` whose kernels run in a Modal Sandbox.

    ``create_kwargs`` go to ``modal.Sandbox.create`` with the merge rules of
    :class:`~async_modal_exec.ModalBackend`; ``options`` go to :class:`Executor`.
    The sandbox starts on first use.
    """
    from ..backends.modal_sandbox import ModalBackend

    backend = ModalBackend(app_name=app_name, port=port, create_kwargs=create_kwargs, ssl_context=ssl_context)
    return Executor(backend, additional_imports=additional_imports, logger=logger, **options)


def create_local_executor(
    additional_imports: Sequence[str] = (),
    logger: AgentLogger | None = None,
    **options: Any,
) -> Executor:
    """An :class:`Executor` on a local Kernel Gateway subprocess (kernels jailed where bubblewrap works)."""
    return Executor(LocalBackend(), additional_imports=additional_imports, logger=logger, **options)


def create_gateway_executor(
    url: str,
    token: str | None = None,
    additional_imports: Sequence[str] = (),
    logger: AgentLogger | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    **options: Any,
) -> Executor:
    """An :class:`Executor` on a Kernel Gateway already running at ``url``."""
    backend = GatewayBackend(url, token, ssl_context=ssl_context)
    return Executor(backend, additional_imports=additional_imports, logger=logger, **options)
