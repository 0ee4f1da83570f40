"""Deliveries (one connection's unacked deliveries, tags and deadlines) and
Queue.statistics()/waiting(), in the broker model with a fake clock and no sockets.
The wire behaviour of the same paths is covered over TCP by tests/integration
(test_gateway, test_delivery_features) and tests/conformance/test_requests."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from conveyor.broker.core import Broker
from conveyor.broker.deliveries import Deliveries
from conveyor.broker.message import Message
from conveyor.broker.queue import Queue, QueueStatistics
from conveyor.broker.session import Session
from conveyor.protocol import Ack, Extend, Get, Nack, PreconditionFailed

T0 = 1_700_000_000_000


def _setup(**args: Any) -> tuple[Broker, Session, Queue, list[int]]:
    now = [T0]
    b = Broker()
    b.clock = lambda: now[0]
    s = Session(b, b.new_session_id(), lambda _chunks: None, 1 << 20)
    q = b.declare_queue(None, "q", arguments=args or None)
    return b, s, q, now


def _fill(b: Broker, n: int, queue: str = "q") -> None:
    for i in range(n):
        b.enqueue(Message("", queue, {}, f"m{i}".encode()), [queue])


def _get(s: Session, n: int, no_ack: bool = False) -> None:
    s.handle([Get(1, "q", n, no_ack)])


def test_get_records_consecutive_tags_and_the_earliest_deadline() -> None:
    b, s, q, now = _setup(ack_timeout_ms=1000)
    _fill(b, 5)
    _get(s, 2)
    now[0] += 100
    _get(s, 2)
    d = s.deliveries
    assert list(s.unacked) == [1, 2, 3, 4] and len(d) == 4 and d.next_tag == 4
    assert d.min_deadline == T0 + 1000
    assert [u[0].deadline for u in d.view.values()] == [T0 + 1000] * 2 + [T0 + 1100] * 2
    _get(s, 1, no_ack=True)  # a tag is used, nothing is held
    assert d.next_tag == 5 and len(d) == 4 and 5 not in d
    assert (q.statistics().ready, q.statistics().unacked) == (0, 4)


def test_settle_single_multiple_and_unknown() -> None:
    b, s, q, _now = _setup()
    _fill(b, 5)
    _get(s, 5)
    s.handle([Ack(2, False), Ack(4, True)])
    assert list(s.unacked) == [5]
    assert q.statistics().acked == 4
    with pytest.raises(PreconditionFailed):
        s.deliveries.settle(2, False)  # already settled
    with pytest.raises(PreconditionFailed):
        s.deliveries.settle(3, True)  # nothing at or below 3 is left
    s.handle([Nack(0, True, True)])  # everything, back to the queue
    assert len(s.deliveries) == 0 and q.statistics().ready == 1


def test_expire_requeues_remembers_the_tag_and_moves_the_min_deadline() -> None:
    b, s, q, now = _setup(ack_timeout_ms=1000)
    _fill(b, 3)
    _get(s, 1)
    now[0] += 500
    _get(s, 2)
    now[0] = T0 + 1000
    s.expire_deliveries(now[0])
    d = s.deliveries
    assert list(s.unacked) == [2, 3] and d.timed_out(1) and not d.timed_out(2)
    assert d.min_deadline == T0 + 1500
    assert q.statistics().ready == 1 and q.statistics().redelivered == 1
    s.handle([Ack(1, False)])  # late ack of a timed-out tag: ignored, no error
    assert list(s.unacked) == [2, 3]
    assert d.expire(T0 + 1499) == [] and len(d) == 2  # before the min deadline: nothing


def test_extend_moves_the_deadline_and_refuses_unknown_or_expired_tags() -> None:
    b, s, _q, now = _setup(ack_timeout_ms=1000)
    _fill(b, 1)
    _get(s, 1)
    s.handle([Extend(1, 5000)])
    u = s.deliveries.get(1)
    assert u is not None and u[0].deadline == T0 + 5000
    now[0] = T0 + 5000
    s.expire_deliveries(now[0])
    assert not s.deliveries.extend(1, 100, now[0])
    d = Deliveries()
    assert not d.extend(7, 100, T0) and d.min_deadline == 0 and d.drain() == []


def test_drain_empties_and_close_requeues() -> None:
    b, s, q, _now = _setup(ack_timeout_ms=1000)
    _fill(b, 3)
    _get(s, 3)
    s.close()
    assert len(s.deliveries) == 0 and s.deliveries.min_deadline == 0
    assert (q.statistics().ready, q.statistics().unacked) == (3, 0)


def test_statistics_is_a_frozen_snapshot_of_the_classic_queue() -> None:
    b, s, q, _now = _setup(max_priority=2)
    b.enqueue(Message("", "q", {"priority": 2}, b"hi"), ["q"])
    b.enqueue(Message("", "q", {"priority": 0}, b"lo"), ["q"])
    b.enqueue(Message("", "q", {"delay": 60_000}, b"later"), ["q"])
    _get(s, 1)
    st = q.statistics()
    assert isinstance(st, QueueStatistics)
    assert (st.name, st.type, st.ready, st.unacked, st.delayed, st.consumers) == (
        "q",
        "classic",
        1,
        1,
        1,
        0,
    )
    assert (st.published, st.delivered, st.stream) == (3, 1, None)
    assert st.head_ts == T0 + 1 and st.ready_bytes == q.ready_bytes
    assert st.type_fields() == {"type": "classic"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.ready = 9  # type: ignore[misc]
    _get(s, 1)
    assert st.ready == 1 and q.statistics().ready == 0  # a snapshot, not a view
    # waiting(): delivery order, delayed last, without taking anything
    assert [qm.message.body for qm in q.waiting()] == [b"later"]
    s.handle([Nack(0, True, True)])
    assert [qm.message.body for qm in q.waiting()] == [b"hi", b"lo", b"later"]
    assert q.statistics().ready == 2
