"""Kernel side: defines a module from source text in the kernel's ``sys.modules``.

Shipped by :func:`async_modal_exec.kernel_side.define_code`, which runs this
file in a namespace of its own and then calls :func:`define`.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence


def define(name: str, sources: Sequence[tuple[str, str]]) -> None:
    """Make module ``name`` of ``sources`` (``(source, filename)`` pairs, run in order) unless it exists.

    As an import does, the module is in ``sys.modules`` while its code runs
    (``dataclasses`` looks it up there) and removed again if that code fails.
    """
    if name in sys.modules:
        return
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        for text, filename in sources:
            exec(compile(text, filename, "exec"), module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
