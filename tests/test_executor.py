"""AsyncExecutor against a real Kernel Gateway on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from async_modal_exec import (
    AsyncExecutor,
    CodeError,
    ExecutionTimeout,
    GatewayBackend,
    GatewayError,
    KernelDied,
    RecoveryOutcome,
)
from async_modal_exec.backends import GatewayEndpoint
from async_modal_exec.errors import ExecutorStateError
from async_modal_exec.results import DisplayEvent, ErrorEvent, ResultEvent, StderrEvent, StdoutEvent
from async_modal_exec.session import KernelState

from .helpers import sleeper, until_running

MakeExecutor = Callable[..., Awaitable[AsyncExecutor]]


async def test_run_returns_output_and_value(executor: AsyncExecutor) -> None:
    result = await executor.run("import sys\nx = 41\nprint('hi')\nprint('warn', file=sys.stderr)\nx + 1")
    assert result.ok
    assert result.stdout == "hi\n"
    assert result.stderr == "warn\n"
    assert result.value is not None and result.value.text == "42"
    # State persists between runs on the same kernel.
    assert (await executor.run("x")).value.text == "41"  # type: ignore[union-attr]


async def test_rich_outputs_all_mime_types_and_images(executor: AsyncExecutor) -> None:
    code = """
import io
from IPython.display import display, HTML
from PIL import Image
buf = io.BytesIO()
Image.new("RGB", (4, 3), "red").save(buf, format="PNG")
display(Image.open(io.BytesIO(buf.getvalue())))
display(HTML("<b>bold</b>"))
class Both:
    def _repr_html_(self): return "<i>html</i>"
    def _repr_json_(self): return {"k": [1, 2]}
    def __repr__(self): return "Both()"
Both()
"""
    result = await executor.run(code)
    assert result.ok, result.error
    images = dict(result.displays[0].images)
    png = images["image/png"]
    assert png.startswith(b"\x89PNG")
    assert result.displays[1].data["text/html"] == "<b>bold</b>"
    assert result.value is not None
    assert result.value.data["text/html"] == "<i>html</i>"
    assert result.value.data["application/json"] == {"k": [1, 2]}
    assert result.value.text == "Both()"
    assert ("image/png", png) in result.images


async def test_matplotlib_figure_comes_back_as_png(executor: AsyncExecutor) -> None:
    result = await executor.run(
        "import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"
    )
    assert result.ok, result.error
    assert result.images and result.images[0][0] == "image/png"


async def test_user_error_keeps_output_printed_before(executor: AsyncExecutor) -> None:
    result = await executor.run("print('step 1 done')\n1/0")
    assert not result.ok
    assert result.stdout == "step 1 done\n"
    assert result.error is not None
    assert result.error.ename == "ZeroDivisionError"
    assert result.error.evalue == "division by zero"
    assert any("1/0" in line for line in result.error.traceback)
    assert not any("\x1b[" in line for line in result.error.traceback)
    with pytest.raises(CodeError) as caught:
        result.raise_for_error()
    assert caught.value.result.stdout == "step 1 done\n"


async def test_syntax_error_is_a_clear_error(executor: AsyncExecutor) -> None:
    result = await executor.run("def broken(:\n    pass")
    assert result.error is not None and result.error.ename == "SyntaxError"


async def test_huge_print_is_capped_with_visible_marker(make_executor: MakeExecutor) -> None:
    executor = await make_executor(max_output_chars=1_000_000)
    result = await executor.run("print('x' * 20_000_000)", timeout=60)
    assert "IOPub data rate" not in result.stdout + result.stderr
    assert result.truncated_chars == 20_000_001 - 1_000_000
    assert result.stdout.startswith("x" * 1_000_000)
    assert f"output truncated, {20_000_001 - 1_000_000} characters dropped" in result.stdout


async def test_huge_print_arrives_whole_without_cap(make_executor: MakeExecutor) -> None:
    executor = await make_executor(max_output_chars=None)
    result = await executor.run("print('y' * 20_000_000)", timeout=60)
    assert result.stdout == "y" * 20_000_000 + "\n"
    assert result.truncated_chars == 0


async def test_large_image_over_one_mebibyte(executor: AsyncExecutor) -> None:
    # websockets' default max_size (1 MiB) would close the connection (1009).
    result = await executor.run(
        "import base64, os\nfrom IPython.display import display\n"
        "blob = b'\\x89PNG' + os.urandom(3_000_000)\n"
        "display({'image/png': base64.b64encode(blob).decode()}, raw=True)\nlen(blob)"
    )
    assert result.ok, result.error
    assert len(result.images[0][1]) == 3_000_004
    assert (await executor.run("1 + 1")).value.text == "2"  # type: ignore[union-attr]


async def test_non_utf8_bytes_on_stdout(executor: AsyncExecutor) -> None:
    # Lone surrogates cannot be encoded as UTF-8: the kernel must replace them,
    # not break the JSON on the websocket. Raw writes to fd 1 must not break anything.
    result = await executor.run(
        "import os, sys\nos.write(1, b'raw \\xff\\xfe end\\n')\n"
        "sys.stdout.write('start ' + b'\\xc3\\x28'.decode('utf-8', 'surrogateescape') + ' end')\nsys.stdout.flush()"
    )
    assert result.ok, result.error
    assert result.stdout.startswith("start ") and result.stdout.endswith(" end")
    assert "\ufffd" in result.stdout
    assert (await executor.run("'still fine'")).value.text == "'still fine'"  # type: ignore[union-attr]


async def test_timeout_interrupts_and_keeps_state(executor: AsyncExecutor) -> None:
    await executor.run("kept = 'yes'")
    started = time.monotonic()
    with pytest.raises(ExecutionTimeout) as caught:
        await executor.run("print('looping', flush=True)\nwhile True: pass", timeout=1.0)
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.restarted is False
    assert "looping" in caught.value.result.stdout
    assert time.monotonic() - started < 10
    assert (await executor.run("kept")).value.text == "'yes'"  # type: ignore[union-attr]


async def test_timeout_restarts_a_kernel_that_ignores_interrupts(make_executor: MakeExecutor) -> None:
    executor = await make_executor(interrupt_grace=1.0)
    await executor.run("lost = 1")
    code = "import time\nwhile True:\n    try:\n        time.sleep(0.05)\n    except KeyboardInterrupt:\n        pass"
    with pytest.raises(ExecutionTimeout) as caught:
        await executor.run(code, timeout=1.0)
    assert caught.value.restarted is True
    assert caught.value.recovery is RecoveryOutcome.REPLACED
    assert "replaced by a fresh kernel" in str(caught.value)
    after = await executor.run("'lost' in dir()", timeout=30)
    assert after.value is not None and after.value.text == "False"


async def test_cancelling_run_interrupts_the_kernel(executor: AsyncExecutor, tmp_path: Path) -> None:
    await executor.run("kept = 7")
    task = asyncio.create_task(executor.run(sleeper(tmp_path / "running")))
    await until_running(tmp_path / "running")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.monotonic()
    result = await executor.run("kept")
    assert time.monotonic() - started < 2, "the kernel was still busy with the cancelled code"
    assert result.value is not None and result.value.text == "7"


async def test_kernel_death_is_reported_and_next_run_gets_fresh_kernel(executor: AsyncExecutor) -> None:
    await executor.run("gone = 1")
    started = time.monotonic()
    with pytest.raises(KernelDied) as caught:
        await executor.run(
            "import os, sys, time\nprint('last words', flush=True)\ntime.sleep(0.3)\nos._exit(1)",
            timeout=30,
        )
    assert time.monotonic() - started < 5
    assert "last words" in caught.value.result.stdout
    result = await executor.run("'gone' in dir()", timeout=30)
    assert result.value is not None and result.value.text == "False"


async def test_kernel_deleted_behind_our_back_gets_replaced(
    executor: AsyncExecutor, gateway: GatewayEndpoint
) -> None:
    from async_modal_exec.gateway import GatewayClient

    old = executor.kernel_id
    assert old is not None
    client = GatewayClient(gateway)
    try:
        await client.delete_kernel(old)
    finally:
        await client.aclose()
    started = time.monotonic()
    with pytest.raises(KernelDied):
        await executor.run("1", timeout=30)
    assert time.monotonic() - started < 10
    result = await executor.run("'new'", timeout=30)
    assert result.value is not None and result.value.text == "'new'"
    assert executor.kernel_id != old


async def test_concurrent_runs_take_turns_in_call_order(executor: AsyncExecutor) -> None:
    await executor.run("order = []")
    codes = [f"import time\ntime.sleep(0.05)\norder.append({i})\n{i}" for i in range(6)]
    results = await asyncio.gather(*(executor.run(code) for code in codes))
    assert [r.value.text for r in results] == [str(i) for i in range(6)]  # type: ignore[union-attr]
    assert (await executor.run("order")).value.text == str(list(range(6)))  # type: ignore[union-attr]


async def test_stream_yields_events_as_they_arrive(executor: AsyncExecutor) -> None:
    code = (
        "import sys, time\nprint('first', flush=True)\ntime.sleep(0.8)\n"
        "print('oops', file=sys.stderr, flush=True)\n"
        "from IPython.display import display, Markdown\ndisplay(Markdown('**md**'))\n'done'"
    )
    started = time.monotonic()
    seen: list[tuple[float, object]] = []
    async for event in executor.stream(code):
        seen.append((time.monotonic() - started, event))
    kinds = [event.kind for _, event in seen]  # type: ignore[attr-defined]
    assert kinds == ["stdout", "stderr", "display", "result"]
    assert isinstance(seen[0][1], StdoutEvent) and seen[0][1].text == "first\n"
    assert isinstance(seen[1][1], StderrEvent)
    assert isinstance(seen[2][1], DisplayEvent) and seen[2][1].output.data["text/markdown"] == "**md**"
    assert isinstance(seen[3][1], ResultEvent) and seen[3][1].output.text == "'done'"
    # The first line arrived long before the execution ended.
    assert seen[-1][0] - seen[0][0] > 0.5


async def test_stream_error_event(executor: AsyncExecutor) -> None:
    events = [event async for event in executor.stream("print('a')\nraise ValueError('bad')")]
    assert isinstance(events[-1], ErrorEvent)
    assert events[-1].error.ename == "ValueError"


async def test_leaving_stream_early_interrupts(executor: AsyncExecutor) -> None:
    await executor.run("kept = 3")
    code = "import time\nfor i in range(100):\n    print(i, flush=True)\n    time.sleep(0.1)"
    async with contextlib.aclosing(executor.stream(code)) as events:  # type: ignore[type-var]
        async for event in events:
            assert isinstance(event, StdoutEvent)
            break
    started = time.monotonic()
    result = await executor.run("kept")
    assert time.monotonic() - started < 2
    assert result.value is not None and result.value.text == "3"


async def test_interrupt_from_another_task(executor: AsyncExecutor, tmp_path: Path) -> None:
    task = asyncio.create_task(executor.run(sleeper(tmp_path / "running")))
    await until_running(tmp_path / "running")
    await executor.interrupt()
    result = await asyncio.wait_for(task, 10)
    assert result.error is not None and result.error.ename == "KeyboardInterrupt"


async def test_restart_loses_state(executor: AsyncExecutor) -> None:
    await executor.run("state = 1")
    old = executor.kernel_id
    await executor.restart()
    assert executor.kernel_id != old  # a brand-new kernel, not the gateway's in-place restart
    result = await executor.run("'state' in dir()")
    assert result.value is not None and result.value.text == "False"


async def test_executions_are_numbered_per_kernel(make_executor: MakeExecutor) -> None:
    # store_history=False (the default): the kernel does not count, the executor does.
    executor = await make_executor()
    counts = [(await executor.run(code)).execution_count for code in ("1", "x = 1", "1 / 0")]
    assert counts == [1, 2, 3]
    events = [event async for event in executor.stream("41 + 1")]
    assert [event.execution_count for event in events if isinstance(event, ResultEvent)] == [4]
    await executor.restart()
    assert (await executor.run("2")).execution_count == 1  # a fresh kernel counts from 1
    # store_history=True: the kernel's own counter, the same numbers.
    counting = await make_executor(store_history=True)
    assert [(await counting.run("1")).execution_count for _ in range(3)] == [1, 2, 3]


async def test_startup_phases_reach_the_progress_callback(gateway: GatewayEndpoint) -> None:
    heard: list[tuple[str, float | None]] = []
    executor = AsyncExecutor(
        GatewayBackend(gateway.base_url, gateway.token), on_progress=lambda *p: heard.append(p)
    )
    async with executor:
        pass
    phases = ["backend", "gateway_ready", "kernel_created"]
    assert [phase for phase, seconds in heard if seconds is None] == phases
    ended = {phase: seconds for phase, seconds in heard if seconds is not None}
    assert list(ended) == phases and all(seconds >= 0 for seconds in ended.values())
    # Each phase starts after the previous one ended.
    assert [p for p, _ in heard] == [p for phase in phases for p in (phase, phase)]


async def test_cancelled_restart_leaves_a_working_executor(executor: AsyncExecutor) -> None:
    await executor.run("state = 1")
    old_kernel = executor.kernel_id
    restart = asyncio.create_task(executor.restart())
    await asyncio.sleep(0.05)  # the replacement is under way (it takes most of a second)
    restart.cancel()
    with pytest.raises(asyncio.CancelledError):
        await restart
    result = await executor.run("print('works')\n'state' in dir()", timeout=60)
    assert result.stdout == "works\n"
    assert result.value is not None and result.value.text == "False"
    assert executor.kernel_id != old_kernel  # replaced; the fixture checks the old one is gone


async def test_failed_kernel_replacement_is_retried_by_the_next_run(
    executor: AsyncExecutor, gateway: GatewayEndpoint
) -> None:
    from async_modal_exec.gateway import GatewayClient

    client = GatewayClient(gateway)
    try:
        await client.delete_kernel(str(executor.kernel_id))  # behind the executor's back
    finally:
        await client.aclose()
    executor._session.kernel_name = "no-such-kernel"  # type: ignore[union-attr]  # its replacement fails
    with pytest.raises(GatewayError):
        await executor.restart()
    executor._session.kernel_name = None  # type: ignore[union-attr]
    result = await executor.run("print('fresh')", timeout=60)
    assert result.stdout == "fresh\n"
    await executor.restart()  # and restart works again
    assert (await executor.run("1 + 1")).value.text == "2"  # type: ignore[union-attr]


async def test_a_failed_delete_leaves_no_second_kernel_behind(
    executor: AsyncExecutor, gateway: GatewayEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    from async_modal_exec.gateway import GatewayClient

    async def refused(self: GatewayClient, kernel_id: str, *, retry_for: float = 10.0) -> None:
        # A gateway failing a delete cannot be provoked on demand: the one
        # mocked boundary of this test (everything else is the real gateway).
        raise GatewayError("DELETE failed with HTTP 500", status=500)

    old = executor.kernel_id
    with monkeypatch.context() as patch:
        patch.setattr(GatewayClient, "delete_kernel", refused)
        with pytest.raises(GatewayError, match="HTTP 500"):
            await executor.restart()
    client = GatewayClient(gateway)
    try:
        assert [kernel["id"] for kernel in await client._json("GET", "/api/kernels")] == [old]
    finally:
        await client.aclose()
    result = await executor.run("'fresh'", timeout=60)  # finishes the replacement
    assert result.value is not None and result.value.text == "'fresh'"
    assert executor.kernel_id != old  # and the fixture checks that no kernel is left


async def test_state_errors(gateway: GatewayEndpoint) -> None:
    executor = AsyncExecutor(GatewayBackend(gateway.base_url, gateway.token))
    assert executor.state == "unopened"
    with pytest.raises(ExecutorStateError, match="not started"):
        await executor.run("1")
    async with executor:
        assert executor.state == "open"
        with pytest.raises(ExecutorStateError):
            await executor.start()
        with pytest.raises(TypeError):
            await executor.run(b"1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            await executor.run("1", timeout=0)
    assert executor.state == "closed"
    with pytest.raises(ExecutorStateError, match="closed"):
        await executor.run("1")
    await executor.aclose()  # twice is harmless


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError):
        AsyncExecutor(GatewayBackend("http://127.0.0.1:1"), timeout=-1)
    with pytest.raises(ValueError):
        AsyncExecutor(GatewayBackend("http://127.0.0.1:1"), interrupt_grace=0)


async def test_dropped_websocket_reconnects_and_replays_missed_output(executor: AsyncExecutor) -> None:
    code = "import time\nfor i in range(6):\n    print(i, flush=True)\n    time.sleep(0.25)\n'end'"
    task = asyncio.create_task(executor.run(code))
    await asyncio.sleep(0.6)
    channel = executor._session.channel  # type: ignore[union-attr]
    assert channel is not None and channel._ws is not None
    channel._ws.transport.abort()  # the connection drops mid-execution
    result = await asyncio.wait_for(task, 30)
    # Same session id on reconnect: the gateway replays what was sent meanwhile.
    assert result.stdout == "".join(f"{i}\n" for i in range(6))
    assert result.value is not None and result.value.text == "'end'"


async def test_aclose_waits_for_the_running_execution_to_let_go(make_executor: MakeExecutor) -> None:
    # Bug from reading: aclose() closed the websocket and deleted the kernel
    # while the execution still ran (here: inside a host-tool call), and
    # returned before it had stopped, against its docstring.
    called = asyncio.Event()

    async def slow_tool(x: int) -> int:
        called.set()
        await asyncio.sleep(1.0)
        return x

    executor = await make_executor(host_tools=[slow_tool])
    running = asyncio.create_task(executor.run("slow_tool(1)"))
    await asyncio.wait_for(called.wait(), 30)
    await asyncio.wait_for(executor.aclose(), 15)
    assert running.done(), "aclose returned while the execution still ran"
    with pytest.raises(ExecutorStateError, match="closed"):
        running.result()


async def test_cancelled_run_of_a_kernel_ignoring_interrupts_returns_within_the_grace(
    make_executor: MakeExecutor, tmp_path: Path
) -> None:
    # A cancelled run never waits for a replacement kernel: it is deferred to the next run.
    executor = await make_executor(interrupt_grace=1.0)
    await executor.run("lost = 1")
    marker = tmp_path / "running"
    code = (
        f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\n"
        "while True:\n    try:\n        time.sleep(0.05)\n    except KeyboardInterrupt:\n        pass"
    )
    running = asyncio.create_task(executor.run(code))
    await until_running(marker)
    began = time.monotonic()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert time.monotonic() - began < 2 * 1.0 + 1.5
    # The kernel is being replaced in the background (no caller waits for it).
    assert executor.kernel_state in (KernelState.LOST, KernelState.CREATING)
    after = await executor.run("'lost' in dir()", timeout=60)
    assert after.value is not None and after.value.text == "False"
    assert executor.kernel_state is KernelState.CONNECTED


async def test_displays_count_toward_the_output_cap(make_executor: MakeExecutor) -> None:
    # 5 images of 0.53 M base64 characters each under a 1 M cap: the first is kept
    # whole, the others shrink to their text/plain; the print after them still fits.
    executor = await make_executor(max_output_chars=1_000_000)
    code = (
        "import base64, os\nfrom IPython.display import display\n"
        "b64 = base64.b64encode(b'\\x89PNG' + os.urandom(400_000)).decode()\n"
        "for i in range(5):\n    display({'image/png': b64, 'text/plain': f'<image {i}>'}, raw=True)\n"
        "print('done')\nlen(b64)"
    )
    result = await executor.run(code, timeout=60)
    assert result.ok, result.error
    b64_chars = 4 * -(-400_004 // 3)
    assert len(result.images) == 1 and len(result.images[0][1]) == 400_004
    assert [d.text for d in result.displays] == [f"<image {i}>" for i in range(5)]
    assert [d.truncated for d in result.displays] == [False, True, True, True, True]
    assert result.value is not None and result.value.text == str(b64_chars)
    assert result.truncated_chars == 4 * b64_chars
    assert result.stdout.startswith("done\n")
    assert f"output truncated, {4 * b64_chars} characters dropped; 4 rich outputs cut to text/plain" in (
        result.stdout
    )


async def test_lone_surrogates_arrive_as_replacement_characters(executor: AsyncExecutor) -> None:
    # A lone surrogate cannot be encoded as UTF-8: the kernel used to fail to
    # send the whole stream message (the line vanished, a traceback went to stderr).
    result = await executor.run(
        "print('before')\nprint('x\\ud800y')\nprint('after')\n"
        "from IPython.display import display\ndisplay({'text/plain': 'd\\udbffe'}, raw=True)\n"
        "'v\\udfff'"
    )
    assert result.ok, result.error
    assert result.stdout == "before\nx\ufffdy\nafter\n"
    assert result.stderr == ""
    assert result.displays[0].text == "d\ufffde"
    assert result.value is not None and result.value.text == "'v\\udfff'"  # repr() escapes it already
    # Stderr too, and nothing the launcher set up is visible in the user's namespace.
    result = await executor.run(
        "import sys\nprint('e\\ud800', file=sys.stderr)\n"
        "[n for n in ('_install', 'pack', 'clean', 'lone', 'original', 'session', 'exc') if n in dir()]"
    )
    assert result.stderr == "e\ufffd\n"
    assert result.value is not None and result.value.text == "[]"


async def test_output_of_a_thread_goes_to_the_cell_that_started_it(executor: AsyncExecutor) -> None:
    # ipykernel 7 keeps the parent header in context variables, which new threads
    # do not inherit: a thread's late print fell back to whichever cell was running.
    started = await executor.run(
        "import threading, time\n"
        "def late():\n    time.sleep(0.5)\n    print('late', flush=True)\n"
        "threading.Thread(target=late).start()\n'started'"
    )
    assert started.stdout == ""
    later = await executor.run("import time\ntime.sleep(1)\nprint('b')")
    assert later.stdout == "b\n"
    # While its cell still runs, a thread's output (and a pool worker's) belongs to it.
    both = await executor.run(
        "import threading\nfrom concurrent.futures import ThreadPoolExecutor\n"
        "pool = ThreadPoolExecutor(1)\n"
        "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
        "pool.submit(print, 'pool 1').result()"
    )
    assert both.stdout == "thread\npool 1\n"
    # A pool worker started by an earlier cell prints for the cell that submitted the work.
    reused = await executor.run("pool.submit(print, 'pool 2').result()\npool.shutdown()")
    assert reused.stdout == "pool 2\n"
