"""Code that runs inside the kernel, kept as real modules and shipped to it as text.

Each module of this package (but this ``__init__``) runs in the sandbox's
kernel, not on the host. There, nothing of ``async_modal_exec`` is installed
and the interpreter is the sandbox's: a module imports only the standard
library and takes what it needs of IPython (the shell, the kernel) as
arguments, so the tests call its functions in-process. The host reads a
module's source once (cached) and sends it with a short call line, in one of
two forms, neither binding a name in the user's namespace:

- :func:`define_code`: the module is kept in the kernel's ``sys.modules``
  under a private name (defined where missing); later calls reach it through
  ``__import__('sys').modules[...]`` (:func:`module_expr`).
- :func:`run_code`: the module runs once in a namespace of its own, then a
  call line runs there; nothing of it is kept but what that call installs.

This ``__init__`` runs on the host; its modules can be imported there too
(``host_tools`` shares the kernel side's ``MARKER``), which costs nothing:
they import only the standard library.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["define_code", "module_expr", "run_code", "source"]


@functools.cache
def source(name: str) -> str:
    """The source text of kernel-side module ``name`` (``"files"``), read once."""
    return resources.files(__name__).joinpath(f"{name}.py").read_text(encoding="utf-8")


def _filename(name: str) -> str:
    # Shown in the kernel's tracebacks (no file there holds the source).
    return f"<async_modal_exec.kernel_side.{name}>"


def module_expr(module: str) -> str:
    """An expression for the kernel's ``sys.modules[module]`` (binds no name)."""
    return f"__import__('sys').modules[{module!r}]"


def run_code(name: str, call: str, **names: str) -> str:
    """One line running kernel-side module ``name`` in a namespace of its own, then ``call`` there.

    ``call``: code run in the module's namespace after its source
    (``"answer('m:', probe([]))"``). ``names``: more names for that
    namespace, each bound to a Python expression evaluated in the user's
    namespace (``shell="get_ipython()"``); the module's own names stay out of it.
    """
    code = f"{source(name)}\n{call}\n"
    bound = "".join(f", {key!r}: {expression}" for key, expression in names.items())
    namespace = f"{{'__name__': {'_async_modal_exec_' + name!r}{bound}}}"
    return f"exec(compile({code!r}, {_filename(name)!r}, 'exec'), {namespace})"


@functools.cache
def define_code(name: str, module: str, extra: tuple[tuple[str, str], ...] = ()) -> str:
    """One line defining kernel-side module ``name`` as the kernel's ``sys.modules[module]``.

    A no-op where the kernel has that module already. ``extra``: more
    ``(source, label)`` pairs run in the module's namespace after its own
    source (code the host supplies, such as smolagents' safe-JSON decoder).
    The loader (:mod:`.loader`) runs in a namespace of its own.
    """
    sources = [(source(name), _filename(name)), *extra]
    return run_code("loader", "define(module, sources)", module=repr(module), sources=repr(sources))
