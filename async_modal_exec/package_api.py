"""The install API of an executor (mixed into :class:`~async_modal_exec.AsyncExecutor`).

The work is :mod:`~async_modal_exec.packages`: probe what the kernel has,
install what is missing (in the kernel, or from the host for a jailed local
kernel), remember what was done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from . import packages

__all__ = ["PackageOperations"]


class PackageOperations:
    """Package installs on the executor's sandbox."""

    async def install(
        self: packages.PackageExecutor,
        requirements: Sequence[str | packages.Requirement],
        *,
        timeout: float | None = 600.0,
        on_output: Callable[[str], None] | None = None,
    ) -> packages.InstallReport:
        """Make ``requirements`` (installer specs: ``"pandas>=2"``) importable in the sandbox.

        One probe asks the kernel which are already satisfied (the
        distribution is installed at a version the spec allows); the missing
        ones are installed in one command, with ``uv pip`` where the sandbox
        has ``uv``, else pip, in the kernel's own interpreter (a jailed local
        kernel has no network: its packages are installed from the host into
        the backend's package directory). What this executor installed or
        found is remembered, so asking again costs nothing.

        Args:
            requirements: the specs.
            timeout: seconds for the probe and the installer together (None: no limit).
            on_output: called on the loop with each piece of the installer's
                output as it is written (it must not block).

        Returns:
            An :class:`InstallReport`: what was installed, what was already there.

        Raises:
            PackageInstallError: the installer failed (the message names the packages).
            ExecutionTimeout: ``timeout`` expired (the installer is interrupted).

        Cancelling the call interrupts the probe or the installer (like a
        cancelled :meth:`run`); nothing is recorded as installed, so the next
        call probes again.
        """
        return await packages.install(self, requirements, timeout=timeout, on_output=on_output)
