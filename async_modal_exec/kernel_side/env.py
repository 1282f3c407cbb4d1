"""Kernel side of environment variables: set a request's values, put back the old ones.

Kept in the kernel as ``sys.modules['_async_modal_exec_env']`` by
:mod:`async_modal_exec.environment`. The values travel in the request's
metadata, never in its source.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["apply", "apply_request", "restore", "saved"]

# What the last apply(save=True) replaced (None: the variable was unset).
saved: dict[str, str | None] = {}


def apply(values: Mapping[str, str], *, save: bool, environ: MutableMapping[str, str] = os.environ) -> None:
    """Set ``values`` in ``environ``; ``save``: remember the old values for :func:`restore` first."""
    if save:
        saved.clear()
        saved.update({name: environ.get(name) for name in values})
    environ.update(values)


def apply_request(kernel: Any, key: str, *, save: bool) -> None:
    """:func:`apply` the values in metadata ``key`` of the request ``kernel`` is running."""
    apply(kernel.get_parent()["metadata"][key], save=save)


def restore(environ: MutableMapping[str, str] = os.environ) -> None:
    """Put back what the last ``apply(save=True)`` replaced (then nothing is saved)."""
    for name, value in saved.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    saved.clear()
