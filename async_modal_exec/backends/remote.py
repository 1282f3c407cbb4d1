"""GatewayBackend: attach to a Kernel Gateway that is already running."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from urllib.parse import urlsplit

from ..environment import checked_env
from .base import Backend, GatewayEndpoint

__all__ = ["GatewayBackend"]


class GatewayBackend(Backend):
    """Uses a running Jupyter Kernel Gateway or Enterprise Gateway at ``url``.

    This is how to scale past one machine without this package starting
    anything: run gateways where you like (e.g. on Kubernetes) and point
    executors at them. Nothing is started, so :meth:`aclose` stops nothing; each
    executor still deletes the kernel it created.

    Args:
        url: ``http(s)://host:port[/base_url]`` of the gateway.
        token: the gateway's auth token (``KG_AUTH_TOKEN``), sent in a header.
        ssl_context: TLS context for ``https`` (e.g. trusting a private CA).
        idle_disconnect: executors on this gateway close their kernel
            websocket after this many idle seconds and reopen it on the next
            run (None: keep it open). Set it when the way to the gateway bills
            or times out open connections (a Modal tunnel; executors on a
            ``ModalBackend`` use its own value).
        env: environment variables set in each kernel by its executor (a
            gateway passes only some variables to the kernels it starts).
        work_dir: the directory file operations are confined to (None: the
            kernel's working directory).

    Raises:
        ValueError: the URL is not an absolute http(s) URL, or carries credentials.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        idle_disconnect: float | None = None,
        env: Mapping[str, str] | None = None,
        work_dir: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"gateway url must look like http(s)://host:port, got {url!r}")
        if parts.username or parts.password or parts.query:
            raise ValueError("put the token in token=, not in the URL (URLs end up in logs)")
        self.endpoint = GatewayEndpoint(url.rstrip("/"), token, ssl_context)
        self.idle_disconnect = idle_disconnect
        self.timings: dict[str, float] = {}
        self._env = checked_env(env)
        self._work_dir = work_dir

    @property
    def kernel_env(self) -> dict[str, str]:
        return dict(self._env)

    @property
    def work_dir(self) -> str | None:
        return self._work_dir

    async def _start_gateway(self) -> GatewayEndpoint:
        """Return the endpoint; readiness is checked by the executor (nothing to cancel here)."""
        return self.endpoint

    async def aclose(self) -> None:
        """Nothing to stop: the gateway is not ours (kernels are deleted by their executors)."""

    def __repr__(self) -> str:
        return f"GatewayBackend({self.endpoint.base_url!r})"
