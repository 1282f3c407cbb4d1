"""Install only what the sandbox is missing: one probe, then one installer command."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Literal

from ..errors import PackageInstallError, ProtocolError
from ..executor import AsyncExecutor
from .requirements import Requirement, unique

logger = logging.getLogger("async_modal_exec.agent")

__all__ = ["InstallPolicy", "PackageInstaller"]

InstallPolicy = Literal["auto", "never"]
_MARKER = "__async_modal_exec__="


def _marked_json(stdout: str) -> Any:
    for line in reversed(stdout.splitlines()):
        if line.startswith(_MARKER):
            return json.loads(line[len(_MARKER) :])
    raise ProtocolError(f"the sandbox did not answer the package probe: {stdout[-500:]!r}")


def probe_code(requirements: Sequence[Requirement]) -> str:
    """Code asking the kernel which modules import and which distributions are installed."""
    imports = sorted({r.import_name for r in requirements if r.import_name})
    distributions = sorted({r.distribution for r in requirements if r.distribution})
    return f"""
def __ame_probe():
    import importlib.metadata, importlib.util, json, shutil
    def importable(name):
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False
    def installed(name):
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False
    print({_MARKER!r} + json.dumps({{
        "imports": {{name: importable(name) for name in {imports!r}}},
        "distributions": {{name: installed(name) for name in {distributions!r}}},
        "uv": shutil.which("uv") is not None,
    }}))
__ame_probe()
del __ame_probe
"""


def install_code(specs: Sequence[str], *, use_uv: bool) -> str:
    """Code running one installer command in the kernel's own interpreter."""
    return f"""
def __ame_install():
    import importlib, json, shutil, subprocess, sys
    if {use_uv!r}:
        command = [shutil.which("uv"), "pip", "install", "--python", sys.executable]
    else:
        command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    done = subprocess.run(command + {list(specs)!r}, capture_output=True, text=True)
    importlib.invalidate_caches()
    output = (done.stdout + done.stderr)[-4000:]
    print({_MARKER!r} + json.dumps({{"returncode": done.returncode, "output": output}}))
__ame_install()
del __ame_install
"""


class PackageInstaller:
    """Installs requirements a sandbox is missing, remembering what it did.

    Args:
        policy: ``"auto"`` (probe, install what is missing) or ``"never"``.
        timeout: seconds the installer command may take.
    """

    def __init__(self, policy: InstallPolicy = "auto", timeout: float = 600.0) -> None:
        if policy not in ("auto", "never"):
            raise ValueError(f"install_packages must be 'auto' or 'never', got {policy!r}")
        self.policy = policy
        self.timeout = timeout
        self.installed: list[str] = []
        self.already_present: list[str] = []

    async def ensure(self, executor: AsyncExecutor, requirements: Sequence[Requirement]) -> list[str]:
        """Probe once, install the missing ones in one command; return the specs installed.

        Raises:
            PackageInstallError: the installer failed (the message names the packages).
            ExecutionTimeout: the installer ran past ``timeout``.

        Cancelling the call interrupts the probe or the installer in the
        kernel (like a cancelled :meth:`AsyncExecutor.run`); nothing is
        recorded as installed, so the next call probes again.
        """
        known = {*self.installed, *self.already_present}
        todo = [r for r in unique(requirements) if r.spec not in known]
        if not todo or self.policy == "never":
            return []
        probe = _marked_json((await executor.run(probe_code(todo))).raise_for_error().stdout)
        missing = [
            r
            for r in todo
            if not (probe["imports"].get(r.import_name) or probe["distributions"].get(r.distribution))
        ]
        self.already_present += [r.spec for r in todo if r not in missing]
        if not missing:
            logger.info("already in the sandbox, nothing to install: %s", ", ".join(r.spec for r in todo))
            return []
        specs = [r.spec for r in missing]
        logger.info("installing in the sandbox: %s", " ".join(specs))
        if executor.backend.installs_on_host:
            returncode, text = await executor.backend.install(specs, self.timeout)
            (await executor.run("import importlib\nimportlib.invalidate_caches()")).raise_for_error()
        else:
            result = await executor.run(install_code(specs, use_uv=bool(probe["uv"])), timeout=self.timeout)
            outcome = _marked_json(result.raise_for_error().stdout)
            returncode, text = int(outcome["returncode"]), str(outcome["output"])
        if returncode != 0:
            named = [spec for spec in specs if spec.lower() in text.lower()] or specs
            raise PackageInstallError(
                f"installing {', '.join(named)} in the sandbox failed:\n{text[-1500:]}",
                packages=named,
                output=text,
            )
        self.installed += specs
        return specs
