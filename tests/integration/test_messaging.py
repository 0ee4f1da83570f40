"""Messaging end to end: a real broker process, real TCP, the asyncio client."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from typing import Any

import pytest

from conveyor import client
from tests.integration.helpers import (
    WAIT,
    bodies,
    connect,
    drain,
    queue_info,
    take,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def numbered(n: int, prefix: str = "m") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


# ---------------------------------------------------------------------- routing
async def test_point_to_point_publish_consume_ack(conn: client.Connection) -> None:
    info = await conn.declare_queue("p2p")
    assert (info.name, info.message_count, info.consumer_count) == ("p2p", 0, 0)
    for body in numbered(10):
        await conn.publish("", "p2p", body)
    assert (await queue_info(conn, "p2p"))["messages"] == 10  # type: ignore[index]

    consumer = await conn.consume("p2p", prefetch=20)
    msgs = await take(consumer, 10)
    assert bodies(msgs) == numbered(10)
    assert [m.delivery_tag for m in msgs] == list(range(1, 11))
    assert all(m.exchange == "" and m.routing_key == "p2p" for m in msgs)
    assert all(not m.redelivered and m.delivery_count == 1 for m in msgs)
    q = await queue_info(conn, "p2p")
    assert q is not None and (q["messages"], q["unacked"], q["consumers"]) == (0, 10, 1)
    for m in msgs:
        m.ack()
    q = await queue_info(conn, "p2p")  # requests are handled after the acks sent before them
    assert q is not None and (q["messages"], q["unacked"], q["consumers"]) == (0, 0, 1)
    assert await consumer.get(0.2) is None
    await consumer.cancel()


async def test_fanout_every_queue_gets_every_message(conn: client.Connection) -> None:
    n = 200
    await conn.declare_exchange("fan", "fanout")
    names = ["fan-a", "fan-b", "fan-c"]
    for name in names:
        await conn.declare_queue(name)
        await conn.bind("fan", name, "ignored-key")
    consumers = [await conn.consume(name, prefetch=50) for name in names]
    assert await conn.publish_batch(numbered(n), exchange="fan", routing_key="anything") == n
    for c in consumers:
        msgs = await take(c, n, ack=True)
        assert bodies(msgs) == numbered(n)
        assert all(m.exchange == "fan" and m.routing_key == "anything" for m in msgs)
    for c in consumers:
        assert await c.get(0.1) is None
    for name in names:
        q = await queue_info(conn, name)
        assert q is not None and (q["messages"], q["unacked"]) == (0, 0)


async def test_topic_routing_with_several_bindings(conn: client.Connection) -> None:
    await conn.declare_exchange("logs", "topic")
    bindings = {
        "t-errors": ["*.error"],
        "t-kern": ["kern.#"],
        "t-all": ["#"],
        "t-multi": ["*.error", "kern.*"],  # a message matching both is still queued once
        "t-exact": ["app.info"],
    }
    for queue, keys in bindings.items():
        await conn.declare_queue(queue)
        for key in keys:
            await conn.bind("logs", queue, key)
    keys = [
        "kern.error",
        "app.error",
        "kern.info.disk",
        "kern",
        "app.info",
        "a.b.error",
        "kern.info",
        "",
        "error",
        ".error",
    ]
    for key in keys:
        await conn.publish("logs", key, f"body:{key}".encode())

    expected = {
        "t-errors": ["kern.error", "app.error", ".error"],
        "t-kern": ["kern.error", "kern.info.disk", "kern", "kern.info"],
        "t-all": keys,
        "t-multi": ["kern.error", "app.error", "kern.info", ".error"],
        "t-exact": ["app.info"],
    }
    for queue, want in expected.items():
        got = await conn.get(queue, 100, no_ack=True)
        assert [m.routing_key for m in got] == want, queue
        assert bodies(got) == [f"body:{k}".encode() for k in want]
        assert all(m.exchange == "logs" for m in got)


async def test_direct_exchange_routes_by_exact_key(conn: client.Connection) -> None:
    await conn.declare_exchange("jobs", "direct")
    for q in ("d1", "d2", "d3"):
        await conn.declare_queue(q)
    await conn.bind("jobs", "d1", "red")
    await conn.bind("jobs", "d2", "green")
    await conn.bind("jobs", "d3", "red")
    await conn.bind("jobs", "d3", "blue")
    for key in ("red", "green", "blue", "yellow", "re", "red.x"):
        await conn.publish("jobs", key, key.encode())
    got = {q: bodies(await conn.get(q, 100, no_ack=True)) for q in ("d1", "d2", "d3")}
    assert got == {"d1": [b"red"], "d2": [b"green"], "d3": [b"red", b"blue"]}

    # The pre-declared amq.direct works the same way.
    await conn.bind("amq.direct", "d2", "k")
    await conn.publish("amq.direct", "k", b"via-amq")
    assert bodies(await conn.get("d2", 10, no_ack=True)) == [b"via-amq"]


async def test_request_reply_via_rpc(conn: client.Connection, connect_to: Any) -> None:
    responder_conn: client.Connection = await connect_to()
    await responder_conn.declare_queue("rpc-service")
    seen: list[tuple[str | None, str | None, bytes]] = []

    async def responder() -> None:
        async with await responder_conn.consume("rpc-service", prefetch=10) as requests:
            async for req in requests:
                seen.append((req.correlation_id, req.reply_to, req.body))
                await responder_conn.publish(
                    "", req.reply_to or "", b"reply:" + req.body, correlation_id=req.correlation_id
                )
                req.ack()

    task = asyncio.create_task(responder())
    try:
        reply = await conn.rpc("", "rpc-service", b"ping", timeout=WAIT)
        assert reply.body == b"reply:ping"
        assert len(seen) == 1
        corr, reply_to, body = seen[0]
        assert body == b"ping"
        assert corr and reply.correlation_id == corr
        assert reply_to and reply_to.startswith("amq.gen-")
        assert reply.routing_key == reply_to

        # Concurrent calls each get their own reply, matched by correlation id.
        replies = await asyncio.gather(
            *(conn.rpc("", "rpc-service", f"req{i}".encode(), timeout=WAIT) for i in range(20))
        )
        assert [r.body for r in replies] == [f"reply:req{i}".encode() for i in range(20)]
        corrs = {c for c, _, _ in seen}
        assert len(corrs) == 21
        assert {r.correlation_id for r in replies} <= corrs
        assert len({r.correlation_id for r in replies}) == 20
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    # Nobody consumes the service queue: the call times out.
    with pytest.raises(client.RequestTimeout):
        await conn.rpc("", "rpc-service", b"x", timeout=0.3)


async def test_rpc_to_no_queue_fails_at_once_with_no_route(conn: client.Connection) -> None:
    # The request matches no queue: NoRoute as soon as the broker says so, not a
    # RequestTimeout after waiting for a reply that cannot come.
    with pytest.raises(client.NoRoute):
        await asyncio.wait_for(conn.rpc("", "no-such-service", b"x", timeout=60), WAIT)
    await conn.declare_exchange("rpc-ex", "direct")
    with pytest.raises(client.NoRoute):
        await asyncio.wait_for(
            conn.rpc("rpc-ex", "unbound", b"x", mandatory=True, timeout=60), WAIT
        )
    # mandatory=False opts out: the unroutable request is dropped, the call times out.
    with pytest.raises(client.RequestTimeout):
        await conn.rpc("rpc-ex", "unbound", b"x", mandatory=False, timeout=0.3)
    assert conn.is_open


# ---------------------------------------------------------------------- consumers
async def test_competing_consumers_share_fairly_exactly_once(
    conn: client.Connection, connect_to: Any
) -> None:
    n = 400
    await conn.declare_queue("work")
    conns = [await connect_to() for _ in range(4)]
    consumers = [await c.consume("work", prefetch=10) for c in conns]
    got: list[list[bytes]] = [[] for _ in consumers]
    total = 0
    all_in = asyncio.Event()

    async def work(i: int) -> None:
        nonlocal total
        deadline = time.monotonic() + WAIT
        while not all_in.is_set() and time.monotonic() < deadline:
            msg = await consumers[i].get(0.1)
            if msg is None:
                continue
            got[i].append(msg.body)
            msg.ack()
            total += 1
            if total >= n:
                all_in.set()
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(work(i)) for i in range(4)]
    assert await conn.publish_batch(numbered(n), routing_key="work") == n
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT + 5)

    everything = [b for g in got for b in g]
    assert len(everything) == n
    assert sorted(everything) == sorted(numbered(n))
    counts = [len(g) for g in got]
    assert all(c >= 50 for c in counts), counts
    # each consumer sees its share in publish order
    for g in got:
        assert g == sorted(g, key=lambda b: int(b[1:]))
    q = await queue_info(conn, "work")
    assert q is not None and (q["messages"], q["unacked"], q["consumers"]) == (0, 0, 4)


async def test_credit_is_never_exceeded(conn: client.Connection) -> None:
    n = 50
    await conn.declare_queue("credit")
    await conn.publish_batch(numbered(n), routing_key="credit")
    consumer = await conn.consume("credit", prefetch=10)
    await asyncio.sleep(0.3)
    held = await drain(consumer, quiet=0.3)
    assert bodies(held) == numbered(10)

    async def server_view() -> tuple[int, int, int, int]:
        (c,) = [c for c in await conn.list("consumers") if c["queue"] == "credit"]
        q = await queue_info(conn, "credit")
        assert q is not None
        return c["unacked"], c["credit"], q["unacked"], q["messages"]

    assert await server_view() == (10, 0, 10, 40)

    # Acking half the window tops the credit up by exactly that much.
    for m in held[:5]:
        m.ack()
    held = held[5:]
    more = await drain(consumer, quiet=0.3)
    assert bodies(more) == numbered(15)[10:]
    held += more
    assert await server_view() == (10, 0, 10, 35)

    # Acking fewer than half the window grants nothing yet.
    for m in held[:4]:
        m.ack()
    held = held[4:]
    assert await drain(consumer, quiet=0.3) == []
    assert (await server_view())[0] == 6

    # Work through the rest: the broker never has more than 10 outstanding.
    received = 15
    deadline = time.monotonic() + WAIT
    while received < n and time.monotonic() < deadline:
        for m in held:
            m.ack()
        held = await drain(consumer, quiet=0.2)
        received += len(held)
        unacked, credit, q_unacked, _ = await server_view()
        assert len(held) <= 10 and unacked == q_unacked == len(held)
        assert unacked + credit <= 10
    assert received == n
    for m in held:
        m.ack()
    assert (await server_view())[2:] == (0, 0)


def _abort_socket(c: client.Connection) -> None:
    """Drop the TCP connection abruptly (RST, no CLOSE frame)."""
    proto = c._proto
    assert proto is not None and proto.transport is not None
    sock = proto.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    proto.transport.abort()


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_unacked_requeued_on_disconnect(how: str, connect_to: Any) -> None:
    a: client.Connection = await connect_to()
    b: client.Connection = await connect_to()
    await b.declare_queue("requeue")
    await b.publish_batch(numbered(20), routing_key="requeue")

    ca = await a.consume("requeue", prefetch=5)
    first = await take(ca, 5)
    assert bodies(first) == numbered(5)
    assert await ca.get(0.2) is None  # credit exhausted
    q = await queue_info(b, "requeue")
    assert q is not None and (q["messages"], q["unacked"]) == (15, 5)

    if how == "close":
        await a.close()
    else:
        _abort_socket(a)

    async def back() -> bool:
        q = await queue_info(b, "requeue")
        return q is not None and (q["messages"], q["unacked"], q["consumers"]) == (20, 0, 0)

    await wait_until(back)
    cb = await b.consume("requeue", prefetch=100)
    msgs = await take(cb, 20)
    assert bodies(msgs) == numbered(20)
    assert [(m.redelivered, m.delivery_count) for m in msgs[:5]] == [(True, 2)] * 5
    assert [(m.redelivered, m.delivery_count) for m in msgs[5:]] == [(False, 1)] * 15
    for m in msgs:
        m.ack()
    assert await cb.get(0.2) is None


async def test_nack_requeue_restores_original_order(conn: client.Connection) -> None:
    await conn.declare_queue("nackq")
    await conn.publish_batch(numbered(10), routing_key="nackq")
    consumer = await conn.consume("nackq", prefetch=4)
    first = await take(consumer, 4)
    assert bodies(first) == numbered(4)
    # Refuse out of order; they go back to their original positions.
    first[3].nack()
    first[1].nack()
    first[0].ack()
    first[2].ack()
    rest = await take(consumer, 8, ack=True)
    assert bodies(rest) == [b"m1", b"m3", b"m4", b"m5", b"m6", b"m7", b"m8", b"m9"]
    assert [(m.redelivered, m.delivery_count) for m in rest[:2]] == [(True, 2), (True, 2)]
    assert all((m.redelivered, m.delivery_count) == (False, 1) for m in rest[2:])

    # Each refusal counts another delivery.
    await conn.publish("", "nackq", b"z")
    for count in (1, 2, 3):
        (z,) = await take(consumer, 1)
        assert (z.body, z.redelivered, z.delivery_count) == (b"z", count > 1, count)
        if count < 3:
            z.nack(requeue=True)
        else:
            z.ack()
    assert await consumer.get(0.2) is None
    q = await queue_info(conn, "nackq")
    assert q is not None and (q["messages"], q["unacked"]) == (0, 0)


async def test_reject_discards(conn: client.Connection) -> None:
    await conn.declare_queue("rejectq")
    await conn.publish_batch(numbered(4), routing_key="rejectq")
    consumer = await conn.consume("rejectq", prefetch=10)
    msgs = await take(consumer, 4)
    msgs[1].reject()
    msgs[2].reject(requeue=True)
    msgs[0].ack()
    msgs[3].ack()
    (back,) = await take(consumer, 1)
    assert (back.body, back.redelivered, back.delivery_count) == (b"m2", True, 2)
    back.reject()
    assert await consumer.get(0.3) is None
    q = await queue_info(conn, "rejectq")
    assert q is not None and (q["messages"], q["unacked"]) == (0, 0)


# ---------------------------------------------------------------------- publishing
async def test_publish_returns_after_confirm(conn: client.Connection, connect_to: Any) -> None:
    observer: client.Connection = await connect_to()
    await conn.declare_queue("confirmed")
    for i in range(1, 21):
        await conn.publish("", "confirmed", b"x%d" % i)
        # Once publish returned, any other connection already sees the message.
        q = await queue_info(observer, "confirmed")
        assert q is not None and q["messages"] == i
        assert not conn._unconfirmed


async def test_publish_batch_5000(conn: client.Connection, connect_to: Any) -> None:
    await conn.declare_queue("bulk")
    msgs = numbered(5000)
    assert await conn.publish_batch(msgs, routing_key="bulk") == 5000
    observer: client.Connection = await connect_to()
    info = await observer.declare_queue("bulk", passive=True)
    assert info.message_count == 5000
    q = await queue_info(observer, "bulk")
    assert q is not None and q["messages"] == 5000
    got: list[client.Message] = []
    for _ in range(100):  # each GET reply holds what fits in one frame
        batch = await observer.get("bulk", 10000, no_ack=True)
        if not batch:
            break
        got += batch
    assert bodies(got) == msgs

    # Mixed OutgoingMessage entries are routed individually.
    await conn.declare_queue("bulk2")
    n = await conn.publish_batch(
        [
            client.OutgoingMessage(b"a", routing_key="bulk"),
            client.OutgoingMessage(b"b", routing_key="bulk2", properties={"message_id": "b"}),
            b"c",
        ],
        routing_key="bulk2",
    )
    assert n == 3
    assert bodies(await observer.get("bulk", 10, no_ack=True)) == [b"a"]
    got2 = await observer.get("bulk2", 10, no_ack=True)
    assert bodies(got2) == [b"b", b"c"]
    assert got2[0].message_id == "b"


async def test_mandatory_unroutable(conn: client.Connection) -> None:
    await conn.declare_exchange("lonely", "direct")
    await conn.declare_queue("bystander")
    await conn.bind("lonely", "bystander", "other-key")
    with pytest.raises(client.NoRoute):
        await conn.publish("lonely", "no-such-key", b"lost", mandatory=True)
    with pytest.raises(client.NoRoute):
        await conn.publish("", "no-such-queue", b"lost", mandatory=True)
    # Without mandatory the message is silently dropped but confirmed.
    await conn.publish("lonely", "no-such-key", b"dropped")
    await conn.publish("", "no-such-queue", b"dropped")
    queues = await conn.list("queues")
    assert [(q["name"], q["messages"]) for q in queues] == [("bystander", 0)]
    # The connection is fine and routable mandatory publishes succeed.
    await conn.publish("lonely", "other-key", b"kept", mandatory=True)
    assert bodies(await conn.get("bystander", 10, no_ack=True)) == [b"kept"]
    # A batch with one unroutable mandatory message raises NoRoute; the others are queued.
    with pytest.raises(client.NoRoute):
        await conn.publish_batch(
            [
                client.OutgoingMessage(b"1", routing_key="other-key"),
                client.OutgoingMessage(b"2", routing_key="nowhere"),
                client.OutgoingMessage(b"3", routing_key="other-key"),
            ],
            exchange="lonely",
            mandatory=True,
        )
    assert bodies(await conn.get("bystander", 10, no_ack=True)) == [b"1", b"3"]


async def test_publish_to_missing_exchange(conn: client.Connection) -> None:
    await conn.declare_queue("still-ok")
    with pytest.raises(client.NotFound) as info:
        await conn.publish("no-such-exchange", "k", b"x")
    assert info.value.code == 404
    assert conn.is_open
    await conn.publish("", "still-ok", b"after")
    assert bodies(await conn.get("still-ok", 10, no_ack=True)) == [b"after"]
    with pytest.raises(client.NotFound):
        await conn.publish_batch([b"a", b"b"], exchange="no-such-exchange")
    await conn.publish("", "still-ok", b"after2")
    assert bodies(await conn.get("still-ok", 10, no_ack=True)) == [b"after2"]


# ---------------------------------------------------------------------- queue features
async def test_exclusive_queue(conn: client.Connection, connect_to: Any) -> None:
    owner: client.Connection = await connect_to()
    await owner.declare_queue("mine", exclusive=True, durable=False)
    await owner.publish("", "mine", b"private")
    with pytest.raises(client.ResourceLocked):
        await conn.declare_queue("mine", exclusive=True, durable=False)
    with pytest.raises(client.ResourceLocked):
        await conn.consume("mine")
    with pytest.raises(client.ResourceLocked):
        await conn.get("mine")
    with pytest.raises(client.ResourceLocked):
        await conn.purge("mine")
    with pytest.raises(client.ResourceLocked):
        await conn.delete_queue("mine")
    assert conn.is_open
    assert bodies(await owner.get("mine", 10, no_ack=True)) == [b"private"]
    q = await queue_info(conn, "mine")
    assert q is not None and q["exclusive"] is True

    await owner.close()

    async def gone() -> bool:
        return await queue_info(conn, "mine") is None

    await wait_until(gone)
    with pytest.raises(client.NotFound):
        await conn.declare_queue("mine", passive=True)
    # The name is free again.
    await conn.declare_queue("mine", exclusive=True, durable=False)


async def test_auto_delete_queue_goes_with_last_consumer(conn: client.Connection) -> None:
    await conn.declare_queue("ad", auto_delete=True)
    # No consumer yet: it stays.
    assert await queue_info(conn, "ad") is not None
    c1 = await conn.consume("ad")
    c2 = await conn.consume("ad")
    await c1.cancel()
    q = await queue_info(conn, "ad")
    assert q is not None and q["consumers"] == 1
    await c2.cancel()
    assert await queue_info(conn, "ad") is None
    with pytest.raises(client.NotFound):
        await conn.declare_queue("ad", passive=True)


async def test_get_pulls_batches(conn: client.Connection) -> None:
    await conn.declare_queue("pull")
    assert await conn.get("pull", 5) == []
    await conn.publish_batch(numbered(10), routing_key="pull")
    first = await conn.get("pull", 4)
    assert bodies(first) == numbered(4)
    assert [m.delivery_tag for m in first] == [1, 2, 3, 4]
    rest = await conn.get("pull", 100)
    assert bodies(rest) == numbered(10)[4:]
    assert [m.delivery_tag for m in rest] == list(range(5, 11))
    assert await conn.get("pull", 1) == []
    q = await queue_info(conn, "pull")
    assert q is not None and (q["messages"], q["unacked"]) == (0, 10)
    first[0].nack()  # back to the head
    for m in first[1:] + rest:
        m.ack()
    (again,) = await conn.get("pull", 10)
    assert (again.body, again.redelivered, again.delivery_count, again.delivery_tag) == (
        b"m0",
        True,
        2,
        11,
    )
    again.ack()
    q = await queue_info(conn, "pull")
    assert q is not None and (q["messages"], q["unacked"]) == (0, 0)
    with pytest.raises(client.InvalidArgument):
        await conn.get("pull", 0)
    with pytest.raises(client.NotFound):
        await conn.get("no-such-queue")


async def test_purge(conn: client.Connection) -> None:
    await conn.declare_queue("purgeq")
    await conn.publish_batch(numbered(7), routing_key="purgeq")
    held = await conn.get("purgeq", 2)
    assert await conn.purge("purgeq") == 5
    q = await queue_info(conn, "purgeq")
    assert q is not None and (q["messages"], q["unacked"]) == (0, 2)
    assert await conn.purge("purgeq") == 0
    for m in held:
        m.nack()  # unacked messages survive a purge and can be requeued
    assert bodies(await conn.get("purgeq", 10, no_ack=True)) == [b"m0", b"m1"]
    with pytest.raises(client.NotFound):
        await conn.purge("no-such-queue")


async def test_delete_queue_cancels_consumers(conn: client.Connection, connect_to: Any) -> None:
    other: client.Connection = await connect_to()
    await conn.declare_queue("doomed")
    await conn.publish_batch(numbered(3), routing_key="doomed")
    consumer = await other.consume("doomed", prefetch=1)
    (m0,) = await take(consumer, 1)
    received: list[bytes] = [m0.body]

    async def iterate() -> None:
        async for msg in consumer:
            received.append(msg.body)

    task = asyncio.create_task(iterate())
    await asyncio.sleep(0.1)
    assert await conn.delete_queue("doomed") == 2  # ready messages; m0 is unacked
    with pytest.raises(client.ConsumerCancelled) as info:
        await asyncio.wait_for(task, WAIT)
    assert info.value.details.get("code") == 404
    assert received == [b"m0"]
    assert consumer.active is False
    assert await queue_info(conn, "doomed") is None
    assert [c for c in await conn.list("consumers") if c["queue"] == "doomed"] == []
    # Acking a message from the deleted queue is harmless; the connection stays usable.
    m0.ack()
    assert other.is_open
    await other.declare_queue("doomed")
    assert await other.get("doomed", 10) == []
    with pytest.raises(client.NotFound):
        await conn.delete_queue("never-existed")


async def test_redeclare_with_different_settings(conn: client.Connection) -> None:
    await conn.declare_queue("settled", durable=True)
    await conn.declare_queue("settled", durable=True)  # identical: fine
    with pytest.raises(client.PreconditionFailed):
        await conn.declare_queue("settled", durable=False)
    with pytest.raises(client.PreconditionFailed):
        await conn.declare_queue("settled", auto_delete=True)
    await conn.declare_exchange("ex-settled", "topic")
    await conn.declare_exchange("ex-settled", "topic")
    with pytest.raises(client.PreconditionFailed):
        await conn.declare_exchange("ex-settled", "fanout")
    with pytest.raises(client.PreconditionFailed):
        await conn.declare_exchange("ex-settled", "topic", durable=False)
    assert conn.is_open
    q = await queue_info(conn, "settled")
    assert q is not None and (q["durable"], q["auto_delete"]) == (True, False)


# ---------------------------------------------------------------------- message content
async def test_properties_arrive_unchanged(conn: client.Connection) -> None:
    await conn.declare_queue("props")
    props: dict[str, Any] = {
        "message_id": "msg-1",
        "correlation_id": "corr-42",
        "reply_to": "somewhere",
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "type": "order.created",
        "app_id": "tests",
        "headers": {
            "a": 1,
            "b": "two",
            "c": [1, 2, 3],
            "d": {"nested": True},
            "e": b"\x00\xff",
            "f": -5,
            "g": 2**40,
        },
        "timestamp": 1_700_000_000_123,
        "ttl": 600_000,
        "priority": 7,
        "persistent": False,
    }
    await conn.publish("", "props", b'{"id": 1}', properties=props)
    await conn.publish(
        "", "props", b"kw", message_id="m2", priority=0, headers={"x": "y"}, ttl=60_000
    )  # (a ttl is honoured: not 1 ms)
    await conn.publish("", "props", b"")
    consumer = await conn.consume("props")
    m1, m2, m3 = await take(consumer, 3)
    assert m1.properties == props
    assert m1.body == b'{"id": 1}'
    assert (m1.message_id, m1.correlation_id, m1.reply_to) == ("msg-1", "corr-42", "somewhere")
    assert m1.headers == props["headers"]
    assert m2.properties == {
        "message_id": "m2",
        "priority": 0,
        "headers": {"x": "y"},
        "ttl": 60_000,
    }
    assert (m3.body, m3.properties) == (b"", {})
    for m in (m1, m2, m3):
        m.ack()


async def test_large_body_round_trip(conn: client.Connection) -> None:
    await conn.declare_queue("large")
    body = os.urandom(512 * 1024)
    await conn.publish("", "large", body)
    consumer = await conn.consume("large", prefetch=4)
    (msg,) = await take(consumer, 1)
    assert msg.body == body
    msg.ack()
    # Several large messages in one batch are split across frames and all arrive.
    many = [os.urandom(300 * 1024) for _ in range(6)]
    assert await conn.publish_batch(many, routing_key="large") == 6
    got = await take(consumer, 6, ack=True)
    assert bodies(got) == many


async def test_message_too_large(broker_factory: Any) -> None:
    b = broker_factory("--max-frame-size", "65536")
    conn = await connect(b.url)
    try:
        await conn.declare_queue("small")
        with pytest.raises(client.MessageTooLarge):
            await conn.publish("", "small", b"x" * 100_000)
        assert conn.is_open
        # Over the broker's message size limit but within a frame: nacked 413.
        with pytest.raises(client.MessageTooLarge):
            await conn.publish("", "small", b"x" * 60_000)
        with pytest.raises(client.MessageTooLarge):
            await conn.publish_batch([b"ok", b"x" * 100_000], routing_key="small")
        assert conn.is_open
        await conn.publish("", "small", b"y" * 50_000)
        got = await conn.get("small", 10, no_ack=True)
        assert bodies(got) == [b"y" * 50_000]
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
