"""The one phase-timing helper: how long each startup phase took, logged as it ends."""

from __future__ import annotations

import logging
import time


def record_phase(
    timings: dict[str, float], name: str, began: float, log: logging.Logger, prefix: str = ""
) -> float:
    """Store ``now - began`` as ``timings[name]``, log it at INFO, and return it."""
    seconds = timings[name] = time.monotonic() - began
    log.info("%s%s: %.2f s", prefix, name.replace("_", " "), seconds)
    return seconds
