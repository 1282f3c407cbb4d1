"""Optional stacks: fail at once, with the pip line, when a piece's extra is missing."""

from __future__ import annotations

import importlib.util

from .errors import MissingExtra

__all__ = ["require"]

#: What each extra brings, by the modules the package imports from it.
EXTRAS = {
    "modal": ("modal",),
    "smolagents": ("smolagents",),
    "local": ("kernel_gateway", "ipykernel"),
    "fastapi": ("fastapi",),
}


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtra` if a module of ``extra`` cannot be imported.

    ``what`` names the piece in the message (``"ModalBackend"``).
    """
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtra(
            f"{what} needs {', '.join(missing)}, which is not installed: "
            f"pip install 'async_modal_exec[{extra}]'",
            extra=extra,
        )
