"""The package's shape: imports go one way, modules stay small, the top level stays readable.

Read from the source with ``ast`` (every import statement, at any depth, under
``TYPE_CHECKING`` too), so a cycle cannot hide behind a lazy import.
"""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

import async_modal_exec

PACKAGE = Path(async_modal_exec.__file__).parent
# The sandbox side runs where the package is not installed: it imports none of it.
SANDBOX_SIDE = ("gateway_side", "kernel_side")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["async_modal_exec", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``name`` imports (``from . import x`` is x, not the package)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(
                    [*package[: len(package) - node.level + 1], *([node.module] if node.module else [])]
                )
            else:
                base = node.module or ""
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
            targets.update(submodules if len(submodules) == len(node.names) else {base, *submodules})
    return {target for target in targets if target in modules and target != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            component.append(node)
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_not_even_under_type_checking() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []
    # And the check sees a cycle when there is one.
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_the_sandbox_side_imports_nothing_of_the_package() -> None:
    modules = _modules()
    for name, path in modules.items():
        side = name.split(".")[1] if name.count(".") else ""
        if side in SANDBOX_SIDE or name == "async_modal_exec.kernel_jail":
            outside = {m for m in _imports(name, path, modules) if m.split(".")[1:2] != [side]}
            assert outside == set(), name


def test_no_module_is_over_600_lines_and_the_executor_is_small() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: size for name, size in sizes.items() if size > 600} == {}
    assert sizes["async_modal_exec.executor"] <= 460


def test_the_top_level_is_at_most_30_names_and_each_one_resolves() -> None:
    names = [name for name in async_modal_exec.__all__ if name != "__version__"]
    assert len(names) <= 30
    for name in names:
        assert getattr(async_modal_exec, name) is not None


def test_a_name_that_moved_off_the_top_level_warns_where_it_lives_now() -> None:
    with pytest.warns(DeprecationWarning, match=r"import StdoutEvent from async_modal_exec\.results"):
        moved = async_modal_exec.StdoutEvent  # type: ignore[attr-defined]
    assert moved is importlib.import_module("async_modal_exec.results").StdoutEvent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert async_modal_exec.ExecutionTimeout.__name__ == "ExecutionTimeout"  # a kept name: no warning
    with pytest.raises(AttributeError):
        _ = async_modal_exec.NoSuchName  # type: ignore[attr-defined]
