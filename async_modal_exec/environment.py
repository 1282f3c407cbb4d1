"""Environment variables of the kernel: for every run of an executor, or for one run.

An executor's ``env=`` is set in each kernel it gets, before any code runs
(a replacement kernel gets it too). A run's ``env=`` is set just before the
code and restored just after it, also when the code fails, times out or is
cancelled; if the restore cannot be done (the connection is gone), the kernel
is replaced before the next run, so a run's variables never reach another.
The values reach the kernel in an execution's metadata, not its source: they
are in no history or traceback.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["METADATA_KEY", "apply_code", "checked_env", "restore_code"]

METADATA_KEY = "async_modal_exec_env"

_APPLY = """
def _async_modal_exec_env(save):
    import os, sys, types
    values = get_ipython().kernel.get_parent()["metadata"][{key!r}]
    store = sys.modules.setdefault("_async_modal_exec_env", types.ModuleType("_async_modal_exec_env"))
    if save:
        store.saved = {{name: os.environ.get(name) for name in values}}
    os.environ.update(values)
_async_modal_exec_env({save!r})
del _async_modal_exec_env
"""

_RESTORE = """
def _async_modal_exec_env():
    import os, sys
    store = sys.modules["_async_modal_exec_env"]  # missing: an error, and the kernel is replaced
    for name, value in store.saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    store.saved = {}
_async_modal_exec_env()
del _async_modal_exec_env
"""


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


def apply_code(*, save: bool) -> str:
    """Code setting the variables of the request's metadata (``save``: remember the old values)."""
    return _APPLY.format(key=METADATA_KEY, save=save)


def restore_code() -> str:
    """Code putting back the values saved by ``apply_code(save=True)``."""
    return _RESTORE
