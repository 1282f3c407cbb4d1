"""The gateway's patched classes: its kernel websocket connection and its kernel spec manager.

* :func:`no_delay_connection_class`: ``TCP_NODELAY`` on every kernel
  websocket (tornado leaves Nagle's algorithm on, and the kernel's small
  replies then waited for delayed ACKs: about 43 ms per execution), and v1
  frames written in pieces (:func:`.v1_codec.v1_frame`).
* :func:`tuned_kernel_spec_manager_class`: IPython kernels start through
  :data:`.kernel_code.KERNEL_BOOTSTRAP` with
  :data:`.kernel_code.KERNEL_TUNING_ARGS`; with ``--kernel-jail`` every kernel
  runs behind :func:`jail_prefix`, interrupted by message (a signal cannot
  reach a process in another PID namespace).

The gateway's modules are imported when these are called, not with this module.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from .kernel_code import KERNEL_TUNING_ARGS, bootstrapped, runs_ipykernel
from .v1_codec import V1_SUBPROTOCOL, v1_frame

__all__ = ["jail_prefix", "no_delay_connection_class", "tuned_kernel_spec_manager_class"]


def no_delay_connection_class() -> type[Any]:
    """The gateway's kernel websocket connection with ``TCP_NODELAY`` and v1 frames written in pieces."""
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
                for chunk in v1_frame(stream.channel, msg_list):
                    protocol.stream.write(chunk)

    from tornado.iostream import StreamClosedError

    return NoDelayWebsocketConnection


def jail_prefix(config_path: str) -> list[str]:
    """The command put before a kernel's to run it in ``kernel_jail.py``.

    The config stays in its file (it holds the kernels' environment): only
    its path is on the command line. ``kernel_jail.py`` is the one beside
    this package (in ``async_modal_exec``): run from the package's files,
    not from sources shipped in memory, which have none.

    Raises:
        RuntimeError: this package was loaded from shipped sources, not files.
    """
    here = globals().get("__file__")
    if here is None:
        raise RuntimeError("--kernel-jail needs the launcher run from async_modal_exec's files")
    jail = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(here))), "kernel_jail.py")
    return [sys.executable, "-I", "-S", jail, config_path]


def tuned_kernel_spec_manager_class(jail: list[str] | None) -> type[Any]:
    """The kernel spec manager: tunes IPython kernels; given ``jail`` (a command prefix), jails all."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    class TunedKernelSpecManager(KernelSpecManager):
        """Adds :data:`KERNEL_TUNING_ARGS` to IPython kernels; jails every kernel if asked."""

        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            spec = super().get_kernel_spec(kernel_name)
            if runs_ipykernel(spec.argv):
                argv = bootstrapped(spec.argv)
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
