"""Which packages a tool needs, and whether it can be sent to a sandbox as source.

Pure functions: nothing here talks to a kernel.

Requirements of a tool come from, in order:

1. an explicit list (``tool_requirements={name: [...]}``, or the executor-wide
   ``requirements=[...]``);
2. ``tool.to_dict()["requirements"]`` when ``to_dict()`` works;
3. a scan of the imports in the tool's source when it does not.

Imports the code guards itself (``try: import numpy`` / ``except ImportError``)
are optional: not installed. smolagents lists them as requirements; its own
patched ``final_answer`` tool guards ``PIL`` and ``numpy`` that way, so a
sandbox without numpy got it installed for every agent.

A tool whose ``to_dict()`` raises is never fatal by itself.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from smolagents.tools import Tool, validate_tool_attributes
from smolagents.utils import get_source, instance_to_source

from ..packages import (
    IMPORT_TO_DISTRIBUTION,
    Requirement,
    requirement_for_import,
    requirement_from_spec,
)

__all__ = [
    "IMPORT_TO_DISTRIBUTION",
    "Requirement",
    "guard_imports",
    "optional_imports",
    "requirement_for_import",
    "requirement_from_spec",
    "requirements_of_tool",
    "shipping_problem",
    "state_difference",
]

# Never installed: provided by the sandbox's own environment or meaningless there.
_NEVER_INSTALL = frozenset({"smolagents", "__future__"})
_IMPORT_LINE = re.compile(r"^\s*(?:import\s+([\w.]+(?:\s*,\s*[\w.]+)*)|from\s+([\w.]+)\s+import)", re.M)
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _imports_of(source: str) -> list[str]:
    names: set[str] = set()
    for match in _IMPORT_LINE.finditer(source):
        found = match.group(1) or match.group(2)
        for part in found.split(","):
            module = part.strip().split(" ")[0]
            if module and not module.startswith("."):
                names.add(module.split(".")[0])
    wanted = names - set(sys.stdlib_module_names) - _NEVER_INSTALL
    return sorted(wanted)


_IMPORT_ERRORS = frozenset({"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


def _handles_import_errors(node: ast.Try) -> bool:
    for handler in node.handlers:
        caught = handler.type
        names = caught.elts if isinstance(caught, ast.Tuple) else [caught]
        if caught is None or any(isinstance(name, ast.Name) and name.id in _IMPORT_ERRORS for name in names):
            return True
    return False


def optional_imports(source: str) -> set[str]:
    """Top-level modules ``source`` imports only inside ``try`` blocks that handle ImportError.

    Module-level imports are not counted: in a tool's ``to_dict()["code"]``
    they are smolagents' copies of the imports it found in the methods.
    """
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return set()
    guarded: set[str] = set()
    unguarded: set[str] = set()

    def visit(node: ast.AST, in_guard: bool) -> None:
        if isinstance(node, ast.Import):
            (guarded if in_guard else unguarded).update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.module and not node.level:
                (guarded if in_guard else unguarded).add(node.module.split(".")[0])
        elif isinstance(node, ast.Try):
            for statement in node.body:
                visit(statement, in_guard or _handles_import_errors(node))
            for part in (*node.handlers, *node.orelse, *node.finalbody):
                visit(part, in_guard)
        else:
            for child in ast.iter_child_nodes(node):
                visit(child, in_guard)

    for statement in tree.body:
        if not isinstance(statement, ast.Import | ast.ImportFrom):
            visit(statement, False)
    return guarded - unguarded


_MODULE_LEVEL_IMPORT = re.compile(r"^(?:import|from)\s+([\w.]+).*$", re.M)


def guard_imports(code: str, modules: set[str]) -> str:
    """Wrap ``code``'s module-level imports of ``modules`` in ``try``/``except ImportError``.

    smolagents copies every import of a tool's methods to the top of the code
    it sends, guarded ones too: without the package the whole definition
    would fail, where the method itself would have done without it.
    """

    def guarded(match: re.Match[str]) -> str:
        if match.group(1).split(".")[0] not in modules:
            return match.group(0)
        return f"try:\n    {match.group(0)}\nexcept ImportError:\n    pass"

    return _MODULE_LEVEL_IMPORT.sub(guarded, code) if modules else code


def _tool_source(tool: Any) -> str:
    """Best-effort source of a tool for scanning (class, or the @tool function)."""
    try:
        if type(tool).__name__ == "SimpleTool":
            return str(get_source(tool.forward))
        return textwrap.dedent(inspect.getsource(type(tool)))
    except (OSError, TypeError):
        return ""


def requirements_of_tool(
    tool: Any, explicit: Sequence[str] | None = None
) -> tuple[list[Requirement], str, set[str]]:
    """The requirements of ``tool``, where they came from (``explicit``, ``to_dict``,
    ``scan``), and the modules its code imports only optionally (not required)."""
    if explicit is not None:
        return [requirement_from_spec(spec) for spec in explicit], "explicit", set()
    try:
        described = tool.to_dict()
        names, source = described["requirements"], described["code"]
        origin = "to_dict"
    except Exception:  # to_dict() raises for many real tools; never fatal by itself
        source = _tool_source(tool)
        names, origin = _imports_of(source), "scan"
    optional = optional_imports(source)
    wanted = [requirement_for_import(name) for name in names if name not in _NEVER_INSTALL | optional]
    return wanted, origin, optional


def is_mcp_tool(tool: Any) -> bool:
    """True for tools wrapping an MCP server (``ToolCollection.from_mcp``, ``MCPClient``)."""
    module = type(tool).__module__ or ""
    return module.startswith(("mcpadapt", "smolagents.mcp_client", "mcp.")) or "MCP" in type(tool).__name__


def shipping_problem(tool: Any, *, check_state: bool = True) -> str | None:
    """Why ``tool`` cannot be sent to the sandbox as source, or None if it can.

    Sent as source, a tool is rebuilt in the sandbox by calling its class with
    no arguments; with ``check_state``, a tool whose state differs from such a
    fresh instance (see :func:`state_difference`) cannot be sent either.
    """
    if not isinstance(tool, Tool):
        return f"it is a {type(tool).__name__}, not a Tool (managed agents run on the host)"
    try:
        validate_tool_attributes(type(tool), check_imports=False)
        instance_to_source(tool, base_cls=Tool)
    except Exception as exc:
        lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip()]
        detail = " ".join(lines) or type(exc).__name__
        return f"its source cannot be rebuilt in the sandbox ({detail[:300]})"
    return state_difference(tool) if check_state else None


def _same_value(ours: Any, fresh: Any) -> bool:
    if type(ours) is not type(fresh):
        return False
    if all("__eq__" not in vars(klass) for klass in type(ours).__mro__[:-1]):
        return True  # no equality of its own: a fresh object of the same class is the same state
    try:
        return bool(ours == fresh)
    except Exception:  # e.g. an array's elementwise ==: not provably the same
        return False


def state_difference(tool: Any) -> str | None:
    """Why ``tool``'s state is not what the sandbox would rebuild, or None if it is.

    The sandbox runs ``ToolClass()``. Here the same call builds a fresh
    instance on the host (the tool's own ``__init__`` runs once more, in this
    process), and every instance attribute is compared: a value given to the
    constructor, set after construction, or left by ``setup()`` is state the
    sandbox's copy would not have. Values are compared with ``==``; an object
    whose class has no equality of its own counts as the same when its class
    is. Only attribute names are reported, never values (they may be secrets).
    """
    try:
        fresh = type(tool)()
    except Exception as exc:
        return f"its class cannot be rebuilt with no arguments ({type(exc).__name__})"
    ours, theirs = vars(tool), vars(fresh)
    for name in sorted(set(ours) | set(theirs)):
        if name == "is_initialized":
            continue  # set by setup(), which the sandbox runs on first use too
        if name not in theirs:
            return f"its attribute {name!r} was set after construction (the sandbox's copy would lack it)"
        if name not in ours or not _same_value(ours[name], theirs[name]):
            return f"its attribute {name!r} differs from a fresh instance's (state given to its constructor?)"
    return None
