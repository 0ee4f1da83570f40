"""Tests of the logged commands (broker.journal): what a durable Broker logs as sessions
drive it, what Replay rebuilds from those commands, and that a snapshot of a live broker
(snapshot_state) rebuilds the same state as replaying the log it replaces.

No sockets and no event loop: Sessions are driven with frames as in test_broker_model,
and the store records every appended batch (through msgpack, exactly as the WAL would
hand it back to recovery)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import msgpack
import pytest

from conveyor.broker.core import Broker
from conveyor.broker.journal import Replay, snapshot_dict
from conveyor.broker.session import Session
from conveyor.broker.store import MemoryStore
from conveyor.protocol import (
    SERVER_FRAMES,
    Ack,
    Bind,
    Consume,
    ConsumeOk,
    Credit,
    Decoder,
    Deliver,
    DeliverBatch,
    DeliveryEntry,
    ExchangeDeclare,
    ExchangeDelete,
    Frame,
    Get,
    GetOk,
    MessageCountOk,
    Nack,
    Ok,
    Publish,
    QueueDeclare,
    QueueDeclareOk,
    QueueDelete,
    QueuePurge,
    Reject,
    Unbind,
)

# --------------------------------------------------------------------------- harness


def roundtrip(obj: Any) -> Any:
    """What the log gives back: msgpack encoded and decoded (tuples become lists)."""
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False, strict_map_key=False)


class LogStore:
    """A Store that keeps every appended batch, as recovery would read it back."""

    def __init__(self) -> None:
        self.batches: list[list[list[Any]]] = []
        self.commits = 0
        self.failed: BaseException | None = None  # Store protocol: never fails

    def append(self, records: Iterable[Any]) -> None:
        batch = list(records)
        if batch:
            self.batches.append(roundtrip(batch))

    def commit(self, callback: Any) -> None:
        self.commits += 1
        callback(None)

    def write_through(self) -> None:
        pass

    def close(self) -> None:
        pass

    def commands(self) -> list[list[Any]]:
        return [c for b in self.batches for c in b]

    def ops(self) -> list[str]:
        return [c[0] for c in self.commands()]


class Client:
    """One Session; every written frame is decoded as a client would."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.frames: list[Frame] = []
        decoder = Decoder(1 << 20, SERVER_FRAMES)

        def write(chunks: list[bytes]) -> None:
            self.frames.extend(decoder.feed(b"".join(chunks)))

        self.session = Session(broker, broker.new_session_id(), write, 1 << 20)
        self._rid = itertools.count(1)
        self._seq = itertools.count(1)

    def send(self, *frames: Frame) -> list[Frame]:
        self.session.handle(list(frames))
        self.broker.pump()
        out, self.frames = self.frames, []
        return out

    def request(self, frame: Frame) -> Frame:
        (reply,) = self.send(frame)
        return reply

    def rid(self) -> int:
        return next(self._rid)

    def declare_queue(self, name: str, **kw: Any) -> None:
        reply = self.request(QueueDeclare(self.rid(), name, **kw))
        assert isinstance(reply, QueueDeclareOk), reply

    def declare_exchange(self, name: str, etype: str, **kw: Any) -> None:
        assert isinstance(self.request(ExchangeDeclare(self.rid(), name, etype, **kw)), Ok)

    def bind(self, exchange: str, queue: str, key: str = "") -> None:
        assert isinstance(self.request(Bind(self.rid(), exchange, queue, key)), Ok)

    def unbind(self, exchange: str, queue: str, key: str = "") -> None:
        assert isinstance(self.request(Unbind(self.rid(), exchange, queue, key)), Ok)

    def publish(
        self,
        routing_key: str,
        *bodies: bytes,
        exchange: str = "",
        props: dict[str, Any] | None = None,
    ) -> None:
        """Publish with confirms; asserts every one is confirmed."""
        frames = [
            Publish(next(self._seq), exchange, routing_key, props or {}, b, False) for b in bodies
        ]
        out = self.send(*frames)
        assert out and all(getattr(f, "ack", False) for f in out), out

    def consume(
        self, queue: str, credit: int, *, no_ack: bool = False
    ) -> tuple[str, list[DeliveryEntry]]:
        out = self.send(Consume(self.rid(), queue, "", no_ack, False, credit, {}))
        assert isinstance(out[0], ConsumeOk), out
        return out[0].consumer_tag, entries_of(out[1:])

    def get(self, queue: str, n: int = 1, no_ack: bool = False) -> list[DeliveryEntry]:
        reply = self.request(Get(self.rid(), queue, n, no_ack))
        assert isinstance(reply, GetOk), reply
        return list(reply.entries)

    def ack(self, tag: int, multiple: bool = False) -> None:
        assert self.send(Ack(tag, multiple)) == []

    def close(self) -> None:
        """The connection went away: unacked deliveries are requeued."""
        self.session.close()
        self.broker.pump()


def entries_of(frames: list[Frame]) -> list[DeliveryEntry]:
    out: list[DeliveryEntry] = []
    for f in frames:
        if isinstance(f, Deliver):
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
            out.extend(f.entries)
        else:
            raise AssertionError(f"unexpected frame {f!r}")
    return out


def replay(batches: list[list[list[Any]]], snapshot: Any = None) -> Broker:
    """Recovery: an optional snapshot plus command batches, built into a fresh broker."""
    r = Replay()
    if snapshot is not None:
        r.load_snapshot(snapshot)
    for b in batches:
        r.apply(b)
    b2 = Broker(MemoryStore(), durable=True)
    r.build(b2)
    return b2


Summary = dict[str, Any]


def summary(broker: Broker) -> Summary:
    """Everything a restart must reproduce, in comparable form."""
    return {
        "queues": {
            name: {
                "auto_delete": q.auto_delete,
                "arguments": q.arguments,
                "messages": [
                    (
                        qm.message.body,
                        qm.message.routing_key,
                        qm.message.exchange,
                        qm.message.properties,
                        qm.delivery_count,
                        qm.redelivered,
                    )
                    for qm in q.iter_messages()
                ],
            }
            for name, q in sorted(broker.queues.items())
        },
        "exchanges": sorted((e.name, e.type, e.auto_delete) for e in broker.exchanges.values()),
        "bindings": sorted(
            (e.name, k, q) for e in broker.exchanges.values() for k, q in e.bindings
        ),
        "queue_bindings": {name: sorted(q.bindings) for name, q in broker.queues.items()},
    }


def restart_view(broker: Broker) -> Summary:
    """What the live broker should look like after a crash now: logged queues only, each
    holding its persistent messages (ready and unacked) in publish order, those that were
    delivered flagged redelivered with their delivery count."""
    b2 = Broker(MemoryStore(), durable=True)
    for name, q in broker.queues.items():
        if not q.logged:
            continue
        held = [
            qm for s in broker.sessions.values() for qm, uq, _c in s.unacked.values() if uq is q
        ]
        q2 = b2.declare_queue(None, name, auto_delete=q.auto_delete, arguments=q.arguments)
        for qm in sorted([*q.iter_messages(), *held], key=lambda qm: qm.message.id):
            if not qm.message.id:
                continue  # transient
            qm2 = q2.enqueue(qm.message)
            qm2.delivery_count = qm.delivery_count
            qm2.redelivered = qm.delivery_count > 0
    for e in broker.exchanges.values():
        if e.durable and not e.builtin:
            b2.declare_exchange(e.name, e.type, auto_delete=e.auto_delete, arguments=e.arguments)
    for e in broker.exchanges.values():
        if e.durable:
            for key, qname in e.bindings:
                if qname in b2.queues:
                    b2.bind(None, e.name, qname, key)
    return summary(b2)


def messages(broker: Broker, queue: str) -> list[tuple[bytes, int, bool]]:
    return [
        (qm.message.body, qm.delivery_count, qm.redelivered)
        for qm in broker.queues[queue].iter_messages()
    ]


@pytest.fixture
def store() -> LogStore:
    return LogStore()


@pytest.fixture
def broker(store: LogStore) -> Broker:
    return Broker(store, durable=True)


@pytest.fixture
def c(broker: Broker) -> Client:
    return Client(broker)


# --------------------------------------------------------------------------- Replay alone


def test_replay_commands_directly() -> None:
    r = Replay()
    r.apply(
        [
            ["xd", "x", "fanout", False, {}],
            ["qd", "a", False, {}],
            ["qd", "b", True, {}],
            ["b", "x", "a", ""],
            ["b", "x", "b", ""],
        ]
    )
    r.apply([["p", 1, ["a", "b"], "x", "", {}, b"one"], ["p", 2, ["a"], "x", "", {}, b"two"]])
    r.apply([["a", "a", [1]], ["d", "b", [1]], ["d", "b", [1]], ["r", "b", [1]]])
    assert r.commands == 11
    assert r.next_id == 3
    b = replay([], None)
    assert r.build(b) == 2
    assert messages(b, "a") == [(b"two", 0, False)]
    assert messages(b, "b") == [(b"one", 2, True)]
    assert b.queues["b"].auto_delete
    assert b.next_message_id == 3
    assert b.exchanges["x"].bindings == {("", "a"), ("", "b")}
    assert b.queues["a"].bindings == {("x", "")}
    assert b.queues["a"].logged


def test_replay_ignores_commands_for_unknown_queues() -> None:
    r = Replay()
    r.apply(
        [
            ["p", 5, ["gone"], "", "gone", {}, b"x"],
            ["d", "gone", [5]],
            ["a", "gone", [5]],
            ["r", "gone", [5]],
            ["qp", "gone"],
            ["qr", "gone"],
            ["xr", "nope"],
            ["u", "x", "q", "k"],
        ]
    )
    assert r.next_id == 6
    assert r.build(Broker(MemoryStore(), durable=True)) == 0


def test_replay_rejects_unknown_commands() -> None:
    with pytest.raises(ValueError, match="unknown log command"):
        Replay().apply([["zz", 1]])


# --------------------------------------------------------------------------- semantics


def test_publish_to_two_queues_then_ack_in_one(c: Client, store: LogStore) -> None:
    c.declare_exchange("fan", "fanout")
    c.declare_queue("q1")
    c.declare_queue("q2")
    c.bind("fan", "q1")
    c.bind("fan", "q2")
    c.publish("", b"m1", b"m2", exchange="fan")
    p = [cmd for cmd in store.commands() if cmd[0] == "p"]
    assert [(cmd[2], cmd[6]) for cmd in p] == [(["q1", "q2"], b"m1"), (["q1", "q2"], b"m2")]
    (e,) = c.get("q1")
    c.ack(e.delivery_tag)
    assert store.commands()[-1] == ["a", "q1", [p[0][1]]]
    b2 = replay(store.batches)
    assert messages(b2, "q1") == [(b"m2", 0, False)]
    assert messages(b2, "q2") == [(b"m1", 0, False), (b"m2", 0, False)]
    assert summary(b2) == restart_view(c.broker)


def test_delivered_twice_then_crash_is_redelivered_with_count(c: Client, store: LogStore) -> None:
    c.declare_queue("q")
    c.publish("q", b"a", b"b")
    tag, got = c.consume("q", 1)
    assert [(e.body, e.delivery_count) for e in got] == [(b"a", 1)]
    assert c.send(Reject(got[0].delivery_tag, True)) == []
    (again,) = entries_of(c.send(Credit(tag, 1)))
    assert (again.body, again.redelivered, again.delivery_count) == (b"a", True, 2)
    assert [op for op in store.ops() if op in "dr"] == ["d", "r", "d"]
    # crash with "a" delivered twice (still unacked), "b" never delivered
    b2 = replay(store.batches)
    assert messages(b2, "q") == [(b"a", 2, True), (b"b", 0, False)]
    assert summary(b2) == restart_view(c.broker)
    # the rebuilt broker delivers it with that count (+1 for this delivery)
    c2 = Client(b2)
    (e,) = c2.get("q")
    assert (e.body, e.redelivered, e.delivery_count) == (b"a", True, 3)


def test_requeue_then_purge_removes_it(c: Client, store: LogStore) -> None:
    c.declare_queue("q")
    c.publish("q", b"a", b"b")
    (e,) = c.get("q")
    assert c.send(Nack(e.delivery_tag, False, True)) == []
    assert c.request(QueuePurge(c.rid(), "q")) == MessageCountOk(c.rid() - 1, 2)
    assert store.ops()[-2:] == ["r", "qp"]
    b2 = replay(store.batches)
    assert messages(b2, "q") == []
    assert summary(b2) == restart_view(c.broker)


def test_purge_keeps_unacked(c: Client, store: LogStore) -> None:
    c.declare_queue("q")
    c.publish("q", b"held", b"ready1", b"ready2")
    (e,) = c.get("q")
    assert c.request(QueuePurge(c.rid(), "q")) == MessageCountOk(c.rid() - 1, 2)
    b2 = replay(store.batches)
    assert messages(b2, "q") == [(b"held", 1, True)]
    assert summary(b2) == restart_view(c.broker)
    # acked after the purge: gone for good
    c.ack(e.delivery_tag)
    assert messages(replay(store.batches), "q") == []
    # or requeued after the purge (connection lost): back in the queue
    c.publish("q", b"again")
    assert [e.body for e in c.get("q")] == [b"again"]
    c.request(QueuePurge(c.rid(), "q"))
    c.close()
    assert c.broker.queues["q"].ready == 1
    assert messages(replay(store.batches), "q") == [(b"again", 1, True)]


def test_queue_delete_drops_messages_and_bindings(c: Client, store: LogStore) -> None:
    c.declare_exchange("x", "direct")
    c.declare_queue("q")
    c.declare_queue("other")
    c.bind("x", "q", "k")
    c.bind("amq.direct", "q", "k2")
    c.bind("x", "other", "k")
    c.publish("k", b"m1", b"m2", exchange="x")
    (held,) = c.get("q")
    reply = c.request(QueueDelete(c.rid(), "q"))
    assert isinstance(reply, MessageCountOk) and reply.message_count == 1
    assert store.ops()[-1] == "qr"
    c.ack(held.delivery_tag)  # acking a message of a deleted queue logs nothing
    assert store.ops()[-1] == "qr"
    b2 = replay(store.batches)
    assert "q" not in b2.queues
    assert b2.exchanges["x"].bindings == {("k", "other")}
    assert b2.exchanges["amq.direct"].bindings == set()
    assert messages(b2, "other") == [(b"m1", 0, False), (b"m2", 0, False)]
    # redeclared under the same name: a new, empty queue with no bindings
    c.declare_queue("q")
    b3 = replay(store.batches)
    assert messages(b3, "q") == [] and b3.queues["q"].bindings == set()
    assert summary(b3) == restart_view(c.broker)


def test_exchange_delete_drops_bindings(c: Client, store: LogStore) -> None:
    c.declare_exchange("t", "topic")
    c.declare_exchange("keep", "topic")
    c.declare_queue("q")
    c.bind("t", "q", "a.*")
    c.bind("t", "q", "#")
    c.bind("keep", "q", "b.#")
    assert c.request(ExchangeDelete(c.rid(), "t")) == Ok(c.rid() - 1)
    assert store.commands()[-1] == ["xr", "t"]
    b2 = replay(store.batches)
    assert "t" not in b2.exchanges
    assert b2.queues["q"].bindings == {("keep", "b.#")}
    # a new exchange under the old name does not get the old bindings back
    c.declare_exchange("t", "topic")
    b3 = replay(store.batches)
    assert b3.exchanges["t"].bindings == set()
    assert summary(b3) == restart_view(c.broker)


def test_unbind_and_auto_delete_exchange(c: Client, store: LogStore) -> None:
    c.declare_exchange("ad", "direct", auto_delete=True)
    c.declare_queue("q")
    c.bind("ad", "q", "k1")
    c.bind("ad", "q", "k2")
    c.unbind("ad", "q", "k1")
    assert replay(store.batches).exchanges["ad"].bindings == {("k2", "q")}
    c.unbind("ad", "q", "k2")  # last binding gone: the exchange deletes itself
    assert store.ops()[-2:] == ["u", "xr"]
    b2 = replay(store.batches)
    assert "ad" not in b2.exchanges
    assert summary(b2) == restart_view(c.broker)


def test_ack_nack_reject_and_no_ack_are_logged(c: Client, store: LogStore) -> None:
    c.declare_queue("q")
    c.publish("q", *[f"m{i}".encode() for i in range(6)])
    got = c.get("q", 4)
    c.ack(got[0].delivery_tag)
    c.send(Nack(got[1].delivery_tag, False, False))  # discarded
    c.send(Reject(got[2].delivery_tag, False))  # discarded
    c.send(Reject(got[3].delivery_tag, True))  # requeued
    c.get("q", 1, no_ack=True)  # m3 again, gone at once
    assert [op for op in store.ops() if op in "dar"] == ["d", "a", "a", "a", "r", "a"]
    b2 = replay(store.batches)
    assert messages(b2, "q") == [(b"m4", 0, False), (b"m5", 0, False)]
    assert summary(b2) == restart_view(c.broker)


def test_consumer_deliveries_and_connection_loss(broker: Broker, store: LogStore) -> None:
    a, b = Client(broker), Client(broker)
    a.declare_queue("q")
    a.publish("q", *[f"m{i}".encode() for i in range(5)])
    _tag_a, got_a = a.consume("q", 2)
    _tag_b, got_b = b.consume("q", 1)
    assert [e.body for e in got_a] == [b"m0", b"m1"]
    assert [e.body for e in got_b] == [b"m2"]
    b.ack(got_b[0].delivery_tag)
    before_close = replay(store.batches)
    assert messages(before_close, "q") == [
        (b"m0", 1, True),
        (b"m1", 1, True),
        (b"m3", 0, False),
        (b"m4", 0, False),
    ]
    assert summary(before_close) == restart_view(broker)
    a.close()  # m0, m1 requeued (b has no credit left, so they stay ready)
    assert broker.queues["q"].ready == 4
    after = replay(store.batches)
    assert summary(after) == restart_view(broker)


# --------------------------------------------------------------------------- not logged


def test_transient_messages_are_never_logged(c: Client, store: LogStore) -> None:
    c.declare_queue("q")
    c.publish("q", b"t1", b"t2", props={"persistent": False})
    c.publish("q", b"p1", props={"persistent": True})
    assert [cmd[6] for cmd in store.commands() if cmd[0] == "p"] == [b"p1"]
    got = c.get("q", 3)
    assert [e.body for e in got] == [b"t1", b"t2", b"p1"]
    for e in got:
        c.ack(e.delivery_tag)
    p1 = next(cmd[1] for cmd in store.commands() if cmd[0] == "p")
    # deliveries and acks of transient messages are not logged either
    assert [cmd for cmd in store.commands() if cmd[0] in "da"] == [
        ["d", "q", [p1]],
        ["a", "q", [p1]],
    ]
    c.publish("q", b"t3", props={"persistent": False})
    assert messages(replay(store.batches), "q") == []
    snap = snapshot_dict(c.broker)
    assert snap["entries"] == [] and snap["queue_messages"] == {"q": []}


def test_non_durable_and_exclusive_queues_are_never_logged(c: Client, store: LogStore) -> None:
    c.declare_exchange("fan", "fanout")
    c.declare_exchange("tmp", "fanout", durable=False)
    c.declare_queue("transient", durable=False)
    c.declare_queue("mine", exclusive=True)
    c.declare_queue("durable")
    for q in ("transient", "mine", "durable"):
        c.bind("fan", q)
        c.bind("tmp", q)
    c.publish("", b"m", exchange="fan")
    for q in ("transient", "mine"):
        (e,) = c.get(q)
        c.ack(e.delivery_tag)
        c.publish(q, b"direct")
        assert c.request(QueuePurge(c.rid(), q)) == MessageCountOk(c.rid() - 1, 1)
    # only the durable queue appears, in every command
    for cmd in store.commands():
        assert "transient" not in str(cmd) and "mine" not in str(cmd), cmd
        assert "tmp" not in str(cmd), cmd  # a non-durable exchange is not logged either
    (p,) = [cmd for cmd in store.commands() if cmd[0] == "p"]
    assert p[2] == ["durable"]
    assert c.request(QueueDelete(c.rid(), "transient")) == MessageCountOk(c.rid() - 1, 0)
    c.close()  # the exclusive queue goes with its owner
    assert "mine" not in c.broker.queues
    assert all(cmd[0] != "qr" for cmd in store.commands())
    b2 = replay(store.batches)
    assert set(b2.queues) == {"durable"}
    assert messages(b2, "durable") == [(b"m", 0, False)]
    assert set(snapshot_dict(c.broker)["queue_messages"]) == {"durable"}


def test_a_broker_without_a_durable_store_logs_nothing() -> None:
    store = LogStore()
    b = Broker(store, durable=False)
    c = Client(b)
    c.declare_queue("q")
    c.publish("q", b"x")
    c.ack(c.get("q")[0].delivery_tag)
    assert store.batches == []
    assert snapshot_dict(b)["queues"] == []


# --------------------------------------------------------------------------- snapshots


def drive(broker: Broker) -> list[Client]:
    """A busy broker: exchanges, bindings, fan-out, deliveries, acks, requeues, purges,
    a deleted queue, transient messages and queues, unacked messages held by sessions."""
    a, b, t = Client(broker), Client(broker), Client(broker)
    a.declare_exchange("fan", "fanout")
    a.declare_exchange("top", "topic", auto_delete=True)
    a.declare_queue("q1")
    a.declare_queue("q2", auto_delete=True)
    a.declare_queue("q3")
    a.declare_queue("gone")
    a.declare_queue("trans", durable=False)
    t.declare_queue("excl", exclusive=True)
    for q in ("q1", "q2", "trans", "gone"):
        a.bind("fan", q)
    a.bind("top", "q3", "a.#")
    a.bind("amq.topic", "q3", "*.b")
    a.bind("top", "q1", "z")
    a.publish("", *[f"f{i}".encode() for i in range(8)], exchange="fan")
    a.publish("a.b", b"t1", b"t2", exchange="top")
    a.publish("x.b", b"t3", exchange="amq.topic")
    a.publish("q1", b"tr1", props={"persistent": False})
    a.publish("q3", b"d1", b"d2")
    # q1: two acked, one requeued (twice delivered), two held unacked by b
    got = a.get("q1", 3)
    a.ack(got[0].delivery_tag)
    a.ack(got[1].delivery_tag)
    a.send(Reject(got[2].delivery_tag, True))
    (again,) = a.get("q1")
    assert again.body == b"f2" and again.delivery_count == 2
    a.send(Reject(again.delivery_tag, True))
    _tag, held = b.consume("q1", 2)
    assert [e.body for e in held] == [b"f2", b"f3"]
    # q2: a consumer holds three, purge takes the ready rest
    _tag2, held2 = b.consume("q2", 3)
    assert len(held2) == 3
    b.request(QueuePurge(b.rid(), "q2"))
    # q3: one delivered no-ack, one acked via GET, one held
    a.get("q3", 1, no_ack=True)
    (x,) = a.get("q3")
    a.ack(x.delivery_tag)
    a.get("q3")
    # a deleted queue and a deleted binding
    a.request(QueueDelete(a.rid(), "gone"))
    a.unbind("top", "q1", "z")
    t.publish("excl", b"e1")
    a.publish("", b"late", exchange="fan")
    return [a, b, t]


def test_snapshot_of_a_live_broker_equals_replaying_the_log(
    broker: Broker, store: LogStore
) -> None:
    drive(broker)
    broker.flush_journal()
    from_log = summary(replay(store.batches))
    snap = roundtrip(snapshot_dict(broker))
    from_snap = summary(replay([], snap))
    assert from_snap == from_log
    assert from_log == restart_view(broker)
    # sanity: the scenario really has state in every queue
    q1 = from_log["queues"]["q1"]["messages"]
    assert [(m[0], m[4], m[5]) for m in q1] == [
        (b"f2", 3, True),
        (b"f3", 1, True),
        (b"f4", 0, False),
        (b"f5", 0, False),
        (b"f6", 0, False),
        (b"f7", 0, False),
        (b"late", 0, False),
    ]
    assert [m[0] for m in from_log["queues"]["q2"]["messages"]] == [b"f0", b"f1", b"f2", b"late"]
    assert set(from_log["queues"]) == {"q1", "q2", "q3"}
    assert ("q3", "*.b", "amq.topic") not in from_log["bindings"]
    assert ("amq.topic", "*.b", "q3") in from_log["bindings"]
    assert snap["next_id"] == broker.next_message_id


def test_snapshot_then_more_commands_equals_full_replay(broker: Broker, store: LogStore) -> None:
    clients = drive(broker)
    broker.flush_journal()
    snap = roundtrip(snapshot_dict(broker))
    mark = len(store.batches)
    a, b, _t = clients
    # after the snapshot: new publishes, acks of messages held at snapshot time, requeues
    a.publish("", b"after1", b"after2", exchange="fan")
    b.ack(0, multiple=True)  # everything b holds
    got = a.get("q1", 2)
    a.send(Reject(got[1].delivery_tag, True))
    a.request(QueuePurge(a.rid(), "q3"))
    a.close()
    broker.flush_journal()
    full = summary(replay(store.batches))
    assert summary(replay(store.batches[mark:], snap)) == full
    assert full == restart_view(broker)
    ids = [cmd[1] for b in store.batches[mark:] for cmd in b if cmd[0] == "p"]
    assert min(ids) >= snap["next_id"]


def test_snapshot_lists_unacked_messages_with_their_delivery_counts(
    c: Client, store: LogStore
) -> None:
    c.declare_queue("q")
    c.publish("q", b"a", b"b", b"c")
    (first,) = c.get("q")
    c.send(Reject(first.delivery_tag, True))
    _tag, held = c.consume("q", 2)  # "a" (second delivery) and "b", both unacked
    assert [(e.body, e.delivery_count) for e in held] == [(b"a", 2), (b"b", 1)]
    assert c.broker.queues["q"].ready == 1
    snap = snapshot_dict(c.broker)
    ids = {m[-1]: m[0] for m in snap["entries"]}
    # id, delivery count, held unacked by a session
    assert snap["queue_messages"]["q"] == [[ids[b"a"], 2, 1], [ids[b"b"], 1, 1], [ids[b"c"], 0, 0]]
    b2 = replay([], roundtrip(snap))
    assert messages(b2, "q") == [(b"a", 2, True), (b"b", 1, True), (b"c", 0, False)]
    assert summary(b2) == summary(replay(store.batches))


def test_snapshot_of_a_message_held_on_a_deleted_and_redeclared_queue(
    c: Client, store: LogStore
) -> None:
    c.declare_queue("q")
    c.publish("q", b"old")
    c.get("q")  # held unacked
    c.request(QueueDelete(c.rid(), "q"))
    c.declare_queue("q")
    c.publish("q", b"new")
    snap = snapshot_dict(c.broker)
    assert [m[-1] for m in snap["entries"]] == [b"new"]
    assert messages(replay([], roundtrip(snap)), "q") == [(b"new", 0, False)]
    assert summary(replay([], roundtrip(snap))) == summary(replay(store.batches))


def test_purge_after_a_snapshot_keeps_messages_held_at_snapshot_time(
    c: Client, store: LogStore
) -> None:
    """A message a consumer holds when the snapshot is taken is still unacked for a purge
    logged after the snapshot: the purge must not drop it (it comes back when the holder
    requeues it or its connection is lost)."""
    c.declare_queue("q")
    c.publish("q", b"held", b"ready")
    (e,) = c.get("q")
    c.broker.flush_journal()
    snap = roundtrip(snapshot_dict(c.broker))
    mark = len(store.batches)
    c.request(QueuePurge(c.rid(), "q"))
    assert messages(replay(store.batches[mark:], snap), "q") == [(b"held", 1, True)]
    c.close()  # requeued
    assert messages(c.broker, "q") == [(b"held", 1, True)]
    assert messages(replay(store.batches[mark:], snap), "q") == [(b"held", 1, True)]
    assert messages(replay(store.batches), "q") == [(b"held", 1, True)]
    assert e.body == b"held"


def test_snapshot_entries_without_the_held_flag_still_load() -> None:
    """Snapshots written before entries carried the held flag ([id, count])."""
    snap = {
        "version": 1,
        "next_id": 3,
        "exchanges": [],
        "queues": [["q", False, {}]],
        "bindings": [["amq.direct", "q", "k"]],
        "entries": [[1, "", "q", {}, b"a"], [2, "", "q", {}, b"b"]],
        "queue_messages": {"q": [[1, 1], [2, 0]]},
    }
    b = replay([], snap)
    assert messages(b, "q") == [(b"a", 1, True), (b"b", 0, False)]
    assert b.next_message_id == 3
    assert b.queues["q"].bindings == {("amq.direct", "k")}
