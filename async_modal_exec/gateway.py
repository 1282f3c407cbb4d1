"""HTTP side of a Kernel Gateway, over aiohttp: readiness and kernel lifecycle."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio

from .backends.base import GatewayEndpoint
from .errors import (
    GatewayAuthError,
    GatewayError,
    GatewayNotFound,
    GatewayUnreachable,
    ProtocolError,
    gateway_error_for_status,
)

logger = logging.getLogger("async_modal_exec.gateway")
startup_logger = logging.getLogger("async_modal_exec.startup")

# A gateway silent this long while starting is reported, then every _SILENCE_REPORT_EVERY s.
_FIRST_SILENCE_REPORT = 3.0
_SILENCE_REPORT_EVERY = 10.0
_ATTEMPT_TIMEOUT = 2.0

__all__ = ["GatewayClient"]


class GatewayClient:
    """REST client of one Kernel Gateway (Jupyter Server kernels API).

    One aiohttp session (one connection pool, the endpoint's TLS context) serves
    every call. The token travels in the ``Authorization`` header only.
    """

    def __init__(self, endpoint: GatewayEndpoint, *, request_timeout: float = 30.0) -> None:
        self.endpoint = endpoint
        self._base = endpoint.base_url.rstrip("/")
        self._session = aiohttp.ClientSession(
            headers=endpoint.headers,
            # Idle connections are dropped after a second: one that died
            # silently meanwhile (a NAT entry timing out) would swallow the
            # next request, and REST calls are rare enough to reconnect.
            connector=aiohttp.TCPConnector(ssl=endpoint.ssl if endpoint.ssl else True, keepalive_timeout=1.0),
            timeout=aiohttp.ClientTimeout(total=request_timeout),
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._session.close()

    @asynccontextmanager
    async def _request(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        url = f"{self._base}{path}"
        if self._session.closed:
            raise GatewayUnreachable(f"the client of the gateway at {self._base} is closed")
        try:
            async with self._session.request(method, url, **kwargs) as response:
                if response.status >= 400:
                    body = (await response.text())[:500]
                    raise gateway_error_for_status(response.status, f"{method} {path}", detail=body)
                yield response
        except (aiohttp.ClientConnectionError, aiohttp.ClientSSLError, TimeoutError) as exc:
            raise GatewayUnreachable(f"cannot reach the gateway at {self._base}: {exc!r}") from exc
        except aiohttp.ClientResponseError as exc:
            raise GatewayError(f"{method} {path}: {exc}", status=exc.status) from exc

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self._request(method, path, **kwargs) as response:
            if response.status == 204:
                return None
            try:
                return await response.json(content_type=None)
            except ValueError as exc:
                raise ProtocolError(
                    f"{method} {path}: the gateway answered with a body that is not JSON"
                ) from exc

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll ``/api/kernelspecs`` until the gateway answers, under one deadline.

        Backoff starts at 10 ms and doubles up to 250 ms. A refused token is
        final; connection errors and 5xx answers are retried until the deadline.
        A gateway silent for 3 s is reported (a warning on
        ``async_modal_exec.startup``, with the last error), then every 10 s.

        Raises:
            GatewayAuthError: the gateway answered 401/403.
            GatewayUnreachable: no good answer before the deadline.

        Cancelling the call stops polling.
        """
        began = time.monotonic()
        deadline = began + timeout
        report_at = began + _FIRST_SILENCE_REPORT
        delay = 0.01
        while True:
            try:
                # One attempt may not hold the deadline: a gateway that accepts
                # and never answers is asked again (and reported) meanwhile.
                with anyio.fail_after(max(0.01, min(deadline - time.monotonic(), _ATTEMPT_TIMEOUT))):
                    await self._json("GET", "/api/kernelspecs")
                return
            except GatewayAuthError:
                raise
            except (GatewayError, TimeoutError) as exc:
                why = exc if isinstance(exc, GatewayError) else "no answer"
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GatewayUnreachable(
                        f"gateway at {self._base} not ready after {timeout:.1f} s: {why}"
                    ) from exc
                logger.debug("gateway not ready yet: %s", exc)
                if time.monotonic() >= report_at:
                    startup_logger.warning(
                        "the gateway at %s has not answered for %.0f s (%s); retrying until %.0f s",
                        self._base,
                        time.monotonic() - began,
                        why,
                        timeout,
                    )
                    report_at += _SILENCE_REPORT_EVERY
                await anyio.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.25)

    async def create_kernel(self, name: str | None = None, *, kernel_id: str | None = None) -> str:
        """Start a kernel; return its id.

        Args:
            name: kernel spec (None: the gateway's default).
            kernel_id: the id to give it (a UUID). Jupyter Server and Kernel
                Gateway honour it, so a caller that loses the answer still
                knows which kernel to delete; a gateway that does not answers
                with an id of its own, which is returned.
        """
        body: dict[str, Any] = {}
        if name:
            body["name"] = name
        if kernel_id:
            body["kernel_id"] = kernel_id
        reply = await self._json("POST", "/api/kernels", json=body)
        if not isinstance(reply, dict) or not isinstance(reply.get("id"), str):
            raise GatewayError(f"unexpected answer to kernel creation: {reply!r}")
        return str(reply["id"])

    async def list_kernels(self) -> list[dict[str, Any]]:
        """The gateway's models of the kernels it runs."""
        reply = await self._json("GET", "/api/kernels")
        if not isinstance(reply, list):
            return []
        return [dict(kernel) for kernel in reply if isinstance(kernel, dict)]

    async def get_kernel(self, kernel_id: str) -> dict[str, Any]:
        """The gateway's model of a kernel (``execution_state`` ...)."""
        reply = await self._json("GET", f"/api/kernels/{kernel_id}")
        return dict(reply) if isinstance(reply, dict) else {}

    async def delete_kernel(self, kernel_id: str, *, retry_for: float = 10.0) -> None:
        """Shut a kernel down; a kernel already gone is not an error.

        While the gateway restarts a dead kernel, jupyter_client answers a
        delete with HTTP 500 (it inspects a startup future that is not done
        yet): that is retried with backoff for up to ``retry_for`` seconds.
        """
        deadline = time.monotonic() + retry_for
        pause = 0.05
        while True:
            try:
                await self._json("DELETE", f"/api/kernels/{kernel_id}")
                return
            except GatewayNotFound:
                return
            except GatewayError as exc:
                if exc.status != 500 or time.monotonic() + pause > deadline:
                    raise
            await anyio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def interrupt_kernel(self, kernel_id: str) -> None:
        """Send the kernel an interrupt (SIGINT for ipykernel)."""
        await self._json("POST", f"/api/kernels/{kernel_id}/interrupt")

    async def interrupt_mode(self, kernel_name: str | None) -> str:
        """How the gateway interrupts kernels of a spec: ``"signal"`` or ``"message"``.

        A message-mode interrupt is an ``interrupt_request`` from the gateway:
        the kernel's reply goes to the gateway (jailed local kernels, which a
        signal cannot reach in their PID namespace).
        """
        reply = await self._json("GET", "/api/kernelspecs")
        specs = reply.get("kernelspecs") if isinstance(reply, dict) else None
        entry = specs.get(kernel_name or reply.get("default")) if isinstance(specs, dict) else None
        spec = entry.get("spec") if isinstance(entry, dict) else None
        mode = spec.get("interrupt_mode") if isinstance(spec, dict) else None
        return mode if mode in ("signal", "message") else "signal"

    def websocket_url(self, kernel_id: str, session_id: str) -> str:
        """The channels websocket URL of a kernel (no token in it)."""
        scheme_base = self._base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        return f"{scheme_base}/api/kernels/{kernel_id}/channels?session_id={session_id}"
