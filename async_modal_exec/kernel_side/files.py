"""Kernel side of file transfers: the operations, confined to the work directory.

Kept in the kernel as ``sys.modules['_async_modal_exec_files']`` by
:mod:`async_modal_exec.files`, which calls :func:`install` once and then one
operation per execution (``begin_upload``, ``put`` ...). Each operation
answers with one display of the files mime type (its fields as JSON), or
raises: :class:`PathRefused` for a path outside the work directory.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import stat
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["Files", "PathRefused", "install"]

OPERATIONS = (
    "begin_upload",
    "put",
    "finish_upload",
    "abort",
    "begin_download",
    "get",
    "stat_path",
    "listdir",
    "remove",
)


class PathRefused(PermissionError):
    """A path that resolves outside the work directory."""


class Files:
    """File operations inside ``work_dir``.

    Args:
        work_dir: the directory every path must resolve into (not ``/``).
        answer: publishes an operation's answer (its fields).
        chunk: the current request's upload chunk, base64 (``put`` reads it).
    """

    def __init__(
        self, work_dir: str, answer: Callable[[dict[str, Any]], None], chunk: Callable[[], str]
    ) -> None:
        root = os.path.realpath(work_dir)
        if root == os.sep:
            raise ValueError("the work directory cannot be the filesystem's root")
        self.root = root
        self._answer = answer
        self._chunk = chunk
        # Open transfers, by token: (file, digest) to read, (file, digest, target, temporary) to write.
        self.transfers: dict[str, tuple[Any, ...]] = {}

    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root.rstrip(os.sep) + os.sep)

    def _real(self, path: str, asked: str) -> str:
        # realpath gives up at a symlink loop and collapses the rest as text,
        # where ".." can hide a symlink the OS would follow: a path is only
        # trusted once resolving it again changes nothing.
        full = os.path.realpath(path)
        if "\0" in asked or os.path.realpath(full) != full or not self._inside(full):
            raise PathRefused(f"{asked!r} is outside the work directory {self.root!r}")
        return full

    def _resolve(self, path: str) -> str:
        return self._real(os.path.join(self.root, path), path)

    def _resolve_entry(self, path: str) -> str:
        # The entry itself (a symlink is not followed), in a real parent.
        lexical = os.path.normpath(os.path.join(self.root, path))
        full = os.path.join(self._real(os.path.dirname(lexical), path), os.path.basename(lexical))
        if not self._inside(full) or full == self.root:
            raise PathRefused(f"{path!r} is outside the work directory {self.root!r}")
        return full

    @staticmethod
    def _describe(full: str) -> dict[str, Any]:
        info = os.lstat(full)
        return {
            "path": full,
            "name": os.path.basename(full),
            "size": info.st_size,
            "is_dir": stat.S_ISDIR(info.st_mode),
            "is_link": stat.S_ISLNK(info.st_mode),
            "modified": info.st_mtime,
        }

    def begin_upload(self, token: str, path: str) -> None:
        if not path or path.endswith(("/", os.sep)):
            raise IsADirectoryError(f"{path!r} names a directory, not a file")
        full = self._resolve(path)
        if os.path.isdir(full):
            raise IsADirectoryError(f"{path!r} is a directory")
        os.makedirs(os.path.dirname(full), exist_ok=True)
        temporary = os.path.join(os.path.dirname(full), f".{os.path.basename(full)}.{token}.part")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(temporary, flags, 0o644)
        self.transfers[token] = (os.fdopen(fd, "wb"), hashlib.sha256(), full, temporary)
        self._answer({"token": token})

    def put(self, token: str) -> None:
        handle, digest, _, _ = self.transfers[token]
        data = base64.b64decode(self._chunk())
        handle.write(data)
        digest.update(data)
        self._answer({"written": len(data)})

    def finish_upload(self, token: str, sha256: str) -> None:
        handle, digest, full, temporary = self.transfers.pop(token)
        try:
            handle.close()
            if digest.hexdigest() != sha256:
                raise ValueError(f"checksum mismatch: sent {sha256}, arrived {digest.hexdigest()}")
            os.replace(temporary, full)
        except BaseException:
            _unlink(temporary)
            raise
        self._answer(self._describe(full))

    def abort(self, token: str) -> None:
        transfer = self.transfers.pop(token, None)
        if transfer is not None:
            transfer[0].close()
            if len(transfer) == 4:
                _unlink(transfer[3])
        self._answer({"aborted": transfer is not None})

    def begin_download(self, token: str, path: str) -> None:
        full = self._resolve(path)
        if os.path.isdir(full):
            raise IsADirectoryError(f"{path!r} is a directory")
        # Non-blocking, then only a regular file: opening a FIFO would wait forever.
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"{path!r} is not a regular file")
        self.transfers[token] = (os.fdopen(fd, "rb"), hashlib.sha256())
        self._answer({"token": token, "file": self._describe(full)})

    def get(self, token: str, size: int) -> None:
        handle, digest = self.transfers[token]
        data = handle.read(size)
        digest.update(data)
        chunk = base64.b64encode(data).decode("ascii")
        if len(data) < size:
            self.transfers.pop(token)
            handle.close()
            self._answer({"chunk": chunk, "eof": True, "sha256": digest.hexdigest()})
        else:
            self._answer({"chunk": chunk, "eof": False})

    def stat_path(self, path: str) -> None:
        self._answer(self._describe(self._resolve(path)))

    def listdir(self, path: str) -> None:
        full = self._resolve(path)
        if not os.path.exists(full):
            raise FileNotFoundError(f"no such directory: {path!r}")
        if not os.path.isdir(full):
            raise NotADirectoryError(f"{path!r} is not a directory")
        entries = [self._describe(os.path.join(full, name)) for name in sorted(os.listdir(full))]
        self._answer({"entries": entries})

    def remove(self, path: str, recursive: bool) -> None:
        full = self._resolve_entry(path)
        if os.path.isdir(full) and not os.path.islink(full):
            if recursive:
                shutil.rmtree(full)
            else:
                os.rmdir(full)
        else:
            os.unlink(full)
        self._answer({"removed": full})


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def install(shell: Any, mime: str, chunk_key: str, work_dir: str | None) -> None:
    """Bind the operations of a :class:`Files` as this module's functions (once: later calls do nothing).

    ``shell`` is the kernel's IPython shell: answers are displays of type
    ``mime`` (``display_pub``, as ``IPython.display.publish_display_data``
    does), an upload chunk is the current request's metadata ``chunk_key``.
    ``work_dir`` None: the kernel's working directory.
    """
    module = sys.modules[__name__]
    if hasattr(module, "root"):
        return

    def answer(fields: dict[str, Any]) -> None:
        shell.display_pub.publish(data={mime: fields}, metadata=None)

    def chunk() -> str:
        return str(shell.kernel.get_parent()["metadata"][chunk_key])

    files = Files(work_dir or os.getcwd(), answer, chunk)
    for operation in OPERATIONS:
        setattr(module, operation, getattr(files, operation))
    module.root = files.root  # type: ignore[attr-defined]
    module.transfers = files.transfers  # type: ignore[attr-defined]  # a test checks none is left open
