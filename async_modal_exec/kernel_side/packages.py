"""Kernel side of package installs: which requirements are satisfied, and one installer command.

Run once per call (in a namespace of its own) by :mod:`async_modal_exec.packages`:
:func:`probe` or :func:`install`, whose result :func:`answer` prints as one
marked line of JSON on stdout (the installer's own output goes to stderr, as
it is written).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

__all__ = ["answer", "install", "installer_command", "probe", "run_installer", "satisfied"]


def _requirement_class() -> Callable[[str], Any] | None:
    """``packaging``'s ``Requirement`` where the kernel has it (or pip's copy), else None."""
    for name in ("packaging.requirements", "pip._vendor.packaging.requirements"):
        try:
            requirement: Callable[[str], Any] = importlib.import_module(name).Requirement
        except ImportError:
            continue
        return requirement
    return None


def importable(name: str) -> bool:
    """Module ``name`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def satisfied(
    spec: str,
    distribution: str | None,
    import_name: str | None,
    requirement: Callable[[str], Any] | None = None,
) -> bool:
    """``distribution`` is installed at a version ``spec`` allows (any version without
    ``requirement``, or if ``spec`` does not parse), or else ``import_name`` imports."""
    if distribution:
        try:
            version: str | None = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            version = None
        if version is not None:
            if requirement is None:
                return True
            try:
                return bool(requirement(spec).specifier.contains(version, prereleases=True))
            except Exception:
                return True
    return bool(import_name) and importable(str(import_name))


def probe(wanted: Sequence[Sequence[str | None]]) -> dict[str, Any]:
    """Which of ``wanted`` (``[spec, distribution, import_name]`` each) are satisfied, and whether
    ``uv`` is on the path."""
    requirement = _requirement_class()
    return {
        "satisfied": {
            str(spec): satisfied(str(spec), distribution, import_name, requirement)
            for spec, distribution, import_name in wanted
        },
        "uv": shutil.which("uv") is not None,
    }


def installer_command(use_uv: bool, python: str = sys.executable) -> list[str]:
    """The install command for interpreter ``python`` (specs to be appended)."""
    if use_uv:
        return [shutil.which("uv") or "uv", "pip", "install", "--python", python]
    return [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]


def run_installer(command: Sequence[str], output: TextIO) -> dict[str, Any]:
    """Run ``command``, copying its output to ``output`` line by line: its exit status and the
    end of its output."""
    tail: list[str] = []
    with subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            output.write(line)
            output.flush()
            tail.append(line)
            del tail[:-200]
    return {"returncode": process.returncode, "output": "".join(tail)[-4000:]}


def install(specs: Sequence[str], use_uv: bool) -> dict[str, Any]:
    """Install ``specs`` into this interpreter (output on stderr as it comes); see :func:`run_installer`."""
    outcome = run_installer([*installer_command(use_uv), *specs], sys.stderr)
    importlib.invalidate_caches()
    return outcome


def answer(marker: str, value: Any) -> None:
    """Print ``value`` as JSON behind ``marker``, on a line of its own."""
    print(marker + json.dumps(value))
