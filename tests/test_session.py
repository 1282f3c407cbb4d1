"""KernelSession through every transition of its state table, against the scripted gateway double.

The double (``tests/gateway_double.py``) stands in for the gateway only where a
real one cannot be made to fail on demand (slow or failing creation, failing
delete, refused websocket); each case also checks what reached the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from async_modal_exec import AsyncExecutor, GatewayBackend, GatewayError
from async_modal_exec.backends import GatewayEndpoint
from async_modal_exec.channel import ChannelLost
from async_modal_exec.errors import ExecutorStateError
from async_modal_exec.fold import ExecutionFold
from async_modal_exec.gateway import GatewayClient
from async_modal_exec.protocol import execute_request, new_msg_id
from async_modal_exec.session import ALLOWED, KernelSession, KernelState

from .gateway_double import GatewayDouble, running_gateway_double

S = KernelState


@pytest.fixture
async def double() -> AsyncIterator[GatewayDouble]:
    async with running_gateway_double() as double:
        yield double


@pytest.fixture
async def client(double: GatewayDouble) -> AsyncIterator[GatewayClient]:
    client = GatewayClient(GatewayEndpoint(double.url))
    yield client
    await client.aclose()


def new_session(client: GatewayClient) -> KernelSession:
    return KernelSession(client, kernel_name=None, max_message_bytes=None)


async def execute(session: KernelSession, code: str = "1") -> None:
    """One execution through a turn: shell reply and idle status come back."""
    async with session.turn() as channel:
        fold = ExecutionFold(new_msg_id())
        await channel.send(execute_request(code, session=session.ws_session, msg_id=fold.msg_id))
        while not fold.done:
            fold.feed(await channel.receive())


def test_the_table_has_every_state_and_closing_is_always_possible() -> None:
    assert set(ALLOWED) == set(KernelState)
    for state, targets in ALLOWED.items():
        if state not in (S.CLOSING, S.CLOSED):
            assert S.CLOSING in targets, state
    assert ALLOWED[S.CLOSED] == frozenset()


async def test_open_execute_close(double: GatewayDouble, client: GatewayClient) -> None:
    session = new_session(client)
    assert session.state is S.NEW
    with pytest.raises(ExecutorStateError, match="not started"):
        async with session.turn():
            pass
    await session.open()
    assert session.state is S.CONNECTED and session.kernel_id in double.kernels
    await execute(session)
    await session.close()
    assert session.state is S.CLOSED
    assert double.kernels == {} and double.deleted == double.created
    await session.close()  # twice is fine
    with pytest.raises(ExecutorStateError, match="closed"):
        async with session.turn():
            pass


async def test_a_transition_outside_the_table_is_refused(client: GatewayClient) -> None:
    session = new_session(client)
    with pytest.raises(ExecutorStateError, match="from new to connected"):
        session._move(S.CONNECTED)
    assert session.state is S.NEW


async def test_idle_close_then_reconnect_with_the_same_session(
    double: GatewayDouble, client: GatewayClient
) -> None:
    session = new_session(client)
    await session.open()
    session.watch_idle(0.2)
    await asyncio.sleep(0.6)
    assert session.state is S.DISCONNECTED and double.sockets == []
    await execute(session)
    assert session.state is S.CONNECTED
    (first_kernel, first_session), (kernel, again) = double.ws_sessions
    assert (kernel, again) == (first_kernel, first_session), (
        "same session: the gateway replays what was missed"
    )
    await session.close()
    assert double.kernels == {}


async def test_a_dropped_websocket_is_reopened_by_the_next_turn(
    double: GatewayDouble, client: GatewayClient
) -> None:
    session = new_session(client)
    await session.open()
    await double.drop_websockets()
    await asyncio.sleep(0.1)
    await execute(session)  # CONNECTED with a dead socket -> DISCONNECTED -> CONNECTED
    assert session.state is S.CONNECTED and len(double.ws_sessions) == 2
    await session.close()


async def test_a_kernel_gone_while_disconnected_is_replaced(
    double: GatewayDouble, client: GatewayClient
) -> None:
    session = new_session(client)
    await session.open()
    old = session.kernel_id
    await double.drop_websockets()
    double.kernels.clear()  # deleted behind the session's back
    await asyncio.sleep(0.1)
    await execute(session)  # reconnect answers 404 -> LOST -> a fresh kernel
    assert session.state is S.CONNECTED and session.kernel_id != old
    assert session.ws_session != double.ws_sessions[0][1], "a new kernel gets a new session"
    await session.close()
    assert double.kernels == {}


async def test_lost_kernel_is_deleted_and_replaced(double: GatewayDouble, client: GatewayClient) -> None:
    session = new_session(client)
    await session.open()
    old = session.kernel_id
    session.stubbed = {"tool"}
    session.mark_lost("the kernel died")
    assert session.state is S.LOST and session.why == "the kernel died"
    await execute(session)
    assert session.state is S.CONNECTED and session.kernel_id != old
    assert old in double.deleted and session.stubbed is None, "stubs are defined again in a new kernel"
    await session.close()


async def test_failed_delete_keeps_the_old_kernel_known(double: GatewayDouble, client: GatewayClient) -> None:
    session = new_session(client)
    await session.open()
    old = session.kernel_id
    double.delete_status = 400
    with pytest.raises(GatewayError, match="HTTP 400"):
        async with session.turn(fresh=True):
            pass
    assert session.state is S.LOST and session.kernel_id == old
    assert list(double.kernels) == [old], "no second kernel before the first is deleted"
    double.delete_status = 204
    await execute(session)  # the next turn finishes the replacement
    assert session.state is S.CONNECTED and list(double.kernels) == [session.kernel_id] != [old]
    await session.close()
    assert double.kernels == {}


async def test_failed_creation_is_lost_then_retried(double: GatewayDouble, client: GatewayClient) -> None:
    session = new_session(client)
    await session.open()
    double.create_status = 500
    with pytest.raises(GatewayError, match="HTTP 500"):
        async with session.turn(fresh=True):
            pass
    assert session.state is S.LOST and session.kernel_id not in double.kernels
    double.create_status = 201
    await execute(session)
    assert session.state is S.CONNECTED
    await session.close()
    assert double.kernels == {}


async def test_refused_websocket_after_creation_is_lost_and_close_deletes(
    double: GatewayDouble, client: GatewayClient
) -> None:
    session = new_session(client)
    double.ws_status = 403
    with pytest.raises(GatewayError, match="403"):
        await session.open()
    assert session.state is S.LOST and session.kernel_id in double.kernels
    await session.close()
    assert session.state is S.CLOSED and double.kernels == {}


async def test_close_during_creation_waits_and_deletes_the_new_kernel(
    double: GatewayDouble, client: GatewayClient
) -> None:
    session = new_session(client)
    double.create_delay = 0.5
    opening = asyncio.create_task(session.open())
    await asyncio.sleep(0.1)
    assert session.state is S.CREATING
    await session.close()
    assert session.state is S.CLOSED
    with pytest.raises(ExecutorStateError, match="closed while its kernel started"):
        await opening
    assert len(double.created) == 1 and double.kernels == {}


async def test_close_stops_the_running_turn_first(double: GatewayDouble, client: GatewayClient) -> None:
    session = new_session(client)
    await session.open()
    double.execute_delay = 30
    running = asyncio.create_task(execute(session, "sleep"))
    await asyncio.sleep(0.2)
    await asyncio.wait_for(session.close(), 5)
    assert running.done(), "close waits until the running operation let go"
    assert isinstance(running.exception(), ChannelLost), "its websocket was closed under it"
    assert double.kernels == {}


async def test_a_close_cut_short_is_run_again_to_the_end(
    double: GatewayDouble, client: GatewayClient
) -> None:
    session = new_session(client)
    await session.open()
    double.delete_delay = 0.3
    closing = asyncio.ensure_future(session.close())
    while not double.delete_requests:
        await asyncio.sleep(0.01)
    task = session._closer._task
    assert task is not None
    task.cancel()  # what asyncio.run does to every task left when it ends
    await closing  # the caller was not cancelled: the steps run again and finish
    assert session.state is S.CLOSED and double.kernels == {}


async def test_executor_aclose_during_kernel_creation_leaves_no_kernel(double: GatewayDouble) -> None:
    # Bug from reading: aclose() while the shielded creation was in flight
    # closed the gateway client under it; the gateway still made the kernel.
    executor = AsyncExecutor(GatewayBackend(double.url))
    double.create_delay = 0.5
    starting = asyncio.create_task(executor.start())
    while not double.create_requests:
        await asyncio.sleep(0.01)
    await executor.aclose()
    with pytest.raises(ExecutorStateError):
        await starting
    await asyncio.sleep(0.6)  # whatever the double was still doing has finished
    assert len(double.created) == 1 and double.kernels == {}, "the kernel made during aclose is deleted"


async def test_close_from_new_and_from_disconnected(double: GatewayDouble, client: GatewayClient) -> None:
    never_opened = new_session(client)
    await never_opened.close()
    assert never_opened.state is S.CLOSED and double.create_requests == 0
    session = new_session(client)
    await session.open()
    session.watch_idle(0.1)
    await asyncio.sleep(0.4)
    assert session.state is S.DISCONNECTED
    await session.close()
    assert session.state is S.CLOSED and double.kernels == {}
