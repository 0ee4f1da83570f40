"""The delivery features in the broker model, with no sockets and a fake clock: exact
timer boundaries (delay, TTL from visibility), the priority starvation guard in one
dispatch batch and one message at a time, requeues in priority queues, dedup as seen by
a mandatory publish, and recovery of messages held at their delivery limit.
(tests/integration/test_delivery_features.py drives the same over TCP.)"""

from __future__ import annotations

from typing import Any

from conveyor.broker.core import Broker
from conveyor.broker.journal import Replay
from conveyor.broker.message import Message
from conveyor.broker.queue import Queue
from conveyor.broker.store import MemoryStore

T0 = 1_700_000_000_000
P = T0 + 1  # publish time of a message enqueued at T0: the truncating clock, rounded up


def _broker() -> tuple[Broker, list[int]]:
    now = [T0]
    b = Broker()
    b.clock = lambda: now[0]
    return b, now


def _msg(body: bytes, rk: str = "q", **props: Any) -> Message:
    return Message("", rk, props, body)


def _bodies(q: Queue) -> list[bytes]:
    return [qm.message.body or b"" for qm in q.iter_messages()]


# ---------------------------------------------------------------------- timers
def test_delay_releases_exactly_at_publish_time_plus_delay() -> None:
    b, now = _broker()
    q = b.declare_queue(None, "q")
    b.enqueue(_msg(b"later", delay=500), ["q"])
    b.enqueue(_msg(b"now"), ["q"])
    assert (q.ready, q.delayed) == (1, 1)
    # Enqueued during ms T0 (the clock truncates): never released before T0 + 1 + 500.
    assert b.next_timer() == P + 500
    now[0] = P + 499
    b.tick()
    assert (q.ready, q.delayed) == (1, 1)
    now[0] = P + 500
    b.tick()
    assert (q.ready, q.delayed) == (2, 0)
    assert _bodies(q) == [b"now", b"later"]


def test_ttl_counts_from_visibility_and_queue_ttl_caps_it() -> None:
    b, now = _broker()
    q = b.declare_queue(None, "q", arguments={"message_ttl_ms": 1000})
    b.enqueue(_msg(b"delayed", delay=300, ttl=500), ["q"])  # visible 300, expires 800
    b.enqueue(_msg(b"own-longer", ttl=5000), ["q"])  # the queue's 1000 wins
    now[0] = P + 799
    b.tick()
    assert _bodies(q) == [b"own-longer", b"delayed"]
    now[0] = P + 800
    b.tick()
    assert _bodies(q) == [b"own-longer"] and q.expired == 1
    now[0] = P + 999
    b.tick()
    assert q.ready == 1
    now[0] = P + 1000
    b.tick()
    assert q.ready == 0 and q.expired == 2


def test_dead_letter_drops_ttl_and_delay_and_keeps_the_rest() -> None:
    b, now = _broker()
    b.declare_exchange("dlx", "fanout")
    dlq = b.declare_queue(None, "dlq")
    b.bind(None, "dlx", "dlq")
    b.declare_queue(None, "q", arguments={"dead_letter_exchange": "dlx"})
    b.enqueue(_msg(b"x", delay=10, ttl=20, priority=3, headers={"k": 1}), ["q"])
    now[0] = P + 30
    b.tick()
    (qm,) = dlq.iter_messages()
    props = qm.message.properties
    assert "ttl" not in props and "delay" not in props and props["priority"] == 3
    assert props["headers"]["k"] == 1
    assert props["headers"]["x-death"] == [
        {
            "reason": "expired",
            "queue": "q",
            "exchange": "",
            "routing_key": "q",
            "count": 1,
            "time": P + 30,
        }
    ]


# ---------------------------------------------------------------------- priority
def _prio_queue(max_priority: int = 9) -> Queue:
    return Queue("p", arguments={"max_priority": max_priority})


def _fill(q: Queue, spec: list[tuple[int, int]]) -> None:
    for prio, n in spec:
        for i in range(n):
            q.enqueue(_msg(b"p%d-%d" % (prio, i), priority=prio))


def _prios(qms: list[Any]) -> list[int]:
    return [qm.message.properties["priority"] for qm in qms]


GUARDED = [11 * k + 10 for k in range(10)] + list(range(110, 120))


def test_starvation_guard_one_at_a_time_and_in_one_batch() -> None:
    for batch in (1, 120):
        q = _prio_queue()
        _fill(q, [(9, 100), (0, 20)])
        got: list[Any] = []
        while q.ready:
            got += q.take(batch)
        prios = _prios(got)
        assert [i for i, p in enumerate(prios) if p == 0] == GUARDED, batch
        assert [qm.message.body for qm in got if _prios([qm]) == [0]] == [
            b"p0-%d" % i for i in range(20)
        ]


def test_requeue_in_a_priority_queue_keeps_priority_and_lane_order() -> None:
    q = _prio_queue()
    _fill(q, [(0, 1)])
    (low,) = q.take(1)
    _fill(q, [(9, 1)])
    q.requeue([low])  # back: but behind the waiting priority 9
    assert _prios(q.take(2)) == [9, 0]

    q = _prio_queue()
    _fill(q, [(5, 4)])
    a, b_, c = q.take(3)
    q.requeue([c, a])
    q.requeue([b_])
    assert [qm.message.body for qm in q.take(4)] == [b"p5-0", b"p5-1", b"p5-2", b"p5-3"]
    assert [qm.redelivered for qm in (a, b_, c)] == [True, True, True]


def test_get_peek_on_a_priority_queue_keeps_the_order() -> None:
    q = _prio_queue()
    _fill(q, [(1, 2), (8, 2)])
    head = q.peek()
    assert head is not None and head.message.body == b"p8-0"
    assert [qm.message.body for qm in q.take(4)] == [b"p8-0", b"p8-1", b"p1-0", b"p1-1"]
    assert head.delivery_count == 1  # the peek did not count as a delivery


# ---------------------------------------------------------------------- dedup
def test_duplicate_counts_as_taken_for_mandatory() -> None:
    b, now = _broker()
    q = b.declare_queue(None, "q", arguments={"dedup_window_ms": 100})
    assert b.enqueue(_msg(b"1", message_id="m"), ["q"]) == 1
    assert b.enqueue(_msg(b"2", message_id="m"), ["q"]) == 1  # not a RETURN
    assert q.ready == 1 and q.published == 1
    now[0] = T0 + 100
    assert b.enqueue(_msg(b"3", message_id="m"), ["q"]) == 1
    assert _bodies(q) == [b"1", b"3"]


def test_full_reject_publish_queue_confirms_a_retry_it_holds() -> None:
    import pytest

    from conveyor.protocol import QueueFull

    b, now = _broker()
    q = b.declare_queue(
        None, "q", arguments={"max_length": 1, "overflow": "reject-publish", "dedup_window_ms": 100}
    )
    b.check_capacity(["q"], 1, "m")
    b.enqueue(_msg(b"1", message_id="m"), ["q"])
    b.check_capacity(["q"], 1, "m")  # full, but it holds "m": no refusal
    assert b.enqueue(_msg(b"1", message_id="m"), ["q"]) == 1 and q.ready == 1
    for mid in ("other", None):
        with pytest.raises(QueueFull):
            b.check_capacity(["q"], 1, mid)
    now[0] = T0 + 100  # the window is over: a new message, and the queue is full
    with pytest.raises(QueueFull):
        b.check_capacity(["q"], 1, "m")


# ---------------------------------------------------------------------- recovery
TOPOLOGY: list[list[Any]] = [
    ["xd", "dlx", "fanout", False, {}],
    ["qd", "dlq", False, {}],
    ["b", "dlx", "dlq", ""],
    ["qd", "work", False, {"delivery_limit": 2, "dead_letter_exchange": "dlx"}],
]


def _check_recovered(b: Broker) -> None:
    work, dlq = b.queues["work"], b.queues["dlq"]
    assert [
        (qm.message.body, qm.delivery_count, qm.redelivered) for qm in work.iter_messages()
    ] == [(b"once", 1, True), (b"ready", 1, True)]
    (dead,) = dlq.iter_messages()
    assert dead.message.body == b"spent" and dead.message.properties["message_id"] == "s"
    (death,) = dead.message.properties["headers"]["x-death"]
    assert (death["reason"], death["queue"], death["count"]) == ("delivery-limit", "work", 1)
    # Logged, so the next restart does not do it again: new in dlq, then gone from work
    # (the removal after the republish: a crash between them keeps the message).
    ops = [(r[0], r[1]) for r in b.journal]
    assert ops == [("p", 4), ("a", "work")]
    assert b.journal[0][2] == ["dlq"] and b.journal[1][2] == [1]
    assert b.next_message_id == 5


def test_recovery_dead_letters_messages_held_at_their_delivery_limit() -> None:
    r = Replay()
    r.apply(TOPOLOGY)
    r.apply(
        [
            ["p", 1, ["work"], "", "work", {"message_id": "s"}, b"spent", T0],
            ["p", 2, ["work"], "", "work", {}, b"once", T0],
            ["p", 3, ["work"], "", "work", {}, b"ready", T0],
            ["d", "work", [1]],
            ["r", "work", [1]],
            ["d", "work", [1]],  # 2nd, in flight
            ["d", "work", [2]],  # 1st, in flight
            ["d", "work", [3]],
            ["r", "work", [3]],
        ]
    )  # back, ready
    b = Broker(MemoryStore(), durable=True)
    r.build(b)
    _check_recovered(b)


def test_recovery_from_snapshot_dead_letters_held_messages_at_their_limit() -> None:
    snap = {
        "version": 2,
        "next_id": 4,
        "dedup": {},
        "exchanges": [["dlx", "fanout", False, {}]],
        "queues": [
            ["dlq", False, {}],
            ["work", False, {"delivery_limit": 2, "dead_letter_exchange": "dlx"}],
        ],
        "bindings": [["dlx", "dlq", ""]],
        # id, delivery count, held unacked by a session
        "queue_messages": {"dlq": [], "work": [[1, 2, 1], [2, 1, 1], [3, 1, 0]]},
        "entries": [
            [1, "", "work", {"message_id": "s"}, T0, b"spent"],
            [2, "", "work", {}, T0, b"once"],
            [3, "", "work", {}, T0, b"ready"],
        ],
    }
    r = Replay()
    r.load_snapshot(snap)
    b = Broker(MemoryStore(), durable=True)
    r.build(b)
    _check_recovered(b)


# ---------------------------------------------------------------------- purge
def test_purge_then_ttl_timer_finds_nothing() -> None:
    b, now = _broker()
    b.declare_exchange("dlx", "fanout")
    dlq = b.declare_queue(None, "dlq")
    b.bind(None, "dlx", "dlq")
    q = b.declare_queue(None, "q", arguments={"dead_letter_exchange": "dlx"})
    b.enqueue(_msg(b"x", ttl=100), ["q"])
    assert b.purge_queue(None, "q") == 1
    now[0] = T0 + 200
    b.tick()
    assert (q.ready, q.expired, q.dead_lettered, dlq.ready) == (0, 0, 0, 0)


def test_purge_keeps_delayed_messages_live_and_in_replay() -> None:
    store = MemoryStore(keep=True)
    now = [T0]
    b = Broker(store, durable=True)
    b.clock = lambda: now[0]
    q = b.declare_queue(None, "q")
    for body, delay in ((b"due", 100), (b"ready", 0), (b"later", 500)):
        b.enqueue(_msg(body, delay=delay), ["q"])
    now[0] = P + 100  # "due" is due, though no timer ran yet: purged with the ready one
    assert b.purge_queue(None, "q") == 2
    b.flush_journal()
    assert (q.ready, q.delayed) == (0, 1)
    commands = [list(c) for c in store.records]
    assert commands[-1] == ["qp", "q", P + 100]

    def replayed(cmds: list[list[Any]]) -> Queue:
        r = Replay()
        r.apply(cmds)
        b2 = Broker(MemoryStore(), durable=True)
        b2.clock = lambda: P + 100
        r.build(b2)
        return b2.queues["q"]

    q2 = replayed(commands)
    assert _bodies(q2) == [b"later"] and q2.delayed == 1
    # A purge logged without a time (older logs) removes all but unacked, as before.
    assert _bodies(replayed([*commands[:-1], ["qp", "q"]])) == []


# ---------------------------------------------------------------------- timers of the gone
def test_delete_and_purge_drop_the_timers_of_their_messages() -> None:
    """TTL and delay of 2^63 ms: the timers of a deleted queue's messages, and of purged
    ones, leave the heap (and with them the messages), instead of waiting for ever."""
    import sys

    b, _now = _broker()
    forever = 1 << 63
    q = b.declare_queue(None, "doomed")
    b.enqueue(_msg(b"t", "doomed", ttl=forever), ["doomed"])
    for _ in range(999):
        b.enqueue(_msg(b"x", "doomed", ttl=forever), ["doomed"])
    for _ in range(1000):
        b.enqueue(_msg(b"d", "doomed", delay=forever), ["doomed"])
    keep = b.declare_queue(None, "keep")
    b.enqueue(_msg(b"k", "keep", ttl=forever), ["keep"])
    assert len(b._timers) == 2001
    m = q.iter_messages()[0].message
    b.delete_queue(None, "doomed")
    assert sys.getrefcount(m) == 2  # ``m`` and the call's argument: nothing holds it
    del m
    assert [t[3] for t in b._timers] == [keep]
    # Purge: the purged messages' TTL timers go too; the queue's other timers stay.
    for _ in range(100):
        b.enqueue(_msg(b"p", "keep", ttl=forever), ["keep"])
    b.enqueue(_msg(b"later", "keep", delay=forever), ["keep"])
    assert b.purge_queue(None, "keep") == 101
    assert len(b._timers) == 1 and keep.delayed == 1
    assert keep.timers == 1 and q.timers == 0
