"""The files API of an executor: upload, download, stream, stat, list and remove in the sandbox.

Each operation holds the kernel for its whole length (other runs wait) and
talks to a small helper defined in the kernel (:mod:`~async_modal_exec.files`
builds the calls and checks the answers). Mixed into
:class:`~async_modal_exec.AsyncExecutor`.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, overload

import anyio

from . import files
from .deadline import Deadline, timed_out
from .driver import DriverSettings
from .protocol import new_msg_id
from .results import ExecutionResult, ExecutionTimeout, RecoveryOutcome
from .session import KernelSession
from .turn import SETUP_TIMEOUT, HeldTurn

__all__ = ["FileOperations"]


class FileOperations:
    """File operations on the executor's kernel (a mixin of :class:`~async_modal_exec.AsyncExecutor`)."""

    file_chunk_bytes: int
    interrupt_grace: float

    def _open_session(self) -> KernelSession:
        raise NotImplementedError

    def _driver_settings(self) -> DriverSettings:
        raise NotImplementedError

    @property
    def _work_dir(self) -> str | None:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def _files_turn(self, timeout: float | None) -> AsyncIterator[files.HelperCall]:
        """Hold the kernel for one file operation; yield the call of its files helper.

        ``timeout`` covers the whole operation (None: no limit). A timeout
        raises :class:`ExecutionTimeout` like a run's.
        """
        deadline = Deadline.after(timeout)
        session = self._open_session()
        acquired = False
        try:
            async with session.turn(deadline=deadline) as channel:
                acquired = True
                turn = HeldTurn(session, channel, self._driver_settings())
                if "files" not in session.prepared:
                    helper = files.helper_code(self._work_dir)
                    await turn.setup(helper, deadline, "defining the files helper")
                    session.prepared.add("files")

                async def call(operation: str, args: tuple[Any, ...], chunk: bytes | None) -> dict[str, Any]:
                    metadata = None
                    if chunk is not None:
                        metadata = {files.CHUNK_KEY: base64.b64encode(chunk).decode("ascii")}
                    until = deadline
                    if operation == "abort":  # cleaning up, also after the deadline: briefly, if at all
                        if not turn.connected:
                            return {}
                        until = Deadline.after(min(SETUP_TIMEOUT, self.interrupt_grace))
                    code = files.call_code(operation, *args)
                    answer = await turn.internal(code, until, metadata, "file operation")
                    return files.answer_of(answer, operation)

                yield call
        except TimeoutError as exc:
            if acquired or isinstance(exc, ExecutionTimeout):
                raise
            raise timed_out(
                deadline, ExecutionResult(), RecoveryOutcome.NOT_STARTED, "file operation"
            ) from None

    async def upload(
        self,
        source: files.Source,
        remote_path: str,
        *,
        timeout: float | None = None,
    ) -> files.RemoteFile:
        """Write ``source`` (bytes, a local file's path, or an async iterable of bytes) to ``remote_path``.

        ``remote_path`` is relative to the sandbox's work directory (or
        absolute inside it); missing directories are created. The file is
        sent in chunks of ``file_chunk_bytes`` (memory stays flat whatever its
        size), written under a temporary name and renamed into place only
        when its SHA-256 matches: a reader never sees half a file.

        Returns:
            The file as the sandbox sees it (:class:`RemoteFile`).

        Raises:
            RemotePathRefused: the path leads outside the work directory.
            ChecksumMismatch: the bytes that arrived differ (nothing is written).
            RemoteFileError: the sandbox refused (a directory there, disk full, ...).
            FileNotFoundError: the local ``source`` does not exist.
            ExecutionTimeout: ``timeout`` (seconds for the whole transfer) expired.

        Cancelling the call (or any failure) stops the transfer and removes
        the temporary file; an existing file at ``remote_path`` is untouched.
        """
        async with self._files_turn(timeout) as call:
            return await files.upload(call, source, remote_path, self.file_chunk_bytes)

    @overload
    async def download(self, remote_path: str, *, timeout: float | None = None) -> bytes: ...

    @overload
    async def download(
        self, remote_path: str, local_path: str | os.PathLike[str], *, timeout: float | None = None
    ) -> files.RemoteFile: ...

    async def download(
        self,
        remote_path: str,
        local_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> bytes | files.RemoteFile:
        """Read ``remote_path`` from the sandbox: its bytes, or into ``local_path``.

        With ``local_path`` the file is streamed to disk in chunks (memory
        stays flat) under a temporary name, renamed into place once its
        SHA-256 matches the one the kernel computed; the result is then the
        :class:`RemoteFile` read. Without it, the bytes are returned (the
        whole file in memory).

        Raises:
            RemoteFileNotFound: no such file.
            RemotePathRefused: the path leads outside the work directory.
            ChecksumMismatch: the bytes that arrived differ (``local_path`` is untouched).
            RemoteFileError: the sandbox refused (a directory, no permission, ...).
            ExecutionTimeout: ``timeout`` (seconds for the whole transfer) expired.

        Cancelling the call stops the transfer; a partial local file is removed.
        """
        async with self.reading(remote_path, timeout=timeout) as (info, chunks):
            if local_path is None:
                return b"".join([chunk async for chunk in chunks])
            target = anyio.Path(local_path)
            temporary = target.with_name(f".{target.name}.{new_msg_id()}.part")
            try:
                async with await anyio.open_file(temporary, "wb") as handle:
                    async for chunk in chunks:
                        await handle.write(chunk)
                await temporary.replace(target)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await temporary.unlink(missing_ok=True)
                raise
        return info

    @contextlib.asynccontextmanager
    async def reading(
        self, remote_path: str, *, timeout: float | None = None
    ) -> AsyncIterator[tuple[files.RemoteFile, AsyncIterator[bytes]]]:
        """Open ``remote_path`` for streaming: ``async with ex.reading(p) as (info, chunks)``.

        ``info`` is known (and errors are raised) before the first chunk is
        read; ``chunks`` yields the bytes in pieces of ``file_chunk_bytes`` and
        ends with :class:`ChecksumMismatch` if they differ from what the kernel
        read. The kernel is held for the block: other runs wait until it ends.

        Raises:
            RemoteFileNotFound, RemotePathRefused, RemoteFileError: as :meth:`download`.

        Leaving the block early (or cancelling it) closes the file in the kernel.
        """
        async with self._files_turn(timeout) as call:
            info, chunks = await files.begin_download(call, remote_path, self.file_chunk_bytes)
            async with aclosing(chunks):
                yield info, chunks

    async def stat(self, remote_path: str, *, timeout: float | None = None) -> files.RemoteFile:
        """What ``remote_path`` is in the sandbox (symlinks followed, within the work directory).

        Raises:
            RemoteFileNotFound: no such file or directory.
            RemotePathRefused: the path leads outside the work directory.

        Cancelling the call abandons it (nothing changes).
        """
        async with self._files_turn(timeout) as call:
            return files.RemoteFile.from_answer(await call("stat_path", (remote_path,), None))

    async def listdir(self, remote_dir: str = ".", *, timeout: float | None = None) -> list[files.RemoteFile]:
        """The entries of ``remote_dir`` in the sandbox, sorted by name (symlinks listed, not followed).

        Raises:
            RemoteFileNotFound: no such directory.
            RemotePathRefused: the path leads outside the work directory.
            RemoteFileError: not a directory, or the sandbox refused.

        Cancelling the call abandons the listing (nothing changes).
        """
        async with self._files_turn(timeout) as call:
            answer = await call("listdir", (remote_dir,), None)
        return [files.RemoteFile.from_answer(entry) for entry in answer["entries"]]

    async def remove(
        self, remote_path: str, *, recursive: bool = False, timeout: float | None = None
    ) -> None:
        """Delete a file, a symlink (not what it points to) or a directory in the sandbox.

        A directory must be empty unless ``recursive``. The work directory
        itself cannot be removed.

        Raises:
            RemoteFileNotFound: no such file.
            RemotePathRefused: the path leads outside the work directory (or is it).
            RemoteFileError: a non-empty directory without ``recursive``, or the sandbox refused.

        Cancelling the call may leave a recursive removal half done.
        """
        async with self._files_turn(timeout) as call:
            await call("remove", (remote_path, recursive), None)
