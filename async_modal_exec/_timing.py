"""The one phase-timing helper: how long each startup phase took, logged as it ends."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator


def record_phase(
    timings: dict[str, float], name: str, began: float, log: logging.Logger, prefix: str = ""
) -> float:
    """Store ``now - began`` as ``timings[name]``, log it at INFO, and return it."""
    seconds = timings[name] = time.monotonic() - began
    log.info("%s%s: %.2f s", prefix, name.replace("_", " "), seconds)
    return seconds


@contextlib.contextmanager
def startup_phase(
    name: str,
    timings: dict[str, float],
    log: logging.Logger,
    on_progress: Callable[[str, float | None], None] | None,
) -> Iterator[None]:
    """One startup phase: ``on_progress`` hears its start ``(name, None)`` and end ``(name, seconds)``."""
    began = time.monotonic()
    if on_progress is not None:
        on_progress(name, None)
    yield
    seconds = record_phase(timings, name, began, log)
    if on_progress is not None:
        on_progress(name, seconds)
