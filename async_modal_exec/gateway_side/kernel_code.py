"""How the gateway side starts IPython kernels: a bootstrap and start-up lines, built from text.

The kernel spec manager (:mod:`.patches`) starts IPython kernels through
:data:`KERNEL_BOOTSTRAP` with :data:`KERNEL_TUNING_ARGS`; other kernel specs
are left alone. What runs in the kernel is the real module
:mod:`.kernel_patches`, whose source is read here through the loaded package
(its loader's ``get_source``: from the package's files, or from the sources
shipped in memory, see :mod:`.bootstrap`) and run in the kernel in a namespace
of its own, so the user's sees nothing. Standard library only.
"""

from __future__ import annotations

import importlib.abc

from . import kernel_patches

__all__ = ["KERNEL_BOOTSTRAP", "KERNEL_TUNING_ARGS", "bootstrapped", "kernel_line", "runs_ipykernel"]


def _source() -> str:
    spec = kernel_patches.__spec__
    loader = spec.loader if spec is not None else None
    # From files a SourceFileLoader, from shipped sources bootstrap's _SourceFinder: both InspectLoaders.
    source = None
    if spec is not None and isinstance(loader, importlib.abc.InspectLoader):
        source = loader.get_source(spec.name)
    if source is None:
        raise ImportError(f"no source for {kernel_patches.__name__}: the kernel patches cannot be shipped")
    return source


_SOURCE = _source()
# Shown in the kernel's tracebacks; the namespace's name is the functions' __module__.
_FILENAME = "<async_modal_exec.gateway_side.kernel_patches>"
_NAMESPACE = "{'__name__': '_async_modal_exec_kernel_patches'}"


def kernel_line(call: str) -> str:
    """One line (no newline in it) running :mod:`.kernel_patches` in a namespace of its own, then ``call``."""
    code = f"{_SOURCE}\n{call}\n"
    return f"exec(compile({code!r}, {_FILENAME!r}, 'exec'), {_NAMESPACE})"


# Runs an IPython kernel in place of ``-m ipykernel_launcher`` (kernel_patches.launch).
# Like ``-m``, the working directory does not shadow modules: dropped before
# anything (kernel_patches' own imports included) is imported.
_DROP_WORKING_DIRECTORY = """import sys

if sys.path and sys.path[0] == "":
    del sys.path[0]
"""
KERNEL_BOOTSTRAP = f"{_DROP_WORKING_DIRECTORY}{kernel_line('launch()')}\n"

# exec_lines run in the kernel at start, before any request; ``_execute_sleep=0``:
# ipykernel sleeps 0.5 ms before every execute_reply for clients that stop at
# the reply, ours ends an execution on IOPub's idle.
KERNEL_TUNING_ARGS = (
    f"--IPKernelApp.exec_lines={kernel_line('tune()')}",
    "--Kernel._execute_sleep=0",
)


def runs_ipykernel(argv: list[str]) -> bool:
    return any(part in ("ipykernel", "ipykernel_launcher") for part in argv)


def bootstrapped(argv: list[str]) -> list[str]:
    """``argv`` with ``-m ipykernel_launcher`` (or ``-m ipykernel``) run through :data:`KERNEL_BOOTSTRAP`."""
    for index in range(len(argv) - 1):
        if argv[index] == "-m" and argv[index + 1] in ("ipykernel_launcher", "ipykernel"):
            return [*argv[:index], "-c", KERNEL_BOOTSTRAP, *argv[index + 2 :]]
    return list(argv)
