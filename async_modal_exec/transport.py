"""What the execution driver needs of the kernel: two small interfaces, so tests can script them.

:class:`~async_modal_exec.session.KernelSession` is a :class:`KernelLink` and
:class:`~async_modal_exec.channel.KernelChannel` a :class:`Transport`; the
driver (:mod:`~async_modal_exec.driver`) and the recovery
(:mod:`~async_modal_exec.recovery`) see only these, so their paths through
drops, silence and dead kernels are unit-tested with a scripted transport
(``tests/test_driver.py``) as well as through real sockets and a fault proxy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .fold import ExecutionFold

__all__ = ["KernelLink", "Transport"]


class Transport(Protocol):
    """The kernel's websocket as the driver uses it (:class:`~async_modal_exec.channel.KernelChannel`).

    ``send`` and ``receive`` raise :class:`~async_modal_exec.channel.ChannelLost`
    when the connection is gone.
    """

    @property
    def is_open(self) -> bool: ...

    @property
    def last_counter(self) -> tuple[str, int] | None: ...

    async def send(self, message: Mapping[str, Any]) -> None: ...

    async def receive(self) -> dict[str, Any]: ...

    async def ping(self, timeout: float) -> bool: ...


class KernelLink(Protocol):
    """The kernel session as the driver uses it (:class:`~async_modal_exec.session.KernelSession`)."""

    running: ExecutionFold | None

    @property
    def kernel_id(self) -> str | None: ...

    @property
    def ws_session(self) -> str: ...

    @property
    def closing(self) -> bool: ...

    def dropped(self, why: str) -> None: ...

    async def reconnect(self) -> None: ...

    async def check_alive(self) -> str | None: ...

    async def interrupt(self) -> bool: ...

    def discard_connection(self, why: str) -> None: ...

    def replace_soon(self, why: str) -> None: ...

    def mark_lost(self, why: str) -> None: ...
