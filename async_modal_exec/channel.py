"""One persistent websocket to one kernel, over the ``websockets`` library."""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Mapping
from typing import Any

import anyio
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ._redact import redacting_logger
from .errors import GatewayError, GatewayUnreachable, ProtocolError, gateway_error_for_status
from .gateway_side.v1_codec import V1_SUBPROTOCOL, decode_v1, encode_v1
from .protocol import (
    decode_legacy_binary,
    kernel_counter,
    kernel_died,
    kernel_info_request,
    msg_id_of,
    parent_msg_id,
)

logger = logging.getLogger("async_modal_exec.channel")

__all__ = ["ChannelLost", "KernelChannel"]


class ChannelLost(Exception):
    """The websocket closed; internal, the executor decides whether to reconnect."""


class KernelChannel:
    """The Jupyter channels websocket of one kernel, kept open across executions.

    Reconnecting reuses the same ``session_id``, so the gateway replays the
    messages sent while the connection was down. Keepalive pings are sent by
    the ``websockets`` library; messages may be as large as ``max_message_bytes``
    (a big PNG or a long print would break the library's 1 MiB default).

    The binary ``v1.kernel.websocket.jupyter.org`` subprotocol is offered (the
    gateway then forwards message parts without re-encoding them); gateways
    that do not speak it get the JSON protocol.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str],
        ssl_context: ssl.SSLContext | None,
        max_message_bytes: int | None,
        ping_interval: float | None = 20.0,
        open_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self._headers = dict(headers)
        self._ssl = ssl_context
        self._max_size = max_message_bytes
        self._ping_interval = ping_interval
        self._open_timeout = open_timeout
        self._ws: ClientConnection | None = None
        self._binary = False
        self._final = False  # closed for good: open() refuses
        # The kernel's session and message number of the last message received.
        self.last_counter: tuple[str, int] | None = None

    @property
    def is_open(self) -> bool:
        """True while the websocket is connected."""
        return self._ws is not None and self._ws.close_code is None

    async def open(self) -> None:
        """Connect if not connected (no-op when open).

        Raises:
            GatewayAuthError: the token was refused (HTTP 401 / 403).
            GatewayNotFound: the kernel does not exist (HTTP 404).
            GatewayUnreachable: no connection, or HTTP 502 / 503 / 504 from a proxy in front.
            GatewayError: any other HTTP answer than the websocket upgrade.

        Cancelling the call abandons the attempt and leaves the channel closed.
        """
        if self.is_open:
            return
        self._refuse_if_final()
        kwargs: dict[str, Any] = {}
        if self.url.startswith("wss://"):
            kwargs["ssl"] = self._ssl if self._ssl is not None else True
        try:
            self._ws = await websockets.connect(
                self.url,
                additional_headers=self._headers,
                max_size=self._max_size,
                max_queue=None,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_interval,
                open_timeout=self._open_timeout,
                close_timeout=2,
                compression=None,
                # Like aiohttp (trust_env=False), ignore proxy variables; looking
                # them up also costs a millisecond of loop time per connect.
                proxy=None,
                subprotocols=[websockets.Subprotocol(V1_SUBPROTOCOL)],
                logger=redacting_logger("websockets.client", self._headers),  # handshake headers: no token
                **kwargs,
            )
        except InvalidStatus as exc:
            raise gateway_error_for_status(exc.response.status_code, "the kernel websocket") from exc
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise GatewayUnreachable(f"cannot open the kernel websocket: {exc!r}") from exc
        self._binary = self._ws.subprotocol == V1_SUBPROTOCOL
        if self._final:  # closed for good while the connection was being made
            await self.aclose()
            self._refuse_if_final()

    def _refuse_if_final(self) -> None:
        if self._final:
            raise GatewayUnreachable("the kernel websocket was closed for good")

    async def confirm_iopub(
        self, *, session: str, timeout: float, retry_every: float = 1.0, reply_grace: float = 0.01
    ) -> None:
        """Return once the kernel's IOPub messages reach this websocket.

        When a websocket opens, the gateway subscribes to the kernel's IOPub
        socket, and a ZeroMQ subscription takes a moment to take effect: what
        the kernel publishes before then is lost. Gateways wait for it
        themselves except when they believe the kernel busy, which they still
        do right after restarting a kernel that was busy; the output of the
        first execution could then vanish. So this sends a
        ``kernel_info_request`` and waits for the IOPub status of it. If the
        shell reply comes but no IOPub message within ``reply_grace`` seconds
        (the subscription is not live yet), or nothing at all within
        ``retry_every`` seconds, it asks again. Other messages received
        meanwhile are dropped: on a new session there are none for anyone
        else, and late answers to these requests are ignored by later
        executions (they match their own message ids).

        Raises:
            GatewayUnreachable: no IOPub answer within ``timeout`` seconds (the
                message says whether the shell answered), or the websocket closed.
            GatewayError: the kernel said it died (or is restarting) meanwhile.

        Cancelling the call leaves the websocket open.
        """
        sent: set[str] = set()
        shell_answered = False
        with anyio.move_on_after(timeout):
            try:
                while True:
                    request = kernel_info_request(session=session)
                    sent.add(msg_id_of(request))
                    await self.send(request)
                    with anyio.move_on_after(retry_every) as waiting:
                        while True:
                            message = await self.receive()
                            if kernel_died(message):
                                raise GatewayError("the kernel died before it answered on the new websocket")
                            if parent_msg_id(message) not in sent:
                                continue
                            if message.get("channel") == "iopub":
                                return
                            shell_answered = True
                            waiting.deadline = min(waiting.deadline, anyio.current_time() + reply_grace)
            except ChannelLost as exc:
                raise GatewayUnreachable(f"the kernel websocket closed before IOPub answered: {exc}") from exc
        if shell_answered:
            raise GatewayUnreachable(
                f"the kernel answered, but nothing reached the websocket on IOPub within {timeout} s"
            )
        raise GatewayUnreachable(
            f"the kernel did not answer kernel_info_request within {timeout} s"
            " (does the gateway let that message type through?)"
        )

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one message.

        Raises:
            ChannelLost: the websocket is closed.
        """
        if self._ws is None:
            raise ChannelLost("not connected")
        try:
            await self._ws.send(encode_v1(message) if self._binary else json.dumps(message))
        except ConnectionClosed as exc:
            raise ChannelLost(str(exc)) from exc

    async def receive(self) -> dict[str, Any]:
        """Wait for the next message.

        Raises:
            ChannelLost: the websocket closed.
            ProtocolError: the frame is not a JSON object.

        Cancelling the call loses no message: it stays queued for the next call.
        """
        if self._ws is None:
            raise ChannelLost("not connected")
        try:
            frame = await self._ws.recv()
        except ConnectionClosed as exc:
            raise ChannelLost(str(exc)) from exc
        try:
            if isinstance(frame, str):
                message = json.loads(frame)
            else:  # v1 frames; without v1, the JSON protocol's frames for messages with buffers
                message = decode_v1(frame) if self._binary else decode_legacy_binary(frame)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"kernel websocket sent a malformed frame: {frame[:200]!r}") from exc
        if not isinstance(message, dict):
            raise ProtocolError(f"kernel websocket sent JSON that is not an object: {message!r:.200}")
        self.last_counter = kernel_counter(message) or self.last_counter
        return message

    async def aclose(self) -> None:
        """Close the websocket (bounded by a short close timeout); safe to call twice.

        :meth:`open` may reconnect afterwards (same session id).
        """
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    async def ping(self, timeout: float) -> bool:
        """True if a websocket ping is answered within ``timeout`` seconds.

        A connection can be dead without a FIN or RST (a black-holed link):
        a send into it "succeeds" and is lost. This proves the way back.
        Cancelling the call abandons the ping.
        """
        ws = self._ws
        if ws is None or ws.close_code is not None:
            return False
        try:
            pong = await ws.ping()
            with anyio.fail_after(timeout):
                await pong
        except (ConnectionClosed, TimeoutError):
            return False
        return True

    def abort(self) -> None:
        """Drop the connection at once, without the closing handshake (a dead link would hold it)."""
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.transport.abort()

    async def close_for_good(self) -> None:
        """Close the websocket and refuse to reopen it, also if a connect is in flight."""
        self._final = True
        await self.aclose()
