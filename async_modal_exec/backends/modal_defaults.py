"""Modal defaults shared by the backend, the factory and the CLI (no ``modal`` import)."""

from __future__ import annotations

__all__ = ["DEFAULT_APP_NAME", "DEFAULT_SANDBOX_TIMEOUT"]

#: The Modal app sandboxes go to unless told otherwise: the backend, the
#: factory, the CLI and ``reap`` all use it, so ``reap`` finds what they made.
DEFAULT_APP_NAME = "smolagent-executor"

#: Seconds a sandbox may live (Modal's ``timeout``) unless ``create_kwargs`` say
#: otherwise. Modal's own default, 300 s, ended pooled sandboxes and long agents
#: mid-run.
DEFAULT_SANDBOX_TIMEOUT = 3600
