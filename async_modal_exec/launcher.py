"""Kernel Gateway launcher, tuned for low latency and whole outputs.

This file is self-contained on purpose: it imports nothing from ``async_modal_exec``
so it can run inside a sandbox whose image has only ``jupyter_kernel_gateway`` and
``ipykernel``, either as ``python -m async_modal_exec.launcher`` or with its source
passed to ``python -c``.

What it changes compared with ``jupyter kernelgateway``:

* ``TCP_NODELAY`` on every kernel websocket. Tornado leaves Nagle's algorithm on,
  and the kernel's small replies then wait for delayed ACKs: about 43 ms added to
  every execution.
* The IOPub data-rate limit is lifted (``iopub_data_rate_limit=0``): the stock
  limit silently replaces big outputs by a notice. The client applies its own,
  visible cap instead.
* Kernels talk ZMQ over Unix sockets (``transport=ipc``) in a private runtime
  directory, which removes the port race between kernels of gateways started at
  the same time and shaves latency.
* The kernel restarter polls faster, so a kernel that dies is reported sooner.
* The gateway's IOPub activity watcher (it keeps ``execution_state`` and
  ``last_activity`` of every kernel) reads only the parts it needs and checks
  no signature. The stock one fully deserializes every output message,
  parsing its dates with dateutil, and content twice for status messages:
  about a fifth of the gateway's CPU time per execution. On IPython kernels
  it subscribes only to the ``kernel.`` topics (status and the like), so big
  outputs are not sent to the gateway twice.
* Nothing is dropped on IOPub: no high-water mark on the kernel's IOPub
  socket (:data:`KERNEL_BOOTSTRAP`) nor on the gateway's sockets. At the
  default (1000 queued messages) bursts of output lost messages silently.
* Up to ``--max-sockets`` ZeroMQ sockets (default 16384, libzmq's own is
  1023: about 170 kernels) and the soft open-file limit raised to the hard
  one. A kernel whose start fails is stopped (jupyter_client forgot its
  process), and stopping the gateway shuts down every kernel even when
  some were deleted meanwhile (the stock stop gave up at the first 404 and
  the gateway never exited).
* Messages between the gateway and its kernels are not signed when they
  use IPC and the runtime directory is ``0700`` and ours (``--sign-messages``
  to sign anyway): the
  key lies next to the IPC sockets, readable by exactly who can reach them
  (see ``docs/security.md``). Signing cost the kernel a fifth of its CPU for
  big outputs.
* Binary (v1) websocket frames are written in pieces, the message parts not
  copied into one buffer and then into the frame.
* The gateway starts in about 0.4 s instead of 1.3 s: ``rfc3987_syntax``,
  whose grammar ``jsonschema`` builds at import, is not imported. Kernel
  sockets retry connecting every 10 ms (ZeroMQ's default is 100 ms), and
  a websocket's check that IOPub is live ends at the kernel's greeting
  (no 0.5 s retry in a third of the kernel starts).
* IPython kernels start with ``--Kernel._execute_sleep=0`` and three snippets in
  ``exec_lines``: :data:`SURROGATE_SAFE_PACK` (a lone surrogate in output,
  ``print('x\\ud800y')``, arrives as U+FFFD instead of losing the message),
  :data:`THREAD_PARENTS` (a thread's output belongs to the cell that started
  it, not to whichever cell runs when it prints) and :data:`STREAM_ORDER`
  (stdout and stderr arrive in the order they were written). Other kernel
  specs are left alone.
* ``--Kernel._execute_sleep=0``: ipykernel sleeps
  0.5 ms before every ``execute_reply`` so that clients which stop at the
  reply (not at the ``idle`` status) see the last output first; our client
  ends an execution on IOPub's ``idle``, which the kernel publishes after the
  output on the same ordered socket, so the sleep only adds latency (0.4 to
  0.9 ms per execution, measured).
* ``--port 0`` binds a free port; the bound port is printed on stdout as
  ``ASYNC_MODAL_EXEC_GATEWAY_PORT=<port>`` once the gateway listens.
* On Linux the gateway becomes a child subreaper: processes that kernels start
  and abandon (even in new sessions) stay in the gateway's process tree, so
  whoever stops the gateway can find and stop them too. Abandoned processes
  that exit are reaped once a second.
* ``--nice N`` lowers the CPU priority of the gateway and its kernels, so
  busy sandboxed code cannot starve the host's event loop of CPU.
* ``--remove-runtime-dir`` deletes ``$JUPYTER_RUNTIME_DIR`` when the gateway
  stops, also when it stops because its parent died.
* ``--exit-on-stdin-eof``: the gateway stops (and stops its kernels) when its
  standard input closes, i.e. when the process that started it goes away.

* Every kernel gets a runtime directory of its own (``<runtime dir>/<kernel
  id>/``: its connection file and IPC sockets), removed with the kernel.
* ``--kernel-jail CONFIG_FILE`` runs every kernel through ``kernel_jail.py`` (a
  bubblewrap sandbox with resource limits, see
  :mod:`async_modal_exec.backends.isolation`), with message-based interrupts
  (a signal cannot reach a process in another PID namespace). The jail binds
  only the kernel's own runtime directory and work directory; the config
  stays in its file (it holds the kernels' environment, and argv is public).

The auth token is read from ``KG_AUTH_TOKEN`` in the environment, never argv,
and then scrubbed: the launcher replaces itself (same pid, ``exec``) with an
environment without it and takes the token over a pipe, so neither
``/proc/<gateway>/environ`` nor the kernels' environments hold it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import sys
from typing import Any

PORT_LINE_PREFIX = "ASYNC_MODAL_EXEC_GATEWAY_PORT="
TOKEN_ENV = "KG_AUTH_TOKEN"
_TOKEN_FD_ENV = "ASYNC_MODAL_EXEC_TOKEN_FD"
DEFAULT_MAX_SOCKETS = 16384


def _take_token() -> str | None:
    """The gateway token, once it is out of this process's environment.

    ``/proc/<pid>/environ`` shows the environment a process was started with,
    whatever it later does to ``os.environ``: the launcher starts itself again
    (``exec``: same pid, same pipes) without the token, which crosses the
    ``exec`` in a pipe whose number is in the new environment.
    """
    fd = os.environ.pop(_TOKEN_FD_ENV, None)
    if fd is not None:
        with os.fdopen(int(fd), "rb") as pipe:
            return pipe.read().decode()
    token = os.environ.get(TOKEN_ENV)
    if token is None:
        return None
    read_end, write_end = os.pipe()
    os.write(write_end, token.encode())  # a few bytes: never fills the pipe
    os.close(write_end)
    os.set_inheritable(read_end, True)
    env = {name: value for name, value in os.environ.items() if name != TOKEN_ENV}
    env[_TOKEN_FD_ENV] = str(read_end)
    sys.stdout.flush()
    os.execve(sys.executable, sys.orig_argv, env)
    raise AssertionError("unreachable")  # pragma: no cover - execve does not return


def _gateway_argv(args: argparse.Namespace) -> list[str]:
    return [
        f"--KernelGatewayApp.ip={args.ip}",
        f"--KernelGatewayApp.port={args.port}",
        "--KernelGatewayApp.port_retries=0",
        "--ZMQChannelsWebsocketConnection.iopub_data_rate_limit=0",
        "--ZMQChannelsWebsocketConnection.iopub_msg_rate_limit=0",
        # No limits, so no per-message rate bookkeeping on the hot path either.
        "--ZMQChannelsWebsocketConnection.limit_rate=False",
        "--KernelManager.transport=ipc",
        # Token-protected anyway; lets owners see (and reap) what runs.
        "--JupyterWebsocketPersonality.list_kernels=True",
        f"--KernelRestarter.time_to_dead={args.restarter_interval}",
        f"--KernelGatewayApp.log_level={args.log_level}",
    ]


def _no_delay_connection_class() -> type[Any]:
    from jupyter_server.services.kernels.connection.channels import (
        ZMQChannelsWebsocketConnection,
    )

    class NoDelayWebsocketConnection(ZMQChannelsWebsocketConnection):
        """Kernel websocket connection that disables Nagle's algorithm."""

        def connect(self) -> Any:
            # The handler's stream exists once the websocket is open, which is
            # when the handler calls connect(); before that set_nodelay fails.
            self.websocket_handler.set_nodelay(True)
            return super().connect()

        def _on_zmq_reply(self, stream: Any, msg_list: list[bytes]) -> None:
            protocol: Any = self.websocket_handler.ws_connection
            if (
                self.subprotocol != V1_SUBPROTOCOL
                or stream.closed()
                or protocol is None
                or getattr(protocol, "stream", None) is None
                or protocol.is_closing()
                or getattr(protocol, "_compressor", None) is not None
                or getattr(protocol, "mask_outgoing", True)
            ):
                super()._on_zmq_reply(stream, msg_list)  # type: ignore[no-untyped-call]
                return
            with contextlib.suppress(StreamClosedError):  # the client went away: nothing to send to
                for chunk in _v1_frame(stream.channel, msg_list):
                    protocol.stream.write(chunk)

    from tornado.iostream import StreamClosedError

    return NoDelayWebsocketConnection


V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"


def _v1_frame(channel: str, parts: list[bytes]) -> list[bytes]:
    """A kernel message as one binary websocket frame of the v1 protocol, in pieces.

    The same bytes as the server's own path (``serialize_msg_to_ws_v1`` and
    tornado's ``write_message``, unmasked and uncompressed, as a server sends),
    but big message parts are not copied into one buffer and then into a
    frame: a 1 MB output was copied twice on the way out, a third of the
    gateway's CPU time for big outputs. Small pieces are joined: the
    frame of a small message is one write.
    """
    name = channel.encode()
    offsets = [8 * (len(parts) + 3)]
    for piece in (name, *parts):
        offsets.append(offsets[-1] + len(piece))
    header = b"".join([len(offsets).to_bytes(8, "little"), *(o.to_bytes(8, "little") for o in offsets)])
    size = offsets[-1]
    if size < 126:
        length = bytes([size])
    elif size <= 0xFFFF:
        length = bytes([126]) + size.to_bytes(2, "big")
    else:
        length = bytes([127]) + size.to_bytes(8, "big")
    pieces: list[bytes] = []
    pending = [b"\x82", length, header, name]
    for part in parts:
        if len(part) < _SMALL_PIECE:
            pending.append(part)
            continue
        pieces.append(b"".join(pending))
        pending = []
        pieces.append(part)
    if pending:
        pieces.append(b"".join(pending))
    return pieces


# Parts smaller than this are joined with their neighbours: every write is a
# send() (and, with TCP_NODELAY, a segment), so a small message stays one.
_SMALL_PIECE = 64 * 1024


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


def _runs_ipykernel(argv: list[str]) -> bool:
    return any(part in ("ipykernel", "ipykernel_launcher") for part in argv)


def _bootstrapped(argv: list[str]) -> list[str]:
    """``argv`` with ``-m ipykernel_launcher`` (or ``-m ipykernel``) run through :data:`KERNEL_BOOTSTRAP`."""
    for index in range(len(argv) - 1):
        if argv[index] == "-m" and argv[index + 1] in ("ipykernel_launcher", "ipykernel"):
            return [*argv[:index], "-c", KERNEL_BOOTSTRAP, *argv[index + 2 :]]
    return list(argv)


def _jail_prefix(config_path: str) -> list[str]:
    """The command put before a kernel's to run it in ``kernel_jail.py``.

    The config stays in its file (it holds the kernels' environment): only
    its path is on the command line.
    """
    jail = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_jail.py")
    return [sys.executable, "-I", "-S", jail, config_path]


def _tuned_kernel_spec_manager_class(jail: list[str] | None) -> type[Any]:
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    class TunedKernelSpecManager(KernelSpecManager):
        """Adds :data:`KERNEL_TUNING_ARGS` to IPython kernels; jails every kernel if asked."""

        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            spec = super().get_kernel_spec(kernel_name)
            if _runs_ipykernel(spec.argv):
                argv = _bootstrapped(spec.argv)
                spec.argv = [*argv, *(arg for arg in KERNEL_TUNING_ARGS if arg not in argv)]
            if jail is not None:
                # jupyter_client swaps a leading "python" for its interpreter only
                # at the front of the command: do it before the prefix goes there.
                kernel = list(spec.argv)
                if kernel and kernel[0] in ("python", "python3"):
                    kernel[0] = sys.executable
                spec.argv = [*jail, *kernel]
                spec.interrupt_mode = "message"
            return spec

    return TunedKernelSpecManager


KERNEL_CONNECTION_FILE = "kernel.json"
_KERNEL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _remove_trees(paths: list[str]) -> None:
    """Remove directory trees, also those whose owner (a kernel) took away write or search permission.

    Permissions are given back only inside the tree being removed, never
    above it.
    """
    import shutil
    import stat

    for top in paths:
        if not os.path.lexists(top):
            continue

        def allow_and_retry(function: Any, path: str, _exc: Any, top: str = top) -> None:
            for directory in (os.path.dirname(path), path):
                inside = directory == top or directory.startswith(top.rstrip("/") + "/")
                if inside and os.path.isdir(directory) and not os.path.islink(directory):
                    with contextlib.suppress(OSError):
                        os.chmod(directory, stat.S_IRWXU)
            with contextlib.suppress(OSError):
                function(path)

        if sys.version_info >= (3, 12):
            shutil.rmtree(top, onexc=allow_and_retry)
        else:  # onerror is deprecated from 3.12 on; the handler takes either
            shutil.rmtree(top, onerror=allow_and_retry)


def _light_activity_kernel_manager_class(*, sign_messages: bool, work_root: str | None) -> type[Any]:
    import asyncio

    from jupyter_core.utils import ensure_async
    from jupyter_server._tz import utcnow
    from kernel_gateway.services.kernels.manager import SeedingMappingKernelManager

    class LightActivityKernelManager(SeedingMappingKernelManager):  # type: ignore[misc]
        """The stock manager with less parsing per message, and no kernel left by a failed start."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._launches: dict[str, Any] = {}  # kernel id -> its manager, while it starts

        def pre_start_kernel(self, kernel_name: str | None, kwargs: dict[str, Any]) -> Any:
            chosen = kwargs.get("kernel_id")
            if chosen is not None and not _KERNEL_ID.fullmatch(str(chosen)):
                # The id names directories (its client may choose it): nothing but a UUID.
                from tornado.web import HTTPError

                raise HTTPError(400, "a kernel id is a UUID")
            km, kernel_name, kernel_id = super().pre_start_kernel(kernel_name, kwargs)
            self._launches[kernel_id] = km
            # A runtime directory per kernel (its connection file and IPC
            # sockets): a jail binds only its kernel's, never the directory
            # that holds the others' keys and sockets.
            own_dir = self._kernel_dirs(kernel_id)[0]
            os.makedirs(own_dir, mode=0o700, exist_ok=True)
            km.connection_file = os.path.join(own_dir, KERNEL_CONNECTION_FILE)
            if km.transport == "ipc":
                km.ip = os.path.join(own_dir, "kernel-ipc")
            private = km.transport == "ipc" and _only_ours(os.path.dirname(km.connection_file))
            if private and not sign_messages:
                # Set before the connection file is written. The kernel talks
                # to the gateway over IPC sockets in a directory only this user
                # can enter, next to the connection file that holds the key: a
                # process that could forge a message could read the key as well.
                # Signing then protects nothing, and costs an HMAC of every byte.
                km.session.key = b""
            return km, kernel_name, kernel_id

        async def start_kernel(self, *args: Any, kernel_id: str | None = None, **kwargs: Any) -> Any:
            # A start can fail after the kernel's process exists (a socket that
            # cannot be made, a kernel that never answers): jupyter_client then
            # forgets that process, or keeps it without telling the caller
            # its id. Stop it here, whatever failed.
            if kernel_id is not None and kernel_id in self:  # an existing kernel: nothing starts
                return await super().start_kernel(*args, kernel_id=kernel_id, **kwargs)
            kernel_id = kernel_id or self.new_kernel_id()
            try:
                return await super().start_kernel(*args, kernel_id=kernel_id, **kwargs)
            except BaseException:
                await self._stop_failed_kernel(kernel_id)
                raise
            finally:
                self._launches.pop(kernel_id, None)

        async def _stop_failed_kernel(self, kernel_id: str) -> None:
            km = self._launches.get(kernel_id)
            self._pending_kernels.pop(kernel_id, None)  # jupyter_client keeps the failed start's task
            try:
                if kernel_id in self._kernels:
                    await self.shutdown_kernel(kernel_id, now=True)
                elif km is not None and km.has_kernel:
                    await km.shutdown_kernel(now=True)
                else:
                    self._remove_kernel_dirs(kernel_id)
                    return  # no process was started
            except Exception:
                self.log.exception("could not stop kernel %s after its start failed", kernel_id)
                return
            if kernel_id not in self._kernels:
                self._remove_kernel_dirs(kernel_id)
            self.log.warning("kernel %s failed to start and was stopped", kernel_id)

        def remove_kernel(self, kernel_id: str) -> Any:
            km = super().remove_kernel(kernel_id)
            if km is not None:
                self._remove_kernel_dirs(kernel_id)
            return km

        def _kernel_dirs(self, kernel_id: str) -> list[str]:
            """The kernel's own runtime directory, and its work directory if it has one."""
            if not _KERNEL_ID.fullmatch(kernel_id):  # never a path made of anything else
                raise ValueError(f"not a kernel id: {kernel_id!r}")
            dirs = [os.path.join(self.connection_dir, kernel_id)]
            if work_root is not None:
                dirs.append(os.path.join(work_root, kernel_id))
            return dirs

        def _remove_kernel_dirs(self, kernel_id: str) -> None:
            # The kernel's own directories go with it (what it wrote stays until
            # here, restarts included), removed by a worker thread: a big work
            # directory would stall every kernel's traffic on this loop.
            if not _KERNEL_ID.fullmatch(kernel_id):
                return
            dirs = self._kernel_dirs(kernel_id)
            try:
                asyncio.get_running_loop().run_in_executor(None, _remove_trees, dirs)
            except RuntimeError:  # no loop running (the gateway is stopping): here and now
                _remove_trees(dirs)

        async def shutdown_all(self, now: bool = False) -> None:
            # The stock shutdowns stop at the first kernel that cannot be shut
            # down, e.g. one a client deleted meanwhile (404): a gateway stopping
            # on that failure never stopped its loop, and kept its other kernels.
            kernel_ids = {*self.list_kernel_ids(), *self._pending_kernels}
            outcomes = await asyncio.gather(
                *(ensure_async(self.shutdown_kernel(kernel_id, now=now)) for kernel_id in kernel_ids),
                return_exceptions=True,
            )
            for kernel_id, outcome in zip(kernel_ids, outcomes, strict=True):
                if isinstance(outcome, Exception) and kernel_id in self:
                    self.log.warning("kernel %s could not be shut down: %r", kernel_id, outcome)

        def start_watching_activity(self, kernel_id: str) -> None:
            kernel = self._kernels[kernel_id]
            kernel.reason = ""
            kernel.last_activity = utcnow()
            kernel._activity_stream = kernel.connect_iopub()
            if KERNEL_BOOTSTRAP in kernel.kernel_spec.argv:
                # An IPython kernel's status messages (and its greeting of
                # this subscription) have topics that start with "kernel.":
                # the watcher need not receive every output a second time.
                # (Comm messages then no longer count as activity: it matters
                # only to idle culling, which our gateways do not enable.)
                import zmq

                kernel._activity_stream.socket.setsockopt(zmq.SUBSCRIBE, b"kernel.")
                kernel._activity_stream.socket.setsockopt(zmq.UNSUBSCRIBE, b"")
            session = kernel.session

            def record_activity(msg_list: list[Any]) -> None:
                # Bookkeeping only: the signature is not checked (the message
                # came over the kernel's private socket, and what reaches a
                # client goes through unchanged either way).
                _, parts = session.feed_identities(msg_list)
                if len(parts) < 5:
                    return
                # Bytes already (on_recv copies): no conversion, a big output is not copied again.
                _signature, header, parent, _metadata, content = parts[:5]
                msg_type = session.unpack(header).get("msg_type")
                parent_msg_type = session.unpack(parent).get("msg_type")
                if (
                    self.track_message_type(msg_type)
                    or self.track_message_type(parent_msg_type)
                    or kernel.execution_state == "busy"
                ):
                    self.last_kernel_activity = kernel.last_activity = utcnow()
                if msg_type == "iopub_welcome" and kernel.execution_state == "starting":
                    # Its IOPub is live: a websocket's check need not wait for a
                    # status this subscription may have missed (it still waits
                    # for the kernel's reply on shell).
                    kernel.execution_state = "idle"
                if msg_type != "status":
                    return
                execution_state = session.unpack(content).get("execution_state")
                if self.track_message_type(parent_msg_type):
                    kernel.execution_state = execution_state
                elif kernel.execution_state == "starting" and execution_state != "starting":
                    kernel.execution_state = "idle"

            kernel._activity_stream.on_recv(record_activity)

    return LightActivityKernelManager


def _skip_slow_imports() -> None:
    """Keep modules the gateway never uses from being imported.

    ``jsonschema`` (through jupyter_events and nbformat) builds a grammar for
    its IRI format check when ``rfc3987_syntax`` is installed: 0.8 of the
    1.2 s the gateway took to import. The gateway validates no IRI; without
    the module that one check is simply not registered.
    """
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]


def _raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one (each kernel costs the gateway a dozen)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _tune_zmq(context: Any, max_sockets: int) -> None:
    """Socket cap and high-water marks of the gateway's ZeroMQ context, before its first socket.

    libzmq allows 1023 sockets per context by default: with about six per
    kernel (more while a websocket connects), the 171st kernel failed to
    start. And no high-water mark on the kernels' sockets: at the default
    (1000 messages) the IOPub subscriber's queue overflowed in bursts of
    output and messages were dropped. And a socket that connects before its
    kernel listens retries every 10 ms, not 100: the activity watcher's IOPub
    subscription, made as the kernel starts, was often not live yet when the
    first websocket's check asked the kernel for its status, so the gateway
    believed the kernel still starting and held the websocket 0.5 s (one
    retry of that check) in about a third of the kernel starts.
    """
    import zmq

    context.set(zmq.MAX_SOCKETS, max_sockets)
    context.setsockopt(zmq.RCVHWM, 0)
    context.setsockopt(zmq.SNDHWM, 0)
    context.setsockopt(zmq.RECONNECT_IVL, 10)
    context.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)  # a kernel that is gone: back off to once a second


# A kernel's longest IPC socket path is <runtime dir>/<kernel id>/kernel-ipc-<n>;
# Linux allows 107 bytes for the path of a Unix socket.
_IPC_NAME_LENGTH = len("/00000000-0000-0000-0000-000000000000/kernel-ipc-5")
_UNIX_PATH_MAX = 107


def _shorten_runtime_dir() -> str | None:
    """Move the runtime directory to a new short one if IPC paths in it would be too long.

    Kernels could not start under a long ``$HOME`` (``ZMQError: File name
    too long``). Returns the directory made (removed when the gateway stops).
    """
    from jupyter_core.paths import jupyter_runtime_dir

    if len(jupyter_runtime_dir()) + _IPC_NAME_LENGTH <= _UNIX_PATH_MAX:
        return None
    import tempfile

    path = tempfile.mkdtemp(prefix="ame-rt-", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.environ["JUPYTER_RUNTIME_DIR"] = path
    return path


def _only_ours(directory: str) -> bool:
    """True if ``directory`` belongs to this user and lets nobody else in (mode ``0700``)."""
    try:
        info = os.stat(directory)
    except OSError:
        return False
    return info.st_uid == os.getuid() and info.st_mode & 0o077 == 0


def _watch_stdin(app: Any) -> None:
    """Stop the gateway when stdin reaches end of file (the parent went away)."""
    from tornado.ioloop import IOLoop

    loop = IOLoop.current()
    fd = sys.stdin.fileno()

    def on_readable(fd: int, events: int) -> None:
        if not os.read(fd, 4096):
            loop.remove_handler(fd)
            app.stop()

    loop.add_handler(fd, on_readable, IOLoop.READ | IOLoop.ERROR)


def _become_subreaper(app: Any) -> None:
    """Adopt orphaned descendants (Linux), and reap those that exit."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    from tornado.ioloop import PeriodicCallback

    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        return
    me = os.getpid()

    def reap_adopted() -> None:
        # Kernels are our own children too, and jupyter_client waits for them:
        # leave their pids alone, reap only zombies we adopted.
        kernel_pids = set()
        for manager in getattr(app.kernel_manager, "_kernels", {}).values():
            pid = getattr(getattr(manager, "provisioner", None), "pid", None)
            if pid is not None:
                kernel_pids.add(pid)
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in kernel_pids:
                continue
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == me:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(entry), os.WNOHANG)

    PeriodicCallback(reap_adopted, 1000).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--restarter-interval", type=float, default=0.5)
    parser.add_argument("--log-level", default="WARN")
    parser.add_argument("--exit-on-stdin-eof", action="store_true")
    parser.add_argument(
        "--remove-runtime-dir", action="store_true", help="delete $JUPYTER_RUNTIME_DIR when the gateway stops"
    )
    parser.add_argument(
        "--nice", type=int, default=0, help="lower the CPU priority of the gateway and kernels"
    )
    parser.add_argument("--remove-dir", help="delete this directory when the gateway stops")
    parser.add_argument(
        "--kernel-jail", help="path of a JSON config file: run kernels in kernel_jail.py (see its docstring)"
    )
    parser.add_argument(
        "--sign-messages",
        action="store_true",
        help="sign kernel messages even over IPC in a runtime directory only we can enter (docs/security.md)",
    )
    parser.add_argument(
        "--max-sockets",
        type=int,
        default=DEFAULT_MAX_SOCKETS,
        help=f"ZeroMQ sockets the gateway may open (default {DEFAULT_MAX_SOCKETS}; about 6 per kernel)",
    )
    args = parser.parse_args(argv)
    runtime_dir = os.environ.get("JUPYTER_RUNTIME_DIR")  # the one to remove, even if replaced below
    token = _take_token()
    if args.nice:
        os.nice(args.nice)
    _raise_open_file_limit()
    _skip_slow_imports()
    # A jailed kernel sees the runtime directory its jail binds: that one stays
    # (LocalBackend keeps it short).
    short_runtime_dir = None if args.kernel_jail else _shorten_runtime_dir()
    from jupyter_core.paths import jupyter_runtime_dir

    os.makedirs(jupyter_runtime_dir(), mode=0o700, exist_ok=True)  # made here: ours alone (see _only_ours)
    # Inherited by kernels: silences debugpy's frozen-modules warning on stderr.
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")

    from kernel_gateway.gatewayapp import KernelGatewayApp
    from traitlets.config import Config

    config = Config()
    config.KernelGatewayApp.kernel_websocket_connection_class = _no_delay_connection_class()
    if token is not None:
        config.KernelGatewayApp.auth_token = token
    jail_config: dict[str, Any] = {}
    if args.kernel_jail:
        with open(args.kernel_jail) as file:
            jail_config = json.load(file)
    jail = _jail_prefix(args.kernel_jail) if args.kernel_jail else None
    config.KernelGatewayApp.kernel_spec_manager_class = _tuned_kernel_spec_manager_class(jail)
    config.KernelGatewayApp.kernel_manager_class = _light_activity_kernel_manager_class(
        sign_messages=args.sign_messages, work_root=jail_config.get("work_root")
    )
    app = KernelGatewayApp.instance(config=config)
    app.initialize(_gateway_argv(args))
    _tune_zmq(app.kernel_manager.context, args.max_sockets)
    # What the gateway calls when it stops: every kernel, tolerating those gone meanwhile.
    app.personality.kernel_pool.shutdown = functools.partial(app.kernel_manager.shutdown_all, now=True)
    port = next(iter(app.http_server._sockets.values())).getsockname()[1]
    _become_subreaper(app)
    if args.exit_on_stdin_eof:
        _watch_stdin(app)
    # Printed before the loop starts; the socket already listens, so a client
    # that reads this line can connect at once (the backlog holds it).
    print(f"{PORT_LINE_PREFIX}{port}", flush=True)
    if args.exit_on_stdin_eof:
        # Whoever started us read the port line and will not read stdout again:
        # send later writes (ours, and kernels' inherited fd 1) to stderr so a
        # full pipe can never block them.
        os.dup2(2, 1)
    try:
        app.start()
    finally:
        _remove_trees(
            [
                *([runtime_dir] if args.remove_runtime_dir and runtime_dir else []),
                *([args.remove_dir] if args.remove_dir else []),
                *([short_runtime_dir] if short_runtime_dir else []),
            ]
        )
        cgroup = jail_config.get("pids_cgroup")
        if cgroup:
            # Empty once the kernels are stopped (their own cgroups first);
            # whoever started us removes what is left.
            with contextlib.suppress(OSError):
                for entry in os.listdir(cgroup):
                    if entry.startswith("kernel-"):
                        with contextlib.suppress(OSError):
                            os.rmdir(os.path.join(cgroup, entry))
                os.rmdir(cgroup)


if __name__ == "__main__":
    main()
