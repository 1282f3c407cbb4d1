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
    above it.
    """
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
