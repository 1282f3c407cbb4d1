"""Exceptions of the server layer, in the package's one tree::

AsyncModalExecError
└── SessionNotFound (also LookupError)   no such session in the session store (HTTP 404)
"""

from __future__ import annotations

from ..errors import AsyncModalExecError

__all__ = ["SessionNotFound"]


class SessionNotFound(AsyncModalExecError, LookupError):
    """The FastAPI session store has no such session (never created, deleted or expired).

    ``sessions_router`` answers it with HTTP 404 and the same message.
    """
