"""Removing what the gateway side made: directory trees and pids cgroups.

Used by the gateway (its kernels' directories, its runtime directory, its
cgroup when it stops) and by :mod:`async_modal_exec.backends.isolation` (the
backend's cgroup). Standard library only. Callers pass only paths they made
or checked (a kernel's directories are named by a validated UUID).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["remove_cgroup", "remove_trees"]


def remove_trees(paths: Iterable[str]) -> None:
    """Remove directory trees, also those whose owner (a kernel) took away write or search permission.

    Permissions are given back only inside the tree being removed, never
    above it, and never through a symlink a kernel could swap in.
    """
    for top in paths:
        if os.path.lexists(top):
            _rmtree(top, top)


def _rmtree(path: str, top: str) -> None:
    def allow_and_retry(function: Any, failed: str, _exc: Any) -> None:
        for directory in (os.path.dirname(failed), failed):
            if directory == top or directory.startswith(top.rstrip("/") + "/"):
                _allow(directory)
        with contextlib.suppress(OSError):
            if function in (os.rmdir, os.unlink, os.remove):
                function(failed)
            elif os.path.isdir(failed) and not os.path.islink(failed):
                _rmtree(failed, top)  # it could not be opened or listed: now it can

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=allow_and_retry)
    else:  # onerror is deprecated from 3.12 on; the handler takes either
        shutil.rmtree(path, onerror=allow_and_retry)


def _allow(directory: str) -> None:
    """Give the owner ``rwx`` on ``directory`` itself; a symlink there (swapped in) is left alone."""
    try:
        # O_PATH needs no permission on the directory; O_NOFOLLOW + O_DIRECTORY refuse a symlink.
        fd = os.open(directory, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IRWXU)  # the inode opened, whatever the path is now
    finally:
        os.close(fd)


def remove_cgroup(path: str) -> bool:
    """Remove a backend's pids cgroup and its kernels' (``kernel-*``) under it; whether it is gone.

    Only ``rmdir``: a cgroup with processes in it (one just killed but not
    reaped yet) stays, and so does anything that is not an empty directory.
    """
    with contextlib.suppress(OSError):
        for entry in os.listdir(path):
            if entry.startswith("kernel-"):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(path, entry))
    with contextlib.suppress(OSError):
        os.rmdir(path)
    return not os.path.exists(path)
