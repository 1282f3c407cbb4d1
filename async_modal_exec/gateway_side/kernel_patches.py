"""Patches that run inside IPython kernels: this module is shipped to each kernel as text.

:mod:`.kernel_code` reads this source through the loaded package and runs it
in the kernel in a namespace of its own (the user's sees nothing): through the
kernel's ``exec_lines``, :func:`tune` (the first three below), and through the
``python -c`` bootstrap, :func:`launch` (the last).

* :func:`surrogate_safe_pack`: a lone surrogate in output arrives as U+FFFD.
* :func:`thread_parents`: a thread's output belongs to the cell that started it.
* :func:`stream_order`: stdout and stderr arrive in the order they were written.
* :func:`lossless_iopub`: no IOPub send high-water mark; every subscription reported.

Each takes what it patches as arguments (by default the running kernel's
objects, or the standard library's classes), so tests apply it to fakes or to
real ipykernel objects in-process. Where those internals differ from what a
patch expects, it changes nothing, writes one line on stderr and returns
False: the kernel keeps its stock behaviour.

Standard library only at import; ipykernel and zmq are imported by the
functions that need them, in the kernel.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["launch", "lossless_iopub", "stream_order", "surrogate_safe_pack", "thread_parents", "tune"]

# The context variables ipykernel 7 keeps a request's parent header in.
_PARENT_VARIABLES = frozenset({"parent_header", "shell_parent", "shell_parent_ident"})


def _guarded(install: Callable[[], None], fallback: str, err: TextIO | None) -> bool:
    try:
        install()
    except Exception as exc:
        # sys.__stderr__: the kernel process's own, never the running cell's output.
        print(f"async_modal_exec: {fallback}: {exc!r}", file=err if err is not None else sys.__stderr__)
        return False
    return True


def _kernel_app_class() -> type[Any]:
    from ipykernel.kernelapp import IPKernelApp

    return IPKernelApp


def _out_stream_class() -> type[Any]:
    from ipykernel.iostream import OutStream

    return OutStream


def surrogate_safe_pack(session: Any = None, *, err: TextIO | None = None) -> bool:
    """Wrap ``session.pack`` (default: the running kernel app's session) to survive lone surrogates.

    jupyter_client packs messages as UTF-8 with ``surrogateescape``, which
    fails for a lone surrogate outside U+DC80-U+DCFF (``print('x\\ud800y')``):
    the whole stream message was lost, a traceback went to stderr, and a
    display raised UnicodeEncodeError in the user's code. Only when that
    happens, the message is packed again with every lone surrogate replaced by
    U+FFFD, which is also what the client makes of the bytes surrogateescape
    produces.
    """

    def install() -> None:
        import re

        target = session if session is not None else _kernel_app_class().instance().session
        original = target.pack
        lone = re.compile("[\ud800-\udfff]")

        def clean(obj: Any) -> Any:
            if isinstance(obj, str):
                return lone.sub("\ufffd", obj)
            if isinstance(obj, dict):
                return {clean(key): clean(value) for key, value in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [clean(value) for value in obj]
            return obj

        def pack(obj: Any) -> Any:
            try:
                return original(obj)
            except UnicodeEncodeError:
                return original(clean(obj))

        target.pack = pack

    return _guarded(install, "lone surrogates stay unsafe in this kernel", err)


def thread_parents(
    thread_class: type[Any] | None = None, pool_class: type[Any] | None = None, *, err: TextIO | None = None
) -> bool:
    """Threads (default ``threading.Thread``) and pool jobs (``ThreadPoolExecutor``) keep their parent.

    ipykernel 7 keeps the parent header (the request that output belongs to)
    in context variables, and a new thread starts with an empty context: its
    output fell back to whichever cell was current, so a thread started by
    cell A that printed after A ended showed up in cell B's result. Here a
    thread takes the parent of the code that starts it, and a pool job the
    parent of the code that submits it (a worker started for one cell is
    reused by later ones). Only ipykernel's variables are carried (by name),
    nothing else of the starter's context.
    """

    def install() -> None:
        import contextvars
        import threading
        from concurrent.futures import ThreadPoolExecutor

        threads: type[Any] = thread_class if thread_class is not None else threading.Thread
        pools: type[Any] = pool_class if pool_class is not None else ThreadPoolExecutor

        def parents() -> list[tuple[contextvars.ContextVar[Any], Any]]:
            context = contextvars.copy_context()
            return [(var, value) for var, value in context.items() if var.name in _PARENT_VARIABLES]

        thread_start = threads.start

        def start(self: Any, *args: Any, **kwargs: Any) -> Any:
            inherited = parents()
            if inherited:
                run = self.run

                def run_with_parent() -> None:
                    try:
                        for var, value in inherited:
                            var.set(value)
                        run()
                    finally:
                        self.__dict__.pop("run", None)  # no thread -> closure -> thread cycle left

                self.run = run_with_parent
            return thread_start(self, *args, **kwargs)

        pool_submit = pools.submit

        def submit(self: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
            inherited = parents()
            if not inherited:
                return pool_submit(self, fn, *args, **kwargs)

            def call(*args: Any, **kwargs: Any) -> Any:
                tokens = [(var, var.set(value)) for var, value in inherited]
                try:
                    return fn(*args, **kwargs)
                finally:
                    for var, token in reversed(tokens):
                        var.reset(token)

            return pool_submit(self, call, *args, **kwargs)

        threads.start = start
        pools.submit = submit

    return _guarded(install, "thread output keeps ipykernel's routing", err)


def stream_order(
    out_stream: type[Any] | None = None, streams: Any = sys, *, err: TextIO | None = None
) -> bool:
    """``out_stream`` (default ipykernel's ``OutStream``) flushes the other stream before its own.

    ipykernel buffers stdout and stderr apart and sends each on its own timer,
    so ``print("a"); print("b", file=sys.stderr); print("c")`` arrived as
    "a c" then "b". Here, when a write to one stream asks for its flush, the
    other stream's pending text is sent first (a flush, which waits for the IO
    thread: only when the code switches streams with output pending), so the
    order on IOPub is the order of the writes. The hook is the flush request,
    not ``write``: IPython wraps each stream's ``write`` per cell. ``streams``:
    where the current ``stdout`` and ``stderr`` are looked up at each write.
    """

    def install() -> None:
        stream_class = out_stream if out_stream is not None else _out_stream_class()
        schedule = stream_class._schedule_flush

        def schedule_after_the_other(self: Any) -> None:
            stdout, stderr = streams.stdout, streams.stderr
            other = stderr if self is stdout else stdout if self is stderr else None
            if isinstance(other, stream_class) and other is not self and other._flush_pending:
                other.flush()
            schedule(self)

        stream_class._schedule_flush = schedule_after_the_other

    return _guarded(install, "stdout and stderr keep ipykernel's order", err)


def lossless_iopub(
    app_class: type[Any] | None = None, options: dict[int, int] | None = None, *, err: TextIO | None = None
) -> bool:
    """``app_class.init_iopub`` (default ``IPKernelApp``) makes its sockets with ``options``.

    Default options: no send high-water mark (``SNDHWM`` 0) and every
    subscription reported (``XPUB_VERBOSE``). At the default mark (1000
    messages queued for a subscriber) a burst of output, e.g. 20,000 flushed
    prints, overflowed the IOPub socket and ZeroMQ dropped messages without a
    word. The price: output a subscriber cannot take yet waits in memory (the
    gateway reads eagerly, so it waits in the gateway). ipykernel greets each
    new subscriber with an ``iopub_welcome`` message, which tells a gateway's
    websocket that its subscription is live (with only the first reported, a
    gateway's second subscriber was never greeted and waited for its 0.5 s
    retry).
    """

    def install() -> None:
        target = app_class if app_class is not None else _kernel_app_class()
        chosen = options
        if chosen is None:
            import zmq

            chosen = {zmq.SNDHWM: 0, zmq.XPUB_VERBOSE: 1}
        init_iopub = target.init_iopub

        def init_lossless_iopub(self: Any, context: Any) -> Any:
            # Options of the sockets made in init_iopub only (pyzmq skips those a
            # socket type lacks): set before the IOPub socket binds, and before its
            # thread runs. Sockets made later (the per-thread event pipes, whose
            # limit makes a printing thread wait) keep the defaults.
            context.sockopts.update(chosen)
            try:
                return init_iopub(self, context)
            finally:
                for option in chosen:
                    context.sockopts.pop(option, None)

        target.init_iopub = init_lossless_iopub

    return _guarded(install, "IOPub keeps its stock limits in this kernel", err)


def tune() -> None:
    """Run in the kernel at start (``exec_lines``): the three output patches, on its own objects."""
    surrogate_safe_pack()
    thread_parents()
    stream_order()


def launch() -> None:
    """Start an IPython kernel as ``-m ipykernel_launcher`` does, with :func:`lossless_iopub` first."""
    lossless_iopub()
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()
