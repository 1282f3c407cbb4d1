"""The sans-I/O protocol layer, with plain dicts: no sockets."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from async_modal_exec import CodeError
from async_modal_exec.fold import ExecutionFold
from async_modal_exec.protocol import (
    execute_request,
    input_reply,
    kernel_died,
    msg_id_of,
    strip_ansi,
)
from async_modal_exec.results import (
    DisplayEvent,
    ErrorEvent,
    ResultEvent,
    RichOutput,
    StderrEvent,
    StdoutEvent,
)

from .helpers import legacy_binary_frame

MSG = "req-1"


def reply(msg_type: str, content: Any, parent: str | None = MSG, channel: str = "iopub") -> dict[str, Any]:
    return {
        "header": {"msg_id": f"m-{msg_type}", "msg_type": msg_type},
        "parent_header": {"msg_id": parent} if parent is not None else {},
        "content": content,
        "channel": channel,
    }


def status(state: str, parent: str | None = MSG) -> dict[str, Any]:
    return reply("status", {"execution_state": state}, parent)


def test_execute_request_shape() -> None:
    msg = execute_request("x = 1", session="s1", store_history=True, allow_stdin=True)
    assert msg["channel"] == "shell"
    assert msg["header"]["msg_type"] == "execute_request"
    assert msg["header"]["session"] == "s1"
    assert msg["content"]["code"] == "x = 1"
    assert msg["content"]["store_history"] is True
    assert msg["content"]["allow_stdin"] is True
    assert msg["parent_header"] == {}
    other = execute_request("x = 1", session="s1")
    assert msg_id_of(other) != msg_id_of(msg)


def test_interrupt_and_input_reply() -> None:
    request = {"header": {"msg_id": "in-1", "msg_type": "input_request"}}
    answer = input_reply("42", session="s", parent=request)
    assert answer["channel"] == "stdin"
    assert answer["content"] == {"value": "42"}
    assert answer["parent_header"]["msg_id"] == "in-1"


def test_fold_collects_everything_in_order() -> None:
    fold = ExecutionFold(MSG)
    png = b"\x89PNG\r\n\x1a\nfake"
    messages = [
        status("busy"),
        reply("execute_input", {"code": "...", "execution_count": 3}),
        reply("stream", {"name": "stdout", "text": "a"}),
        reply("stream", {"name": "stderr", "text": "warn"}),
        reply("stream", {"name": "stdout", "text": "b\n"}),
        reply(
            "display_data",
            {
                "data": {"image/png": base64.b64encode(png).decode(), "text/plain": "<Fig>"},
                "metadata": {"w": 1},
            },
        ),
        reply(
            "execute_result",
            {
                "data": {
                    "text/plain": "{'a': 1}",
                    "application/json": {"a": 1},
                    "text/html": ["<b>", "x</b>"],
                },
                "execution_count": 3,
            },
        ),
        reply("execute_reply", {"status": "ok", "execution_count": 3}, channel="shell"),
        status("idle"),
    ]
    events = [event for message in messages for event in fold.feed(message)]
    assert fold.done
    assert [type(e) for e in events] == [StdoutEvent, StderrEvent, StdoutEvent, DisplayEvent, ResultEvent]
    result = fold.result()
    assert result.ok
    assert result.stdout == "ab\n"
    assert result.stderr == "warn"
    assert result.execution_count == 3
    assert result.value is not None
    assert result.value.data["application/json"] == {"a": 1}
    assert result.value.data["text/html"] == "<b>x</b>"
    assert result.value.text == "{'a': 1}"
    assert result.displays[0].images == [("image/png", png)]
    assert result.displays[0].metadata == {"w": 1}
    assert result.images == [("image/png", png)]
    assert result.to_jsonable()["displays"][0]["data"]["image/png"] == base64.b64encode(png).decode()


def test_foreign_and_malformed_messages_are_ignored() -> None:
    fold = ExecutionFold(MSG)
    junk: list[Any] = [
        reply("stream", {"name": "stdout", "text": "other request"}, parent="someone-else"),
        status("idle", parent="someone-else"),
        {"no": "header"},
        {"header": "not a dict", "parent_header": {"msg_id": MSG}},
        {"header": {"msg_type": "stream"}, "parent_header": "nope"},
        reply("stream", "content is not a dict"),
        reply("stream", {"name": "stdout", "text": 42}),
        reply("display_data", {"data": "not a bundle"}),
        reply("execute_result", {}),
        reply("unknown_type", {"x": 1}),
        reply("execute_input", {"execution_count": True}),
    ]
    for message in junk:
        assert fold.feed(message) == []
    assert not fold.done
    result = fold.result()
    assert result.stdout == "" and result.value is None and result.execution_count is None


def test_error_keeps_earlier_output_and_strips_ansi() -> None:
    fold = ExecutionFold(MSG)
    fold.feed(reply("stream", {"name": "stdout", "text": "before\n"}))
    events = fold.feed(
        reply(
            "error",
            {
                "ename": "ZeroDivisionError",
                "evalue": "division by zero",
                "traceback": ["\x1b[0;31mZeroDivisionError\x1b[0m: boom"],
            },
        )
    )
    assert isinstance(events[0], ErrorEvent)
    # The shell reply repeats the error: it must not be reported twice.
    assert (
        fold.feed(
            reply(
                "execute_reply",
                {"status": "error", "ename": "ZeroDivisionError", "evalue": "x"},
                channel="shell",
            )
        )
        == []
    )
    fold.feed(status("idle"))
    result = fold.result()
    assert result.stdout == "before\n"
    assert result.error is not None
    assert result.error.ename == "ZeroDivisionError"
    assert result.error.traceback == ("ZeroDivisionError: boom",)
    with pytest.raises(CodeError) as caught:
        result.raise_for_error()
    assert caught.value.result.stdout == "before\n"


def test_error_only_in_reply_is_reported() -> None:
    fold = ExecutionFold(MSG)
    fold.feed(
        reply(
            "execute_reply",
            {"status": "error", "ename": "X", "evalue": "y", "traceback": []},
            channel="shell",
        )
    )
    assert fold.result().error is not None


def test_out_of_order_reply_before_outputs_and_late_messages() -> None:
    fold = ExecutionFold(MSG)
    fold.feed(reply("execute_reply", {"status": "ok", "execution_count": 7}, channel="shell"))
    fold.feed(reply("stream", {"name": "stdout", "text": "late but before idle"}))
    fold.feed(status("idle"))
    assert fold.done
    # Anything for the request after idle is ignored.
    assert fold.feed(reply("stream", {"name": "stdout", "text": "after idle"})) == []
    result = fold.result()
    assert result.stdout == "late but before idle"
    assert result.execution_count == 7


def test_busy_does_not_finish_and_foreign_idle_does_not_finish() -> None:
    fold = ExecutionFold(MSG)
    fold.feed(status("busy"))
    fold.feed(status("idle", parent="other"))
    assert not fold.done


def test_output_cap_marks_truncation() -> None:
    fold = ExecutionFold(MSG, max_output_chars=10)
    fold.feed(reply("stream", {"name": "stdout", "text": "12345678"}))
    events = fold.feed(reply("stream", {"name": "stderr", "text": "abcdef"}))
    assert events == [StderrEvent("ab")]
    assert fold.feed(reply("stream", {"name": "stdout", "text": "zzz"})) == []
    result = fold.result()
    assert result.truncated_chars == 7
    assert result.stdout.startswith("12345678")
    assert "output truncated, 7 characters dropped" in result.stdout
    assert result.stderr == "ab"


def test_invalid_base64_image_is_kept_not_lost() -> None:
    fold = ExecutionFold(MSG)
    fold.feed(reply("display_data", {"data": {"image/png": "***not base64***"}}))
    assert fold.result().displays[0].data["image/png"] == "***not base64***"


def test_kernel_died_detection() -> None:
    assert kernel_died(status("restarting", parent=None))
    assert kernel_died(status("dead", parent=None))
    assert not kernel_died(status("idle", parent=None))
    assert not kernel_died(reply("stream", {"execution_state": "dead"}))


def test_strip_ansi() -> None:
    assert strip_ansi("\x1b[1;32mgreen\x1b[0m \x1b[?25lx") == "green x"


def test_aborted_request_is_an_error() -> None:
    fold = ExecutionFold(MSG)
    fold.feed(reply("execute_reply", {"status": "aborted"}, channel="shell"))
    fold.feed(status("idle"))
    error = fold.result().error
    assert error is not None and error.ename == "ExecutionAborted"


def test_v1_binary_frames_round_trip() -> None:
    from async_modal_exec.protocol import decode_v1, encode_v1

    message = execute_request("print('é')", session="s")
    message["buffers"] = [b"\x00\x01raw"]
    decoded = decode_v1(encode_v1(message))
    assert decoded["channel"] == "shell"
    assert decoded["header"] == message["header"]
    assert decoded["content"] == message["content"]
    assert decoded["parent_header"] == {} and decoded["metadata"] == {}
    assert decoded["buffers"] == [b"\x00\x01raw"]
    assert decoded["msg_type"] == "execute_request"


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x01" + b"\x00" * 7,
        (6).to_bytes(8, "little") + b"\x00" * 8,
        (6).to_bytes(8, "little") + (10**9).to_bytes(8, "little") * 6,
    ],
)
def test_v1_malformed_frames_raise_value_error(frame: bytes) -> None:
    from async_modal_exec.protocol import decode_v1

    with pytest.raises(ValueError):
        decode_v1(frame)


def test_json_protocol_binary_frame_is_decoded() -> None:
    from async_modal_exec.protocol import decode_legacy_binary

    body = json.dumps({"header": {"msg_type": "comm_msg"}, "parent_header": {}, "channel": "iopub"}).encode()
    decoded = decode_legacy_binary(legacy_binary_frame(body, b"\x00\x01", b"", b"raw"))
    assert decoded["channel"] == "iopub" and decoded["header"] == {"msg_type": "comm_msg"}
    assert decoded["buffers"] == [b"\x00\x01", b"", b"raw"]
    assert decode_legacy_binary(legacy_binary_frame(body))["buffers"] == []


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00\x00\x00\x00",  # no parts
        b"\x00\x00\x00\x02\x00\x00\x00\x0c",  # offsets cut short
        b"\x00\x00\x00\x01\x00\x00\x00\x02{}",  # offset inside the header
        b"\x00\x00\x00\x02\x00\x00\x00\x0c\x00\x00\x00\x0b{}",  # offsets going backwards
        b"\x00\x00\x00\x01\x00\x00\x00\x08[1]",  # not an object
        b"\x00\x00\x00\x01\x00\x00\x00\x08{no",  # not JSON
    ],
)
def test_json_protocol_malformed_binary_frames_raise_value_error(frame: bytes) -> None:
    from async_modal_exec.protocol import decode_legacy_binary

    with pytest.raises(ValueError):
        decode_legacy_binary(frame)


def test_reply_is_noted_and_a_lost_idle_can_be_assumed() -> None:
    fold = ExecutionFold(MSG)
    fold.feed(reply("stream", {"name": "stdout", "text": "out\n"}))
    assert not fold.replied
    fold.feed(reply("execute_reply", {"status": "ok", "execution_count": 3}, channel="shell"))
    assert fold.replied and not fold.done
    fold.assume_done()  # what the executor does when idle never follows the reply
    assert fold.done
    result = fold.result()
    assert result.stdout == "out\n" and result.execution_count == 3


def test_output_cap_counts_displays_and_results() -> None:
    # The cap is one budget for everything kept, in arrival order: streams and
    # rich outputs alike (a rich output counts the characters of its bundle as sent).
    fold = ExecutionFold(MSG, max_output_chars=100)
    big = base64.b64encode(b"x" * 300).decode()  # 400 characters
    small = {"text/plain": "small", "text/html": "<b>s</b>"}  # 5 + 8
    fold.feed(reply("stream", {"name": "stdout", "text": "12345"}))
    assert fold.feed(reply("display_data", {"data": small})) == [DisplayEvent(RichOutput(small, {}))]
    # Does not fit whole (room 82): reduced to its text/plain.
    reduced = fold.feed(reply("display_data", {"data": {"image/png": big, "text/plain": "<Figure>"}}))
    assert reduced == [DisplayEvent(RichOutput({"text/plain": "<Figure>"}, {}, truncated=True))]
    # Room 74: the value keeps the first 74 characters of its text/plain, nothing else.
    fold.feed(
        reply(
            "execute_result",
            {"data": {"text/plain": "y" * 100, "application/json": {"k": 1}}, "execution_count": 1},
        )
    )
    # No room left and no text/plain: dropped whole, no event.
    assert fold.feed(reply("display_data", {"data": {"image/png": big}})) == []
    assert fold.feed(reply("stream", {"name": "stdout", "text": "late"})) == []
    result = fold.result()
    assert [dict(d.data) for d in result.displays] == [small, {"text/plain": "<Figure>"}]
    assert [d.truncated for d in result.displays] == [False, True]
    assert result.value is not None and result.value.text == "y" * 74 and result.value.truncated
    assert "application/json" not in result.value.data
    dropped = 400 + (26 + len('{"k": 1}')) + 400 + 4
    assert result.truncated_chars == dropped
    assert result.images == []
    assert f"output truncated, {dropped} characters dropped" in result.stdout
    assert "2 rich outputs cut to text/plain, 1 dropped" in result.stdout
    assert result.to_jsonable()["displays"][1]["truncated"] is True
    assert "truncated" not in result.to_jsonable()["displays"][0]


def test_output_cap_keeps_rich_outputs_that_fit() -> None:
    fold = ExecutionFold(MSG, max_output_chars=1000)
    png = base64.b64encode(b"\x89PNG" + b"p" * 200).decode()
    fold.feed(reply("display_data", {"data": {"image/png": png, "text/plain": "<img>"}}))
    fold.feed(reply("execute_result", {"data": {"text/plain": "42"}, "execution_count": 1}))
    result = fold.result()
    assert result.truncated_chars == 0 and "truncated" not in result.stdout
    assert result.images[0][1] == b"\x89PNG" + b"p" * 200
    assert result.value is not None and result.value.text == "42" and not result.value.truncated
