"""Starts the gateway side (:mod:`async_modal_exec.gateway_side`): here, in a subprocess, or in a sandbox.

``python -m async_modal_exec.launcher [options]`` runs the launcher in this
process (after importing this package). The commands built here run it
without this package, through :mod:`async_modal_exec.gateway_side.bootstrap`
(``python -c``, so ``sys.path`` is as with ``-m``):

* :func:`local_command`: a short ``-c`` that loads ``bootstrap.py`` by path,
  which loads the gateway side from this package's files under a private
  name, without importing ``async_modal_exec`` (aiohttp and the rest: 0.2 s
  more per gateway start). ``LocalBackend`` runs it.
* :func:`sandbox_command`: ``bootstrap.py``'s source and the gateway side's
  module sources in the ``-c`` itself, for a Modal sandbox where this package
  is not installed. ``ModalBackend`` runs it (reading files: off the event
  loop). ``--kernel-jail`` needs the files (not used there).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .gateway_side.auth_token import TOKEN_ENV
from .gateway_side.main import PORT_LINE_PREFIX, main

__all__ = ["GATEWAY_SIDE_DIR", "PORT_LINE_PREFIX", "TOKEN_ENV", "local_command", "sandbox_command"]

#: The gateway side's files (``kernel_jail.py`` is found beside this directory).
GATEWAY_SIDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gateway_side")

# A single argument of a command line may hold 128 KiB on Linux (MAX_ARG_STRLEN).
_MAX_ARGUMENT = 128 * 1024


def gateway_side_sources() -> dict[str, str]:
    """Module name (``__init__`` included) -> source of the gateway side, but the bootstrap itself."""
    return {
        path.stem: path.read_text()
        for path in sorted(Path(GATEWAY_SIDE_DIR).glob("*.py"))
        if path.name != "bootstrap.py"
    }


# Loads bootstrap.py (first argument) on its own, then the package (second
# argument) through it. Short: command lines are public and people read them.
_RUN_FROM_FILES = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location('_async_modal_exec_bootstrap', sys.argv.pop(1)); "
    "bootstrap = importlib.util.module_from_spec(spec); spec.loader.exec_module(bootstrap); "
    "bootstrap.run(bootstrap.load_from_directory(sys.argv.pop(1)))"
)


def local_command(python: str, options: Iterable[str]) -> list[str]:
    """The command that runs the launcher with ``python`` from this package's files."""
    bootstrap = os.path.join(GATEWAY_SIDE_DIR, "bootstrap.py")
    return [python, "-c", _RUN_FROM_FILES, bootstrap, GATEWAY_SIDE_DIR, *options]


def sandbox_command(python: str, options: Iterable[str]) -> tuple[str, ...]:
    """The command that runs the launcher with ``python`` where this package is not installed."""
    bootstrap = Path(GATEWAY_SIDE_DIR, "bootstrap.py").read_text()
    source = f"{bootstrap}\nrun(load_from_sources({gateway_side_sources()!r}))\n"
    if len(source.encode()) >= _MAX_ARGUMENT:  # pragma: no cover - a guard for whoever grows the package
        raise RuntimeError(f"the gateway side's sources ({len(source)} bytes) no longer fit in one argument")
    return (python, "-c", source, *options)


if __name__ == "__main__":
    main()
