"""Keep credentials out of log records that libraries write for us.

``websockets`` logs every handshake header at DEBUG, ``Authorization: token
<token>`` among them, and the gateway's answer sets a login cookie that
authenticates as well as the token does. :func:`redacting_logger` gives the
library a logger of its own (``websockets.connect(logger=...)``) that writes
the same records with those values replaced by ``[redacted]``.

aiohttp, the REST side, logs no request or response headers, so it needs no
such logger (``tests/test_hygiene.py`` checks both with every logger at DEBUG).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

__all__ = ["REDACTED", "RedactingLogger", "redact", "redacting_logger", "secrets_of"]

REDACTED = "[redacted]"
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
# "Name: value" up to the end of the line, for the headers above.
_HEADER_VALUE = re.compile(r"(?i)\b((?:proxy-)?authorization|set-cookie|cookie)(\s*:\s*)[^\r\n]+")
# A secret shorter than this is not searched for in free text (it would match by chance).
_MIN_SECRET = 6

if TYPE_CHECKING:
    _Adapter = logging.LoggerAdapter[logging.Logger]
else:  # LoggerAdapter is not subscriptable at runtime before Python 3.11
    _Adapter = logging.LoggerAdapter


def secrets_of(headers: Mapping[str, str]) -> tuple[str, ...]:
    """The credential values in ``headers``: whole values and the part after the scheme.

    ``{"Authorization": "token abc"}`` gives ``("token abc", "abc")``; longest first,
    so replacing them in order never leaves part of a longer one behind.
    """
    found: set[str] = set()
    for name, value in headers.items():
        if name.lower() not in SENSITIVE_HEADERS or not value:
            continue
        found.add(value)
        _, _, credential = value.partition(" ")
        if credential.strip():
            found.add(credential.strip())
    return tuple(sorted((s for s in found if len(s) >= _MIN_SECRET), key=len, reverse=True))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with sensitive header values and every one of ``secrets`` replaced by ``[redacted]``."""
    text = _HEADER_VALUE.sub(lambda match: f"{match[1]}{match[2]}{REDACTED}", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class RedactingLogger(_Adapter):
    """A logger adapter that redacts credentials from each record before it is created.

    The record keeps its logger name, level and (on Python 3.11+) the caller's
    file and line; only a message that contained a credential changes: it is
    then stored already formatted, without ``args``, so no handler or filter
    downstream ever sees the value.

    Args:
        logger: the logger the records go to (e.g. ``websockets.client``).
        secrets: literal values to redact wherever they appear.
    """

    def __init__(self, logger: logging.Logger, secrets: Iterable[str] = ()) -> None:
        super().__init__(logger, {})
        self.secrets = tuple(sorted(set(secrets), key=len, reverse=True))

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, kwargs  # no ``extra`` of ours: leave the record's own alone

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        text = _format(msg, args)
        clean = redact(text, self.secrets)
        # One frame more than the adapter's own: the caller of debug()/info().
        kwargs["stacklevel"] = int(kwargs.get("stacklevel", 1)) + 1
        if clean != text:
            self.logger.log(level, clean, **kwargs)
        else:
            self.logger.log(level, msg, *args, **kwargs)


def _format(msg: object, args: tuple[object, ...]) -> str:
    if not args:
        return str(msg)
    values: object = args[0] if len(args) == 1 and isinstance(args[0], Mapping) else args
    try:
        return str(msg) % values
    except (TypeError, ValueError, KeyError):
        return f"{msg} {args!r}"


def redacting_logger(name: str, headers: Mapping[str, str]) -> RedactingLogger:
    """A :class:`RedactingLogger` on the logger ``name`` that hides the credentials in ``headers``."""
    return RedactingLogger(logging.getLogger(name), secrets_of(headers))
