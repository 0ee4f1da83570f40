"""Resource limits end to end: each refusal is the spec's typed error, and the broker
(and the refused connection, where it stays open) keeps serving afterwards.

Limits (spec/PROTOCOL.md "Limits", broker/limits.py): max_headers (400),
max_header_bytes (413), max_connections and max_connections_per_subject (ERROR 506
instead of OPEN_OK, then close), max_queues (506), max_consumers_per_connection (506).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest

from conveyor import client
from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.integration.helpers import WAIT, connect, take

pytestmark = pytest.mark.timeout(60)

RESOURCE_ERROR = wire.code("resource-error")
INVALID_ARGUMENT = wire.code("invalid-argument")
MESSAGE_TOO_LARGE = wire.code("message-too-large")


async def _refused(coro: Any, code: int) -> client.ConveyorError:
    with pytest.raises(client.ConveyorError) as info:
        await asyncio.wait_for(coro, WAIT)
    assert info.value.code == code, info.value
    return info.value


# ---------------------------------------------------------------------- per message
async def test_header_count_and_size_limits(broker_factory: Callable[..., BrokerProcess]) -> None:
    b = broker_factory("--max-headers", "4", "--max-header-bytes", "256")
    conn = await connect(b.url)
    try:
        await conn.declare_queue("hdr")
        await conn.publish("", "hdr", b"four", headers={f"h{i}": i for i in range(4)})
        err = await _refused(
            conn.publish("", "hdr", b"five", headers={f"h{i}": i for i in range(5)}),
            INVALID_ARGUMENT,
        )
        assert "max_headers" in err.message and not err.fatal
        err = await _refused(
            conn.publish("", "hdr", b"big", headers={"h": "x" * 300}), MESSAGE_TOO_LARGE
        )
        assert "max_header_bytes" in err.message
        await conn.publish("", "hdr", b"fits", headers={"h": "x" * 200})
        # In a batch only the offending message is refused; the others are enqueued.
        with pytest.raises(client.ConveyorError):
            await asyncio.wait_for(
                conn.publish_batch(
                    [
                        client.OutgoingMessage(b"b1"),
                        client.OutgoingMessage(
                            b"b2", properties={"headers": {f"h{i}": i for i in range(9)}}
                        ),
                        client.OutgoingMessage(b"b3", properties={"headers": {"ok": 1}}),
                    ],
                    routing_key="hdr",
                ),
                WAIT,
            )
        consumer = await conn.consume("hdr", prefetch=10)
        got = await take(consumer, 4, ack=True)
        assert [m.body for m in got] == [b"four", b"fits", b"b1", b"b3"]
        assert got[0].headers == {f"h{i}": i for i in range(4)}
        assert await consumer.get(0.2) is None
    finally:
        await conn.close()
    assert b.alive()


async def test_header_limits_on_the_wire(broker_factory: Callable[..., BrokerProcess]) -> None:
    """Raw frames: a confirmed publish is nacked with the code, a seq-0 one gets ERROR rid 0;
    the connection stays open."""
    b = broker_factory("--max-headers", "2")
    with wire.open_conn(b.port) as c:
        c.send_frame("queue_declare", 1, "hdr-wire", False, False, True)
        c.send_frame("publish", 1, "", "hdr-wire", {"headers": {"a": 1, "b": 2, "c": 3}}, b"x")
        c.send_frame("publish", 0, "", "hdr-wire", {"headers": {"a": 1, "b": 2, "c": 3}}, b"y")
        c.send_frame("publish", 2, "", "hdr-wire", {"headers": {"a": 1}}, b"z")
        seen: dict[str, Any] = {}
        while len(seen) < 4:
            f = c.recv()
            if f.kind == "confirm":
                seen[f"confirm{f['first_seq']}"] = f
            elif f.kind in ("queue_declare_ok", "error"):
                seen[f.kind] = f
        assert (seen["confirm1"]["ack"], seen["confirm1"]["code"]) == (False, INVALID_ARGUMENT)
        assert "max_headers" in seen["confirm1"]["message"]
        assert (seen["error"]["rid"], seen["error"]["code"]) == (0, INVALID_ARGUMENT)
        assert seen["error"]["details"]["limit"] == "max_headers"
        assert seen["confirm2"]["ack"] is True


# ---------------------------------------------------------------------- broker model
async def test_max_queues(broker_factory: Callable[..., BrokerProcess]) -> None:
    b = broker_factory("--max-queues", "3")
    conn = await connect(b.url)
    try:
        for name in ("q1", "q2"):
            await conn.declare_queue(name)
        server_named = await conn.declare_queue("", exclusive=True)
        err = await _refused(conn.declare_queue("q4"), RESOURCE_ERROR)
        assert err.details["limit"] == "max_queues" and err.details["max_queues"] == 3
        assert err.retriable and not err.fatal
        await _refused(conn.declare_queue(""), RESOURCE_ERROR)
        # Redeclaring an existing queue is not a new queue; the connection still works.
        assert (await conn.declare_queue("q1")).name == "q1"
        await conn.publish("", "q1", b"still serving")
        await conn.delete_queue(server_named.name)
        await conn.declare_queue("q4")  # room again
        await _refused(conn.declare_queue("q5"), RESOURCE_ERROR)
    finally:
        await conn.close()
    assert b.alive()


async def test_max_consumers_per_connection(broker_factory: Callable[..., BrokerProcess]) -> None:
    b = broker_factory("--max-consumers-per-connection", "2")
    conn = await connect(b.url)
    other = await connect(b.url)
    try:
        await conn.declare_queue("cq")
        c1 = await conn.consume("cq", prefetch=5)
        await conn.consume("cq", prefetch=5)
        err = await _refused(conn.consume("cq", prefetch=5), RESOURCE_ERROR)
        assert err.details["limit"] == "max_consumers_per_connection"
        # Per connection: another connection may still consume.
        c3 = await other.consume("cq", prefetch=5)
        await c1.cancel()
        c4 = await conn.consume("cq", prefetch=5)  # room again
        for i in range(6):
            await conn.publish("", "cq", b"m%d" % i)
        got = []
        for c in (c3, c4):
            got += await take(c, 2, ack=True)
        assert len(got) == 4
    finally:
        await conn.close()
        await other.close()
    assert b.alive()


# ---------------------------------------------------------------------- connections
async def test_max_connections(broker_factory: Callable[..., BrokerProcess]) -> None:
    b = broker_factory("--max-connections", "3")
    conns = [await connect(b.url) for _ in range(3)]
    try:
        err = await _refused(connect(b.url), RESOURCE_ERROR)
        assert "max_connections" in err.message
        # On the wire: ERROR(rid 0, 506) in place of OPEN_OK, then the broker closes.
        with wire.Conn(b.port) as raw:
            raw.send(wire.PREAMBLE)
            raw.expect("hello")
            raw.send_frame("auth", "anonymous", "", {}, 0, 0)
            e = raw.expect_fatal(RESOURCE_ERROR)
            assert e["details"] == {"limit": "max_connections", "max_connections": 3}
        # Open connections keep working; closing one makes room.
        await conns[0].declare_queue("conn-limit")
        await conns[0].close()
        conns[0] = await connect(b.url)
        await conns[0].publish("", "conn-limit", b"ok")
    finally:
        for c in conns:
            await c.close()
    # Refused and closed connections were released: all three slots are free again.
    again = [await connect(b.url) for _ in range(3)]
    for c in again:
        await c.close()
    assert b.alive()


async def test_max_connections_per_subject(broker_factory: Callable[..., BrokerProcess]) -> None:
    b = broker_factory("--max-connections-per-subject", "2")
    conns = [await connect(b.url) for _ in range(2)]
    try:
        err = await _refused(connect(b.url), RESOURCE_ERROR)
        assert err.details["limit"] == "max_connections_per_subject"
        # anonymous: per address and local user
        assert err.details["subject"] == f"anonymous@127.0.0.1/uid:{os.getuid()}"
        await conns[1].close()
        conns[1] = await connect(b.url)
        await conns[1].declare_queue("subj", exclusive=True)
    finally:
        for c in conns:
            await c.close()
    assert b.alive()


def test_limit_settings_are_validated(broker_factory: Callable[..., BrokerProcess]) -> None:
    with pytest.raises(RuntimeError, match="did not start"):
        broker_factory("--max-queues", "0")
