"""The execution driver and its recovery, driven through a scripted transport (no sockets).

``ScriptedKernel`` plays the kernel behind the websocket: it answers each
request the driver sends with the messages a script says, numbered the way
jupyter_client numbers a kernel's messages (``<session>_<pid>_<n>``), so the
loss accounting sees what it sees on a real link. ``ScriptedLink`` plays the
kernel session (reconnect, interrupt, liveness). The same paths are covered
through real sockets and a fault proxy in test_faults.py; here each branch of
the recovery is reached on purpose, in milliseconds.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from async_modal_exec.channel import ChannelLost
from async_modal_exec.deadline import Deadline
from async_modal_exec.driver import DriverSettings, ExecutionRun
from async_modal_exec.errors import GatewayNotFound, GatewayUnreachable
from async_modal_exec.fold import ExecutionFold, MarkerEvent
from async_modal_exec.protocol import msg_type_of, new_msg_id
from async_modal_exec.results import ExecutionTimeout, KernelDied, RecoveryOutcome, StdoutEvent

DROP = object()  # in the inbox: the connection closes here


class ScriptedKernel:
    """The far end of the websocket: numbered messages, answers scripted per request type."""

    def __init__(self) -> None:
        self.counter = 0
        self.inbox: collections.deque[Any] = collections.deque()
        self.arrived = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self.open = True
        self.pong = True
        self.last_counter: tuple[str, int] | None = None
        # request msg_type -> what to do with it (default: nothing, the kernel stays busy)
        self.on: dict[str, Callable[[Mapping[str, Any]], None]] = {}

    # -- building the kernel's messages ----------------------------------------

    def message(
        self, msg_type: str, content: Mapping[str, Any], parent: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        self.counter += 1
        return {
            "header": {"msg_id": f"kern_7_{self.counter}", "msg_type": msg_type},
            "parent_header": {"msg_id": parent["header"]["msg_id"]} if parent is not None else {},
            "content": dict(content),
            "channel": "shell" if msg_type.endswith("_reply") else "iopub",
        }

    def put(self, *items: Any) -> None:
        self.inbox.extend(items)
        self.arrived.set()

    def run_to_idle(self, request: Mapping[str, Any], text: str = "hi\n", *, status: str = "ok") -> None:
        """What a kernel sends for a request that prints ``text`` and finishes."""
        self.put(*self.started(request), *self.finished(request, text, status=status))

    def started(self, request: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [
            self.message("status", {"execution_state": "busy"}, request),
            self.message("execute_input", {"code": "", "execution_count": 1}, request),
        ]

    def finished(
        self, request: Mapping[str, Any], text: str = "", *, status: str = "ok"
    ) -> list[dict[str, Any]]:
        out = [self.message("stream", {"name": "stdout", "text": text}, request)] if text else []
        reply: dict[str, Any] = {"status": status, "execution_count": 1}
        if status == "error":
            reply.update(ename="KeyboardInterrupt", evalue="", traceback=[])
            out.append(
                self.message("error", {"ename": "KeyboardInterrupt", "evalue": "", "traceback": []}, request)
            )
        out.append(self.message("execute_reply", reply, request))
        out.append(self.message("status", {"execution_state": "idle"}, request))
        return out

    # -- the Transport interface -----------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.open

    async def send(self, message: Mapping[str, Any]) -> None:
        if not self.open:
            raise ChannelLost("closed")
        self.sent.append(dict(message))
        handler = self.on.get(str(msg_type_of(message)))
        if handler is not None:
            handler(message)

    async def receive(self) -> dict[str, Any]:
        while True:
            if not self.open:
                raise ChannelLost("closed")
            if self.inbox:
                item = self.inbox.popleft()
                if item is DROP:
                    self.open = False
                    raise ChannelLost("the connection dropped")
                header = item["header"]["msg_id"]
                self.last_counter = ("kern_7", int(header.rsplit("_", 1)[1]))
                return dict(item)
            self.arrived.clear()
            await self.arrived.wait()

    async def ping(self, timeout: float) -> bool:
        return self.pong and self.open


class ScriptedLink:
    """The kernel session: records what the driver asked of it."""

    def __init__(self, kernel: ScriptedKernel) -> None:
        self.kernel = kernel
        self.running: ExecutionFold | None = None
        self.calls: list[str] = []
        self.why_dead: str | None = None
        self.reconnect_error: Exception | None = None
        self.on_interrupt: Callable[[], bool] = lambda: False  # False: by signal

    kernel_id = "k-1"
    ws_session = "ws-1"
    closing = False

    def dropped(self, why: str) -> None:
        self.calls.append("dropped")

    async def reconnect(self) -> None:
        self.calls.append("reconnect")
        if self.reconnect_error is not None:
            raise self.reconnect_error
        self.kernel.open = True

    async def check_alive(self) -> str | None:
        self.calls.append("check_alive")
        return self.why_dead

    async def interrupt(self) -> bool:
        self.calls.append("interrupt")
        return self.on_interrupt()

    def discard_connection(self, why: str) -> None:
        self.calls.append("discard_connection")

    def replace_soon(self, why: str) -> None:
        self.calls.append("replace_soon")

    def mark_lost(self, why: str) -> None:
        self.calls.append("mark_lost")


def new_run(
    kernel: ScriptedKernel, link: ScriptedLink, timeout: float | None = 5.0, *, grace: float = 0.5
) -> ExecutionRun:
    settings = DriverSettings(liveness_interval=0.2, interrupt_grace=grace)
    return ExecutionRun(link, kernel, ExecutionFold(new_msg_id()), Deadline.after(timeout), settings)


async def drive(run: ExecutionRun) -> list[Any]:
    return [event async for event in run.events("print('hi')")]


@pytest.fixture
def kernel() -> ScriptedKernel:
    return ScriptedKernel()


@pytest.fixture
def link(kernel: ScriptedKernel) -> ScriptedLink:
    return ScriptedLink(kernel)


async def test_a_run_that_finishes_yields_its_output_and_loses_nothing(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    kernel.on["execute_request"] = kernel.run_to_idle
    run = new_run(kernel, link)
    events = await drive(run)
    assert events == [StdoutEvent("hi\n")]
    result = run.fold.result()
    assert result.stdout == "hi\n" and result.lost_messages == 0
    assert link.calls == [] and link.running is None


async def test_a_timeout_interrupts_and_reports_no_loss(kernel: ScriptedKernel, link: ScriptedLink) -> None:
    requests: list[Mapping[str, Any]] = []

    def start(request: Mapping[str, Any]) -> None:
        requests.append(request)
        kernel.put(*kernel.started(request))  # busy until interrupted

    def interrupted_by_signal() -> bool:
        kernel.put(*kernel.finished(requests[0], status="error"))
        return False

    kernel.on["execute_request"] = start
    link.on_interrupt = interrupted_by_signal
    with pytest.raises(ExecutionTimeout) as caught:
        await drive(new_run(kernel, link, timeout=0.3))
    assert caught.value.recovery is RecoveryOutcome.INTERRUPTED
    assert caught.value.result.lost_messages == 0 and not caught.value.result.incomplete
    assert "timed out after 0.3 s" in str(caught.value)
    assert link.calls.count("interrupt") == 1 and "replace_soon" not in link.calls


async def test_a_message_mode_interrupt_takes_a_counter_that_is_not_a_loss(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    requests: list[Mapping[str, Any]] = []
    kernel.on["execute_request"] = lambda request: (
        requests.append(request),
        kernel.put(*kernel.started(request)),
    )

    def interrupted_by_message() -> bool:
        kernel.counter += 1  # the interrupt_reply went to the gateway, not to us
        kernel.put(*kernel.finished(requests[0], status="error"))
        return True

    link.on_interrupt = interrupted_by_message
    with pytest.raises(ExecutionTimeout) as caught:
        await drive(new_run(kernel, link, timeout=0.3))
    assert caught.value.recovery is RecoveryOutcome.INTERRUPTED
    assert caught.value.result.lost_messages == 0


async def test_a_real_gap_is_still_reported(kernel: ScriptedKernel, link: ScriptedLink) -> None:
    def with_a_hole(request: Mapping[str, Any]) -> None:
        messages = kernel.started(request) + kernel.finished(request, "x")
        del messages[2]  # the stream message never arrives
        kernel.put(*messages)

    kernel.on["execute_request"] = with_a_hole
    run = new_run(kernel, link)
    await drive(run)
    assert run.fold.result().lost_messages == 1


async def test_a_kernel_that_ignores_the_interrupt_is_replaced_in_the_background(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    kernel.on["execute_request"] = lambda request: kernel.put(*kernel.started(request))
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(ExecutionTimeout) as caught:
        await drive(new_run(kernel, link, timeout=0.2, grace=0.3))
    assert caught.value.recovery is RecoveryOutcome.REPLACED and caught.value.restarted
    assert link.calls[-1] == "replace_soon"
    assert loop.time() - began < 0.2 + 0.3 + 1.0 + 0.5  # timeout + grace + last look (+ slack)


async def test_no_pong_after_an_ignored_interrupt_means_the_link_not_the_kernel(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    kernel.on["execute_request"] = lambda request: kernel.put(*kernel.started(request))
    kernel.pong = False
    with pytest.raises(ExecutionTimeout) as caught:
        await drive(new_run(kernel, link, timeout=0.2, grace=0.2))
    assert caught.value.recovery is RecoveryOutcome.UNREACHABLE and not caught.value.restarted
    assert "discard_connection" in link.calls and "replace_soon" not in link.calls


async def test_an_unreachable_gateway_at_interrupt_time_keeps_the_kernel(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    kernel.on["execute_request"] = lambda request: kernel.put(*kernel.started(request))

    def unreachable() -> bool:
        raise GatewayUnreachable("connection refused")

    link.on_interrupt = unreachable
    with pytest.raises(ExecutionTimeout) as caught:
        await drive(new_run(kernel, link, timeout=0.2))
    assert caught.value.recovery is RecoveryOutcome.UNREACHABLE
    assert link.calls == ["interrupt", "discard_connection"]


async def test_a_request_lost_with_the_connection_is_sent_again_once(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    attempts: list[Mapping[str, Any]] = []

    def lose_the_first(request: Mapping[str, Any]) -> None:
        attempts.append(request)
        if len(attempts) == 1:
            kernel.put(DROP)  # the request dies with the link: the kernel never saw it
        else:
            kernel.run_to_idle(request)

    def answer_probe(probe: Mapping[str, Any]) -> None:
        kernel.put(
            kernel.message("status", {"execution_state": "busy"}, probe),
            kernel.message("kernel_info_reply", {"status": "ok"}, probe),
            kernel.message("status", {"execution_state": "idle"}, probe),
        )

    kernel.on["execute_request"] = lose_the_first
    kernel.on["kernel_info_request"] = answer_probe
    kernel.put(kernel.message("status", {"execution_state": "idle"}, None))  # seen before the drop
    run = new_run(kernel, link)
    assert await drive(run) == [StdoutEvent("hi\n")]
    assert len(attempts) == 2 and link.calls[:2] == ["dropped", "check_alive"]
    assert "reconnect" in link.calls


async def test_a_request_the_kernel_started_is_never_sent_twice(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    attempts: list[Mapping[str, Any]] = []

    def start_then_drop(request: Mapping[str, Any]) -> None:
        attempts.append(request)
        busy, started = kernel.started(request)
        kernel.put(busy, DROP, started, *kernel.finished(request, "once\n"))  # the rest is replayed

    kernel.on["execute_request"] = start_then_drop
    run = new_run(kernel, link)
    assert await drive(run) == [StdoutEvent("once\n")]
    assert len(attempts) == 1
    assert run.fold.result().lost_messages == 0


async def test_a_link_that_cannot_be_reconnected_ends_in_kernel_died(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    kernel.on["execute_request"] = lambda request: kernel.put(kernel.started(request)[0], DROP)
    link.reconnect_error = GatewayUnreachable("refused")
    with pytest.raises(KernelDied, match="could not reconnect"):
        await drive(new_run(kernel, link))
    assert link.calls.count("reconnect") == 3 and link.calls[-1] == "mark_lost"


async def test_a_kernel_the_gateway_forgot_ends_in_kernel_died(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    kernel.on["execute_request"] = lambda request: kernel.put(kernel.started(request)[0], DROP)
    link.reconnect_error = GatewayNotFound("no such kernel")
    with pytest.raises(KernelDied, match="no longer knows"):
        await drive(new_run(kernel, link))
    assert link.calls[-1] == "mark_lost"


async def test_a_silent_kernel_is_checked_over_rest_and_found_dead(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    kernel.on["execute_request"] = lambda request: kernel.put(*kernel.started(request))
    link.why_dead = "the kernel is dead"
    with pytest.raises(KernelDied, match="the kernel is dead"):
        await drive(new_run(kernel, link))
    assert "check_alive" in link.calls


async def test_a_dead_status_ends_the_run_and_marks_the_kernel_lost(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    kernel.on["execute_request"] = lambda request: kernel.put(
        *kernel.started(request), kernel.message("status", {"execution_state": "dead"}, None)
    )
    with pytest.raises(KernelDied, match="died during the execution"):
        await drive(new_run(kernel, link))
    assert link.calls == ["mark_lost"]


async def test_cancelling_a_run_interrupts_the_kernel_and_keeps_it(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    requests: list[Mapping[str, Any]] = []
    kernel.on["execute_request"] = lambda request: (
        requests.append(request),
        kernel.put(*kernel.started(request)),
    )

    def interrupted() -> bool:
        kernel.put(*kernel.finished(requests[0], status="error"))
        return False

    link.on_interrupt = interrupted
    run = new_run(kernel, link, timeout=None)
    task = asyncio.create_task(drive(run))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert link.calls == ["interrupt"] and run.fold.done and link.running is None


async def test_a_capped_setup_step_names_itself_in_its_timeout(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    kernel.on["execute_request"] = lambda request: kernel.put(*kernel.started(request))
    link.on_interrupt = lambda: False
    settings = DriverSettings(liveness_interval=0.2, interrupt_grace=0.1)
    step = Deadline.after(60).capped(0.2, "defining the host tools")
    run = ExecutionRun(link, kernel, ExecutionFold(new_msg_id()), step, settings, internal=True)
    with pytest.raises(
        ExecutionTimeout, match=r"defining the host tools in the kernel took longer than 0.2 s"
    ):
        await drive(run)


def test_a_deadline_refuses_what_cannot_be_a_timeout() -> None:
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="timeout must be positive"):
            Deadline.after(bad)
    unlimited = Deadline.after(None)
    assert unlimited.seconds() is None and not unlimited.expired
    five = Deadline.after(5)
    assert five.capped(60, "a step") is five  # the caller's deadline comes first: its timeout is named
    step = five.capped(1, "a step")
    assert step.step == "a step" and step.timeout == 1 and step.at < five.at


def test_a_timeout_without_a_number_still_reads_well() -> None:
    from async_modal_exec.deadline import timed_out
    from async_modal_exec.results import ExecutionResult

    error = timed_out(Deadline.after(None), ExecutionResult(), RecoveryOutcome.NOT_STARTED, "file operation")
    assert str(error).startswith("file operation timed out after its deadline; the code never started")


async def test_a_cut_output_says_so_in_the_stream_even_when_the_idle_status_never_comes(
    kernel: ScriptedKernel, link: ScriptedLink
) -> None:
    def reply_but_never_idle(request: Mapping[str, Any]) -> None:
        kernel.put(*kernel.started(request), *kernel.finished(request, "x" * 100)[:-1])  # no idle

    kernel.on["execute_request"] = reply_but_never_idle
    settings = DriverSettings(liveness_interval=5.0, interrupt_grace=0.5)
    fold = ExecutionFold(new_msg_id(), max_output_chars=10)
    run = ExecutionRun(link, kernel, fold, Deadline.after(30), settings)
    events = await drive(run)
    assert isinstance(events[-1], MarkerEvent) and events[-1].truncated_chars == 90
    assert fold.result().stdout.endswith(events[-1].text)
