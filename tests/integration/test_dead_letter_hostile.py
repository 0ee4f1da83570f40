"""Hostile headers against dead-lettering, with bystanders, on a real broker over TCP.

A client once could publish ``x-death: 7`` (an int) into a queue with a dead-letter
exchange and ``delivery_limit``, consume it with ten other publishers' messages and
disconnect: dead-lettering raised inside the connection's close after the removal of all
eleven was logged, so none reached the DLQ, ten confirmed persistent messages of another
publisher were gone after a restart, the closed connection stayed listed holding its
consumers and deliveries, and a single-active-consumer queue it consumed was blocked for
everyone. ``x-`` headers are the broker's: every publish path strips client-supplied
ones (spec section 10).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from conveyor import client
from conveyor.broker.wal import frame_record, iter_segment
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, drain, queue_info, take, wait_until
from tests.integration.http_helpers import http

pytestmark = pytest.mark.timeout(90)

FORGED: dict[str, Any] = {"x-death": 7, "X-Death": "x", "x-stream-offset": -1, "app": "kept"}


async def _connections(conn: client.Connection) -> set[str]:
    return {str(row["id"]) for row in await conn.list("connections")}


async def _depth(conn: client.Connection, queue: str) -> int:
    info = await queue_info(conn, queue)
    assert info is not None, queue
    return int(info["messages"])


@pytest.mark.parametrize("restart", ["kill", "graceful"])
async def test_forged_x_death_harms_no_bystander(
    broker_factory: Callable[..., BrokerProcess], restart: str
) -> None:
    b = broker_factory()
    admin = await client.connect(b.url, reconnect=False, timeout=WAIT)
    bystander = await client.connect(b.url, reconnect=False, timeout=WAIT)
    attacker = await client.connect(b.url, reconnect=False, timeout=WAIT)
    try:
        await admin.declare_exchange("dlx", "fanout")
        await admin.declare_queue("dlq")
        await admin.bind("dlx", "dlq")
        await admin.declare_queue("shared", dead_letter_exchange="dlx", delivery_limit=1)
        await admin.declare_queue("sac", single_active_consumer=True)
        before = await _connections(admin)
        assert len(before) == 3

        for i in range(10):  # confirmed, persistent
            await bystander.publish("", "shared", b"bystander-%d" % i)
        await attacker.publish("", "shared", b"poison", headers=FORGED)
        await bystander.publish("", "sac", b"sac-0")

        shared = await attacker.consume("shared", prefetch=11)
        got = await take(shared, 11, timeout=5)
        assert {m.body for m in got} == {b"bystander-%d" % i for i in range(10)} | {b"poison"}
        poison = next(m for m in got if m.body == b"poison")
        assert poison.headers == {"app": "kept"}, "client x- headers were stored"
        sac = await attacker.consume("sac", prefetch=5)
        assert [m.body for m in await take(sac, 1, timeout=5)] == [b"sac-0"]
        await asyncio.wait_for(attacker.close(), WAIT)  # nothing acked

        async def attacker_gone() -> bool:
            return len(await _connections(admin)) == 2

        await wait_until(attacker_gone, 5)

        async def all_dead_lettered() -> bool:
            return await _depth(admin, "dlq") == 11

        await wait_until(all_dead_lettered, 5)
        assert await _depth(admin, "shared") == 0
        consumers = await admin.list("consumers")
        assert not [c for c in consumers if c["queue"] in ("shared", "sac")], consumers

        # The single-active-consumer queue serves a new consumer: the attacker's unacked
        # message first (redelivered), then new ones.
        await bystander.publish("", "sac", b"sac-1")
        standby = await admin.consume("sac", prefetch=5)
        again = await take(standby, 2, timeout=5, ack=True)
        assert [(m.body, m.redelivered) for m in again] == [(b"sac-0", True), (b"sac-1", False)]

        # After a restart every bystander message is in the DLQ (the poison one too,
        # with the broker's own death record only).
        await bystander.publish("", "sac", b"barrier")  # confirmed: all before is on disk
    finally:
        for c in (admin, bystander, attacker):
            await asyncio.wait_for(c.close(), WAIT)
    if restart == "kill":
        b.kill()
    else:
        await asyncio.to_thread(b.stop)
    b.start()
    conn = await client.connect(b.url, reconnect=False, timeout=WAIT)
    try:
        dead = await conn.get("dlq", 100)
        bodies = sorted(m.body for m in dead)
        assert bodies == sorted([b"bystander-%d" % i for i in range(10)] + [b"poison"])
        for m in dead:
            assert [(d["queue"], d["reason"], d["count"]) for d in m.deaths] == [
                ("shared", "delivery-limit", 1)
            ]
            if m.body == b"poison":
                assert set(m.headers) == {"app", "x-death"}
        conn.ack_all(dead)
        consumer = await conn.consume("sac", prefetch=5)
        assert [m.body for m in await take(consumer, 1, timeout=5, ack=True)] == [b"barrier"]
        assert await drain(consumer, quiet=0.2) == []
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
    assert "Traceback" not in b.log_text()


async def test_gateway_publish_strips_x_headers(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """The REST gateway goes through the same check as binary publishes."""
    b = broker_factory("--http-port", "0")
    conn = await client.connect(b.url, reconnect=False, timeout=WAIT)
    try:
        await conn.declare_exchange("dlx", "fanout")
        await conn.declare_queue("dlq")
        await conn.bind("dlx", "dlq")
        await conn.declare_queue("gw", dead_letter_exchange="dlx")
        status, body = await http(
            b, "POST", "/queues/gw/messages", json={"message": "m", "headers": dict(FORGED)}
        )
        assert status == 201, body
        status, body = await http(
            b, "POST", "/queues/gw/messages", json={"message": "only-x", "headers": {"x-death": []}}
        )
        assert status == 201, body
        msgs = await conn.get("gw", 10)
        assert [(m.body, m.headers) for m in msgs] == [(b"m", {"app": "kept"}), (b"only-x", {})]
        for m in msgs:
            m.reject()  # dead-lettered with the broker's record only
        dead = await take(await conn.consume("dlq"), 2, timeout=5, ack=True)
        assert [[(d["queue"], d["reason"], d["count"]) for d in m.deaths] for m in dead] == [
            [("gw", "rejected", 1)]
        ] * 2
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


def _forge_logged_headers(wal_dir: Path, marker: str, headers: dict[str, Any]) -> int:
    """Rewrite the log so messages published with header ``marker`` carry ``headers``
    instead (what a log written before x- headers were stripped may hold); returns how
    many were changed. The records are re-framed, so their checksums are valid."""
    changed = 0
    for seg in sorted(wal_dir.glob("seg-*.log")):
        out = bytearray()
        for _offset, batch in iter_segment(seg, last=True):
            for rec in batch:
                if rec[0] == "p" and marker in ((rec[5] or {}).get("headers") or {}):
                    rec[5] = dict(rec[5], headers=headers)
                    changed += 1
            out += frame_record(msgpack.packb(batch, use_bin_type=True))
        seg.write_bytes(bytes(out))
    return changed


@pytest.mark.parametrize(
    "x_death", [7, [7, "s", {"queue": "shared", "count": "x", "reason": "delivery-limit"}]]
)
async def test_malformed_x_death_already_in_the_log_is_contained(
    broker_factory: Callable[..., BrokerProcess], x_death: Any
) -> None:
    """No publish can store a bad x-death any more, but a log may hold one: when it is
    dead-lettered the bad record is ignored (a fresh history starts), every other
    message reaches the DLQ and the connection closes cleanly."""
    b = broker_factory()
    conn = await client.connect(b.url, reconnect=False, timeout=WAIT)
    await conn.declare_exchange("dlx", "fanout")
    await conn.declare_queue("dlq")
    await conn.bind("dlx", "dlq")
    await conn.declare_queue("shared", dead_letter_exchange="dlx", delivery_limit=1)
    for i in range(10):
        await conn.publish("", "shared", b"bystander-%d" % i)
    await conn.publish("", "shared", b"legacy", headers={"legacy-marker": 1})
    await asyncio.wait_for(conn.close(), WAIT)
    b.kill()  # every confirmed record is on disk; no snapshot is written
    assert _forge_logged_headers(b.data_dir / "wal", "legacy-marker", {"x-death": x_death}) == 1
    b.start()
    consumer_conn = await client.connect(b.url, reconnect=False, timeout=WAIT)
    admin = await client.connect(b.url, reconnect=False, timeout=WAIT)
    try:
        got = await take(await consumer_conn.consume("shared", prefetch=11), 11, timeout=5)
        legacy = next(m for m in got if m.body == b"legacy")
        assert legacy.headers == {"x-death": x_death}
        await asyncio.wait_for(consumer_conn.close(), WAIT)

        async def dead_lettered() -> bool:
            return await _depth(admin, "dlq") == 11 and len(await _connections(admin)) == 1

        await wait_until(dead_lettered, 5)
        dead = await admin.get("dlq", 100)
        assert sorted(m.body for m in dead) == sorted(
            [b"bystander-%d" % i for i in range(10)] + [b"legacy"]
        )
        for m in dead:
            assert [(d["queue"], d["reason"], d["count"]) for d in m.deaths] == [
                ("shared", "delivery-limit", 1)
            ]
        admin.ack_all(dead)
    finally:
        for c in (consumer_conn, admin):
            await asyncio.wait_for(c.close(), WAIT)
