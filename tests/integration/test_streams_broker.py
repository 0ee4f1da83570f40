"""Streams against a real broker process (broker side; spec/PROTOCOL.md section 20)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from conveyor import client
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect, drain, queue_info, take, wait_until

STREAM = {"queue_type": "stream"}


def _offsets(msgs: list[client.Message]) -> list[int]:
    return [m.properties["headers"]["x-stream-offset"] for m in msgs]


async def _fill(conn: client.Connection, name: str, n: int, start: int = 0, size: int = 0) -> None:
    bodies = [(f"m{i}".encode() + b"." * size) for i in range(start, start + n)]
    for i in range(0, n, 100):
        await asyncio.wait_for(conn.publish_batch(bodies[i : i + 100], routing_key=name), WAIT)


async def test_two_groups_each_get_everything_in_order(conn: client.Connection) -> None:
    await conn.declare_queue("s", arguments=STREAM)
    await _fill(conn, "s", 50)
    g1 = await conn.consume("s", prefetch=20, arguments={"group": "g1", "offset": "first"})
    g2 = await conn.consume("s", prefetch=20, arguments={"group": "g2", "offset": "first"})
    got1 = await take(g1, 50, ack=True)
    got2 = await take(g2, 50, ack=True)
    assert _offsets(got1) == list(range(50)) == _offsets(got2)
    assert [m.body for m in got1] == [f"m{i}".encode() for i in range(50)]
    assert all(m.delivery_count == 1 and not m.redelivered for m in got1)
    assert await drain(g1, 0.2) == []
    info = await queue_info(conn, "s")
    assert info is not None and info["type"] == "stream"
    assert (info["first_offset"], info["head_offset"], info["messages"]) == (0, 50, 50)
    await wait_until(lambda: _committed(conn, "s", "g1", 50))
    # a private cursor: offsets "last", a number; acks change nothing on the stream
    last = await conn.consume("s", arguments={"offset": "last"})
    assert _offsets(await take(last, 1)) == [49]
    mid = await conn.consume("s", arguments={"offset": 45})
    assert _offsets(await take(mid, 5)) == [45, 46, 47, 48, 49]
    nxt = await conn.consume("s")  # default "next": only new messages
    await _fill(conn, "s", 1, 50)
    assert _offsets(await take(nxt, 1)) == [50]


async def _committed(conn: client.Connection, name: str, group: str, n: int) -> bool:
    info = await queue_info(conn, name)
    return info is not None and info["groups"].get(group, {}).get("committed") == n


async def test_errors(conn: client.Connection) -> None:
    with pytest.raises(client.InvalidArgument):
        await conn.declare_queue("bad", durable=False, arguments=STREAM)
    with pytest.raises(client.InvalidArgument):
        await conn.declare_queue("bad", arguments={**STREAM, "message_ttl_ms": 5})
    await conn.declare_queue("s", arguments=STREAM)
    await conn.declare_queue("c")
    with pytest.raises(client.InvalidArgument):
        await conn.purge("s")
    with pytest.raises(client.InvalidArgument):
        await conn.consume("c", arguments={"offset": "first"})
    with pytest.raises(client.InvalidArgument):
        await conn.consume("s", arguments={"nope": 1})
    with pytest.raises(client.InvalidArgument):
        await conn.consume("s", arguments={"offset": "middle"})
    info = await queue_info(conn, "c")
    assert info is not None and info["type"] == "classic"


async def test_members_share_and_disconnect_hands_over(
    conn: client.Connection, connect_to: Callable[..., Awaitable[Any]]
) -> None:
    await conn.declare_queue("s", arguments=STREAM)
    await _fill(conn, "s", 40)
    other = await connect_to()
    a = await other.consume("s", prefetch=5, arguments={"group": "g", "offset": "first"})
    b = await conn.consume("s", prefetch=5, arguments={"group": "g"})
    held = await take(a, 5)  # a keeps 5 unacked, then its connection goes
    got_b = await take(b, 5, ack=True)
    assert not set(_offsets(held)) & set(_offsets(got_b))
    await asyncio.wait_for(other.close(), WAIT)
    rest = await take(b, 35, ack=True)
    seen = _offsets(got_b) + _offsets(rest)
    assert sorted(seen) == list(range(40)) and len(seen) == 40
    redelivered = [m for m in rest if m.redelivered]
    assert sorted(_offsets(redelivered)) == sorted(_offsets(held))
    assert all(m.delivery_count == 2 for m in redelivered)
    await wait_until(lambda: _committed(conn, "s", "g", 40))


async def test_kill9_keeps_messages_confirms_and_group_offsets(broker: BrokerProcess) -> None:
    conn = await connect(broker.url)
    await conn.declare_queue("s", arguments=STREAM)
    await _fill(conn, "s", 300)  # every one confirmed
    g = await conn.consume("s", prefetch=50, arguments={"group": "g", "offset": "first"})
    await take(g, 120, ack=True)
    await wait_until(lambda: _committed(conn, "s", "g", 120))
    await asyncio.sleep(0.4)  # committed offsets are written at most every 100 ms
    broker.kill()
    broker.start()
    conn = await connect(broker.url)
    try:
        info = await queue_info(conn, "s")
        assert info is not None
        assert (info["head_offset"], info["messages"]) == (300, 300)
        assert info["groups"]["g"]["committed"] == 120
        g = await conn.consume("s", prefetch=50, arguments={"group": "g", "offset": "last"})
        rest = await take(g, 180, ack=True)
        assert _offsets(rest) == list(range(120, 300))  # resumed: no gap, offset ignored
        everything = await conn.consume("s", prefetch=300, arguments={"offset": "first"})
        assert [m.body for m in await take(everything, 300)] == [
            f"m{i}".encode() for i in range(300)
        ]
        await _fill(conn, "s", 10, 300)  # appends continue after the recovered head
        assert _offsets(await take(g, 10, ack=True)) == list(range(300, 310))
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def test_replay_from_timestamp(conn: client.Connection) -> None:
    await conn.declare_queue("s", arguments=STREAM)
    await _fill(conn, "s", 20)
    await asyncio.sleep(0.05)
    await _fill(conn, "s", 20, 20)
    c = await conn.consume("s", prefetch=100, arguments={"offset": "first"})
    msgs = await take(c, 40)
    stamps = [m.properties["headers"]["x-stream-timestamp"] for m in msgs]
    assert stamps == sorted(stamps) and stamps[20] > stamps[19]
    t = await conn.consume(
        "s", prefetch=100, arguments={"timestamp": stamps[20], "offset": "first"}
    )
    assert _offsets(await take(t, 20)) == list(range(20, 40))
    assert await drain(t, 0.2) == []


async def test_retention_by_size_bounds_disk(conn: client.Connection) -> None:
    seg, limit = 8192, 40_000
    await conn.declare_queue(
        "s", arguments={**STREAM, "stream_segment_bytes": seg, "max_length_bytes": limit}
    )
    for round_ in range(10):
        await _fill(conn, "s", 50, round_ * 50, size=300)
        info = await queue_info(conn, "s")
        assert info is not None
        assert info["bytes"] <= limit + seg + 2048, info
    assert info is not None
    assert info["first_offset"] > 0 and info["head_offset"] == 500
    c = await conn.consume("s", prefetch=1000, arguments={"offset": 0})
    got = await drain(c, 0.3)
    assert _offsets(got) == list(range(info["first_offset"], 500))


async def test_delete_and_redeclare(conn: client.Connection) -> None:
    await conn.declare_queue("s", arguments=STREAM)
    await _fill(conn, "s", 5)
    await conn.delete_queue("s")
    await conn.declare_queue("s", arguments=STREAM)
    info = await queue_info(conn, "s")
    assert info is not None and info["head_offset"] == 0


async def test_publish_confirm_latency_sane(conn: client.Connection) -> None:
    await conn.declare_queue("s", arguments=STREAM)
    t0 = time.monotonic()
    await _fill(conn, "s", 1000)
    assert time.monotonic() - t0 < WAIT


async def test_management_api_shows_group_lag(tmp_path: Path) -> None:
    """The HTTP management API reports a stream's offsets and per-group lag."""
    import aiohttp

    b = BrokerProcess(tmp_path / "data", "--http-port", "0").start()
    try:
        conn = await connect(b.url)
        try:
            await conn.declare_queue("lag.s", arguments={"queue_type": "stream"})
            await conn.publish_batch([b"m%d" % i for i in range(10)], routing_key="lag.s")
            s = conn.stream("lag.s", offset="first", group="g", auto_commit=False)
            got = []
            async with s:
                while len(got) < 4:
                    m = await s.get(5)
                    assert m is not None
                    got.append(m)
                s.commit(got[-1])
                deadline = time.monotonic() + 5
                info: dict[str, Any] = {}
                async with aiohttp.ClientSession() as http:
                    while time.monotonic() < deadline:
                        url = f"http://127.0.0.1:{b.http_port}/api/queues/lag.s"
                        async with http.get(url) as r:
                            assert r.status == 200
                            info = await r.json()
                        if info["groups"].get("g", {}).get("committed") == 4:
                            break
                        await asyncio.sleep(0.1)
            assert info["type"] == "stream" and info["head_offset"] == 10
            assert info["groups"]["g"]["committed"] == 4 and info["groups"]["g"]["lag"] == 6
        finally:
            await conn.close()
    finally:
        b.stop()
