"""Pending futures. A deliberate close() with publishes and requests in flight waits
(bounded) for their confirms and replies, settles whatever is left quietly as
PublishInDoubt, and no confirmed message is lost; a reply completes only the request whose
id and reply type it matches."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
from typing import Any

import pytest

from conveyor import client
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect, queue_info

pytestmark = pytest.mark.timeout(60)


def _record_loop_errors() -> list[dict[str, Any]]:
    """What the event loop reports (e.g. "Future exception was never retrieved")."""
    seen: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    return seen


def _fill_credit(conn: client.Connection, queue: str) -> int:
    """publish_nowait until the broker's publish credit is used up; the futures are
    dropped, as a fire-and-forget publisher does. Returns how many were queued."""
    n = 0
    with pytest.raises(client.Backpressure):
        for _ in range(1_000_000):
            conn.publish_nowait("", queue, b"m%d" % n)
            n += 1
    return n


async def test_close_waits_for_confirms_of_dropped_publish_nowait_futures(
    broker: BrokerProcess,
) -> None:
    errors = _record_loop_errors()
    async with await connect(broker.url) as conn:
        await conn.declare_queue("fire-forget")
        n = _fill_credit(conn, "fire-forget")
        assert n > 1000
    gc.collect()
    assert errors == [], errors[:3]
    assert conn.in_doubt == 0  # every confirm came back before CLOSE
    async with await connect(broker.url) as observer:
        q = await queue_info(observer, "fire-forget")
        assert q is not None and q["messages"] == n


async def test_close_without_waiting_settles_publishes_as_in_doubt(
    broker: BrokerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    errors = _record_loop_errors()
    conn = await connect(broker.url)
    await conn.declare_queue("doubt")
    futures = [conn.publish_nowait("", "doubt", b"d%d" % i) for i in range(2000)]
    caplog.set_level(logging.WARNING, logger="conveyor.client")
    await asyncio.wait_for(conn.close(timeout=0), WAIT)
    assert all(f.done() for f in futures)
    doubted = [f for f in futures if f.exception() is not None]
    assert all(isinstance(f.exception(), client.PublishInDoubt) for f in doubted)
    assert conn.in_doubt == len(doubted)
    if doubted:
        exc = doubted[0].exception()
        assert isinstance(exc, client.ConnectionClosed)  # existing handlers still catch it
        assert exc.details["in_doubt"] == len(doubted)
        lines = [r.getMessage() for r in caplog.records if "in doubt" in r.getMessage()]
        assert lines == [
            f"connection closed by the application; {len(doubted)} "
            "publish(es) in doubt (not confirmed)"
        ]
    del futures, doubted
    gc.collect()
    assert errors == [], errors[:3]
    # In doubt means unknown, not lost: the broker had them all before the CLOSE.
    async with await connect(broker.url) as observer:
        q = await queue_info(observer, "doubt")
        assert q is not None and q["messages"] == 2000


async def test_close_completes_requests_and_publishes_in_flight(broker: BrokerProcess) -> None:
    conn = await connect(broker.url)
    t1 = asyncio.create_task(conn.declare_queue("raced"))
    t2 = asyncio.create_task(conn.publish("", "raced", b"x"))
    await asyncio.sleep(0)  # both frames are queued, before close() runs
    await asyncio.wait_for(conn.close(), WAIT)
    info, published = await asyncio.wait_for(asyncio.gather(t1, t2), WAIT)
    assert info.name == "raced" and published is None
    assert conn.in_doubt == 0
    async with await connect(broker.url) as observer:
        q = await queue_info(observer, "raced")
        assert q is not None and q["messages"] == 1


async def test_close_fails_an_rpc_waiting_for_its_reply_at_once(broker: BrokerProcess) -> None:
    async with await connect(broker.url) as server_side:
        await server_side.declare_queue("slow-service")
        conn = await connect(broker.url)
        call = asyncio.create_task(conn.rpc("", "slow-service", b"ping", timeout=WAIT))
        for _ in range(200):  # until the request is in the queue: it is waiting for a reply
            q = await queue_info(server_side, "slow-service")
            if q is not None and q["messages"] == 1:
                break
            await asyncio.sleep(0.02)
        await asyncio.wait_for(conn.close(), WAIT)
        # Settled by close(), not left to run into its RequestTimeout.
        with pytest.raises(client.ConnectionClosed):
            await asyncio.wait_for(call, WAIT)


async def test_a_reply_of_the_wrong_type_fails_its_request_with_a_typed_error(
    broker: BrokerProcess,
) -> None:
    # Two requests under one request id (what a confused peer would produce): the GET_OK
    # that comes first must not complete the LIST waiting on that id.
    from conveyor.protocol import Get, encode

    async with await connect(broker.url) as conn:
        await conn.declare_queue("twins")
        rid = next(conn._rids)
        conn._send(encode(Get(rid, "twins", 1, True)))  # answered by GET_OK(rid)
        conn._rids = itertools.count(rid)  # the LIST reuses the same id
        with pytest.raises(client.ConveyorError) as exc:
            await asyncio.wait_for(conn.list("queues"), WAIT)
        assert exc.value.name == "unexpected-frame"
        assert exc.value.details == {"rid": rid, "frame": "get_ok"}
        assert [q["name"] for q in await conn.list("queues")] == ["twins"]  # still usable
