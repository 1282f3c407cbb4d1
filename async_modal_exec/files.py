"""Files in and out of the sandbox's work directory, in bounded chunks, checksummed.

The portable path: every backend has a kernel, so files travel over the
kernel's own channel. A helper module (:mod:`.kernel_side.files`) is defined in
the kernel once (``_async_modal_exec_files`` in ``sys.modules``, nothing in the
user's namespace); each call is one small execution. An upload chunk rides in the
``execute_request``'s metadata, where the kernel reads it as data: put into the
code as a literal it would be parsed as source, 15x slower (2 MiB: 650 ms
against 43 ms). A download chunk comes back as a display of its own mime type.
Memory stays bounded by a few chunks on both sides, whatever the file's size.

Every path is resolved in the kernel (symlinks included) and must lie inside
the work directory: the backend's (``LocalBackend``: the kernels' ``cwd``), or
else the kernel's working directory when the helper was installed.

Uploads go to a temporary name next to the target and are renamed into place
only when the SHA-256 of what arrived equals the one of what was sent; a
transfer cut short leaves nothing behind (the temporary file is removed).
Downloads are checked against the SHA-256 the kernel computed while reading.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from .errors import ChecksumMismatch, RemoteFileError, RemoteFileNotFound, RemotePathRefused
from .kernel_side import define_code, module_expr
from .results import ExecutionResult

__all__ = ["DEFAULT_CHUNK_BYTES", "FILES_MIME", "RemoteFile", "Source", "helper_code"]

FILES_MIME = "application/x.async-modal-exec.files+json"
DEFAULT_CHUNK_BYTES = 2 * 2**20
CHUNK_KEY = "async_modal_exec_chunk"

MODULE = "_async_modal_exec_files"  # the kernel-side helper's name in the kernel's sys.modules


def helper_code(work_dir: str | None) -> str:
    """Code defining the kernel's files helper (a no-op where it exists); see :mod:`.kernel_side.files`."""
    install = f"{module_expr(MODULE)}.install(get_ipython(), {FILES_MIME!r}, {CHUNK_KEY!r}, {work_dir!r})"
    return f"{define_code('files', MODULE)}\n{install}\n"


def call_code(operation: str, *args: Any) -> str:
    """Code calling one operation of the helper (binds no name in the user's namespace)."""
    arguments = ", ".join(repr(arg) for arg in args)
    return f"{module_expr(MODULE)}.{operation}({arguments})"


@dataclass(frozen=True)
class RemoteFile:
    """A file or directory in the sandbox.

    Attributes:
        path: its absolute path in the sandbox (for a listed symlink: the
            link's own path; otherwise symlinks resolved).
        name: its last component.
        size: bytes (for a directory: what the filesystem says).
        is_dir: a directory.
        is_link: a symbolic link (listed, not followed).
        modified: modification time, seconds since the epoch.
    """

    path: str
    name: str
    size: int
    is_dir: bool
    is_link: bool
    modified: float

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> RemoteFile:
        return cls(
            path=str(answer["path"]),
            name=str(answer["name"]),
            size=int(answer["size"]),
            is_dir=bool(answer["is_dir"]),
            is_link=bool(answer["is_link"]),
            modified=float(answer["modified"]),
        )


# One helper call: (operation, its arguments, a chunk for the metadata or None) -> the answer.
HelperCall = Callable[[str, "tuple[Any, ...]", "bytes | None"], Awaitable[dict[str, Any]]]

_ERRORS: dict[str, type[RemoteFileError]] = {
    "PathRefused": RemotePathRefused,
    "FileNotFoundError": RemoteFileNotFound,
}


def answer_of(result: ExecutionResult, operation: str) -> dict[str, Any]:
    """The helper's answer in ``result``; its error as a :class:`RemoteFileError`."""
    if result.error is not None:
        error = result.error
        if error.evalue.startswith("checksum mismatch"):
            raise ChecksumMismatch(f"{operation}: {error.evalue}")
        kind = _ERRORS.get(error.ename)
        if kind is not None:
            raise kind(error.evalue)
        raise RemoteFileError(f"{operation}: {error.ename}: {error.evalue}")
    for output in reversed(result.displays):
        answer = output.data.get(FILES_MIME)
        if isinstance(answer, dict):
            return answer
    raise RemoteFileError(f"{operation}: the kernel's files helper did not answer")


Source = bytes | str | os.PathLike[str] | AsyncIterable[bytes]


async def _chunks(source: Source, size: int) -> AsyncIterator[bytes]:
    """``source`` (bytes, a local file's path, or an async stream of bytes) in pieces of ``size``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        for start in range(0, len(view), size):
            yield bytes(view[start : start + size])
        return
    if isinstance(source, AsyncIterable):
        pending = bytearray()
        async for piece in source:
            pending += piece
            while len(pending) >= size:
                yield bytes(pending[:size])
                del pending[:size]
        if pending:
            yield bytes(pending)
        return
    async with await anyio.open_file(source, "rb") as handle:
        while chunk := await handle.read(size):
            yield chunk


async def _abort(call: HelperCall, token: str) -> None:
    """Drop a transfer in the kernel (its partial file, its open file); shielded, at most 5 s.

    Errors are ignored: the kernel may be gone, and the transfer with it.
    """
    with anyio.CancelScope(shield=True), anyio.move_on_after(5), contextlib.suppress(Exception):
        await call("abort", (token,), None)


async def upload(call: HelperCall, source: Source, remote_path: str, chunk_bytes: int) -> RemoteFile:
    """Send ``source`` to ``remote_path``; see :meth:`AsyncExecutor.upload`."""
    token = uuid.uuid4().hex  # made here, so a transfer cut short at once can still be dropped
    try:
        await call("begin_upload", (token, remote_path), None)
        digest = hashlib.sha256()
        async for chunk in _chunks(source, chunk_bytes):
            digest.update(chunk)
            await call("put", (token,), chunk)
        answer = await call("finish_upload", (token, digest.hexdigest()), None)
    except BaseException:
        await _abort(call, token)
        raise
    return RemoteFile.from_answer(answer)


class Download:
    """The bytes of one remote file, chunk by chunk (an async iterator).

    Ends with :class:`ChecksumMismatch` if what arrived differs from what the
    kernel read. :meth:`aclose` drops the transfer in the kernel (its open
    file) unless it ended, also when no chunk was ever read.
    """

    def __init__(self, call: HelperCall, token: str, remote_path: str, chunk_bytes: int) -> None:
        self._call = call
        self._token = token
        self._remote_path = remote_path
        self._chunk_bytes = chunk_bytes
        self._digest = hashlib.sha256()
        self._ended = False

    def __aiter__(self) -> Download:
        return self

    async def __anext__(self) -> bytes:
        if self._ended:
            raise StopAsyncIteration
        answer = await self._call("get", (self._token, self._chunk_bytes), None)
        chunk = base64.b64decode(answer["chunk"])
        self._digest.update(chunk)
        if answer["eof"]:
            self._ended = True  # the kernel closed the file
            if answer["sha256"] != self._digest.hexdigest():
                raise ChecksumMismatch(
                    f"downloading {self._remote_path!r}: the kernel read {answer['sha256']}, "
                    f"{self._digest.hexdigest()} arrived"
                )
        return chunk

    async def aclose(self) -> None:
        if not self._ended:
            self._ended = True
            await _abort(self._call, self._token)


async def begin_download(call: HelperCall, remote_path: str, chunk_bytes: int) -> tuple[RemoteFile, Download]:
    """Open ``remote_path`` for reading: what it is, and its bytes (close the :class:`Download`)."""
    token = uuid.uuid4().hex
    try:
        begun = await call("begin_download", (token, remote_path), None)
    except BaseException:
        await _abort(call, token)
        raise
    return RemoteFile.from_answer(begun["file"]), Download(call, token, remote_path, chunk_bytes)
