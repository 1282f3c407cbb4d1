"""The kernel patches in process: each on fakes or real ipykernel objects, their fallbacks, their shipping.

:mod:`async_modal_exec.gateway_side.kernel_patches` runs in IPython kernels;
here its functions patch subclasses and fakes (never the process's own
classes, but in the tests of the shipped lines, which put them back).
"""

from __future__ import annotations

import ast
import contextvars
import importlib
import io
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq
from jupyter_client.session import Session

from async_modal_exec import launcher
from async_modal_exec.gateway_side import kernel_code, kernel_patches
from async_modal_exec.gateway_side.bootstrap import load_from_sources
from async_modal_exec.gateway_side.kernel_patches import (
    lossless_iopub,
    stream_order,
    surrogate_safe_pack,
    thread_parents,
)

PARENT = contextvars.ContextVar[Any]("parent_header")
OTHER = contextvars.ContextVar[Any]("not_ipykernels")


def _one_fallback_line(err: io.StringIO, says: str) -> None:
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"async_modal_exec: {says}: "), lines


# -- surrogate_safe_pack ---------------------------------------------------------------------


def test_a_real_session_packs_lone_surrogates_as_replacement_characters() -> None:
    session = Session(key=b"")
    message = {"text": "x\ud800y", "list": ["\udbff", ("\udfff",)], "key\ud800": 1}
    with pytest.raises(UnicodeEncodeError):
        session.pack(message)
    assert surrogate_safe_pack(session)
    assert json.loads(session.pack(message)) == {
        "text": "x\ufffdy",
        "list": ["\ufffd", ["\ufffd"]],
        "key\ufffd": 1,
    }
    # What packed before packs as before (surrogateescape's range included), no copy made.
    assert json.loads(session.pack({"a": "\udc80"}).decode("utf8", "surrogateescape")) == {"a": "\udc80"}


def test_surrogate_safe_pack_falls_back_where_the_session_differs() -> None:
    err = io.StringIO()
    assert not surrogate_safe_pack(SimpleNamespace(), err=err)
    _one_fallback_line(err, "lone surrogates stay unsafe in this kernel")


def test_the_fallback_line_goes_to_the_process_stderr_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", err)
    assert not surrogate_safe_pack(SimpleNamespace())
    _one_fallback_line(err, "lone surrogates stay unsafe in this kernel")


# -- thread_parents --------------------------------------------------------------------------


def _classes() -> tuple[type[threading.Thread], type[ThreadPoolExecutor]]:
    class Thread(threading.Thread):
        pass

    class Pool(ThreadPoolExecutor):
        pass

    return Thread, Pool


def _seen() -> tuple[Any, Any]:
    return PARENT.get(None), OTHER.get(None)


def test_a_thread_takes_the_parent_of_the_code_that_starts_it() -> None:
    Thread, Pool = _classes()
    assert thread_parents(Thread, Pool)

    def cell() -> None:
        PARENT.set("cell A")
        OTHER.set("not carried")
        seen: list[tuple[Any, Any]] = []
        thread = Thread(target=lambda: seen.append(_seen()))
        thread.start()
        thread.join()
        assert seen == [("cell A", None)]  # only ipykernel's variables (by name)
        assert "run" not in thread.__dict__  # no thread -> closure -> thread cycle left
        stock = threading.Thread(target=lambda: seen.append(_seen()))  # the stock class: untouched
        stock.start()
        stock.join()
        assert seen[-1] == (None, None)

    contextvars.copy_context().run(cell)


def test_a_pool_job_takes_the_parent_of_the_code_that_submits_it() -> None:
    Thread, Pool = _classes()
    assert thread_parents(Thread, Pool)
    with Pool(max_workers=1) as pool:

        def cell(parent: str) -> Any:
            PARENT.set(parent)
            return pool.submit(_seen).result()

        assert contextvars.copy_context().run(cell, "cell A") == ("cell A", None)
        # The worker started for cell A serves cell B with B's parent, and keeps none after.
        assert contextvars.copy_context().run(cell, "cell B") == ("cell B", None)
        assert contextvars.Context().run(lambda: pool.submit(_seen).result()) == (None, None)


def test_thread_parents_falls_back_and_changes_nothing_where_the_classes_differ() -> None:
    Thread, _ = _classes()
    err = io.StringIO()
    assert not thread_parents(Thread, type("NoSubmit", (), {}), err=err)
    assert "start" not in Thread.__dict__
    _one_fallback_line(err, "thread output keeps ipykernel's routing")


# -- stream_order ----------------------------------------------------------------------------


class _FakeOutStream:
    """What stream_order relies on in ipykernel's OutStream: a flush request, a pending flag, flush."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log, self._flush_pending = name, log, False

    def _schedule_flush(self) -> None:
        self.log.append(f"schedule {self.name}")
        self._flush_pending = True

    def flush(self) -> None:
        self.log.append(f"flush {self.name}")
        self._flush_pending = False

    def write(self, text: str) -> None:
        self._schedule_flush()


def test_a_write_to_one_stream_sends_the_others_pending_text_first() -> None:
    class OutStream(_FakeOutStream):
        pass

    log: list[str] = []
    out, err, other = OutStream("out", log), OutStream("err", log), OutStream("other", log)
    streams = SimpleNamespace(stdout=out, stderr=err)
    assert stream_order(OutStream, streams)
    out.write("a")
    out.write("a")  # the same stream: nothing else to send first
    err.write("b")
    out.write("c")
    other.write("d")  # neither stdout nor stderr: no flush
    assert log == [
        "schedule out",
        "schedule out",
        "flush out",
        "schedule err",
        "flush err",
        "schedule out",
        "schedule other",
    ]
    # A stderr that is not such a stream (replaced by the user) is left alone.
    log.clear()
    streams.stderr = _FakeOutStream("plain", log)
    streams.stderr._flush_pending = True
    out.write("e")
    assert log == ["schedule out"]


def test_stream_order_falls_back_where_the_stream_class_differs() -> None:
    err = io.StringIO()
    assert not stream_order(type("NoScheduleFlush", (), {}), err=err)
    _one_fallback_line(err, "stdout and stderr keep ipykernel's order")


# -- lossless_iopub --------------------------------------------------------------------------


def test_init_iopub_makes_its_sockets_without_a_high_water_mark() -> None:
    context = zmq.Context()
    marks: list[int] = []

    class App:
        def init_iopub(self, context: zmq.Context[Any]) -> str:
            with context.socket(zmq.XPUB) as socket:
                marks.append(socket.getsockopt(zmq.SNDHWM))
            return "made"

    try:
        assert lossless_iopub(App)
        assert App().init_iopub(context) == "made"
        with context.socket(zmq.XPUB) as later:  # sockets made later keep the defaults
            marks.append(later.getsockopt(zmq.SNDHWM))
        assert marks == [0, 1000]
        assert context.sockopts == {}
    finally:
        context.term()


def test_the_options_are_taken_back_when_init_iopub_fails() -> None:
    class App:
        def init_iopub(self, context: Any) -> None:
            assert context.sockopts == {1: 0, 2: 1, 3: 3}
            raise OSError("bind")

    assert lossless_iopub(App, {1: 0, 2: 1})
    context = SimpleNamespace(sockopts={3: 3})
    with pytest.raises(OSError, match="bind"):
        App().init_iopub(context)
    assert context.sockopts == {3: 3}


def test_lossless_iopub_falls_back_where_the_app_differs() -> None:
    err = io.StringIO()
    assert not lossless_iopub(type("NoInitIopub", (), {}), err=err)
    _one_fallback_line(err, "IOPub keeps its stock limits in this kernel")


# -- shipping --------------------------------------------------------------------------------


def _shipped(line: str, call: str) -> None:
    """``line`` is exec(compile(<this module's source + call>, ...), {...}): one line, the file's text."""
    assert "\n" not in line
    (statement,) = ast.parse(line).body
    assert isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)
    (compiled, namespace) = statement.value.args
    assert isinstance(compiled, ast.Call) and isinstance(compiled.args[0], ast.Constant)
    source = Path(kernel_patches.__file__).read_text()
    assert compiled.args[0].value == f"{source}\n{call}\n"
    assert ast.literal_eval(namespace) == {"__name__": "_async_modal_exec_kernel_patches"}


def test_the_tuning_line_runs_the_three_patches_and_binds_no_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipykernel.iostream import OutStream
    from ipykernel.kernelapp import IPKernelApp

    # Put back after the test whatever the line replaces.
    monkeypatch.setattr(threading.Thread, "start", threading.Thread.start)
    monkeypatch.setattr(ThreadPoolExecutor, "submit", ThreadPoolExecutor.submit)
    monkeypatch.setattr(OutStream, "_schedule_flush", OutStream._schedule_flush)
    app = SimpleNamespace(session=Session(key=b""))
    monkeypatch.setattr(IPKernelApp, "instance", lambda: app)
    line = kernel_code.KERNEL_TUNING_ARGS[0].removeprefix("--IPKernelApp.exec_lines=")
    _shipped(line, "tune()")
    user: dict[str, Any] = {}
    err = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", err)
    exec(line, user)
    assert list(user) == ["__builtins__"]
    assert err.getvalue() == ""
    assert json.loads(app.session.pack({"text": "\ud800"})) == {"text": "\ufffd"}
    for cls, name in [
        (threading.Thread, "start"),
        (ThreadPoolExecutor, "submit"),
        (OutStream, "_schedule_flush"),
    ]:
        assert vars(cls)[name].__module__ == "_async_modal_exec_kernel_patches", name
    assert kernel_code.KERNEL_TUNING_ARGS[1:] == ("--Kernel._execute_sleep=0",)


def test_the_bootstrap_drops_the_working_directory_tunes_iopub_and_launches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ipykernel import kernelapp

    launched: list[bool] = []
    monkeypatch.setattr(kernelapp, "launch_new_instance", lambda: launched.append(True))
    monkeypatch.setattr(kernelapp.IPKernelApp, "init_iopub", kernelapp.IPKernelApp.init_iopub)
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    prefix, line, end = kernel_code.KERNEL_BOOTSTRAP.rsplit("\n", 2)
    assert end == "" and compile(prefix, "<prefix>", "exec")
    _shipped(line, "launch()")
    main: dict[str, Any] = {}  # python -c's __main__ (not the user's namespace: IPython makes that)
    exec(kernel_code.KERNEL_BOOTSTRAP, main)
    assert sorted(main) == ["__builtins__", "sys"]
    assert launched == [True]
    assert sys.path[0] != ""
    assert vars(kernelapp.IPKernelApp)["init_iopub"].__module__ == "_async_modal_exec_kernel_patches"


def test_the_lines_are_the_same_from_shipped_sources() -> None:
    name = "_test_kernel_patches_shipped"
    package = load_from_sources(launcher.gateway_side_sources(), name=name)
    try:
        shipped = importlib.import_module(package.__name__ + ".kernel_code")
        assert shipped.KERNEL_BOOTSTRAP == kernel_code.KERNEL_BOOTSTRAP
        assert shipped.KERNEL_TUNING_ARGS == kernel_code.KERNEL_TUNING_ARGS
        loader = sys.modules[name + ".kernel_patches"].__spec__.loader
        with pytest.raises(ImportError):
            loader.get_source(name + ".not_shipped")
    finally:
        for module in list(sys.modules):
            if module.startswith(name):
                del sys.modules[module]
        sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "name", None) != name]
