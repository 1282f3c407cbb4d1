"""Code the gateway side runs in IPython kernels: a bootstrap and three start-up snippets.

The kernel spec manager (:mod:`.patches`) starts IPython kernels through
:data:`KERNEL_BOOTSTRAP` with :data:`KERNEL_TUNING_ARGS`; other kernel specs
are left alone. Each snippet is text run in the kernel (its own namespace:
the user's sees nothing), and keeps the kernel's stock behaviour, with a line
on its stderr, where the kernel's internals differ from what it patches.
Standard library only.
"""

from __future__ import annotations

__all__ = [
    "KERNEL_BOOTSTRAP",
    "KERNEL_TUNING_ARGS",
    "STREAM_ORDER",
    "SURROGATE_SAFE_PACK",
    "THREAD_PARENTS",
    "bootstrapped",
    "runs_ipykernel",
]

# Runs in the kernel at start (``exec_lines``, in a namespace of its own, so the
# user's sees nothing). jupyter_client packs messages as UTF-8 with
# ``surrogateescape``, which fails for a lone surrogate outside U+DC80-U+DCFF
# (``print('x\ud800y')``): the whole stream message was lost, a traceback went to
# stderr, and a display raised UnicodeEncodeError in the user's code. Only when
# that happens, the message is packed again with every lone surrogate replaced
# by U+FFFD, which is also what the client makes of the bytes surrogateescape
# produces. Kernels whose internals differ keep their stock behaviour.
SURROGATE_SAFE_PACK = r"""
def _install():
    import re
    from ipykernel.kernelapp import IPKernelApp

    session = IPKernelApp.instance().session
    original = session.pack
    lone = re.compile("[\ud800-\udfff]")

    def clean(obj):
        if isinstance(obj, str):
            return lone.sub("\ufffd", obj)
        if isinstance(obj, dict):
            return {clean(key): clean(value) for key, value in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(value) for value in obj]
        return obj

    def pack(obj):
        try:
            return original(obj)
        except UnicodeEncodeError:
            return original(clean(obj))

    session.pack = pack

try:
    _install()
except Exception as exc:
    import sys
    print(f"async_modal_exec: lone surrogates stay unsafe in this kernel: {exc!r}", file=sys.__stderr__)
"""

# Also runs in the kernel at start. ipykernel 7 keeps the parent header (the
# request that output belongs to) in context variables, and a new thread starts
# with an empty context: its output fell back to whichever cell was current, so
# a thread started by cell A that printed after A ended showed up in cell B's
# result. Here a thread takes the parent of the code that starts it, and a
# ThreadPoolExecutor job the parent of the code that submits it (a worker
# started for one cell is reused by later ones). Only ipykernel's variables are
# carried (by name), nothing else of the starter's context.
THREAD_PARENTS = r"""
def _install():
    import contextvars
    import threading
    from concurrent.futures import ThreadPoolExecutor

    names = frozenset({"parent_header", "shell_parent", "shell_parent_ident"})

    def parents():
        return [(var, value) for var, value in contextvars.copy_context().items() if var.name in names]

    thread_start = threading.Thread.start

    def start(self, *args, **kwargs):
        inherited = parents()
        if inherited:
            run = self.run

            def run_with_parent():
                try:
                    for var, value in inherited:
                        var.set(value)
                    run()
                finally:
                    self.__dict__.pop("run", None)  # no thread -> closure -> thread cycle left

            self.run = run_with_parent
        return thread_start(self, *args, **kwargs)

    pool_submit = ThreadPoolExecutor.submit

    def submit(self, fn, /, *args, **kwargs):
        inherited = parents()
        if not inherited:
            return pool_submit(self, fn, *args, **kwargs)

        def call(*args, **kwargs):
            tokens = [(var, var.set(value)) for var, value in inherited]
            try:
                return fn(*args, **kwargs)
            finally:
                for var, token in reversed(tokens):
                    var.reset(token)

        return pool_submit(self, call, *args, **kwargs)

    threading.Thread.start = start
    ThreadPoolExecutor.submit = submit

try:
    _install()
except Exception as exc:
    import sys
    print(f"async_modal_exec: thread output keeps ipykernel's routing: {exc!r}", file=sys.__stderr__)
"""

# Also runs in the kernel at start. ipykernel buffers stdout and stderr apart and
# sends each on its own timer, so `print("a"); print("b", file=sys.stderr);
# print("c")` arrived as "a c" then "b". Here, when a write to one stream asks
# for its flush, the other stream's pending text is sent first (a flush, which
# waits for the IO thread: only when the code switches streams with output
# pending), so the order on IOPub is the order of the writes. The hook is the
# flush request, not ``write``: IPython wraps each stream's ``write`` per cell.
STREAM_ORDER = r"""
def _install():
    import sys
    from ipykernel.iostream import OutStream

    schedule = OutStream._schedule_flush

    def schedule_after_the_other(self):
        other = sys.stderr if self is sys.stdout else sys.stdout if self is sys.stderr else None
        if isinstance(other, OutStream) and other is not self and other._flush_pending:
            other.flush()
        schedule(self)

    OutStream._schedule_flush = schedule_after_the_other

try:
    _install()
except Exception as exc:
    import sys
    print(f"async_modal_exec: stdout and stderr keep ipykernel's order: {exc!r}", file=sys.__stderr__)
"""

# Runs an IPython kernel in place of ``-m ipykernel_launcher`` (same start, and
# like it, the working directory does not shadow modules). The kernel's IOPub
# socket gets no send high-water mark: at the default (1000 messages queued
# for a subscriber) a burst of output, e.g. 20,000 flushed prints, overflowed
# it and ZeroMQ dropped messages without a word. The price: output a
# subscriber cannot take yet waits in memory (the gateway reads eagerly, so
# it waits in the gateway). And the socket reports every subscription, not
# only the first: ipykernel greets each new subscriber with an ``iopub_welcome``
# message, which tells a gateway's websocket that its subscription is live
# (with only the first reported, a gateway's second subscriber was never
# greeted and waited for its 0.5 s retry).
KERNEL_BOOTSTRAP = r"""
import sys

if sys.path and sys.path[0] == "":
    del sys.path[0]


def _install():
    import zmq
    from ipykernel.kernelapp import IPKernelApp

    init_iopub = IPKernelApp.init_iopub

    def init_lossless_iopub(self, context):
        # Options of the sockets made in init_iopub only (pyzmq skips those a
        # socket type lacks): set before the IOPub socket binds, and before its
        # thread runs. Sockets made later (the per-thread event pipes, whose
        # limit makes a printing thread wait) keep the defaults.
        options = {zmq.SNDHWM: 0, zmq.XPUB_VERBOSE: 1}
        context.sockopts.update(options)
        try:
            init_iopub(self, context)
        finally:
            for option in options:
                context.sockopts.pop(option, None)

    IPKernelApp.init_iopub = init_lossless_iopub


try:
    _install()
except Exception as exc:
    print(f"async_modal_exec: IOPub keeps its stock limits in this kernel: {exc!r}", file=sys.stderr)

from ipykernel import kernelapp

kernelapp.launch_new_instance()
"""

KERNEL_TUNING_ARGS = (
    "--IPKernelApp.exec_lines="
    f"exec({SURROGATE_SAFE_PACK!r}, {{}}); exec({THREAD_PARENTS!r}, {{}}); exec({STREAM_ORDER!r}, {{}})",
    "--Kernel._execute_sleep=0",
)


def runs_ipykernel(argv: list[str]) -> bool:
    return any(part in ("ipykernel", "ipykernel_launcher") for part in argv)


def bootstrapped(argv: list[str]) -> list[str]:
    """``argv`` with ``-m ipykernel_launcher`` (or ``-m ipykernel``) run through :data:`KERNEL_BOOTSTRAP`."""
    for index in range(len(argv) - 1):
        if argv[index] == "-m" and argv[index + 1] in ("ipykernel_launcher", "ipykernel"):
            return [*argv[:index], "-c", KERNEL_BOOTSTRAP, *argv[index + 2 :]]
    return list(argv)
