"""Install only what the sandbox is missing: one probe, then one installer command.

Used by :meth:`AsyncExecutor.install` (and through it by the smolagents
facade). The probe runs in the kernel: a requirement is satisfied when its
distribution is installed at a version its spec allows (checked with
``packaging`` where the kernel has it, else presence only), or, for a bare
import name, when the module imports. The missing ones go to one installer
command (``uv pip install`` where the sandbox has ``uv``, else pip, in the
kernel's own interpreter), whose output is streamed while it runs. Both run
:mod:`.kernel_side.packages` in the kernel.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .deadline import Deadline
from .errors import ExecutorStateError, PackageInstallError, ProtocolError
from .kernel_side import run_code
from .results import ErrorEvent, Event, ExecutionResult, StderrEvent, StdoutEvent

if TYPE_CHECKING:
    from .backends.base import Backend

logger = logging.getLogger("async_modal_exec.packages")
_REFRESH_TIMEOUT = 10.0  # after a host install: the kernel refreshes its import caches

__all__ = [
    "IMPORT_TO_DISTRIBUTION",
    "InstallReport",
    "PackageRecord",
    "Requirement",
    "requirement_for_import",
    "requirement_from_spec",
]

# Import names whose distribution is named differently (smolagents maps only PIL).
IMPORT_TO_DISTRIBUTION: Mapping[str, str] = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "cv2": "opencv-python",
    "yaml": "pyyaml",
    "bs4": "beautifulsoup4",
    "dateutil": "python-dateutil",
    "dotenv": "python-dotenv",
    "docx": "python-docx",
    "pptx": "python-pptx",
    "fitz": "pymupdf",
    "Crypto": "pycryptodome",
    "jwt": "pyjwt",
    "serial": "pyserial",
    "usb": "pyusb",
    "magic": "python-magic",
    "attr": "attrs",
    "google.protobuf": "protobuf",
    "tiktoken": "tiktoken",
    "Levenshtein": "python-levenshtein",
    "mpl_toolkits": "matplotlib",
    "pkg_resources": "setuptools",
}

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_MARKER = "__async_modal_exec__="


@dataclass(frozen=True)
class Requirement:
    """One package wanted in the sandbox.

    Attributes:
        spec: what to give the installer (``"pillow"``, ``"boto3>=1.34"``, a URL ...).
        distribution: the distribution name, to check if it is installed (None if unknown).
        import_name: the module it provides, to check if it is importable (None if unknown).
    """

    spec: str
    distribution: str | None
    import_name: str | None = None


def requirement_for_import(module: str) -> Requirement:
    """The requirement that provides top-level module ``module``."""
    distribution = IMPORT_TO_DISTRIBUTION.get(module, module.replace("_", "-"))
    return Requirement(spec=distribution, distribution=distribution, import_name=module)


def requirement_from_spec(spec: str) -> Requirement:
    """A requirement given as an installer spec (``"pkg"``, ``"pkg>=1"``, ``"pkg @ url"``).

    A bare import name with a known distribution (``"PIL"``, ``"sklearn"``) is
    mapped, since ``additional_imports`` are import names.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a requirement must be a non-empty installer spec, got {spec!r}")
    spec = spec.strip()
    if spec in IMPORT_TO_DISTRIBUTION:
        return requirement_for_import(spec)
    match = _NAME.match(spec)
    name = match.group(1) if match and "/" not in spec.split("@")[0] else None
    import_name = name.replace("-", "_") if name and name == spec else None
    return Requirement(spec=spec, distribution=name, import_name=import_name)


def unique(requirements: Iterable[Requirement]) -> list[Requirement]:
    """Requirements without duplicates (same spec), in order."""
    seen: dict[str, Requirement] = {}
    for requirement in requirements:
        seen.setdefault(requirement.spec, requirement)
    return list(seen.values())


@dataclass(frozen=True)
class InstallReport:
    """What :meth:`AsyncExecutor.install` did.

    Attributes:
        installed: the specs that were missing and are now installed.
        already_present: the specs the sandbox already satisfied (or that this
            executor installed before).
        output: the end of the installer's output ("" when nothing ran).
    """

    installed: tuple[str, ...] = ()
    already_present: tuple[str, ...] = ()
    output: str = ""


@dataclass
class PackageRecord:
    """What one executor installed or found, so nothing is probed twice."""

    installed: list[str] = field(default_factory=list)
    already_present: list[str] = field(default_factory=list)

    def known(self) -> set[str]:
        return {*self.installed, *self.already_present}


def _marked_json(stdout: str) -> Any:
    for line in reversed(stdout.splitlines()):
        if line.startswith(_MARKER):
            return json.loads(line[len(_MARKER) :])
    raise ProtocolError(f"the sandbox did not answer the package probe: {stdout[-500:]!r}")


def probe_code(requirements: Sequence[Requirement]) -> str:
    """Code asking the kernel which requirements are satisfied, and whether it has ``uv``."""
    wanted = [[r.spec, r.distribution, r.import_name] for r in requirements]
    return run_code("packages", f"answer({_MARKER!r}, probe({wanted!r}))")


def install_code(specs: Sequence[str], *, use_uv: bool) -> str:
    """Code running one installer command in the kernel's interpreter, its output streamed on stderr."""
    return run_code("packages", f"answer({_MARKER!r}, install({list(specs)!r}, {use_uv!r}))")


class HostInstaller(Protocol):
    """What :func:`install` uses of a started sandbox (see :class:`~async_modal_exec.Sandbox`)."""

    @property
    def installs_on_host(self) -> bool: ...

    async def install(self, specs: list[str], timeout: float) -> tuple[int, str]: ...


class PackageExecutor(Protocol):
    """What :func:`install` uses of an executor (an :class:`~async_modal_exec.AsyncExecutor`)."""

    @property
    def packages(self) -> PackageRecord: ...

    @property
    def sandbox(self) -> HostInstaller | None: ...

    async def run(self, code: str, *, timeout: float | Deadline | None = None) -> ExecutionResult: ...

    def stream(
        self, code: str, *, timeout: float | Deadline | None = None
    ) -> AsyncGenerator[Event, None]: ...


class Provisioner(Protocol):
    """What :func:`provision` uses of an executor (an :class:`~async_modal_exec.AsyncExecutor`)."""

    async def install(
        self, requirements: Sequence[str | Requirement], *, timeout: float | None
    ) -> InstallReport: ...


async def install(
    executor: PackageExecutor,
    requirements: Sequence[str | Requirement],
    *,
    timeout: float | None,
    on_output: Callable[[str], None] | None,
) -> InstallReport:
    """See :meth:`AsyncExecutor.install`."""
    if isinstance(requirements, str):
        raise TypeError("requirements must be a list of specs, not one string")
    wanted = unique(r if isinstance(r, Requirement) else requirement_from_spec(r) for r in requirements)
    record = executor.packages
    known = record.known()
    todo = [r for r in wanted if r.spec not in known]
    present = [r.spec for r in wanted if r.spec in known]
    if not todo:
        return InstallReport(already_present=tuple(present))
    deadline = Deadline.after(timeout)  # one for the probe and the installer
    probe = _marked_json((await executor.run(probe_code(todo), timeout=deadline)).raise_for_error().stdout)
    missing = [r for r in todo if not probe["satisfied"].get(r.spec)]
    record.already_present += [r.spec for r in todo if r not in missing]
    present += [r.spec for r in todo if r not in missing]
    if not missing:
        logger.info("already in the sandbox, nothing to install: %s", ", ".join(r.spec for r in todo))
        return InstallReport(already_present=tuple(present))
    specs = [r.spec for r in missing]
    logger.info("installing in the sandbox: %s", " ".join(specs))
    sandbox = executor.sandbox
    if sandbox is None:  # the probe ran: started, unless closed since
        raise ExecutorStateError("the executor is closed")
    if sandbox.installs_on_host:
        returncode, text = await sandbox.install(specs, deadline.remaining())
        if on_output is not None and text:
            on_output(text)
    else:
        stdout: list[str] = []
        code = install_code(specs, use_uv=bool(probe["uv"]))
        async with aclosing(executor.stream(code, timeout=deadline)) as events:
            async for event in events:
                if isinstance(event, StderrEvent):
                    if on_output is not None:
                        on_output(event.text)
                elif isinstance(event, StdoutEvent):
                    stdout.append(event.text)
                elif isinstance(event, ErrorEvent):
                    raise PackageInstallError(
                        f"the installer of {', '.join(specs)} could not run: {event.error}",
                        packages=specs,
                        output="",
                    )
        outcome = _marked_json("".join(stdout))
        returncode, text = int(outcome["returncode"]), str(outcome["output"])
    if returncode != 0:
        named = [spec for spec in specs if spec.lower() in text.lower()] or specs
        raise PackageInstallError(
            f"installing {', '.join(named)} in the sandbox failed:\n{text[-1500:]}",
            packages=named,
            output=text,
        )
    if sandbox.installs_on_host:
        # The kernel's import caches do not know the new files yet. A bound of
        # its own: an install that finished in time is not reported as a timeout.
        refresh = "import importlib\nimportlib.invalidate_caches()"
        (await executor.run(refresh, timeout=Deadline.after(_REFRESH_TIMEOUT))).raise_for_error()
    record.installed += specs
    return InstallReport(installed=tuple(specs), already_present=tuple(present), output=text)


async def provision(executor: Provisioner, backend: Backend) -> None:
    """Install ``backend.requirements`` with ``executor`` unless the sandbox has them already.

    Once done, the backend may keep the result (Modal: a snapshot), and its
    ``requirements_ready`` turns true: the sandbox's next kernels skip even the probe.
    """
    if not backend.requirements or backend.requirements_ready:
        return
    report = await executor.install(backend.requirements, timeout=backend.requirements_timeout)
    await backend.requirements_installed(list(report.installed))
    backend.requirements_ready = True
