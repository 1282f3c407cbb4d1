"""Results and streamed events of one execution, and the ExecutionError branch that carries them (no I/O)."""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._root_error import AsyncModalExecError

__all__ = [
    "CodeError",
    "ExecutionError",
    "ExecutionTimeout",
    "KernelDied",
    "RecoveryOutcome",
    "DisplayEvent",
    "ErrorEvent",
    "Event",
    "ExecutionResult",
    "RemoteError",
    "ResultEvent",
    "RichOutput",
    "StderrEvent",
    "StdoutEvent",
]

# Mime types the kernel sends base64-encoded; they are decoded to bytes.
BINARY_MIME_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "application/pdf"}
)
# Which image of a bundle to decode: lossless types first, JPEG last (a kernel
# that offers both would otherwise hand back a lossy copy of the picture).
IMAGE_PREFERENCE = ("image/png", "image/bmp", "image/gif", "image/webp")


def decode_mime_bundle(data: Mapping[str, Any]) -> dict[str, Any]:
    """Decode a Jupyter mime bundle: base64 images to bytes, the rest as sent.

    A value that is not valid base64 for a binary type is kept as sent rather
    than dropped, so nothing the kernel produced is lost.
    """
    decoded: dict[str, Any] = {}
    for mime, value in data.items():
        if mime in BINARY_MIME_TYPES and isinstance(value, str):
            try:
                decoded[mime] = base64.b64decode(value, validate=False)
            except (binascii.Error, ValueError):
                decoded[mime] = value
        elif isinstance(value, list) and mime.startswith("text/"):
            decoded[mime] = "".join(str(part) for part in value)
        else:
            decoded[mime] = value
    return decoded


@dataclass(frozen=True)
class RichOutput:
    """One rich value: an ``execute_result`` or a ``display_data``.

    Attributes:
        data: mime type -> value. Images (``image/png``, ``image/jpeg`` ...) are
            ``bytes``; ``application/json`` is the decoded object; text types are ``str``.
        metadata: the kernel's metadata for the value (sizes, ...).
        truncated: True when the output cap did not leave room for the whole
            bundle: only its ``text/plain`` is kept (itself cut to the room
            left), every other mime type is dropped.
    """

    data: Mapping[str, Any]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    truncated: bool = False

    @property
    def text(self) -> str | None:
        """The ``text/plain`` representation, if any."""
        value = self.data.get("text/plain")
        return value if isinstance(value, str) else None

    @property
    def images(self) -> list[tuple[str, bytes]]:
        """Every image in the bundle as ``(mime_type, bytes)``."""
        return [
            (mime, value)
            for mime, value in self.data.items()
            if mime.startswith("image/") and isinstance(value, bytes)
        ]

    @property
    def best_image(self) -> tuple[str, bytes] | None:
        """The bundle's most faithful image: PNG (or another lossless type) over JPEG; None if none."""
        images = dict(self.images)
        for mime in IMAGE_PREFERENCE:
            if mime in images:
                return mime, images[mime]
        return next(iter(images.items()), None)

    def to_jsonable(self) -> dict[str, Any]:
        """A JSON-ready dict (binary values base64-encoded again; ``"truncated": true`` if cut)."""
        data = {
            mime: base64.b64encode(value).decode() if isinstance(value, bytes) else value
            for mime, value in self.data.items()
        }
        jsonable: dict[str, Any] = {"data": data, "metadata": dict(self.metadata)}
        if self.truncated:
            jsonable["truncated"] = True
        return jsonable


@dataclass(frozen=True)
class RemoteError:
    """An exception raised by the user's code in the kernel.

    Attributes:
        ename: the exception's type name, e.g. ``"ZeroDivisionError"``.
        evalue: its message.
        traceback: the traceback lines, ANSI colour codes stripped.
    """

    ename: str
    evalue: str
    traceback: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.traceback:
            return "\n".join(self.traceback)
        return f"{self.ename}: {self.evalue}"


@dataclass(frozen=True)
class ExecutionResult:
    """Everything one execution produced.

    The user's code raising is data, not an exception: see ``error``, and
    :meth:`raise_for_error` to turn it into :class:`~async_modal_exec.CodeError`.

    Attributes:
        stdout: all stdout text, in order.
        stderr: all stderr text, in order.
        value: the ``execute_result`` (the value of the last expression), if any.
        displays: every ``display_data`` output, in order.
        error: the exception the code raised, if any.
        execution_count: the number of this execution on its kernel (1 for
            the first; a fresh kernel starts again at 1): the kernel's own
            counter with ``store_history=True``, else counted by the executor
            (a kernel that stores no history does not count).
        truncated_chars: characters dropped by the output cap: of stdout and
            stderr, and of the mime bundles of displays and of the value (as
            the kernel sent them, e.g. base64 for images); see
            :attr:`RichOutput.truncated`.
        lost_messages: messages of the kernel that never arrived (a link cut,
            an overflowing queue on the way): the result is then
            :attr:`incomplete`, and stdout ends with a marker saying so.
        stream_order: how stdout and stderr interleaved, as runs of
            ``("stdout" | "stderr", characters)`` in arrival order (see :attr:`logs`).
    """

    stdout: str = ""
    stderr: str = ""
    value: RichOutput | None = None
    displays: tuple[RichOutput, ...] = ()
    error: RemoteError | None = None
    execution_count: int | None = None
    truncated_chars: int = 0
    lost_messages: int = 0
    stream_order: tuple[tuple[str, int], ...] = ()

    @property
    def logs(self) -> str:
        """stdout and stderr interleaved in the order they arrived (the kernel's
        order on its IOPub channel), as a terminal would show them; markers at the end."""
        if not self.stderr:
            return self.stdout
        parts: list[str] = []
        taken = {"stdout": 0, "stderr": 0}
        texts = {"stdout": self.stdout, "stderr": self.stderr}
        for stream, size in self.stream_order:
            start = taken[stream]
            parts.append(texts[stream][start : start + size])
            taken[stream] = start + size
        parts += [self.stdout[taken["stdout"] :], self.stderr[taken["stderr"] :]]
        return "".join(parts)

    @property
    def incomplete(self) -> bool:
        """True if some of the kernel's messages were lost on the way (see ``lost_messages``)."""
        return self.lost_messages > 0

    @property
    def ok(self) -> bool:
        """True when the code did not raise."""
        return self.error is None

    def _outputs(self) -> list[RichOutput]:
        """The displays, then the value: every rich output, in order."""
        return [*self.displays, *([self.value] if self.value is not None else [])]

    @property
    def best_image(self) -> tuple[str, bytes] | None:
        """The last image displayed or returned, in its most faithful type
        (see :attr:`RichOutput.best_image`); None if there is none."""
        bests = (output.best_image for output in reversed(self._outputs()))
        return next((best for best in bests if best is not None), None)

    @property
    def images(self) -> list[tuple[str, bytes]]:
        """Every image displayed or returned, in order, as ``(mime_type, bytes)``."""
        return [image for output in self._outputs() for image in output.images]

    def raise_for_error(self) -> ExecutionResult:
        """Return ``self``, or raise :class:`CodeError` if the code raised.

        Raises:
            CodeError: carrying this result (so output printed before the error is kept).
        """
        if self.error is not None:
            raise CodeError(f"{self.error.ename}: {self.error.evalue}", self)
        return self

    def to_jsonable(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole result."""
        jsonable: dict[str, Any] = json.loads(
            json.dumps(
                {
                    "stdout": self.stdout,
                    "stderr": self.stderr,
                    "value": self.value.to_jsonable() if self.value else None,
                    "displays": [d.to_jsonable() for d in self.displays],
                    "error": None
                    if self.error is None
                    else {
                        "ename": self.error.ename,
                        "evalue": self.error.evalue,
                        "traceback": list(self.error.traceback),
                    },
                    "execution_count": self.execution_count,
                    "truncated_chars": self.truncated_chars,
                    "lost_messages": self.lost_messages,
                },
                default=repr,
            )
        )
        return jsonable


@dataclass(frozen=True)
class StdoutEvent:
    """Text the code wrote to stdout."""

    text: str
    kind: Literal["stdout"] = "stdout"


@dataclass(frozen=True)
class StderrEvent:
    """Text the code wrote to stderr."""

    text: str
    kind: Literal["stderr"] = "stderr"


@dataclass(frozen=True)
class DisplayEvent:
    """A ``display_data`` output (a figure, an image, HTML ...)."""

    output: RichOutput
    kind: Literal["display"] = "display"


@dataclass(frozen=True)
class ResultEvent:
    """The value of the last expression (``execute_result``)."""

    output: RichOutput
    execution_count: int | None = None
    kind: Literal["result"] = "result"


@dataclass(frozen=True)
class ErrorEvent:
    """The code raised."""

    error: RemoteError
    kind: Literal["error"] = "error"


Event = StdoutEvent | StderrEvent | DisplayEvent | ResultEvent | ErrorEvent
"""One streamed event; match on ``event.kind`` or on the class."""


# -- the ExecutionError branch of the exception tree (drawn in errors.py) -----------------


class ExecutionError(AsyncModalExecError):
    """An execution did not complete normally.

    Attributes:
        result: what the execution produced before it stopped (stdout, stderr,
            displays, error): output printed before a failure is never lost.
    """

    def __init__(self, message: str, result: ExecutionResult) -> None:
        super().__init__(message)
        self.result = result


class CodeError(ExecutionError):
    """The user's code raised; ``result.error`` has its name, value and traceback."""


class RecoveryOutcome(enum.Enum):
    """What the executor did to bring the kernel back after a timeout or cancellation.

    * ``INTERRUPTED``: the interrupt stopped the code; the kernel's state is kept.
    * ``REPLACED``: the kernel ignored the interrupt (or died meanwhile); a
      fresh kernel is being started in the background and the next run uses
      it; the state is lost.
    * ``DEFERRED``: the kernel could not be brought back (the gateway failed
      in a way that leaves it unknown): the next run starts on a fresh kernel;
      the state is lost.
    * ``UNREACHABLE``: the gateway could not be reached to interrupt the
      kernel. The kernel is left as it is and the next run reconnects; its
      state is kept if the kernel is fine (code still running finishes first).
    * ``NOT_STARTED``: the timeout expired before the code was sent (waiting
      for the executions before it, or for a kernel being replaced): nothing
      ran, nothing was interrupted.
    """

    INTERRUPTED = "interrupted"
    REPLACED = "replaced"
    DEFERRED = "deferred"
    UNREACHABLE = "unreachable"
    NOT_STARTED = "not_started"

    @property
    def state_kept(self) -> bool:
        """True if the kernel's variables survived (or, for ``UNREACHABLE``, may have)."""
        return self in _STATE_KEPT

    def describe(self) -> str:
        """One clause for messages and logs, e.g. ``"the kernel was interrupted (its state is kept)"``."""
        return _RECOVERY_TEXT[self]


_STATE_KEPT = {RecoveryOutcome.INTERRUPTED, RecoveryOutcome.UNREACHABLE, RecoveryOutcome.NOT_STARTED}
_RECOVERY_TEXT = {
    RecoveryOutcome.INTERRUPTED: "the kernel was interrupted (its state is kept)",
    RecoveryOutcome.REPLACED: (
        "the kernel ignored the interrupt (or died) and is being replaced by a fresh kernel"
        " (its state is lost)"
    ),
    RecoveryOutcome.DEFERRED: (
        "the kernel could not be brought back; the next run starts on a fresh kernel (its state is lost)"
    ),
    RecoveryOutcome.UNREACHABLE: (
        "the gateway could not be reached to interrupt the kernel; the next run reconnects"
        " (the kernel's state is kept if it is fine)"
    ),
    RecoveryOutcome.NOT_STARTED: "the code never started (nothing was interrupted; the state is kept)",
}


class ExecutionTimeout(ExecutionError, TimeoutError):
    """The execution's timeout expired.

    ``recovery`` (a :class:`RecoveryOutcome`) says what happened to the
    kernel: interrupted (variables defined before the timed-out code survive),
    being replaced (code that swallows ``KeyboardInterrupt``, a frozen or dead
    kernel: its state is gone and ``restarted`` is true), unreachable (kept as
    it is), or the code never started.

    Attributes:
        recovery: a :class:`RecoveryOutcome`.
        timeout: the caller's timeout in seconds that expired, or None when
            a bounded setup step ran out instead (``step`` names it) or the
            call had no limit of its own.
        step: the setup step whose own bound expired, or ``""``.
    """

    def __init__(
        self,
        message: str,
        result: ExecutionResult,
        *,
        recovery: RecoveryOutcome,
        timeout: float | None = None,
        step: str = "",
    ) -> None:
        super().__init__(message, result)
        self.recovery = recovery
        self.timeout = timeout
        self.step = step

    @property
    def restarted(self) -> bool:
        """True if the kernel's state is lost (it is replaced, now or by the next run)."""
        return not self.recovery.state_kept


class KernelDied(ExecutionError):
    """The kernel process died during the execution; the next run gets a fresh kernel."""
