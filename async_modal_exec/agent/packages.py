"""The facade's install policy over :meth:`AsyncExecutor.install`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from ..executor import AsyncExecutor
from ..packages import Requirement

__all__ = ["InstallPolicy", "PackageInstaller"]

InstallPolicy = Literal["auto", "never"]


class PackageInstaller:
    """Installs the requirements of the tools a sandbox is missing, or never.

    Args:
        policy: ``"auto"`` (probe, install what is missing) or ``"never"``.
        timeout: seconds the probe and the installer may take.
    """

    def __init__(self, policy: InstallPolicy = "auto", timeout: float = 600.0) -> None:
        if policy not in ("auto", "never"):
            raise ValueError(f"install_packages must be 'auto' or 'never', got {policy!r}")
        self.policy = policy
        self.timeout = timeout
        self.installed: list[str] = []
        self.already_present: list[str] = []

    async def ensure(self, executor: AsyncExecutor, requirements: Sequence[Requirement]) -> list[str]:
        """Install the missing ones with :meth:`AsyncExecutor.install`; return the specs installed.

        Raises:
            PackageInstallError: the installer failed (the message names the packages).
            ExecutionTimeout: the probe and installer ran past ``timeout``.

        Cancelling the call interrupts the probe or the installer in the
        kernel; nothing is recorded as installed, so the next call probes again.
        """
        if self.policy == "never" or not requirements:
            return []
        report = await executor.install(requirements, timeout=self.timeout)
        self.installed += [spec for spec in report.installed if spec not in self.installed]
        self.already_present += [spec for spec in report.already_present if spec not in self.already_present]
        return list(report.installed)
