"""Load the gateway side as a package under a private name, where ``async_modal_exec`` is not importable.

Not imported as part of the package: :mod:`async_modal_exec.launcher` has
``python -c`` load this file by path and call
``run(load_from_directory(<this directory>))`` (locally: the package's own
files, so tracebacks show their lines and the jail script is found beside
them), or sends this module's source followed by
``run(load_from_sources({...}))`` (in a Modal sandbox, where this package is
not installed: its modules' sources travel in the command). Neither imports
``async_modal_exec`` (0.2 s of aiohttp and the rest per gateway start), and
``sys.path`` stays as ``python -c`` made it.

Standard library only.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import os
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType

__all__ = ["PRIVATE_NAME", "load_from_directory", "load_from_sources", "run"]

#: The name the package is loaded under (its modules import each other relatively).
PRIVATE_NAME = "_async_modal_exec_gateway_side"


def load_from_directory(directory: str, name: str = PRIVATE_NAME) -> ModuleType:
    """Import the package in ``directory`` (its ``__init__.py`` and modules) as ``name``."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(directory, "__init__.py"), submodule_search_locations=[directory]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"no package in {directory!r}")
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


class _SourceFinder(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Finds and loads the package ``name`` and its modules from their source texts.

    ``get_source`` gives a module's text back (:mod:`.kernel_code` ships one to kernels).
    """

    def __init__(self, name: str, sources: Mapping[str, str]) -> None:
        self.name = name
        self.sources = dict(sources)

    def _key(self, fullname: str) -> str | None:
        if fullname == self.name:
            return "__init__"
        prefix = self.name + "."
        if fullname.startswith(prefix) and fullname[len(prefix) :] in self.sources:
            return fullname[len(prefix) :]
        return None

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        key = self._key(fullname)
        if key is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=key == "__init__")

    def get_source(self, fullname: str) -> str:
        key = self._key(fullname)
        if key is None:
            raise ImportError(f"{fullname!r} is not one of the shipped modules", name=fullname)
        return self.sources[key]

    def is_package(self, fullname: str) -> bool:
        return self._key(fullname) == "__init__"

    def exec_module(self, module: ModuleType) -> None:
        key = self._key(module.__name__)
        assert key is not None
        source = self.sources[key]
        filename = f"<gateway_side/{key}.py>"
        # Tracebacks (in the sandbox's log) show the lines: mtime None keeps the entry cached.
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)


def load_from_sources(sources: Mapping[str, str], name: str = PRIVATE_NAME) -> ModuleType:
    """Import the package as ``name`` from ``sources`` (module name -> source, ``__init__`` included).

    Its modules have no ``__file__``.
    """
    sys.meta_path.insert(0, _SourceFinder(name, sources))
    return importlib.import_module(name)


def run(package: ModuleType) -> None:
    """Run the launcher of the loaded ``package`` with this process's arguments."""
    importlib.import_module(package.__name__ + ".main").main()
