"""Environment variables of the kernel: for every run of an executor, or for one run.

An executor's ``env=`` is set in each kernel it gets, before any code runs
(a replacement kernel gets it too). A run's ``env=`` is set just before the
code and restored just after it, also when the code fails, times out or is
cancelled; if the restore cannot be done (the connection is gone), the kernel
is replaced before the next run, so a run's variables never reach another.
The values reach the kernel in an execution's metadata, not its source: they
are in no history or traceback. The kernel side is :mod:`.kernel_side.env`.
"""

from __future__ import annotations

from collections.abc import Mapping

from .kernel_side import define_code, module_expr

__all__ = ["METADATA_KEY", "apply_code", "checked_env", "restore_code"]

METADATA_KEY = "async_modal_exec_env"

MODULE = "_async_modal_exec_env"  # the kernel side's name in the kernel's sys.modules


def checked_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """``env`` as a plain dict, refused with ``ValueError``/``TypeError`` if it cannot be an environment."""
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of str to str, not {type(env).__name__}")
    checked: dict[str, str] = {}
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"env names and values must be str, got {name!r}: {value!r}")
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise ValueError(f"{name!r} cannot be an environment variable name (or its value has NUL)")
        checked[name] = value
    return checked


def apply_code(*, save: bool, define: bool = True) -> str:
    """Code setting the variables of the request's metadata (``save``: remember the old values).

    ``define=False`` leaves out the kernel side's source (2.8 KB): for a
    kernel known to have it already.
    """
    apply = f"{module_expr(MODULE)}.apply_request(get_ipython().kernel, {METADATA_KEY!r}, save={save!r})"
    return f"{define_code('env', MODULE)}\n{apply}\n" if define else f"{apply}\n"


def restore_code() -> str:
    """Code putting back the values saved by ``apply_code(save=True)``.

    Where the kernel lacks the module (a restarted kernel), it raises
    ``KeyError``, and the executor replaces the kernel.
    """
    return f"{module_expr(MODULE)}.restore()\n"
