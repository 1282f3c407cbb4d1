"""Sans-I/O folding of one request's messages into events and a result.

:class:`ExecutionFold` consumes the messages that arrive after an
``execute_request`` (built by :mod:`~async_modal_exec.protocol`), one at a
time, and turns those belonging to its request into events and a final
:class:`~async_modal_exec.ExecutionResult`. Nothing here touches a socket.

Rules the fold follows (after jupyter_client's ``execute_interactive``):

* a message belongs to the request when ``parent_header.msg_id`` equals the
  request's ``msg_id``; anything else (other requests, restarts of other
  clients, malformed dicts) is ignored;
* the request is done when its ``status`` goes ``idle``; messages for it that
  arrive afterwards (a late ``execute_reply``) are ignored;
* a ``status`` of ``dead`` or ``restarting`` from the kernel itself (no parent)
  means the kernel died: :attr:`ExecutionFold.kernel_dead`;
* an ``input_request`` for the request (``input()`` or a host-tool call in the
  kernel) waits for an answer: :meth:`ExecutionFold.take_input_request`;
* the kernel numbers the messages it sends: :class:`LossTracker` counts the
  numbers of this request that never arrived (``result.lost_messages``);
* output cut by the cap or lost on the way is never silent: the result's
  stdout ends with a marker line, and the events end with the same line (a
  :class:`MarkerEvent`) when the request goes idle, so a streamed run says
  what a returned result says.

The driver only moves bytes: it feeds what arrives and acts on what the fold
says (answer an input request, report a dead kernel, stop at ``done``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .protocol import kernel_counter, kernel_died, msg_type_of, parent_msg_id, strip_ansi
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
    decode_mime_bundle,
)


def bundle_chars(data: Mapping[str, Any]) -> int:
    """The characters of a mime bundle as the kernel sent it: what the output cap counts.

    Strings (base64 for images) count their length, lists of strings (multi-line
    text) the sum, any other JSON value the length of its JSON text.
    """
    total = 0
    for value in data.values():
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, list) and all(isinstance(part, str) for part in value):
            total += sum(len(part) for part in value)
        else:
            total += len(json.dumps(value, default=repr))
    return total


@dataclass
class OutputCap:
    """Caps the output kept for one execution: stdout, stderr, displays and the value.

    One budget of ``max_chars`` characters, spent in arrival order. Stream text
    past it is dropped and counted. A rich output (``display_data``,
    ``update_display_data``, ``execute_result``) counts :func:`bundle_chars` of
    its bundle: kept whole if it fits; otherwise only its ``text/plain`` is kept,
    cut to the room left (the other mime types are dropped and counted); with
    no room or no ``text/plain`` it is dropped entirely. The result then ends
    with a visible marker saying how much was dropped.
    """

    max_chars: int | None
    kept: int = 0
    dropped: int = 0
    rich_cut: int = 0  # rich outputs reduced to (part of) their text/plain
    rich_dropped: int = 0  # rich outputs dropped entirely

    def _room(self) -> int:
        assert self.max_chars is not None
        return max(self.max_chars - self.kept, 0)

    def take(self, text: str) -> str:
        """The part of stream ``text`` that fits (the rest is counted as dropped)."""
        if self.max_chars is None:
            return text
        kept = text[: self._room()]
        self.kept += len(kept)
        self.dropped += len(text) - len(kept)
        return kept

    def take_rich(self, data: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool] | None:
        """The part of the mime bundle ``data`` that fits and whether it was cut; None: nothing fits."""
        if self.max_chars is None:
            return data, False
        size = bundle_chars(data)
        room = self._room()
        if size <= room:
            self.kept += size
            return data, False
        text = data.get("text/plain")
        if isinstance(text, list):
            text = "".join(str(part) for part in text)
        kept = text[:room] if isinstance(text, str) else ""
        self.kept += len(kept)
        self.dropped += size - len(kept)
        if not kept:
            self.rich_dropped += 1
            return None
        self.rich_cut += 1
        return {"text/plain": kept}, True


def truncation_marker(dropped: int, rich_cut: int = 0, rich_dropped: int = 0) -> str:
    """The line appended to stdout when the output cap dropped ``dropped`` characters.

    ``rich_cut`` rich outputs were reduced to their ``text/plain``, ``rich_dropped``
    dropped entirely; the marker says so when either is not zero.
    """
    details = []
    if rich_cut:
        details.append(f"{rich_cut} rich output{'s' if rich_cut != 1 else ''} cut to text/plain")
    if rich_dropped:
        noun = "" if details else f" rich output{'s' if rich_dropped != 1 else ''}"
        details.append(f"{rich_dropped}{noun} dropped")
    detail = f"; {', '.join(details)}" if details else ""
    return f"\n[async_modal_exec: output truncated, {dropped} characters dropped{detail}]\n"


@dataclass(frozen=True)
class MarkerEvent(StdoutEvent):
    """The closing marker line of a cut-short output, streamed as stdout text.

    A :class:`StdoutEvent` (``kind`` ``"stdout"``) whose text is the marker
    :meth:`ExecutionFold.result`'s stdout ends with (:func:`truncation_marker`,
    :func:`loss_marker`); consumers that know it can show it apart from the
    code's own output.

    Attributes:
        truncated_chars: characters the output cap dropped.
        lost_messages: messages of the kernel that never arrived.
    """

    truncated_chars: int = 0
    lost_messages: int = 0


def unaccounted_messages(
    last_seen: tuple[str, int] | None, answer: Mapping[str, Any], between: Iterable[Mapping[str, Any]]
) -> int | None:
    """How many of the kernel's messages numbered between ``last_seen`` and ``answer`` nobody saw.

    ``between`` are the messages received meanwhile. Gateways "nudge" a
    reconnected kernel with ``kernel_info_request``s of their own; each one
    seen there (by its status messages) accounts for three numbers (busy,
    reply, idle). None when the numbers cannot tell (another kernel session,
    ids without a counter).
    """
    counter = kernel_counter(answer)
    if last_seen is None or counter is None or counter[0] != last_seen[0]:
        return None
    nudges = {
        parent_msg_id(message)
        for message in between
        if (seen := kernel_counter(message)) is not None and last_seen[1] < seen[1] < counter[1]
    }
    return counter[1] - last_seen[1] - 1 - 3 * len(nudges)


class LossTracker:
    """Counts the kernel's messages lost during one execution, from the counters in their ids.

    Tracking starts with the request's first message (its ``busy`` status)
    and ends with its ``idle``: every counter in between belongs to a message
    this client must see (IOPub is broadcast; the shell and stdin messages in
    that window are this request's), except the ``execute_reply``, which may
    still be on its way on the shell channel when ``idle`` arrives. A counter
    seen twice is a duplicate (a replay after a reconnect) and is dropped.
    Kernels whose ids do not carry a counter are not tracked.
    """

    def __init__(self) -> None:
        self._source: str | None = None
        self._first: int | None = None
        self._last: int | None = None
        self._seen: set[int] = set()
        self._sent_elsewhere = 0
        self.closed = False

    def sent_elsewhere(self, count: int = 1) -> None:
        """``count`` messages of the window went to another client, by design.

        A message-mode interrupt: the gateway sends the kernel an
        ``interrupt_request`` and gets its ``interrupt_reply``, which takes a
        counter this client never sees. Not a loss.
        """
        self._sent_elsewhere += count

    def see(self, message: Mapping[str, Any], *, ours: bool) -> bool:
        """Record ``message``; False if it is a duplicate to drop."""
        found = kernel_counter(message)
        if found is None or self.closed:
            return True
        source, counter = found
        if self._source is None:
            if not ours:
                return True
            self._source, self._first = source, counter
        if source != self._source:
            return True  # another kernel session (e.g. the kernel restarted): not ours to count
        if counter in self._seen:
            return False
        self._seen.add(counter)
        return True

    def close(self, message: Mapping[str, Any] | None) -> None:
        """The request ended (at ``message``, its idle status; None if that was lost)."""
        found = kernel_counter(message) if message is not None else None
        if found is not None and found[0] == self._source:
            self._last = found[1]
        elif self._seen:
            self._last = max(self._seen)
        self.closed = True

    def lost(self, *, replied: bool) -> int:
        """Messages missing from the window (0 while it is open)."""
        if not self.closed or self._first is None or self._last is None:
            return 0
        window = self._last - self._first + 1
        seen = sum(1 for counter in self._seen if self._first <= counter <= self._last)
        return max(window - seen - (0 if replied else 1) - self._sent_elsewhere, 0)


def loss_marker(lost: int) -> str:
    """The line appended to stdout when ``lost`` messages of the kernel never arrived."""
    noun = "message" if lost == 1 else "messages"
    return f"\n[async_modal_exec: output incomplete, {lost} {noun} of the kernel lost on the way]\n"


class ExecutionFold:
    """Folds the messages of one ``execute_request`` into events and a result.

    Feed every received message to :meth:`feed`; it returns the events the
    message produced (none for foreign or malformed messages). :attr:`done` turns
    true when the request's status goes idle; :attr:`kernel_dead` when the
    kernel reports itself dead or restarting; :meth:`take_input_request` hands
    out an ``input_request`` of this request waiting for its answer.
    :meth:`result` can be called at any time: before ``done`` it is the
    partial result.

    :attr:`value_cap`, when set, caps the value of the last expression
    (``execute_result``) on its own, so printed output that spent the shared
    budget does not drop it (the command line sets it).
    """

    def __init__(self, msg_id: str, *, max_output_chars: int | None = None) -> None:
        self.msg_id = msg_id
        self.done = False
        self.replied = False  # the shell's execute_reply arrived
        self.kernel_dead = False  # the kernel said it died (status dead / restarting)
        self.acknowledged = False  # a message of this request arrived: the kernel got it
        self._input_request: Mapping[str, Any] | None = None
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._stream_order: list[tuple[str, int]] = []  # runs of (stream, characters)
        self._value: RichOutput | None = None
        self._displays: list[RichOutput] = []
        self._error: RemoteError | None = None
        self._execution_count: int | None = None
        # Set by the executor when the kernel does not count (store_history=False):
        # the number of this execution on its kernel, reported instead.
        self.number: int | None = None
        self._cap = OutputCap(max_output_chars)
        self.value_cap: OutputCap | None = None  # None: the value shares ``max_output_chars``
        self._loss = LossTracker()

    def belongs(self, message: Mapping[str, Any]) -> bool:
        """True if ``message`` answers this request."""
        return parent_msg_id(message) == self.msg_id

    def feed(self, message: Mapping[str, Any]) -> list[Event]:
        """Consume one received message; return the events it produced."""
        if kernel_died(message):
            self.kernel_dead = True
            return []
        ours = self.belongs(message)
        self.acknowledged = self.acknowledged or ours
        if not self._loss.see(message, ours=ours):
            return []  # a duplicate (replayed after a reconnect)
        if self.done or not ours:
            return []
        if msg_type_of(message) == "input_request":
            self._input_request = message
            return []
        content = message.get("content")
        if not isinstance(content, Mapping):
            return []
        handler = getattr(self, f"_on_{msg_type_of(message)}", None)
        if handler is None:
            return []
        events: list[Event] = handler(content)
        if self.done:
            self._loss.close(message)
            marker = self._marker()
            if marker is not None:
                events.append(marker)
        return events

    def _on_status(self, content: Mapping[str, Any]) -> list[Event]:
        if content.get("execution_state") == "idle":
            self.done = True
        return []

    @property
    def lost_messages(self) -> int:
        """Messages of the kernel that never arrived during this request (see :class:`LossTracker`)."""
        return self._loss.lost(replied=self.replied)

    def interrupted_by_message(self) -> None:
        """The kernel was interrupted by a message whose reply goes to the gateway, not here."""
        if not self.done:
            self._loss.sent_elsewhere()

    def _on_stream(self, content: Mapping[str, Any]) -> list[Event]:
        text = content.get("text")
        if not isinstance(text, str):
            return []
        text = self._cap.take(text)
        if not text:
            return []
        stream = "stderr" if content.get("name") == "stderr" else "stdout"
        order = self._stream_order
        if order and order[-1][0] == stream:
            order[-1] = (stream, order[-1][1] + len(text))
        else:
            order.append((stream, len(text)))
        if stream == "stderr":
            self._stderr.append(text)
            return [StderrEvent(text)]
        self._stdout.append(text)
        return [StdoutEvent(text)]

    def _rich(self, content: Mapping[str, Any], cap: OutputCap | None = None) -> RichOutput | None:
        data = content.get("data")
        if not isinstance(data, Mapping):
            return None
        taken = (cap or self._cap).take_rich(data)
        if taken is None:
            return None
        kept, truncated = taken
        metadata = content.get("metadata")
        return RichOutput(
            decode_mime_bundle(kept),
            dict(metadata) if isinstance(metadata, Mapping) else {},
            truncated=truncated,
        )

    def _on_display_data(self, content: Mapping[str, Any]) -> list[Event]:
        output = self._rich(content)
        if output is None:
            return []
        self._displays.append(output)
        return [DisplayEvent(output)]

    _on_update_display_data = _on_display_data

    def _on_execute_result(self, content: Mapping[str, Any]) -> list[Event]:
        self._take_count(content)
        output = self._rich(content, self.value_cap)
        if output is None:
            return []
        self._value = output
        return [ResultEvent(output, self._count())]

    def _on_error(self, content: Mapping[str, Any]) -> list[Event]:
        if self._error is not None:
            return []
        traceback = content.get("traceback")
        lines = tuple(strip_ansi(str(line)) for line in traceback) if isinstance(traceback, list) else ()
        self._error = RemoteError(
            ename=str(content.get("ename", "Error")),
            evalue=str(content.get("evalue", "")),
            traceback=lines,
        )
        return [ErrorEvent(self._error)]

    def _on_execute_input(self, content: Mapping[str, Any]) -> list[Event]:
        self._take_count(content)
        return []

    def take_input_request(self) -> Mapping[str, Any] | None:
        """The ``input_request`` of this request waiting for an answer (once), or None."""
        request, self._input_request = self._input_request, None
        return request

    def assume_done(self) -> list[Event]:
        """End the fold without the idle status (it was lost after the reply came).

        Returns the closing :class:`MarkerEvent`, if output was cut or lost,
        as :meth:`feed` does at the idle status.
        """
        self.done = True
        self._loss.close(None)
        marker = self._marker()
        return [marker] if marker is not None else []

    def _on_execute_reply(self, content: Mapping[str, Any]) -> list[Event]:
        self.replied = True
        self._take_count(content)
        if content.get("status") == "error" and self._error is None:
            return self._on_error(content)
        if content.get("status") == "aborted" and self._error is None:
            # The kernel drops requests queued behind one that failed.
            return self._on_error(
                {
                    "ename": "ExecutionAborted",
                    "evalue": "the kernel aborted this request after an earlier error",
                }
            )
        return []

    def _count(self) -> int | None:
        return self.number if self.number is not None else self._execution_count

    def _take_count(self, content: Mapping[str, Any]) -> None:
        count = content.get("execution_count")
        if isinstance(count, int) and not isinstance(count, bool):
            self._execution_count = count

    def _marker(self) -> MarkerEvent | None:
        """The marker line closing a cut-short output, or None when nothing was cut or lost."""
        caps = [self._cap] if self.value_cap is None else [self._cap, self.value_cap]
        dropped = sum(cap.dropped for cap in caps)
        text = ""
        if dropped:
            rich_cut = sum(cap.rich_cut for cap in caps)
            text += truncation_marker(dropped, rich_cut, sum(cap.rich_dropped for cap in caps))
        lost = self.lost_messages
        if lost:
            text += loss_marker(lost)
        return MarkerEvent(text, truncated_chars=dropped, lost_messages=lost) if text else None

    def result(self) -> ExecutionResult:
        """The result so far (the final one once :attr:`done`)."""
        marker = self._marker() or MarkerEvent("")
        return ExecutionResult(
            stdout="".join(self._stdout) + marker.text,
            stderr="".join(self._stderr),
            value=self._value,
            displays=tuple(self._displays),
            error=self._error,
            execution_count=self._count(),
            truncated_chars=marker.truncated_chars,
            lost_messages=marker.lost_messages,
            stream_order=tuple(self._stream_order),
        )
