"""Tests of the broker model (broker.core / broker.queue / broker.session) with no sockets
and no event loop: Sessions are driven with frames and every written frame is captured by
the write callback, then compared with the exact frames the spec requires."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from conveyor.broker.core import Broker
from conveyor.broker.session import Session
from conveyor.protocol import (
    SERVER_FRAMES,
    Ack,
    Bind,
    Cancel,
    Cancelled,
    Confirm,
    Consume,
    ConsumeOk,
    Credit,
    Decoder,
    Deliver,
    DeliverBatch,
    DeliverRun,
    DeliveryEntry,
    Error,
    ExchangeDeclare,
    ExchangeDelete,
    Frame,
    Get,
    GetOk,
    List,
    ListOk,
    MessageCountOk,
    Nack,
    Ok,
    Publish,
    PublishBatch,
    PublishEntry,
    PublishRun,
    QueueDeclare,
    QueueDeclareOk,
    QueueDelete,
    QueuePurge,
    Reject,
    Return,
    Unbind,
    encode,
)

# --------------------------------------------------------------------------- harness


class Conn:
    """One Session plus a collector for everything its write callback receives."""

    def __init__(self, broker: Broker, max_frame_size: int = 1 << 20) -> None:
        self.broker = broker
        self.writes: list[list[Frame]] = []
        # The session writes encoded bytes; decode them as a client would.
        decoder = Decoder(max_frame_size, SERVER_FRAMES)
        self.raw: list[bytes] = []

        def write(chunks: list[bytes]) -> None:
            data = b"".join(chunks)
            self.raw.append(data)
            self.writes.append(decoder.feed(data))

        self.session = Session(broker, broker.new_session_id(), write, max_frame_size)
        self._rid = itertools.count(1)

    @property
    def id(self) -> str:
        return self.session.id

    def rid(self) -> int:
        return next(self._rid)

    def take(self) -> list[Frame]:
        """Frames written since the last take, in write order."""
        out = [f for batch in self.writes for f in batch]
        self.writes.clear()
        return out

    def send(self, *frames: Frame) -> list[Frame]:
        """Handle ``frames`` as one input batch, pump the broker, return what was written."""
        self.session.handle(list(frames))
        self.broker.pump()
        return self.take()

    def request(self, frame: Frame) -> Frame:
        """Send one request and return its single reply."""
        out = self.send(frame)
        assert len(out) == 1, out
        return out[0]

    # convenience wrappers (each asserts success) ----------------------------------
    def declare_queue(self, name: str, **kw: Any) -> str:
        rid = self.rid()
        reply = self.request(
            QueueDeclare(
                rid,
                name,
                kw.pop("durable", True),
                kw.pop("exclusive", False),
                kw.pop("auto_delete", False),
                False,
                {},
            )
        )
        assert isinstance(reply, QueueDeclareOk), reply
        assert reply.rid == rid
        return reply.queue

    def declare_exchange(self, name: str, etype: str) -> None:
        rid = self.rid()
        assert self.request(ExchangeDeclare(rid, name, etype)) == Ok(rid)

    def bind(self, exchange: str, queue: str, key: str = "") -> None:
        rid = self.rid()
        assert self.request(Bind(rid, exchange, queue, key)) == Ok(rid)

    def consume(
        self,
        queue: str,
        credit: int,
        tag: str = "",
        *,
        no_ack: bool = False,
        exclusive: bool = False,
    ) -> tuple[str, list[Frame]]:
        """Start a consumer; return its tag and any deliveries written with CONSUME_OK."""
        rid = self.rid()
        out = self.send(Consume(rid, queue, tag, no_ack, exclusive, credit, {}))
        assert out and isinstance(out[0], ConsumeOk), out
        assert out[0].rid == rid
        return out[0].consumer_tag, out[1:]

    def publish_to_queue(self, queue: str, bodies: list[bytes]) -> None:
        """Publish without confirms (seq 0) to the default exchange."""
        assert self.send(*[Publish(0, "", queue, {}, b, False) for b in bodies]) == []

    def get(self, queue: str, max_messages: int = 1, no_ack: bool = False) -> GetOk:
        rid = self.rid()
        reply = self.request(Get(rid, queue, max_messages, no_ack))
        assert isinstance(reply, GetOk), reply
        assert reply.rid == rid
        return reply

    def list(self, kind: str) -> list[dict[str, Any]]:
        rid = self.rid()
        reply = self.request(List(rid, kind))
        assert isinstance(reply, ListOk), reply
        return reply.items


def assert_error(frame: Frame, rid: int, code: int) -> Error:
    assert isinstance(frame, Error), frame
    assert (frame.rid, frame.code) == (rid, code), frame
    assert frame.message
    return frame


def entries_of(frames: list[Frame], tag: str | None = None) -> list[DeliveryEntry]:
    """Flatten DELIVER / DELIVER_BATCH frames to delivery entries (optionally one tag)."""
    out: list[DeliveryEntry] = []
    for f in frames:
        if isinstance(f, Deliver):
            if tag is None or f.consumer_tag == tag:
                out.append(
                    DeliveryEntry(
                        f.delivery_tag,
                        f.redelivered,
                        f.exchange,
                        f.routing_key,
                        f.properties,
                        f.body,
                        f.delivery_count,
                    )
                )
        elif isinstance(f, DeliverBatch):
            assert f.entries, "DELIVER_BATCH must carry at least one entry"
            if tag is None or f.consumer_tag == tag:
                out.extend(f.entries)
        else:
            raise AssertionError(f"unexpected frame {f!r}")
    return out


def bodies(entries: list[DeliveryEntry]) -> list[bytes]:
    return [e.body for e in entries]


def msgs(n: int, prefix: str = "m", start: int = 1) -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(start, start + n)]


def queue_info(conn: Conn, name: str) -> dict[str, Any]:
    (info,) = [q for q in conn.list("queues") if q["name"] == name]
    return info


@pytest.fixture
def broker() -> Broker:
    return Broker()


@pytest.fixture
def conn(broker: Broker) -> Conn:
    return Conn(broker)


# --------------------------------------------------------------------------- declare


def test_exchange_declare_is_idempotent(conn: Conn) -> None:
    assert conn.send(ExchangeDeclare(1, "logs", "topic", True, False, False, {})) == [Ok(1)]
    assert conn.send(ExchangeDeclare(2, "logs", "topic", True, False, False, {})) == [Ok(2)]
    assert [e for e in conn.list("exchanges") if e["name"] == "logs"] == [
        {"name": "logs", "type": "topic", "durable": True, "auto_delete": False, "bindings": 0}
    ]


@pytest.mark.parametrize(
    "redeclare",
    [
        ExchangeDeclare(2, "logs", "direct", True, False, False, {}),
        ExchangeDeclare(2, "logs", "topic", False, False, False, {}),
        ExchangeDeclare(2, "logs", "topic", True, True, False, {}),
    ],
    ids=["type", "durable", "auto_delete"],
)
def test_exchange_redeclare_different_is_406(conn: Conn, redeclare: ExchangeDeclare) -> None:
    assert conn.send(ExchangeDeclare(1, "logs", "topic")) == [Ok(1)]
    (reply,) = conn.send(redeclare)
    err = assert_error(reply, 2, 406)
    # The 406 names the setting that differs, with both values.
    setting = err.details["setting"]
    assert err.details == {
        "exchange": "logs",
        "setting": setting,
        "existing": err.details["existing"],
        "requested": getattr(redeclare, setting),
    }
    assert err.details["existing"] != err.details["requested"]
    assert setting in err.message
    # the original is untouched
    assert conn.send(ExchangeDeclare(3, "logs", "topic", passive=True)) == [Ok(3)]


def test_exchange_passive(conn: Conn) -> None:
    (reply,) = conn.send(ExchangeDeclare(1, "missing", "direct", passive=True))
    assert assert_error(reply, 1, 404).details == {"exchange": "missing"}
    assert conn.send(ExchangeDeclare(2, "amq.topic", passive=True)) == [Ok(2)]
    # passive never creates
    assert "missing" not in {e["name"] for e in conn.list("exchanges")}


def test_exchange_unknown_type_is_400(conn: Conn) -> None:
    (reply,) = conn.send(ExchangeDeclare(1, "x", "headers"))
    assert assert_error(reply, 1, 400).details == {"type": "headers"}
    assert "x" not in {e["name"] for e in conn.list("exchanges")}


def test_amq_names_are_reserved(conn: Conn) -> None:
    assert_error(conn.request(ExchangeDeclare(1, "amq.custom", "direct")), 1, 403)
    # identical redeclare / passive declare of a pre-declared exchange succeeds
    assert conn.send(ExchangeDeclare(2, "amq.direct", "direct")) == [Ok(2)]
    assert conn.send(ExchangeDeclare(3, "amq.fanout", "fanout", passive=True)) == [Ok(3)]
    assert_error(conn.request(ExchangeDelete(4, "amq.direct")), 4, 403)
    assert_error(conn.request(ExchangeDelete(5, "")), 5, 403)
    assert_error(conn.request(QueueDeclare(6, "amq.mine")), 6, 403)
    assert_error(conn.request(Bind(7, "", "q", "q")), 7, 403)


def test_queue_declare_is_idempotent(conn: Conn) -> None:
    assert conn.send(QueueDeclare(1, "q")) == [QueueDeclareOk(1, "q", 0, 0)]
    conn.publish_to_queue("q", msgs(2))
    assert conn.send(QueueDeclare(2, "q")) == [QueueDeclareOk(2, "q", 2, 0)]
    conn.consume("q", 0)
    assert conn.send(QueueDeclare(3, "q", passive=True)) == [QueueDeclareOk(3, "q", 2, 1)]


@pytest.mark.parametrize(
    "redeclare",
    [
        QueueDeclare(2, "q", durable=False),
        QueueDeclare(2, "q", exclusive=True),
        QueueDeclare(2, "q", auto_delete=True),
    ],
    ids=["durable", "exclusive", "auto_delete"],
)
def test_queue_redeclare_different_is_406(conn: Conn, redeclare: QueueDeclare) -> None:
    assert conn.send(QueueDeclare(1, "q")) == [QueueDeclareOk(1, "q", 0, 0)]
    (reply,) = conn.send(redeclare)
    err = assert_error(reply, 2, 406)
    setting = err.details["setting"]
    assert err.details == {
        "queue": "q",
        "setting": setting,
        "existing": not getattr(redeclare, setting),
        "requested": getattr(redeclare, setting),
    }


def test_queue_passive_missing_is_404(conn: Conn) -> None:
    (reply,) = conn.send(QueueDeclare(1, "nope", passive=True))
    assert assert_error(reply, 1, 404).details == {"queue": "nope"}
    assert conn.list("queues") == []


def test_server_named_queue(conn: Conn) -> None:
    a = conn.declare_queue("", exclusive=True, auto_delete=True)
    b = conn.declare_queue("")
    assert a.startswith("amq.gen-") and b.startswith("amq.gen-")
    assert a != b and len(a) > len("amq.gen-")
    # the owner may redeclare and use it by name
    assert conn.send(QueueDeclare(50, a, True, True, True, False, {})) == [
        QueueDeclareOk(50, a, 0, 0)
    ]
    conn.publish_to_queue(a, [b"x"])
    assert bodies(conn.get(a).entries) == [b"x"]


# --------------------------------------------------------------------------- routing


def ready_bodies(conn: Conn, queue: str) -> list[bytes]:
    """Drain a queue with no-ack GET and return the bodies in order."""
    return bodies(conn.get(queue, 10000, no_ack=True).entries)


def test_default_exchange_routes_by_queue_name(conn: Conn) -> None:
    conn.declare_queue("a")
    conn.declare_queue("b")
    out = conn.send(
        Publish(1, "", "a", {}, b"to-a", False),
        Publish(2, "", "b", {}, b"to-b", False),
        Publish(3, "", "nobody", {}, b"lost", False),
    )
    assert out == [Confirm(1, 3, True, 0, "")]
    assert ready_bodies(conn, "a") == [b"to-a"]
    assert ready_bodies(conn, "b") == [b"to-b"]


def test_direct_exchange(conn: Conn) -> None:
    conn.declare_exchange("d", "direct")
    for q in ("q1", "q2", "q3"):
        conn.declare_queue(q)
    conn.bind("d", "q1", "k1")
    conn.bind("d", "q2", "k2")
    conn.bind("d", "q3", "k1")
    conn.bind("d", "q3", "k1")  # idempotent: still enqueued once
    out = conn.send(
        Publish(1, "d", "k1", {}, b"one", False),
        Publish(2, "d", "k2", {}, b"two", False),
        Publish(3, "d", "k3", {}, b"three", False),
    )
    assert out == [Confirm(1, 3, True, 0, "")]
    assert ready_bodies(conn, "q1") == [b"one"]
    assert ready_bodies(conn, "q2") == [b"two"]
    assert ready_bodies(conn, "q3") == [b"one"]


def test_fanout_to_three_queues(conn: Conn) -> None:
    conn.declare_exchange("f", "fanout")
    for i, q in enumerate(("f1", "f2", "f3")):
        conn.declare_queue(q)
        conn.bind("f", q, f"ignored-{i}")
    props = {"message_id": "id-1", "headers": {"h": 1}}
    assert conn.send(Publish(1, "f", "whatever", props, b"all", False)) == [
        Confirm(1, 1, True, 0, "")
    ]
    for q in ("f1", "f2", "f3"):
        assert conn.get(q, 5, no_ack=True).entries[0].body == b"all"
    for q in ("f1", "f2", "f3"):
        assert queue_info(conn, q)["messages"] == 0


def test_fanout_delivery_metadata(conn: Conn) -> None:
    conn.declare_exchange("f", "fanout")
    conn.declare_queue("f1")
    conn.declare_queue("f2")
    conn.bind("f", "f1")
    conn.bind("f", "f2")
    props = {"message_id": "id-1", "headers": {"h": 1}}
    conn.send(Publish(1, "f", "rk", props, b"all", False))
    assert conn.get("f1").entries == [DeliveryEntry(1, False, "f", "rk", props, b"all", 1)]
    assert conn.get("f2").entries == [DeliveryEntry(2, False, "f", "rk", props, b"all", 1)]


def test_topic_exchange_patterns(conn: Conn) -> None:
    conn.declare_exchange("t", "topic")
    patterns = {
        "nyse": "stock.*.nyse",
        "stock": "stock.#",
        "errors": "#.error",
        "one": "*",
        "exact": "a.b",
    }
    for q, pattern in patterns.items():
        conn.declare_queue(q)
        conn.bind("t", q, pattern)
    keys = [
        "stock.usd.nyse",
        "stock.eur.lse",
        "stock",
        "app.db.error",
        "error",
        "x",
        "a.b",
        "a.b.c",
        "stock.usd.nyse.error",
    ]
    out = conn.send(*[Publish(i + 1, "t", k, {}, k.encode(), False) for i, k in enumerate(keys)])
    assert out == [Confirm(1, len(keys), True, 0, "")]
    assert ready_bodies(conn, "nyse") == [b"stock.usd.nyse"]
    assert ready_bodies(conn, "stock") == [
        b"stock.usd.nyse",
        b"stock.eur.lse",
        b"stock",
        b"stock.usd.nyse.error",
    ]
    assert ready_bodies(conn, "errors") == [b"app.db.error", b"error", b"stock.usd.nyse.error"]
    assert ready_bodies(conn, "one") == [b"stock", b"error", b"x"]
    assert ready_bodies(conn, "exact") == [b"a.b"]


def test_unroutable_mandatory_returns_before_confirm(conn: Conn) -> None:
    conn.declare_exchange("d", "direct")
    conn.declare_queue("q")
    conn.bind("d", "q", "k")
    out = conn.send(
        Publish(1, "d", "k", {}, b"ok1", False),
        Publish(2, "d", "nokey", {"message_id": "m2"}, b"lost", True),
        Publish(3, "d", "k", {}, b"ok3", True),
    )
    assert out == [
        Return(2, 312, "no route", "d", "nokey", {"message_id": "m2"}, b"lost"),
        Confirm(1, 3, True, 0, ""),
    ]
    # alone in its batch: RETURN then the CONFIRM covering it
    assert conn.send(Publish(4, "", "nobody", {}, b"x", True)) == [
        Return(4, 312, "no route", "", "nobody", {}, b"x"),
        Confirm(4, 4, True, 0, ""),
    ]
    assert ready_bodies(conn, "q") == [b"ok1", b"ok3"]


def test_unroutable_mandatory_in_batch(conn: Conn) -> None:
    conn.declare_queue("q")
    entries = [
        PublishEntry("", "q", {}, b"a", True),
        PublishEntry("", "none", {}, b"b", True),
        PublishEntry("", "q", {}, b"c", True),
    ]
    assert conn.send(PublishBatch(10, entries)) == [
        Return(11, 312, "no route", "", "none", {}, b"b"),
        Confirm(10, 12, True, 0, ""),
    ]


def test_unroutable_not_mandatory_only_confirmed(conn: Conn) -> None:
    conn.declare_exchange("d", "direct")
    assert conn.send(Publish(1, "d", "nokey", {}, b"dropped", False)) == [
        Confirm(1, 1, True, 0, "")
    ]


def test_publish_to_missing_exchange(conn: Conn) -> None:
    conn.declare_queue("q")
    (nack,) = conn.send(Publish(1, "nope", "k", {}, b"x", False))
    assert isinstance(nack, Confirm)
    assert (nack.first_seq, nack.last_seq, nack.ack, nack.code) == (1, 1, False, 404)
    assert "nope" in nack.message
    # seq 0: no confirm wanted, so ERROR rid 0
    (err,) = conn.send(Publish(0, "nope", "k", {}, b"x", False))
    assert assert_error(err, 0, 404).details == {"exchange": "nope"}
    # nacks and acks are ranges in seq order
    out = conn.send(
        Publish(2, "", "q", {}, b"a", False),
        Publish(3, "nope", "k", {}, b"b", False),
        Publish(4, "", "q", {}, b"c", False),
        Publish(5, "", "q", {}, b"d", False),
    )
    assert [
        (c.first_seq, c.last_seq, c.ack, c.code)
        for c in out  # type: ignore[attr-defined]
    ] == [(2, 2, True, 0), (3, 3, False, 404), (4, 5, True, 0)]
    assert ready_bodies(conn, "q") == [b"a", b"c", b"d"]


def test_confirm_ranges_coalesce(conn: Conn) -> None:
    conn.declare_queue("q")
    batch = PublishBatch(1, [PublishEntry("", "q", {}, b"%d" % i, False) for i in range(100)])
    assert conn.send(batch) == [Confirm(1, 100, True, 0, "")]
    assert queue_info(conn, "q")["messages"] == 100
    # the next batch continues the sequence in a new range
    batch2 = PublishBatch(101, [PublishEntry("", "q", {}, b"x", False)] * 3)
    assert conn.send(batch2, Publish(104, "", "q", {}, b"y", False)) == [
        Confirm(101, 104, True, 0, "")
    ]


def test_batch_with_seq_zero_has_no_confirms(conn: Conn) -> None:
    conn.declare_queue("q")
    batch = PublishBatch(0, [PublishEntry("", "q", {}, b"x", False)] * 5)
    assert conn.send(batch) == []
    assert queue_info(conn, "q")["messages"] == 5


# --------------------------------------------------------------------------- credit


def test_consume_respects_credit(conn: Conn) -> None:
    conn.declare_queue("q")
    conn.publish_to_queue("q", msgs(20))
    tag, delivered = conn.consume("q", 5)
    first = entries_of(delivered, tag)
    assert first == [DeliveryEntry(i, False, "", "q", {}, b"m%d" % i, 1) for i in range(1, 6)]
    assert conn.send() == []  # no credit left: nothing more
    more = entries_of(conn.send(Credit(tag, 3)), tag)
    assert [e.delivery_tag for e in more] == [6, 7, 8]
    assert bodies(more) == [b"m6", b"m7", b"m8"]
    assert conn.send() == []
    (info,) = conn.list("consumers")
    assert info == {
        "queue": "q",
        "consumer_tag": tag,
        "connection": conn.id,
        "credit": 0,
        "unacked": 8,
        "no_ack": False,
    }
    assert queue_info(conn, "q")["messages"] == 12
    # acking does not grant credit by itself
    assert conn.send(Ack(8, True)) == []
    assert conn.list("consumers")[0]["unacked"] == 0
    assert conn.send() == []


def test_single_delivery_is_deliver_frame(conn: Conn) -> None:
    conn.declare_queue("q")
    tag, out = conn.consume("q", 10, "mine")
    assert tag == "mine" and out == []
    assert conn.send(Publish(1, "", "q", {"type": "t"}, b"hi", False)) == [
        Confirm(1, 1, True, 0, ""),
        Deliver("mine", 1, False, "", "q", {"type": "t"}, b"hi", 1),
    ]


def test_credit_is_never_exceeded(conn: Conn) -> None:
    conn.declare_queue("q")
    publisher = Conn(conn.broker)
    tag, out = conn.consume("q", 4)
    granted = 4
    received = entries_of(out, tag)
    for step in range(30):
        publisher.publish_to_queue("q", msgs(3, f"s{step}-"))
        received += entries_of(conn.take(), tag)
        if step % 3 == 0:
            granted += 2
            received += entries_of(conn.send(Credit(tag, 2)), tag)
        if step % 4 == 0 and received:
            conn.send(Ack(received[-1].delivery_tag, True))
        (info,) = conn.list("consumers")
        assert info["unacked"] <= granted
        assert len(received) <= granted
        assert info["credit"] == granted - len(received)
    assert len(received) == granted  # there was always more than enough to deliver


def test_credit_unknown_tag_is_error_rid0(conn: Conn) -> None:
    (err,) = conn.send(Credit("ghost", 5))
    assert assert_error(err, 0, 404).details == {"consumer_tag": "ghost"}


def test_no_ack_consumer_still_uses_credit(conn: Conn) -> None:
    conn.declare_queue("q")
    conn.publish_to_queue("q", msgs(5))
    tag, out = conn.consume("q", 2, no_ack=True)
    assert bodies(entries_of(out, tag)) == [b"m1", b"m2"]
    assert conn.session.unacked == {}
    info = queue_info(conn, "q")
    assert (info["messages"], info["unacked"]) == (3, 0)
    # acking a no-ack delivery is an unknown tag
    assert_error(conn.send(Ack(1, False))[0], 0, 406)


def test_competing_consumers_round_robin(broker: Broker) -> None:
    admin = Conn(broker)
    admin.declare_queue("work")
    workers = [Conn(broker) for _ in range(3)]
    tags = [w.consume("work", 1000)[0] for w in workers]
    admin.publish_to_queue("work", msgs(30))
    for k, (w, tag) in enumerate(zip(workers, tags, strict=True)):
        got = entries_of(w.take(), tag)
        assert bodies(got) == [b"m%d" % i for i in range(k + 1, 31, 3)]
        assert [e.delivery_tag for e in got] == list(range(1, 11))
    assert queue_info(admin, "work")["messages"] == 0


def test_competing_consumers_one_publish_at_a_time(broker: Broker) -> None:
    admin = Conn(broker)
    admin.declare_queue("work")
    workers = [Conn(broker) for _ in range(3)]
    tags = [w.consume("work", 1000)[0] for w in workers]
    for body in msgs(30):
        admin.publish_to_queue("work", [body])
    for k, (w, tag) in enumerate(zip(workers, tags, strict=True)):
        assert bodies(entries_of(w.take(), tag)) == [b"m%d" % i for i in range(k + 1, 31, 3)]


def test_competing_consumers_skip_consumers_without_credit(broker: Broker) -> None:
    admin = Conn(broker)
    admin.declare_queue("work")
    a, b = Conn(broker), Conn(broker)
    ta, _ = a.consume("work", 2)
    tb, _ = b.consume("work", 100)
    admin.publish_to_queue("work", msgs(10))
    assert bodies(entries_of(a.take(), ta)) == [b"m1", b"m3"]
    assert bodies(entries_of(b.take(), tb)) == [
        b"m2",
        b"m4",
        b"m5",
        b"m6",
        b"m7",
        b"m8",
        b"m9",
        b"m10",
    ]


# --------------------------------------------------------------------------- ack


def _consume_n(conn: Conn, n: int, queue: str = "q") -> str:
    conn.declare_queue(queue)
    conn.publish_to_queue(queue, msgs(n))
    tag, out = conn.consume(queue, n)
    assert [e.delivery_tag for e in entries_of(out, tag)] == list(range(1, n + 1))
    return tag


def test_ack_single(conn: Conn) -> None:
    _consume_n(conn, 5)
    assert conn.send(Ack(2, False)) == []
    assert list(conn.session.unacked) == [1, 3, 4, 5]
    info = queue_info(conn, "q")
    assert (info["messages"], info["unacked"]) == (0, 4)
    assert conn.list("consumers")[0]["unacked"] == 4


def test_ack_multiple(conn: Conn) -> None:
    _consume_n(conn, 5)
    assert conn.send(Ack(2, False), Ack(4, True)) == []
    assert list(conn.session.unacked) == [5]
    assert queue_info(conn, "q")["unacked"] == 1


def test_ack_tag_zero_multiple_acks_all(conn: Conn) -> None:
    _consume_n(conn, 5)
    assert conn.send(Ack(0, True)) == []
    assert list(conn.session.unacked) == []
    assert queue_info(conn, "q")["unacked"] == 0
    assert conn.list("consumers")[0]["unacked"] == 0


@pytest.mark.parametrize(
    "bad",
    [Ack(99, False), Ack(0, False), Ack(99, True)],
    ids=["never-delivered", "zero", "multiple-nothing-below"],
)
def test_ack_unknown_tag_is_406_and_session_continues(conn: Conn, bad: Ack) -> None:
    conn.declare_queue("q")  # nothing delivered yet on this connection
    (err,) = conn.send(bad)
    assert assert_error(err, 0, 406).details == {"delivery_tag": bad.delivery_tag}
    # the session keeps working
    conn.publish_to_queue("q", msgs(2))
    tag, out = conn.consume("q", 10)
    assert bodies(entries_of(out, tag)) == [b"m1", b"m2"]
    assert conn.send(Ack(1, False)) == []
    (err,) = conn.send(Ack(1, False))  # already acked
    assert_error(err, 0, 406)
    assert conn.send(Ack(2, False), Publish(1, "", "q", {}, b"m3", False)) == [
        Confirm(1, 1, True, 0, ""),
        Deliver(tag, 3, False, "", "q", {}, b"m3", 1),
    ]


def test_error_mid_batch_does_not_stop_the_batch(conn: Conn) -> None:
    _consume_n(conn, 3)
    out = conn.send(Ack(1, False), Ack(1, False), Ack(2, False), QueueDeclare(7, "q"))
    assert len(out) == 2
    assert_error(out[0], 0, 406)
    assert out[1] == QueueDeclareOk(7, "q", 0, 1)
    assert list(conn.session.unacked) == [3]


# --------------------------------------------------------------------------- nack / reject


def test_nack_requeue_restores_order_ahead_of_new_messages(conn: Conn) -> None:
    conn.declare_queue("q")
    conn.publish_to_queue("q", msgs(6))
    tag, out = conn.consume("q", 3)
    assert bodies(entries_of(out, tag)) == [b"m1", b"m2", b"m3"]
    # requeue out of order: m3 first, then m1 and m2
    assert conn.send(Nack(3, False, True)) == []  # no credit: nothing redelivered yet
    assert conn.send(Nack(2, True, True)) == []
    info = queue_info(conn, "q")
    assert (info["messages"], info["unacked"]) == (6, 0)
    again = entries_of(conn.send(Credit(tag, 10)), tag)
    assert again == [
        DeliveryEntry(4, True, "", "q", {}, b"m1", 2),
        DeliveryEntry(5, True, "", "q", {}, b"m2", 2),
        DeliveryEntry(6, True, "", "q", {}, b"m3", 2),
        DeliveryEntry(7, False, "", "q", {}, b"m4", 1),
        DeliveryEntry(8, False, "", "q", {}, b"m5", 1),
        DeliveryEntry(9, False, "", "q", {}, b"m6", 1),
    ]
    # a second requeue keeps counting deliveries (4 credits are left: redelivered at once)
    third = entries_of(conn.send(Nack(4, False, True)), tag)
    assert third == [DeliveryEntry(10, True, "", "q", {}, b"m1", 3)]
    assert conn.list("consumers")[0]["credit"] == 3


def test_nack_requeue_goes_back_to_get(conn: Conn) -> None:
    conn.declare_queue("q")
    conn.publish_to_queue("q", msgs(4))
    got = conn.get("q", 2)
    assert [(e.delivery_tag, e.body) for e in got.entries] == [(1, b"m1"), (2, b"m2")]
    assert got.message_count == 2
    conn.send(Nack(0, True, True))
    again = conn.get("q", 10)
    assert again.entries == [
        DeliveryEntry(3, True, "", "q", {}, b"m1", 2),
        DeliveryEntry(4, True, "", "q", {}, b"m2", 2),
        DeliveryEntry(5, False, "", "q", {}, b"m3", 1),
        DeliveryEntry(6, False, "", "q", {}, b"m4", 1),
    ]
    assert again.message_count == 0


def test_nack_without_requeue_discards(conn: Conn) -> None:
    _consume_n(conn, 3)
    assert conn.send(Nack(2, True, False)) == []
    info = queue_info(conn, "q")
    assert (info["messages"], info["unacked"]) == (0, 1)


def test_reject(conn: Conn) -> None:
    tag = _consume_n(conn, 3)
    assert conn.send(QueueDeclare(90, "q")) == [QueueDeclareOk(90, "q", 0, 1)]
    # reject without requeue: gone for good
    assert conn.send(Reject(1, False)) == []
    info = queue_info(conn, "q")
    assert (info["messages"], info["unacked"]) == (0, 2)
    # reject with requeue: redelivered
    again = entries_of(conn.send(Reject(3, True), Credit(tag, 5)), tag)
    assert again == [DeliveryEntry(4, True, "", "q", {}, b"m3", 2)]
    # reject names exactly one tag; an unknown one is 406
    assert_error(conn.send(Reject(1, False))[0], 0, 406)
    conn.send(Reject(2, False), Reject(4, False))
    info = queue_info(conn, "q")
    assert (info["messages"], info["unacked"]) == (0, 0)


# --------------------------------------------------------------------------- lifecycle


def test_close_requeues_unacked_in_order_to_another_consumer(broker: Broker) -> None:
    a, b = Conn(broker), Conn(broker)
    a.declare_queue("q")
    a.publish_to_queue("q", msgs(10))
    ta, out = a.consume("q", 5)
    assert bodies(entries_of(out, ta)) == msgs(5)
    a.send(Ack(2, False))  # m2 is done; m1, m3, m4, m5 stay unacked
    tb, out = b.consume("q", 0)
    assert out == []
    a.session.close()
    broker.pump()
    assert a.take() == []  # a closed session writes nothing
    got = entries_of(b.send(Credit(tb, 100)), tb)
    assert got == [
        DeliveryEntry(1, True, "", "q", {}, b"m1", 2),
        DeliveryEntry(2, True, "", "q", {}, b"m3", 2),
        DeliveryEntry(3, True, "", "q", {}, b"m4", 2),
        DeliveryEntry(4, True, "", "q", {}, b"m5", 2),
    ] + [DeliveryEntry(i - 1, False, "", "q", {}, b"m%d" % i, 1) for i in range(6, 11)]
    assert [c["connection"] for c in b.list("consumers")] == [b.id]


def test_close_requeues_get_deliveries(broker: Broker) -> None:
    a, b = Conn(broker), Conn(broker)
    a.declare_queue("q")
    a.publish_to_queue("q", msgs(3))
    assert bodies(a.get("q", 2).entries) == [b"m1", b"m2"]
    a.session.close()
    again = b.get("q", 10)
    assert [(e.body, e.redelivered, e.delivery_count) for e in again.entries] == [
        (b"m1", True, 2),
        (b"m2", True, 2),
        (b"m3", False, 1),
    ]


def test_exclusive_queue_deleted_on_close(broker: Broker) -> None:
    a, b = Conn(broker), Conn(broker)
    a.declare_queue("mine", exclusive=True)
    a.declare_exchange("x", "fanout")
    a.bind("x", "mine")
    a.publish_to_queue("mine", msgs(2))
    a.consume("mine", 1)
    a.session.close()
    broker.pump()
    assert_error(b.request(QueueDeclare(1, "mine", passive=True)), 1, 404)
    assert "mine" not in {q["name"] for q in b.list("queues")}
    assert b.list("bindings") == []
    assert b.list("consumers") == []
    assert a.id not in broker.sessions


def test_auto_delete_queue_deleted_when_last_consumer_cancelled(conn: Conn) -> None:
    conn.declare_queue("ad", auto_delete=True)
    conn.publish_to_queue("ad", msgs(1))
    # never consumed: survives
    assert conn.send(QueueDeclare(100, "ad", True, False, True, True, {})) == [
        QueueDeclareOk(100, "ad", 1, 0)
    ]
    t1, _ = conn.consume("ad", 0)
    t2, _ = conn.consume("ad", 0)
    assert t1 != t2
    assert conn.send(Cancel(101, t1)) == [Ok(101)]
    assert conn.send(QueueDeclare(102, "ad", passive=True)) == [QueueDeclareOk(102, "ad", 1, 1)]
    assert conn.send(Cancel(103, t2)) == [Ok(103)]
    assert_error(conn.request(QueueDeclare(104, "ad", passive=True)), 104, 404)
    assert_error(conn.request(Cancel(105, t2)), 105, 404)


def test_cancel_keeps_unacked(conn: Conn) -> None:
    tag = _consume_n(conn, 3)
    assert conn.send(Cancel(50, tag)) == [Ok(50)]
    assert list(conn.session.unacked) == [1, 2, 3]
    conn.publish_to_queue("q", msgs(1, start=4))  # no consumer: stays ready
    assert conn.send(Ack(0, True)) == []
    info = queue_info(conn, "q")
    assert (info["messages"], info["unacked"], info["consumers"]) == (1, 0, 0)


def test_queue_delete_cancels_consumers(broker: Broker) -> None:
    a, b = Conn(broker), Conn(broker)
    a.declare_queue("q")
    a.publish_to_queue("q", msgs(3))
    tb, out = b.consume("q", 1)
    assert bodies(entries_of(out, tb)) == [b"m1"]
    own, out = a.consume("q", 0, "own")
    assert out == []
    # 2 ready messages removed; m1 is unacked by b, not counted
    out = a.send(QueueDelete(10, "q"))
    assert out == [Cancelled(own, 404, "queue 'q' deleted"), MessageCountOk(10, 2)]
    assert b.take() == [Cancelled(tb, 404, "queue 'q' deleted")]
    assert b.session.consumers == {}
    assert_error(b.send(Credit(tb, 1))[0], 0, 404)
    assert b.send(Ack(1, False)) == []  # the old delivery can still be settled
    assert a.list("queues") == []


# --------------------------------------------------------------------------- exclusivity


def test_exclusive_queue_locked_to_owner(broker: Broker) -> None:
    a, b = Conn(broker), Conn(broker)
    a.declare_queue("mine", exclusive=True)
    a.declare_exchange("x", "direct")
    attempts: list[Frame] = [
        QueueDeclare(1, "mine", passive=True),
        QueueDeclare(2, "mine", True, True, False, False, {}),
        Consume(3, "mine", "", False, False, 10, {}),
        Get(4, "mine", 1, False),
        QueuePurge(5, "mine"),
        QueueDelete(6, "mine"),
        Bind(7, "x", "mine", "k"),
        Unbind(8, "x", "mine", "k"),
    ]
    out = b.send(*attempts)
    assert len(out) == len(attempts)
    for rid, reply in enumerate(out, start=1):
        assert assert_error(reply, rid, 405).details == {"queue": "mine"}
    # the owner is unaffected
    assert a.send(QueueDeclare(50, "mine", passive=True)) == [QueueDeclareOk(50, "mine", 0, 0)]


def test_exclusive_consumer_conflicts(broker: Broker) -> None:
    a, b = Conn(broker), Conn(broker)
    a.declare_queue("q1")
    a.declare_queue("q2")
    a.consume("q1", 0, "ex", exclusive=True)
    assert_error(b.request(Consume(1, "q1", "", False, False, 0, {})), 1, 405)
    assert_error(a.request(Consume(2, "q1", "", False, False, 0, {})), 2, 405)
    a.consume("q2", 0)
    assert_error(b.request(Consume(3, "q2", "", False, True, 0, {})), 3, 405)
    assert [c["queue"] for c in a.list("consumers")] == ["q1", "q2"]


def test_duplicate_consumer_tag_is_406(conn: Conn) -> None:
    conn.declare_queue("q")
    conn.consume("q", 0, "t")
    assert_error(conn.request(Consume(9, "q", "t", False, False, 0, {})), 9, 406)


# --------------------------------------------------------------------------- get


def test_get_max_messages(conn: Conn) -> None:
    conn.declare_queue("q")
    conn.publish_to_queue("q", msgs(5))
    assert conn.send(Get(1, "q", 3, False)) == [
        GetOk(1, [DeliveryEntry(i, False, "", "q", {}, b"m%d" % i, 1) for i in (1, 2, 3)], 2)
    ]
    info = queue_info(conn, "q")
    assert (info["messages"], info["unacked"]) == (2, 3)
    assert conn.send(Ack(3, True)) == []


def test_get_empty_queue(conn: Conn) -> None:
    conn.declare_queue("q")
    assert conn.send(Get(1, "q", 10, False)) == [GetOk(1, [], 0)]


@pytest.mark.parametrize("n", [0, 10001])
def test_get_max_messages_out_of_range_is_400(conn: Conn, n: int) -> None:
    conn.declare_queue("q")
    conn.publish_to_queue("q", msgs(1))
    assert_error(conn.request(Get(1, "q", n, False)), 1, 400)
    assert queue_info(conn, "q")["messages"] == 1


def test_get_missing_queue_is_404(conn: Conn) -> None:
    assert_error(conn.request(Get(1, "nope", 1, False)), 1, 404)


def test_get_no_ack_removes_messages(conn: Conn) -> None:
    conn.declare_queue("q")
    conn.publish_to_queue("q", msgs(4))
    got = conn.get("q", 3, no_ack=True)
    assert bodies(got.entries) == [b"m1", b"m2", b"m3"]
    assert got.message_count == 1
    assert conn.session.unacked == {}
    info = queue_info(conn, "q")
    assert (info["messages"], info["unacked"]) == (1, 0)
    conn.session.close()  # nothing to requeue
    other = Conn(conn.broker)
    assert bodies(other.get("q", 10).entries) == [b"m4"]


def test_get_and_push_share_tag_space(conn: Conn) -> None:
    conn.declare_queue("q")
    conn.publish_to_queue("q", msgs(3))
    assert [e.delivery_tag for e in conn.get("q", 1).entries] == [1]
    tag, out = conn.consume("q", 10)
    assert [e.delivery_tag for e in entries_of(out, tag)] == [2, 3]


# --------------------------------------------------------------------------- limits


def test_message_too_large_is_nacked_413() -> None:
    broker = Broker(max_message_size=100)
    conn = Conn(broker)
    conn.declare_queue("q")
    out = conn.send(
        Publish(1, "", "q", {}, b"x" * 100, False),
        Publish(2, "", "q", {}, b"x" * 101, False),
        Publish(3, "", "q", {"headers": {"k": "v" * 100}}, b"", False),
        Publish(4, "", "q", {}, b"ok", False),
    )
    assert [
        (c.first_seq, c.last_seq, c.ack, c.code)
        for c in out  # type: ignore[attr-defined]
    ] == [(1, 1, True, 0), (2, 2, False, 413), (3, 3, False, 413), (4, 4, True, 0)]
    assert all(isinstance(c, Confirm) for c in out)
    (err,) = conn.send(Publish(0, "", "q", {}, b"x" * 101, False))
    assert_error(err, 0, 413)
    assert bodies(conn.get("q", 10).entries) == [b"x" * 100, b"ok"]


def test_deliver_batch_split_to_fit_frame_size(broker: Broker) -> None:
    conn = Conn(broker, max_frame_size=65536)
    conn.declare_queue("big")
    payloads = [bytes([i]) * 10000 for i in range(20)]
    conn.publish_to_queue("big", payloads)
    tag, out = conn.consume("big", 1000)
    assert len(out) > 1
    for f in out:
        assert isinstance(f, DeliverBatch)
        assert len(encode(f)) <= 65536
    got = entries_of(out, tag)
    assert bodies(got) == payloads
    assert [e.delivery_tag for e in got] == list(range(1, 21))


def test_deliver_batch_split_accounts_for_headers(broker: Broker) -> None:
    conn = Conn(broker, max_frame_size=65536)
    conn.declare_queue("hdr")
    props = {"headers": {"blob": "h" * 30000}}
    conn.send(*[Publish(0, "", "hdr", props, b"b%d" % i, False) for i in range(4)])
    tag, out = conn.consume("hdr", 100)
    for f in out:
        assert len(encode(f)) <= 65536
    assert bodies(entries_of(out, tag)) == [b"b0", b"b1", b"b2", b"b3"]


def test_get_ok_fits_frame_size(broker: Broker) -> None:
    conn = Conn(broker, max_frame_size=65536)
    conn.declare_queue("big")
    conn.publish_to_queue("big", [b"z" * 10000] * 20)
    got = conn.get("big", 20)
    assert 0 < len(got.entries) < 20
    assert len(encode(got)) <= 65536
    assert got.message_count == 20 - len(got.entries)


def test_get_ok_fits_frame_size_with_headers(broker: Broker) -> None:
    conn = Conn(broker, max_frame_size=65536)
    conn.declare_queue("hdr")
    props = {"headers": {"blob": "h" * 30000}}
    conn.send(*[Publish(0, "", "hdr", props, b"x", False) for _ in range(4)])
    got = conn.get("hdr", 4)
    assert len(encode(got)) <= 65536
    assert got.entries and got.message_count == 4 - len(got.entries)


# --------------------------------------------------------------------------- purge / delete


def test_purge_leaves_unacked(conn: Conn) -> None:
    conn.declare_queue("q")
    conn.publish_to_queue("q", msgs(5))
    tag, out = conn.consume("q", 2)
    assert len(entries_of(out, tag)) == 2
    assert conn.send(QueuePurge(20, "q")) == [MessageCountOk(20, 3)]
    info = queue_info(conn, "q")
    assert (info["messages"], info["unacked"]) == (0, 2)
    assert conn.send(QueuePurge(21, "q")) == [MessageCountOk(21, 0)]
    # the unacked ones are still settleable, and requeue puts them back
    assert conn.send(Ack(1, False)) == []
    conn.send(Cancel(22, tag))
    conn.send(Nack(2, False, True))
    assert queue_info(conn, "q")["messages"] == 1
    assert_error(conn.request(QueuePurge(23, "nope")), 23, 404)


def test_queue_delete_preconditions(conn: Conn) -> None:
    conn.declare_queue("q")
    conn.publish_to_queue("q", msgs(2))
    assert_error(conn.request(QueueDelete(1, "q", False, True)), 1, 406)
    tag, _ = conn.consume("q", 0)
    assert_error(conn.request(QueueDelete(2, "q", True, False)), 2, 406)
    assert conn.send(Cancel(3, tag)) == [Ok(3)]
    assert conn.send(QueueDelete(4, "q", True, False)) == [MessageCountOk(4, 2)]
    assert_error(conn.request(QueueDelete(5, "q")), 5, 404)
    conn.declare_queue("empty")
    assert conn.send(QueueDelete(6, "empty", True, True)) == [MessageCountOk(6, 0)]


def test_exchange_delete(conn: Conn) -> None:
    conn.declare_exchange("x", "direct")
    conn.declare_queue("q")
    conn.bind("x", "q", "k")
    assert_error(conn.request(ExchangeDelete(1, "x", True)), 1, 406)
    assert conn.send(ExchangeDelete(2, "x", False)) == [Ok(2)]
    assert conn.list("bindings") == []
    assert_error(conn.request(ExchangeDelete(3, "x", False)), 3, 404)
    # the queue's binding bookkeeping was cleared too: deleting it now is clean
    assert conn.send(QueueDelete(4, "q")) == [MessageCountOk(4, 0)]


def test_bind_unbind(conn: Conn) -> None:
    conn.declare_exchange("x", "direct")
    conn.declare_queue("q")
    assert_error(conn.request(Bind(1, "nope", "q", "k")), 1, 404)
    assert_error(conn.request(Bind(2, "x", "nope", "k")), 2, 404)
    conn.bind("x", "q", "k")
    assert conn.send(Unbind(3, "x", "q", "k")) == [Ok(3)]
    assert conn.send(Unbind(4, "x", "q", "k")) == [Ok(4)]  # missing binding: still ok
    assert conn.send(Publish(1, "x", "k", {}, b"m", True)) == [
        Return(1, 312, "no route", "x", "k", {}, b"m"),
        Confirm(1, 1, True, 0, ""),
    ]


# --------------------------------------------------------------------------- list


def test_list_kinds(broker: Broker) -> None:
    a, b = Conn(broker), Conn(broker)
    a.declare_exchange("logs", "topic")
    a.declare_queue("q1")
    a.declare_queue("q2", durable=False, exclusive=True)
    a.bind("logs", "q1", "*.error")
    a.bind("logs", "q2", "#")
    a.publish_to_queue("q1", msgs(3))
    tag, out = b.consume("q1", 1, "worker")
    assert len(entries_of(out, tag)) == 1
    a.consume("q2", 7, "ntag", no_ack=True)

    queues = a.list("queues")
    expected_queues = [
        {
            "name": "q1",
            "durable": True,
            "exclusive": False,
            "auto_delete": False,
            "messages": 2,
            "unacked": 1,
            "consumers": 1,
            "arguments": {},
        },
        {
            "name": "q2",
            "durable": False,
            "exclusive": True,
            "auto_delete": False,
            "messages": 0,
            "unacked": 0,
            "consumers": 1,
            "arguments": {},
        },
    ]
    assert [{k: q[k] for k in expected_queues[0]} for q in queues] == expected_queues

    exchanges = {e["name"]: e for e in a.list("exchanges")}
    assert exchanges["logs"] == {
        "name": "logs",
        "type": "topic",
        "durable": True,
        "auto_delete": False,
        "bindings": 2,
    }
    assert {n: e["type"] for n, e in exchanges.items() if n.startswith("amq.")} == {
        "amq.direct": "direct",
        "amq.topic": "topic",
        "amq.fanout": "fanout",
    }

    assert a.list("bindings") == [
        {"exchange": "logs", "queue": "q2", "routing_key": "#"},
        {"exchange": "logs", "queue": "q1", "routing_key": "*.error"},
    ]

    consumers = sorted(a.list("consumers"), key=lambda c: c["consumer_tag"])
    assert consumers == [
        {
            "queue": "q2",
            "consumer_tag": "ntag",
            "connection": a.id,
            "credit": 7,
            "unacked": 0,
            "no_ack": True,
        },
        {
            "queue": "q1",
            "consumer_tag": "worker",
            "connection": b.id,
            "credit": 0,
            "unacked": 1,
            "no_ack": False,
        },
    ]


def test_list_unknown_kind_is_400(conn: Conn) -> None:
    (err,) = conn.send(List(1, "widgets"))
    assert assert_error(err, 1, 400).details == {"kind": "widgets"}


def test_replies_in_request_order(conn: Conn) -> None:
    out = conn.send(
        QueueDeclare(1, "q"),
        QueueDeclare(2, "q", passive=True),
        QueueDeclare(3, "missing", passive=True),
        List(4, "bogus"),
        QueuePurge(5, "q"),
    )
    assert [getattr(f, "rid", None) for f in out] == [1, 2, 3, 4, 5]
    assert out[0] == QueueDeclareOk(1, "q", 0, 0)
    assert out[1] == QueueDeclareOk(2, "q", 0, 0)
    assert_error(out[2], 3, 404)
    assert_error(out[3], 4, 400)
    assert out[4] == MessageCountOk(5, 0)


def test_publish_batch_runs_keep_per_message_outcomes_in_order() -> None:
    """A PUBLISH_BATCH is enqueued in runs (Broker.enqueue_many); every entry that needs
    its own handling (routing error, headers, size, unroutable mandatory, delay, TTL)
    still gets the same outcome, in seq order, as if published one by one."""
    broker = Broker(max_message_size=100)
    conn = Conn(broker)
    conn.declare_queue("q")
    conn.declare_exchange("d", "direct")
    entries = [
        PublishEntry("", "q", {"persistent": False}, b"a", False),  # 1
        PublishEntry("", "q", {}, b"b", False),  # 2
        PublishEntry("nope", "k", {}, b"lost", False),  # 3: 404
        PublishEntry("", "q", {"headers": {"h": 1}}, b"c", False),  # 4
        PublishEntry("", "q", {}, b"x" * 101, False),  # 5: 413
        PublishEntry("", "q", {"delay": 60_000}, b"later", False),  # 6: delayed
        PublishEntry("", "q", {"ttl": 60_000}, b"d", False),  # 7
        PublishEntry("d", "none", {}, b"ret", True),  # 8: RETURN
        PublishEntry("d", "none", {}, b"dropped", False),  # 9
        PublishEntry("", "q", {}, b"e", False),  # 10
    ]
    out = conn.send(PublishBatch(1, entries))
    assert [f for f in out if isinstance(f, Return)] == [
        Return(8, 312, "no route", "d", "none", {}, b"ret")
    ]
    assert [(c.first_seq, c.last_seq, c.ack, c.code) for c in out if isinstance(c, Confirm)] == [
        (1, 2, True, 0),
        (3, 3, False, 404),
        (4, 4, True, 0),
        (5, 5, False, 413),
        (6, 10, True, 0),
    ]
    info = queue_info(conn, "q")
    assert (info["messages"], info["delayed"], info["published"]) == (5, 1, 6)
    assert ready_bodies(conn, "q") == [b"a", b"b", b"c", b"d", b"e"]
    assert broker.queues["q"].next_due() > 0  # the delayed one waits on its timer
    assert conn.session.published == 10


def test_publish_batch_into_dedup_queue_stores_a_retry_once(conn: Conn) -> None:
    conn.send(QueueDeclare(conn.rid(), "dd", durable=False, arguments={"dedup_window_ms": 60_000}))
    entries = [
        PublishEntry("", "dd", {"message_id": "m1"}, b"one", False),
        PublishEntry("", "dd", {"message_id": "m1"}, b"again", False),
        PublishEntry("", "dd", {"message_id": "m2"}, b"two", False),
    ]
    assert conn.send(PublishBatch(1, entries)) == [Confirm(1, 3, True, 0, "")]
    assert ready_bodies(conn, "dd") == [b"one", b"two"]


# --------------------------------------------------------------------------- runs (1.1)


def test_publish_run_is_confirmed_once_and_delivered_as_a_run_to_a_1_1_client(
    broker: Broker,
) -> None:
    pub, sub = Conn(broker), Conn(broker)
    sub.session.runs = True  # its preamble said 1.1
    pub.declare_queue("q")
    props = {"persistent": False, "content_type": "text/plain"}
    assert pub.send(PublishRun(7, "", "q", props, False, msgs(5))) == [Confirm(7, 11, True, 0, "")]
    tag, out = sub.consume("q", 10)
    assert out == [DeliverRun(tag, 1, "", "q", props, msgs(5))]
    pub.send(PublishRun(12, "", "q", props, False, msgs(3, start=6)))
    assert sub.take() == [DeliverRun(tag, 6, "", "q", props, msgs(3, start=6))]
    sub.send(Ack(8, True))
    assert queue_info(pub, "q")["unacked"] == 0
    # a 1.0 client gets the same messages as DELIVER_BATCH entries
    pub.declare_queue("q2")
    pub.send(PublishRun(0, "", "q2", props, False, msgs(3)))
    old = Conn(broker)
    tag2, out2 = old.consume("q2", 10)
    assert [type(f) for f in out2] == [DeliverBatch]
    assert entries_of(out2, tag2) == [
        DeliveryEntry(i + 1, False, "", "q2", props, b, 1) for i, b in enumerate(msgs(3))
    ]


def test_deliver_run_only_for_first_deliveries_sharing_their_fields(broker: Broker) -> None:
    pub, sub = Conn(broker), Conn(broker)
    sub.session.runs = True
    pub.declare_queue("q")
    pub.send(PublishRun(0, "", "q", {}, False, msgs(3)))
    tag, out = sub.consume("q", 3)
    assert out == [DeliverRun(tag, 1, "", "q", {}, msgs(3))]
    # requeued: redeliveries go as DELIVER_BATCH entries with their counts
    assert sub.send(Nack(3, True, True)) == []
    again = sub.send(Credit(tag, 3))
    assert [type(f) for f in again] == [DeliverBatch]
    assert entries_of(again, tag) == [
        DeliveryEntry(4 + i, True, "", "q", {}, b, 2) for i, b in enumerate(msgs(3))
    ]
    sub.send(Ack(6, True))
    # different properties in one batch: entries, not a run
    pub.send(
        Publish(0, "", "q", {"priority": 1}, b"p1", False), Publish(0, "", "q", {}, b"p2", False)
    )
    mixed = sub.send(Credit(tag, 10))
    assert [type(f) for f in mixed] == [DeliverBatch]
    assert bodies(entries_of(mixed, tag)) == [b"p1", b"p2"]
    # equal (not identical) properties from separate publishes still make a run
    pub.send(
        Publish(0, "", "q", {"type": "t"}, b"e1", False),
        Publish(0, "", "q", {"type": "t"}, b"e2", False),
    )
    assert sub.take() == [DeliverRun(tag, 9, "", "q", {"type": "t"}, [b"e1", b"e2"])]


def test_deliver_run_split_to_fit_frame_size() -> None:
    broker = Broker()
    pub, sub = Conn(broker), Conn(broker, max_frame_size=8192)
    sub.session.runs = True
    pub.declare_queue("q")
    pub.send(PublishRun(0, "", "q", {}, False, [b"%04d" % i + b"x" * 996 for i in range(10)]))
    _tag, out = sub.consume("q", 10)
    assert len(out) >= 3 and all(isinstance(f, DeliverRun) for f in out)
    assert all(len(encode(f)) <= 8192 for f in out)
    tags = [f.first_tag + i for f in out for i in range(len(f.bodies))]  # type: ignore[attr-defined]
    assert tags == list(range(1, 11))
    assert [b[:4] for f in out for b in f.bodies] == [  # type: ignore[attr-defined]
        b"%04d" % i for i in range(10)
    ]


def test_publish_run_outcomes_match_single_publishes() -> None:
    broker = Broker(max_message_size=100)
    conn = Conn(broker)
    conn.declare_queue("q")
    conn.declare_exchange("d", "direct")
    nack = conn.send(PublishRun(1, "nope", "k", {}, False, [b"a", b"b"]))
    assert [
        (c.first_seq, c.last_seq, c.ack, c.code)
        for c in nack  # type: ignore[attr-defined]
    ] == [(1, 1, False, 404), (2, 2, False, 404)]  # as for single publishes
    out = conn.send(PublishRun(3, "d", "none", {}, True, [b"r1", b"r2"]))
    assert out == [
        Return(3, 312, "no route", "d", "none", {}, b"r1"),
        Return(4, 312, "no route", "d", "none", {}, b"r2"),
        Confirm(3, 4, True, 0, ""),
    ]
    big = conn.send(PublishRun(5, "", "q", {}, False, [b"ok", b"x" * 101, b"ok2"]))
    assert [
        (c.first_seq, c.last_seq, c.ack, c.code)
        for c in big  # type: ignore[attr-defined]
    ] == [(5, 5, True, 0), (6, 6, False, 413), (7, 7, True, 0)]
    assert ready_bodies(conn, "q") == [b"ok", b"ok2"]


def test_empty_batch_or_run_is_a_typed_error_and_uses_no_seq(conn: Conn) -> None:
    conn.declare_queue("q")
    for frame in (PublishBatch(5, []), PublishRun(5, "", "q", {}, False, [])):
        (reply,) = conn.send(frame)
        assert "empty" in assert_error(reply, 0, 400).message
    # the connection goes on; seq 5 is still the next one
    assert conn.send(Publish(5, "", "q", {}, b"m", False)) == [Confirm(5, 5, True, 0, "")]
    assert ready_bodies(conn, "q") == [b"m"]


# ---------------------------------------------------------------------- dispatch bounds
def test_dispatch_is_bounded_by_batch_paused_transport_and_unacked_bytes() -> None:
    """A consumer with 2^32-1 credit gets DISPATCH_BYTES per dispatch, nothing while its
    transport is paused, and no more than max_unacked_bytes_per_consumer unacked; an ack
    that takes it below the cap lets dispatch continue."""
    from dataclasses import replace

    from conveyor.broker.queue import DISPATCH_BYTES, UNACKED_OVERHEAD
    from conveyor.protocol import Ack

    broker = Broker()
    body = b"x" * (64 << 10)
    cap = 3 * DISPATCH_BYTES
    broker.limits = replace(broker.limits, max_unacked_bytes_per_consumer=cap)
    c = Conn(broker)
    c.declare_queue("big")
    c.publish_to_queue("big", [body] * 400)  # 25 MiB
    tag, first = c.consume("big", 0xFFFFFFFF)
    got = entries_of(first)
    assert len(got) == DISPATCH_BYTES // len(body)  # one batch, the rest waits
    c.session.pause_writing(True)
    broker.pump()
    assert c.take() == []  # the transport is full: nothing more
    c.session.pause_writing(False)
    for _ in range(10):
        broker.pump()
        got += entries_of(c.take())
    per = len(body) + UNACKED_OVERHEAD
    assert len(got) == -(-cap // per)  # stopped at the unacked-bytes cap
    consumer = c.session.consumers[tag]
    assert consumer.held and consumer.unacked_bytes >= cap
    c.session.handle([Ack(got[9].delivery_tag, True)])
    broker.pump()
    more = entries_of(c.take())
    assert more and len(more) <= 11
    assert broker.queues["big"].ready == 400 - len(got) - len(more)
