"""The binary v1 kernel websocket protocol (``v1.kernel.websocket.jupyter.org``), both ways.

The one home of the format: the gateway side writes kernel messages to
clients with :func:`v1_frame`, the client (:mod:`async_modal_exec.channel`)
sends with :func:`encode_v1` and reads with :func:`decode_v1`.

Layout of a message: the number of offsets, the offsets (little-endian
uint64, from the start of the message), then the channel name, the four JSON
parts (header, parent header, metadata, content) and any binary buffers.

Standard library only: this module also runs in sandboxes where this package
is not installed (see :mod:`async_modal_exec.gateway_side`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["SMALL_PIECE", "V1_SUBPROTOCOL", "decode_v1", "encode_v1", "v1_frame"]

V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"
_V1_PARTS = ("header", "parent_header", "metadata", "content")

# Parts smaller than this are joined with their neighbours: every write is a
# send() (and, with TCP_NODELAY, a segment), so a small message stays one.
SMALL_PIECE = 64 * 1024


def _offsets_header(channel: bytes, parts: Sequence[bytes]) -> bytes:
    """The count and offsets that start a v1 message of ``channel`` and ``parts``."""
    offsets = [8 * (len(parts) + 3)]
    for piece in (channel, *parts):
        offsets.append(offsets[-1] + len(piece))
    return b"".join([len(offsets).to_bytes(8, "little"), *(o.to_bytes(8, "little") for o in offsets)])


def encode_v1(message: Mapping[str, Any]) -> bytes:
    """Encode a message for the binary ``v1.kernel.websocket.jupyter.org`` subprotocol.

    The gateway forwards the parts to the kernel without re-encoding them.
    """
    channel = str(message.get("channel") or "shell").encode()
    parts = [json.dumps(message.get(name) or {}).encode() for name in _V1_PARTS]
    parts += [bytes(buffer) for buffer in message.get("buffers") or []]
    return b"".join([_offsets_header(channel, parts), channel, *parts])


def decode_v1(frame: bytes) -> dict[str, Any]:
    """Decode a binary v1 frame into the same dict shape as the JSON protocol.

    The parts are read in place (memoryviews of the frame, decoded straight
    from it): a 10 MB output is not copied part by part first. Binary buffers
    are copied out as ``bytes``.

    Raises:
        ValueError: the frame is truncated or its parts are not JSON.
    """
    view = memoryview(frame)
    count = int.from_bytes(view[:8], "little")
    if count < 6 or len(frame) < 8 * (count + 1):
        raise ValueError("truncated v1 frame")
    offsets = [int.from_bytes(view[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
    if offsets[-1] > len(frame) or offsets != sorted(offsets):
        raise ValueError("v1 frame offsets out of range")
    chunks = [view[offsets[i] : offsets[i + 1]] for i in range(count - 1)]
    message: dict[str, Any] = {"channel": str(chunks[0], "utf-8")}
    for name, chunk in zip(_V1_PARTS, chunks[1:5], strict=True):
        # Kernels encode lone surrogates (text decoded with surrogateescape) as
        # raw bytes; decode like jupyter_client does, replacing what is invalid.
        message[name] = json.loads(str(chunk, "utf-8", "replace")) if chunk else {}
    message["buffers"] = [bytes(chunk) for chunk in chunks[5:]]
    message["msg_type"] = message["header"].get("msg_type") if isinstance(message["header"], dict) else None
    return message


def v1_frame(channel: str, parts: list[bytes]) -> list[bytes]:
    """A kernel message as one binary websocket frame of the v1 protocol, in pieces.

    ``parts`` are the kernel's message parts as the gateway receives them
    (header, parent header, metadata, content, buffers). The same bytes as
    the server's own path (``serialize_msg_to_ws_v1`` and tornado's
    ``write_message``, unmasked and uncompressed, as a server sends), but big
    message parts are not copied into one buffer and then into a frame: a
    1 MB output was copied twice on the way out, a third of the gateway's CPU
    time for big outputs. Small pieces are joined: the frame of a small
    message is one write.
    """
    name = channel.encode()
    header = _offsets_header(name, parts)
    size = len(header) + len(name) + sum(len(part) for part in parts)
    if size < 126:
        length = bytes([size])
    elif size <= 0xFFFF:
        length = bytes([126]) + size.to_bytes(2, "big")
    else:
        length = bytes([127]) + size.to_bytes(8, "big")
    pieces: list[bytes] = []
    pending = [b"\x82", length, header, name]
    for part in parts:
        if len(part) < SMALL_PIECE:
            pending.append(part)
            continue
        pieces.append(b"".join(pending))
        pending = []
        pieces.append(part)
    if pending:
        pieces.append(b"".join(pending))
    return pieces
