"""A TCP proxy on loopback that injects link faults between the executor and a real gateway.

Every connection the executor opens (REST and websocket) goes through it, so
faults are real TCP events the client cannot tell from a bad network:

* ``reset()``: every open connection is aborted (the client sees RST / EOF);
* ``black_hole()``: bytes stop flowing both ways on the open connections and
  on new ones, with no FIN or RST (a dead NAT entry, a pulled cable);
  ``heal()`` lets them flow again (what was held back is dropped);
* ``stall_existing()``: only the connections open now go silent (a NAT entry
  that timed out); new connections work;
* ``slow(seconds)``: each chunk is delayed;
* ``cut_response_to(marker)``: on the connection whose request contains
  ``marker`` (e.g. ``b"POST /api/kernels"``), the server's answer is dropped
  and the connection aborted (the server acted; its answer is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    stalled: bool = False
    cut: bool = False  # drop the server's next chunk and abort
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.server):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_port``; see the module docstring for the faults."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.links: set[_Link] = set()
        self.holes = False
        self.delay = 0.0
        self.cut_marker: bytes | None = None
        self.connections = 0  # accepted so far
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        for link in list(self.links):
            link.abort()

    def black_hole(self) -> None:
        self.holes = True

    def heal(self) -> None:
        self.holes = False
        for link in self.links:
            link.stalled = False

    def stall_existing(self) -> None:
        for link in self.links:
            link.stalled = True

    def slow(self, seconds: float) -> None:
        self.delay = seconds

    def cut_response_to(self, marker: bytes) -> None:
        self.cut_marker = marker

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, upstream_writer)
        self.links.add(link)
        link.tasks = [
            asyncio.create_task(self._pipe(link, reader, upstream_writer, from_server=False)),
            asyncio.create_task(self._pipe(link, upstream_reader, writer, from_server=True)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self.links.discard(link)
            for end in (link.client, link.server):
                end.close()

    async def _pipe(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_server: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.holes or link.stalled:
                    continue  # dropped: no FIN, no RST
                if not from_server and self.cut_marker is not None and self.cut_marker in data:
                    self.cut_marker = None
                    link.cut = True
                if from_server and link.cut:
                    link.abort()
                    return
                writer.write(data)
                await writer.drain()
            # End of stream: pass the FIN on (buffered bytes are still sent).
            if writer.can_write_eof() and not writer.transport.is_closing():
                writer.write_eof()
        except (ConnectionError, OSError):
            link.abort()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset()
        tasks = [task for link in list(self.links) for task in link.tasks]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


@asynccontextmanager
async def fault_proxy(target_port: int) -> AsyncIterator[FaultProxy]:
    """A :class:`FaultProxy` to ``127.0.0.1:target_port`` for the block."""
    proxy = await FaultProxy(target_port).start()
    try:
        yield proxy
    finally:
        await proxy.aclose()
