"""The gateway's kernel manager: a directory of its own per kernel, fixes of the stock manager.

* Every kernel gets a runtime directory of its own (``<runtime dir>/<kernel
  id>/``: its connection file and IPC sockets) and, when the jail config
  names a ``work_root``, a work directory there; both go with the kernel. A
  jail binds only its kernel's, never the directory that holds the other
  kernels' keys and sockets. A kernel id names directories, so nothing but
  a UUID is accepted (a client may choose it).
* Messages between the gateway and its kernels are not signed when they use
  IPC in a runtime directory that is ``0700`` and ours (``--sign-messages``
  to sign anyway): the key lies next to the IPC sockets, readable by exactly
  who can reach them (see ``docs/security.md``). Signing cost the kernel a
  fifth of its CPU for big outputs.
* A kernel whose start fails is stopped (jupyter_client forgot its process),
  and stopping the gateway shuts down every kernel even when some were
  deleted meanwhile (the stock stop gave up at the first 404 and the gateway
  never exited).
* The IOPub activity watcher (it keeps ``execution_state`` and
  ``last_activity`` of every kernel) reads only the parts it needs and checks
  no signature. The stock one fully deserializes every output message,
  parsing its dates with dateutil, and content twice for status messages:
  about a fifth of the gateway's CPU time per execution. On IPython kernels
  it subscribes only to the ``kernel.`` topics (status and the like), so big
  outputs are not sent to the gateway twice.

The gateway's modules are imported when the class is made, not with this module.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .cleanup import remove_trees
from .kernel_code import KERNEL_BOOTSTRAP

__all__ = ["KERNEL_CONNECTION_FILE", "KERNEL_ID", "light_activity_kernel_manager_class", "only_ours"]

KERNEL_CONNECTION_FILE = "kernel.json"
KERNEL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def only_ours(directory: str) -> bool:
    """True if ``directory`` belongs to this user and lets nobody else in (mode ``0700``)."""
    try:
        info = os.stat(directory)
    except OSError:
        return False
    return info.st_uid == os.getuid() and info.st_mode & 0o077 == 0


def light_activity_kernel_manager_class(*, sign_messages: bool, work_root: str | None) -> type[Any]:
    """The gateway's kernel manager class; kernels' work directories under ``work_root`` if given."""
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
            if chosen is not None and not KERNEL_ID.fullmatch(str(chosen)):
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
            private = km.transport == "ipc" and only_ours(os.path.dirname(km.connection_file))
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
            if not KERNEL_ID.fullmatch(kernel_id):  # never a path made of anything else
                raise ValueError(f"not a kernel id: {kernel_id!r}")
            dirs = [os.path.join(self.connection_dir, kernel_id)]
            if work_root is not None:
                dirs.append(os.path.join(work_root, kernel_id))
            return dirs

        def _remove_kernel_dirs(self, kernel_id: str) -> None:
            # The kernel's own directories go with it (what it wrote stays until
            # here, restarts included), removed by a worker thread: a big work
            # directory would stall every kernel's traffic on this loop.
            if not KERNEL_ID.fullmatch(kernel_id):
                return
            dirs = self._kernel_dirs(kernel_id)
            try:
                asyncio.get_running_loop().run_in_executor(None, remove_trees, dirs)
            except RuntimeError:  # no loop running (the gateway is stopping): here and now
                remove_trees(dirs)

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
