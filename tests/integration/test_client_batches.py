"""Batch consumption (``Consumer.batches``, ``get_batch``, ``ack_all``) against a real
broker, and the client's own decoding of DELIVER_BATCH / DELIVER / CONFIRM frames, which
must accept and refuse exactly what the generated decoder does."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conveyor import client
from conveyor.protocol import (
    SERVER_FRAMES,
    Confirm,
    ConveyorError,
    Deliver,
    DeliverBatch,
    encode_fields,
)
from conveyor.protocol.codec import Decoder
from conveyor.protocol.connection import State
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect, queue_info, wait_until

pytestmark = pytest.mark.timeout(60)


def numbered(n: int, prefix: str = "m") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


async def collect(
    consumer: client.Consumer, n: int, *, max_messages: int | None = None, ack: bool = True
) -> list[list[client.Message]]:
    """Batches from ``consumer.batches()`` until ``n`` messages came (bounded by WAIT)."""
    batches: list[list[client.Message]] = []

    async def run() -> None:
        got = 0
        async for batch in consumer.batches(max_messages):
            batches.append(batch)
            if ack:
                consumer.ack_all(batch)
            got += len(batch)
            if got >= n:
                return

    await asyncio.wait_for(run(), WAIT)
    return batches


async def settled_queue(conn: client.Connection, name: str) -> None:
    async def empty() -> bool:
        q = await queue_info(conn, name)
        return q is not None and (q["messages"], q["unacked"]) == (0, 0)

    await wait_until(empty)


# ---------------------------------------------------------------------- batches
async def test_batches_yield_every_message_in_order_and_ack_all_settles(
    conn: client.Connection,
) -> None:
    await conn.declare_queue("b-order")
    n = 1000
    consumer = await conn.consume("b-order", prefetch=50)  # credit must keep coming back
    assert await conn.publish_batch(numbered(n), routing_key="b-order") == n
    batches = await collect(consumer, n)
    msgs = [m for b in batches for m in b]
    assert all(batches) and len(msgs) == n
    assert [m.body for m in msgs] == numbered(n)
    assert all(m.settled for m in msgs)
    tags = [m.delivery_tag for m in msgs]
    assert tags == sorted(tags) and len(set(tags)) == n
    assert max(len(b) for b in batches) <= 50  # never more than the credit window
    await settled_queue(conn, "b-order")
    assert await consumer.get_batch(timeout=0.1) == []
    await consumer.cancel()


async def test_batches_respect_max_messages(conn: client.Connection) -> None:
    await conn.declare_queue("b-max")
    await conn.publish_batch(numbered(100), routing_key="b-max")
    consumer = await conn.consume("b-max", prefetch=100)
    await wait_until(lambda: len(consumer._buffer) == 100)  # all buffered first
    batches = await collect(consumer, 100, max_messages=7)
    assert [len(b) for b in batches] == [7] * 14 + [2]
    assert [m.body for b in batches for m in b] == numbered(100)
    await settled_queue(conn, "b-max")
    with pytest.raises(ValueError):
        consumer.batches(0)


async def test_batches_mix_with_per_message_iteration_and_get_batch(
    conn: client.Connection,
) -> None:
    await conn.declare_queue("b-mix")
    consumer = await conn.consume("b-mix", prefetch=200)
    await conn.publish_batch(numbered(60), routing_key="b-mix")
    first = await consumer.get(WAIT)
    assert first is not None and first.body == b"m0"
    first.ack()
    rest: list[client.Message] = []
    while len(rest) < 59:
        batch = await consumer.get_batch(max_messages=10, timeout=WAIT)
        assert 1 <= len(batch) <= 10
        rest += batch
    assert [m.body for m in rest] == numbered(60)[1:]
    # individually acked and bulk-acked messages share the cumulative ACK
    rest[0].ack()
    consumer.ack_all(rest[1:])
    await settled_queue(conn, "b-mix")
    assert await consumer.get_batch(timeout=0.1) == []
    with pytest.raises(ValueError):
        await consumer.get_batch(max_messages=0)


async def test_batches_end_when_the_consumer_is_cancelled(conn: client.Connection) -> None:
    await conn.declare_queue("b-cancel")
    consumer = await conn.consume("b-cancel", prefetch=10)
    await conn.publish_batch(numbered(3), routing_key="b-cancel")
    seen: list[bytes] = []

    async def run() -> None:
        async for batch in consumer.batches():
            seen.extend(m.body for m in batch)
            consumer.ack_all(batch)
            if len(seen) == 3:
                await consumer.cancel()

    await asyncio.wait_for(run(), WAIT)  # ends, does not hang
    assert seen == numbered(3)
    assert await consumer.get_batch(timeout=0.1) == []


async def test_no_ack_batches_return_credit_as_they_are_taken(conn: client.Connection) -> None:
    await conn.declare_queue("b-noack")
    consumer = await conn.consume("b-noack", prefetch=10, no_ack=True)
    await conn.publish_batch(numbered(300), routing_key="b-noack")
    batches = await collect(consumer, 300, ack=False)
    msgs = [m for b in batches for m in b]
    assert [m.body for m in msgs] == numbered(300)
    assert all(m.settled for m in msgs)
    with pytest.raises(RuntimeError):
        consumer.ack_all(msgs[:1])
    await settled_queue(conn, "b-noack")


async def test_ack_all_out_of_order_and_across_consumers(conn: client.Connection) -> None:
    await conn.declare_queue("b-x1")
    await conn.declare_queue("b-x2")
    c1 = await conn.consume("b-x1", prefetch=4)
    c2 = await conn.consume("b-x2", prefetch=4)
    for i in range(40):  # interleaved deliveries on one connection
        await conn.publish("", "b-x1", b"a%d" % i)
        await conn.publish("", "b-x2", b"b%d" % i)
    got1: list[client.Message] = []
    got2: list[client.Message] = []
    for _ in range(1000):  # bounded: ~50 ms per idle round
        if len(got1) == 40 and len(got2) == 40:
            break
        b1 = await c1.get_batch(timeout=0.05)
        b2 = await c2.get_batch(timeout=0.05)
        got1 += b1
        got2 += b2
        # settle the newest first, and both consumers' messages in one call
        conn.ack_all(list(reversed(b2)) + b1)
    assert [m.body for m in got1] == [b"a%d" % i for i in range(40)]
    assert [m.body for m in got2] == [b"b%d" % i for i in range(40)]
    await settled_queue(conn, "b-x1")
    await settled_queue(conn, "b-x2")


async def test_ack_all_is_all_or_nothing(conn: client.Connection, connect_to: Any) -> None:
    await conn.declare_queue("b-aon")
    consumer = await conn.consume("b-aon", prefetch=20)
    await conn.publish_batch(numbered(5), routing_key="b-aon")
    msgs = await consumer.get_batch(max_messages=5, timeout=WAIT)
    while len(msgs) < 5:
        msgs += await consumer.get_batch(timeout=WAIT)
    msgs[3].ack()
    with pytest.raises(RuntimeError, match="already settled"):
        consumer.ack_all(msgs)
    assert [m.settled for m in msgs] == [False, False, False, True, False]
    with pytest.raises(RuntimeError, match="twice"):
        consumer.ack_all([msgs[0], msgs[1], msgs[0]])
    assert not any(m.settled for m in msgs[:3])

    other = await connect_to()
    await other.declare_queue("b-aon2")
    oc = await other.consume("b-aon2", prefetch=5)
    await other.publish("", "b-aon2", b"elsewhere")
    foreign = await oc.get(WAIT)
    assert foreign is not None
    with pytest.raises(ValueError):
        consumer.ack_all([msgs[0], foreign])
    with pytest.raises(ValueError):
        consumer.ack_all([foreign])
    assert not msgs[0].settled and not foreign.settled
    foreign.ack()

    consumer.ack_all([msgs[i] for i in (0, 1, 2, 4)])
    consumer.ack_all([])
    await settled_queue(conn, "b-aon")


async def test_ack_all_after_the_connection_is_lost(broker: BrokerProcess) -> None:
    conn = await connect(broker.url)
    try:
        await conn.declare_queue("b-lost")
        consumer = await conn.consume("b-lost", prefetch=10)
        await conn.publish_batch(numbered(3), routing_key="b-lost")
        msgs = await consumer.get_batch(timeout=WAIT)
        assert msgs
        broker.kill()
        await wait_until(lambda: not conn.is_open)
        with pytest.raises(client.ConnectionClosed):
            consumer.ack_all(msgs)
        with pytest.raises(client.ConnectionClosed):
            msgs[0].ack()
        assert not any(m.settled for m in msgs)
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def _take_all(consumer: client.Consumer, n: int) -> list[client.Message]:
    msgs: list[client.Message] = []
    while len(msgs) < n:
        batch = await consumer.get_batch(timeout=WAIT)
        assert batch, f"got {len(msgs)} of {n} messages"
        msgs += batch
    return msgs


async def test_publishes_and_acks_interleaved_in_one_loop_turn(conn: client.Connection) -> None:
    """Acks queued between publishes go out before the later publishes (coalesced with
    them in the same writes); every publish is confirmed and arrives in order."""
    await conn.declare_queue("b-src")
    await conn.declare_queue("b-dst")
    src = await conn.consume("b-src", prefetch=200)
    await conn.publish_batch(numbered(80, "s"), routing_key="b-src")
    msgs = await _take_all(src, 80)
    futs = []
    for i, m in enumerate(msgs[:40]):  # no await: all in one loop turn
        futs.append(conn.publish_nowait("", "b-dst", b"p%d" % (2 * i)))
        m.ack()
        futs.append(conn.publish_nowait("", "b-dst", b"p%d" % (2 * i + 1)))

    async def ack_then_publish(m: client.Message, i: int) -> int:
        m.ack()
        return await conn.publish_batch([b"q%d-%d" % (i, k) for k in range(3)], routing_key="b-dst")

    tasks = [asyncio.ensure_future(ack_then_publish(m, i)) for i, m in enumerate(msgs[40:])]
    await asyncio.wait_for(asyncio.gather(*futs, *tasks), WAIT)
    assert not conn._unconfirmed
    dst = await conn.consume("b-dst", prefetch=500)
    got = await _take_all(dst, 200)
    expected = [b"p%d" % i for i in range(80)] + [
        b"q%d-%d" % (i, k) for i in range(40) for k in range(3)
    ]
    assert [m.body for m in got] == expected
    dst.ack_all(got)
    await settled_queue(conn, "b-src")
    await settled_queue(conn, "b-dst")


# ---------------------------------------------------------------------- client decoding
class _Owner:
    """Just enough of a Connection for _Protocol._decode."""

    epoch = 1
    url = client.connection.parse_url("mq://127.0.0.1:1")
    name = ""


def _frames(ftype: int, bodies: list[Any]) -> bytes:
    return b"".join(encode_fields(ftype, b) for b in bodies)


def _reference(data: bytes) -> list[Any] | ConveyorError:
    try:
        return Decoder(1 << 30, SERVER_FRAMES).feed(data)
    except ConveyorError as exc:
        return exc


def _client_decode(data: bytes, chunk: int | None = None) -> list[Any] | ConveyorError:
    proto = client.connection._Protocol(_Owner())  # type: ignore[arg-type]
    proto.wire.state = State.OPEN
    out: list[Any] = []
    try:
        if chunk is None:
            return proto._decode(data)
        for i in range(0, len(data), chunk):
            out += proto._decode(data[i : i + chunk])
        return out
    except ConveyorError as exc:
        return exc


def _normal(frames: list[Any]) -> list[Any]:
    """Client fast-path records and generated frames as comparable tuples."""
    out: list[Any] = []
    for f in frames:
        if isinstance(f, client.connection._Deliveries):
            out.append(
                (
                    "deliver",
                    f.consumer_tag,
                    [
                        (
                            m.delivery_tag,
                            m.redelivered,
                            m.exchange,
                            m.routing_key,
                            m.properties,
                            m.body,
                            m.delivery_count,
                        )
                        for m in f.messages
                    ],
                )
            )
            assert f.tags == [m.delivery_tag for m in f.messages]
        elif isinstance(f, DeliverBatch):
            out.append(("deliver", f.consumer_tag, [tuple(e) for e in f.entries]))
        elif isinstance(f, Deliver):
            out.append(
                (
                    "deliver",
                    f.consumer_tag,
                    [
                        (
                            f.delivery_tag,
                            f.redelivered,
                            f.exchange,
                            f.routing_key,
                            f.properties,
                            f.body,
                            f.delivery_count,
                        )
                    ],
                )
            )
        else:  # Confirm or the client's _Confirmed
            out.append(("confirm", f.first_seq, f.last_seq, f.ack, f.code, f.message))
    return out


def _typed(v: Any) -> Any:
    """Values with their types, so True and 1 (equal in Python) compare different."""
    if isinstance(v, dict):
        return {k: _typed(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_typed(x) for x in v]
    return (type(v).__name__, v)


def _same_as_reference(data: bytes) -> None:
    want = _reference(data)
    for chunk in (None, 1, 7, 64):
        got = _client_decode(data, chunk)
        if isinstance(want, ConveyorError):
            assert isinstance(got, ConveyorError), (chunk, got)
            assert (type(got), got.message) == (type(want), want.message)
        else:
            assert not isinstance(got, ConveyorError), (chunk, got)
            assert _typed(_normal(got)) == _typed(_normal(want))


E = [7, False, "ex", "rk", {}, b"body", 1]  # a valid delivery entry


def _entry(**change: Any) -> list[Any]:
    names = ["tag", "red", "ex", "rk", "props", "body", "count"]
    e = list(E)
    for k, v in change.items():
        e[names.index(k)] = v
    return e


VALID_BATCHES: list[list[Any]] = [
    ["ctag", [E, E]],
    ["ctag", []],
    ["ctag", [_entry(props={"persistent": True}), _entry(props={"persistent": True})]],
    [
        "ctag",
        [
            _entry(
                props={
                    "persistent": False,
                    "message_id": "x",
                    "ttl": 5,
                    "priority": 9,
                    "timestamp": 2**64 - 1,
                }
            )
        ]
        * 3,
    ],
    ["ctag", [_entry(props={"headers": {"a": 1, "b": [1, {"c": None}]}})] * 2],
    ["ctag", [[1], [2, True], [3, False, "e"], [4, True, "e", "k", {}, b"", 0]]],
    ["ctag", [_entry(ex="x" * 200, rk="é" * 60), _entry(tag=2**64 - 1, count=2**32 - 1)]],
    ["c" * 255, [E]],
    [
        "ctag",
        [
            _entry(props={"persistent": True}),
            _entry(props={"persistent": False}),
            _entry(props={"ttl": 1}),
            _entry(props={"ttl": 2}),
        ],
    ],
]

INVALID_BATCHES: list[Any] = [
    ["ctag", [E, _entry(tag=-1)]],
    ["ctag", [E, _entry(tag=True)]],
    ["ctag", [E, _entry(tag=-(2**63))]],
    ["ctag", [E, _entry(red=1)]],
    ["ctag", [E, _entry(ex=5)]],
    ["ctag", [E, _entry(ex="x" * 256)]],
    ["ctag", [E, _entry(body="text")]],
    ["ctag", [E, _entry(count=-1)]],
    ["ctag", [E, _entry(count=2**32)]],
    ["ctag", [E, _entry(props=[])]],
    ["ctag", [E, _entry(props={"unknown": 1})]],
    # a memo trap: equal (==) to the validated properties before it, wrong type
    ["ctag", [_entry(props={"persistent": True}), _entry(props={"persistent": 1})]],
    ["ctag", [_entry(props={"ttl": 1}), _entry(props={"ttl": True})]],
    ["ctag", [_entry(props={"ttl": 1}), _entry(props={"ttl": 1.0})]],
    ["ctag", [_entry(props={"priority": 1}), _entry(props={"priority": 10})]],
    ["ctag", [_entry(props={"headers": {"a": 1}}), _entry(props={"headers": {b"a": 1}})]],
    ["ctag", [E, [*E, 1]]],
    ["ctag", [E, []]],
    ["ctag", [E, "entry"]],
    ["ctag", "entries"],
    ["ctag", [E], "extra"],
    ["ctag"],
    [5, [E]],
    ["c" * 256, [E]],
    "not a list",
]


@pytest.mark.parametrize("body", VALID_BATCHES + INVALID_BATCHES)
async def test_client_decodes_deliver_batch_like_the_generated_decoder(body: Any) -> None:
    _same_as_reference(_frames(DeliverBatch.TYPE, [body]))
    # and in a stream with other frames around it
    _same_as_reference(
        _frames(Confirm.TYPE, [[1, 2, True, 0, ""]])
        + _frames(DeliverBatch.TYPE, [["ctag", [E]], body])
    )


@pytest.mark.parametrize(
    "entry", [b[1][0] for b in VALID_BATCHES if b[1]] + [b[1][-1] for b in INVALID_BATCHES[:16]]
)
async def test_client_decodes_deliver_like_the_generated_decoder(entry: Any) -> None:
    _same_as_reference(_frames(Deliver.TYPE, [["ctag", *entry]]))


@pytest.mark.parametrize(
    "body",
    [
        [1, 5, True, 0, ""],
        [1, 5],
        [1, 5, False, 404, "no exchange"],
        [1, 5, False],
        [0, 2**64 - 1, True, 65535, "x" * 20000],
        [-1, 5, True, 0, ""],
        [1, 5, 1, 0, ""],
        [1, 5, True, 65536, ""],
        [1, 5, True, 0, 7],
        [1, 5, True, 0, "", "extra"],
        [1],
        [True, 5, True, 0, ""],
        [1, 5.0, True, 0, ""],
    ],
)
async def test_client_decodes_confirm_like_the_generated_decoder(body: Any) -> None:
    _same_as_reference(_frames(Confirm.TYPE, [body]))


# ---------------------------------------------------------------------- runs (1.1)


async def test_runs_carry_shared_fields_and_each_message_owns_its_properties(
    conn: client.Connection,
) -> None:
    """publish_batch of plain bodies goes out as PUBLISH_RUN and comes back as DELIVER_RUN
    (both sides speak 1.1 or later): tags, order, fields and properties are as for single
    publishes, and each message has its own properties dict."""
    assert conn._proto is not None and conn._proto.server_minor >= 1
    await conn.declare_queue("runs", durable=False)
    props = {"content_type": "text/plain", "headers": {"k": "v"}, "persistent": False}
    assert await conn.publish_batch(numbered(50), routing_key="runs", properties=props) == 50
    consumer = await conn.consume("runs", prefetch=100)
    batches = await collect(consumer, 50, ack=False)
    msgs = [m for b in batches for m in b]
    assert [m.body for m in msgs] == numbered(50)
    tags = [m.delivery_tag for m in msgs]
    assert tags == list(range(tags[0], tags[0] + 50))
    assert all(
        (m.exchange, m.routing_key, m.redelivered, m.delivery_count) == ("", "runs", False, 1)
        for m in msgs
    )
    assert all(m.properties == props for m in msgs)
    msgs[0].properties["headers"] = {"changed": True}
    msgs[1].properties["content_type"] = "x"
    assert msgs[2].properties == props and props["content_type"] == "text/plain"
    # redelivered after a nack: entries with their counts (not a run), same messages
    for m in msgs[:10]:
        m.nack(requeue=True)
    consumer.ack_all(msgs[10:])
    again = [m for b in await collect(consumer, 10, ack=True) for m in b]
    assert [m.body for m in again] == numbered(10)
    assert all(m.redelivered and m.delivery_count == 2 for m in again)
    await settled_queue(conn, "runs")


async def test_mixed_publishes_in_one_turn_still_batch(conn: client.Connection) -> None:
    """Publishes queued in one loop turn that differ in routing key or properties go out
    as PUBLISH_BATCH (no run); every one is confirmed and routed by its own fields."""
    for q in ("mix.a", "mix.b"):
        await conn.declare_queue(q, durable=False)
    futs = [
        conn.publish_nowait(
            "",
            "mix.a" if i % 3 else "mix.b",
            b"%d" % i,
            properties={"priority": i % 2} if i % 5 == 0 else None,
        )
        for i in range(30)
    ]
    await asyncio.wait_for(asyncio.gather(*futs), WAIT)
    a = await conn.get("mix.a", 100, no_ack=True)
    b = await conn.get("mix.b", 100, no_ack=True)
    assert [m.body for m in a] == [b"%d" % i for i in range(30) if i % 3]
    assert [m.body for m in b] == [b"%d" % i for i in range(30) if not i % 3]
    assert [m.properties.get("priority") for m in b] == [
        i % 2 if i % 5 == 0 else None for i in range(30) if not i % 3
    ]


async def test_runs_larger_than_a_frame_are_split(conn: client.Connection) -> None:
    """A run whose bodies exceed the frame size is split into several PUBLISH_RUN and
    DELIVER_RUN frames; nothing is lost or reordered."""
    await conn.declare_queue("bigrun", durable=False)
    bodies = [b"%05d" % i + b"z" * 40_000 for i in range(60)]  # ~2.4 MB > 1 MiB frames
    assert await conn.publish_batch(bodies, routing_key="bigrun") == 60
    consumer = await conn.consume("bigrun", prefetch=60)
    got = [m for b in await collect(consumer, 60) for m in b]
    assert [m.body[:5] for m in got] == [b"%05d" % i for i in range(60)]
    assert all(len(m.body) == 40_005 for m in got)
    await settled_queue(conn, "bigrun")
