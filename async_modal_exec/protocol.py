"""Sans-I/O Jupyter messaging: build requests, read message headers, encode frames.

Nothing here touches a socket. :func:`execute_request` and friends build message
dicts in the websocket JSON format of Jupyter Server / Kernel Gateway; the
messages that come back are folded into a result by :mod:`~async_modal_exec.fold`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

# The v1 format has one home, on the gateway side (the launcher writes it there); re-exported.
from .gateway_side.v1_codec import V1_SUBPROTOCOL as V1_SUBPROTOCOL
from .gateway_side.v1_codec import decode_v1 as decode_v1
from .gateway_side.v1_codec import encode_v1 as encode_v1

PROTOCOL_VERSION = "5.3"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """Remove ANSI escape sequences (colours, cursor moves) from ``text``."""
    return _ANSI_ESCAPE.sub("", text)


def new_session_id() -> str:
    """A fresh Jupyter session id."""
    return uuid.uuid4().hex


def new_msg_id() -> str:
    """A fresh message id."""
    return uuid.uuid4().hex


def _message(
    msg_type: str, content: dict[str, Any], *, session: str, channel: str, msg_id: str | None = None
) -> dict[str, Any]:
    return {
        "header": {
            "msg_id": msg_id or new_msg_id(),
            "msg_type": msg_type,
            "username": "async_modal_exec",
            "session": session,
            "date": datetime.now(timezone.utc).isoformat(),
            "version": PROTOCOL_VERSION,
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": channel,
        "buffers": [],
    }


def execute_request(
    code: str,
    *,
    session: str,
    store_history: bool = False,
    allow_stdin: bool = False,
    msg_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build an ``execute_request`` for the shell channel (``msg_id``: default, a fresh one).

    ``metadata`` goes in the message's metadata, where code in the kernel can
    read it (``get_ipython().kernel.get_parent()["metadata"]``) without it
    being parsed as source: how file chunks travel.
    """
    message = _message(
        "execute_request",
        {
            "code": code,
            "silent": False,
            "store_history": store_history,
            "user_expressions": {},
            "allow_stdin": allow_stdin,
            "stop_on_error": True,
        },
        session=session,
        channel="shell",
        msg_id=msg_id,
    )
    if metadata:
        message["metadata"] = dict(metadata)
    return message


def kernel_info_request(*, session: str) -> dict[str, Any]:
    """Build a ``kernel_info_request`` for the shell channel."""
    return _message("kernel_info_request", {}, session=session, channel="shell")


def input_reply(value: str, *, session: str, parent: Mapping[str, Any]) -> dict[str, Any]:
    """Build an ``input_reply`` answering the ``input_request`` message ``parent``."""
    message = _message("input_reply", {"value": value}, session=session, channel="stdin")
    message["parent_header"] = dict(parent.get("header") or {})
    return message


def decode_legacy_binary(frame: bytes) -> dict[str, Any]:
    """Decode a binary frame of the JSON websocket protocol (a message with buffers).

    Without the v1 subprotocol, messages travel as JSON text, except those
    carrying binary buffers. Layout: the number of parts (big-endian uint32),
    the offset of each part from the start of the frame (uint32 each), then
    the parts: the message as JSON, then its buffers.

    Raises:
        ValueError: the frame is truncated or its first part is not a JSON object.
    """
    count = int.from_bytes(frame[:4], "big")
    if len(frame) < 4 or count < 1 or len(frame) < 4 * (count + 1):
        raise ValueError("truncated binary frame")
    offsets = [int.from_bytes(frame[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(count)]
    offsets.append(len(frame))
    if offsets[0] < 4 * (count + 1) or offsets != sorted(offsets):
        raise ValueError("binary frame offsets out of range")
    parts = [frame[offsets[i] : offsets[i + 1]] for i in range(count)]
    message = json.loads(parts[0].decode("utf-8", "replace"))
    if not isinstance(message, dict):
        raise ValueError("the binary frame's message is not a JSON object")
    message["buffers"] = parts[1:]
    return message


def msg_id_of(message: Mapping[str, Any]) -> str:
    """The ``msg_id`` of a message built here."""
    return str(message["header"]["msg_id"])


def parent_msg_id(message: Mapping[str, Any]) -> str | None:
    """The ``parent_header.msg_id`` of a received message, or None if malformed."""
    parent = message.get("parent_header")
    if isinstance(parent, Mapping):
        value = parent.get("msg_id")
        return value if isinstance(value, str) else None
    return None


def msg_type_of(message: Mapping[str, Any]) -> str | None:
    """The ``header.msg_type`` of a message (or its top-level ``msg_type``)."""
    header = message.get("header")
    if isinstance(header, Mapping) and isinstance(header.get("msg_type"), str):
        return str(header["msg_type"])
    value = message.get("msg_type")
    return value if isinstance(value, str) else None


def kernel_died(message: Mapping[str, Any]) -> bool:
    """True if ``message`` is the kernel's own ``dead`` / ``restarting`` status."""
    if msg_type_of(message) != "status":
        return False
    content = message.get("content")
    return isinstance(content, Mapping) and content.get("execution_state") in {"dead", "restarting"}


def kernel_counter(message: Mapping[str, Any]) -> tuple[str, int] | None:
    """The kernel session and message counter in a message's id, or None.

    jupyter_client's ``Session`` names what a kernel sends
    ``<session>_<pid>_<counter>``, one counter for every message of that
    session (all channels), so a jump in the counters that arrive means
    messages were lost on the way.
    """
    header = message.get("header")
    msg_id = header.get("msg_id") if isinstance(header, Mapping) else None
    if not isinstance(msg_id, str):
        return None
    source, _, counter = msg_id.rpartition("_")
    if not source or not counter.isdigit():
        return None
    return source, int(counter)
