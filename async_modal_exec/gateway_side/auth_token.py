"""The gateway's auth token: taken from the environment, then scrubbed from it.

The token comes in ``KG_AUTH_TOKEN`` (never argv, which is public). Standard
library only.
"""

from __future__ import annotations

import os
import sys

__all__ = ["TOKEN_ENV", "scrubbed_environment", "take_token"]

TOKEN_ENV = "KG_AUTH_TOKEN"
_TOKEN_FD_ENV = "ASYNC_MODAL_EXEC_TOKEN_FD"


def scrubbed_environment(environ: dict[str, str], token_fd: int) -> dict[str, str]:
    """``environ`` without the token, naming instead the pipe the token crosses ``exec`` in."""
    env = {name: value for name, value in environ.items() if name != TOKEN_ENV}
    env[_TOKEN_FD_ENV] = str(token_fd)
    return env


def take_token() -> str | None:
    """The gateway token, once it is out of this process's environment.

    ``/proc/<pid>/environ`` shows the environment a process was started with,
    whatever it later does to ``os.environ``: the launcher starts itself again
    (``exec``: same pid, same pipes, same ``sys.orig_argv``) without the
    token, which crosses the ``exec`` in a pipe whose number is in the new
    environment. Returns None when no token was given.
    """
    fd = os.environ.pop(_TOKEN_FD_ENV, None)
    if fd is not None:
        with os.fdopen(int(fd), "rb") as pipe:
            return pipe.read().decode()
    token = os.environ.get(TOKEN_ENV)
    if token is None:
        return None
    read_end, write_end = os.pipe()
    os.write(write_end, token.encode())  # a few bytes: never fills the pipe
    os.close(write_end)
    os.set_inheritable(read_end, True)
    env = scrubbed_environment(dict(os.environ), read_end)
    sys.stdout.flush()
    os.execve(sys.executable, sys.orig_argv, env)
    raise AssertionError("unreachable")  # pragma: no cover - execve does not return
