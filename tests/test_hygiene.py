"""What the package leaves in logs, against a real gateway on loopback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from async_modal_exec import AsyncExecutor
from async_modal_exec.backends import GatewayEndpoint

MakeExecutor = Callable[..., Awaitable[AsyncExecutor]]


async def test_the_gateway_token_is_in_no_log_record(
    make_executor: MakeExecutor, gateway: GatewayEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    # websockets.client logs every handshake header at DEBUG, Authorization included.
    token = gateway.token
    assert token
    caplog.set_level(logging.DEBUG)  # the root logger: every library's records reach caplog
    executor = await make_executor()
    assert (await executor.run("print('hi')")).stdout == "hi\n"
    # A dropped connection makes a second handshake (the reconnect path).
    channel = executor._session.channel  # type: ignore[union-attr]
    assert channel is not None and channel._ws is not None
    channel._ws.transport.abort()
    await asyncio.sleep(0.1)
    assert (await executor.run("print('again')", timeout=30)).stdout == "again\n"
    await executor.aclose()
    records = caplog.records
    assert any(record.name.startswith("websockets") for record in records), "websockets logged nothing"
    leaked = [
        (record.name, record.getMessage())
        for record in records
        if token in record.getMessage() or token in repr(record.args) or token in str(record.msg)
    ]
    assert leaked == []
    assert token not in caplog.text
    # The header is still logged, its value is not.
    assert any(
        "Authorization" in record.getMessage() and "[redacted]" in record.getMessage() for record in records
    )


def test_redacting_logger_hides_credentials_and_passes_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    from async_modal_exec._redact import redacting_logger, secrets_of

    headers = {"Authorization": "token s3cr3t-value", "User-Agent": "x"}
    assert secrets_of(headers) == ("token s3cr3t-value", "s3cr3t-value")
    log = redacting_logger("tests.hygiene", headers)
    caplog.set_level(logging.DEBUG, logger="tests.hygiene")
    log.debug("> %s: %s", "Authorization", "token s3cr3t-value")
    log.debug("< Set-Cookie: %s", "user=abc; Path=/")
    log.info("the token %s leaked", "s3cr3t-value")
    log.warning("%(n)d frames", {"n": 3})
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "> Authorization: [redacted]",
        "< Set-Cookie: [redacted]",
        "the [redacted] leaked",  # "token <value>" is a secret as a whole
        "3 frames",
    ]
    assert all("s3cr3t" not in repr(record.args) for record in caplog.records)
    assert caplog.records[0].filename == "test_hygiene.py"  # the caller's line, not the adapter's
