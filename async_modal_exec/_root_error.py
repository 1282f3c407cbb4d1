"""The root of the exception tree (drawn in :mod:`async_modal_exec.errors`).

It has a module of its own so that :mod:`~async_modal_exec.results` (which
defines the errors that carry an ``ExecutionResult``) and
:mod:`~async_modal_exec.errors` (which gathers the whole tree) need not import
each other.
"""

from __future__ import annotations

__all__ = ["AsyncModalExecError"]


class AsyncModalExecError(Exception):
    """Root of every exception raised by async_modal_exec."""

    __module__ = "async_modal_exec.errors"
