"""Paging: ready bodies beyond the memory budget live in page files, order and content
are kept, and page files go away once nothing refers to them."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from conveyor.broker.core import Broker
from conveyor.broker.journal import Replay, snapshot_entries, snapshot_state
from conveyor.broker.message import Message
from conveyor.broker.pager import Pager
from conveyor.broker.wal import iter_snapshot, write_snapshot

BUDGET = 64 * 1024


def body(i: int, size: int = 1000) -> bytes:
    return (b"%08d" % i) * (size // 8)


@pytest.fixture
def pager(tmp_path: Path) -> Pager:
    return Pager(tmp_path / "pages", BUDGET, file_bytes=256 * 1024)


def publish(broker: Broker, queue: str, start: int, n: int) -> None:
    for i in range(start, start + n):
        broker.enqueue(Message("", queue, {}, body(i)), [queue])
        if i % 50 == 0:
            broker.pump()
    broker.pump()


def test_backlog_beyond_budget_is_paged_and_comes_back_in_order(pager: Pager) -> None:
    broker = Broker(pager=pager)
    q = broker.declare_queue(None, "q")
    publish(broker, "q", 0, 1000)  # ~1 MB of bodies, 16x the budget
    assert pager.resident <= BUDGET
    assert q.paged > 900
    resident_bodies = sum(1 for qm in q.iter_messages() if qm.message.body is not None)
    assert resident_bodies * 1000 <= BUDGET
    files = list(pager.dir.iterdir())
    assert len(files) >= 3  # rotated at 256 KiB
    got: list[bytes] = []
    for _ in range(100):
        batch = q.take(37)
        if not batch:
            break
        got.extend(qm.message.body or b"<missing>" for qm in batch)
        q.ack(len(batch))
        del batch
    assert got == [body(i) for i in range(1000)]
    assert pager.paged_in > 900
    gc.collect()
    # every message is gone: every page file but the one still open for appends is deleted
    assert len(list(pager.dir.iterdir())) <= 1


def test_publishes_behind_a_paged_tail_are_paged_and_ordered(pager: Pager) -> None:
    broker = Broker(pager=pager)
    q = broker.declare_queue(None, "q")
    publish(broker, "q", 0, 200)
    first = [qm.message.body for qm in q.take(50)]
    q.ack(50)
    publish(broker, "q", 200, 100)  # the tail is paged: these go to disk as well
    assert pager.resident <= BUDGET
    rest = [qm.message.body for qm in q.take(1000)]
    assert first + rest == [body(i) for i in range(300)]


def test_fanout_message_paged_in_one_queue_is_read_back_in_the_other(pager: Pager) -> None:
    broker = Broker(pager=pager)
    a = broker.declare_queue(None, "a")
    b = broker.declare_queue(None, "b")
    broker.declare_exchange("fan", "fanout")
    broker.bind(None, "fan", "a")
    broker.bind(None, "fan", "b")
    for i in range(300):
        broker.enqueue(Message("fan", "", {}, body(i)), ["a", "b"])
    broker.pump()
    assert pager.resident <= BUDGET
    for q in (a, b):
        assert [qm.message.body for qm in q.take(1000)] == [body(i) for i in range(300)]


def test_purge_releases_the_budget(pager: Pager) -> None:
    broker = Broker(pager=pager)
    q = broker.declare_queue(None, "q")
    publish(broker, "q", 0, 40)
    assert pager.resident == 40 * 1000
    broker.purge_queue(None, "q")
    assert pager.resident == 0 and q.ready == 0


def test_snapshot_streams_paged_bodies_and_replay_pages_again(tmp_path: Path, pager: Pager) -> None:
    broker = Broker(pager=pager, durable=True)
    broker.declare_queue(None, "q")
    for i in range(500):
        broker.enqueue(Message("", "q", {"persistent": True}, body(i)), ["q"])
    broker.pump()
    broker.journal.clear()
    head, messages = snapshot_state(broker)
    assert sum(1 for e in messages if type(e[-1]) is not bytes) > 400  # by page
    path, _size = write_snapshot(tmp_path, 1, head, snapshot_entries(messages))
    # Recover into a new broker whose pager has the same small budget.
    pager2 = Pager(tmp_path / "pages2", BUDGET)
    replay = Replay(pager=pager2)
    h, entries = iter_snapshot(path)
    replay.load_snapshot(h, entries)
    broker2 = Broker(pager=pager2, durable=True)
    assert replay.build(broker2) == 500
    q2 = broker2.queues["q"]
    assert q2.paged > 400 and pager2.resident <= BUDGET
    assert [qm.message.body for qm in q2.take(1000)] == [body(i) for i in range(500)]


def test_damaged_or_incomplete_snapshot_is_refused(tmp_path: Path) -> None:
    path, size = write_snapshot(
        tmp_path, 1, {"next_id": 1}, ([i, "", "q", {}, body(i)] for i in range(100))
    )
    data = path.read_bytes()
    path.write_bytes(data[: size - 5])  # no end record
    with pytest.raises(ValueError):
        iter_snapshot(path)
    flipped = bytearray(data)
    flipped[size // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError):
        iter_snapshot(path)


def test_headers_are_paged_with_the_body_and_come_back(tmp_path: Path, pager: Pager) -> None:
    """Messages whose headers are most of their size: paged messages hold no headers in
    memory, and delivery, dead-lettering and snapshots (then replay) see them whole."""
    broker = Broker(pager=pager, durable=True)
    broker.declare_queue(
        None, "q", arguments={"dead_letter_exchange": "", "dead_letter_routing_key": "dlq"}
    )
    broker.declare_queue(None, "dlq")

    def headers(i: int) -> dict[str, object]:
        return {"i": i, "blob": b"h" * 2000, "nested": {"k": [i, "v"]}}

    shared = {"persistent": True, "headers": headers(-1)}  # one dict for a run
    for i in range(300):
        props = shared if i >= 200 else {"persistent": True, "headers": headers(i)}
        broker.enqueue(Message("", "q", props, body(i, 100)), ["q"])
    broker.pump()
    q = broker.queues["q"]
    paged = [qm.message for qm in q.iter_messages() if qm.message.body is None]
    assert len(paged) > 200
    assert all("headers" not in m.properties for m in paged)
    assert shared["headers"] == headers(-1)  # the shared dict itself is left alone
    assert Pager.properties(paged[0])["headers"]["blob"] == b"h" * 2000
    broker.journal.clear()
    head, messages = snapshot_state(broker)
    path, _size = write_snapshot(tmp_path, 1, head, snapshot_entries(messages))
    # Delivery: load brings the headers back.
    taken = q.take(50)
    assert [qm.message.properties["headers"] for qm in taken] == [headers(i) for i in range(50)]
    # Dead-lettering a paged message keeps its headers (plus x-death).
    tail = [qm for qm in q.iter_messages() if qm.message.body is None][-1]
    assert q.remove(tail)
    broker.dead_letter(q, [tail], "expired")
    dead = broker.queues["dlq"].take(1)[0].message
    assert (
        dead.properties["headers"]["blob"] == b"h" * 2000
        and "x-death" in dead.properties["headers"]
    )
    # A snapshot taken while they were paged has every header.
    pager2 = Pager(tmp_path / "pages2", BUDGET)
    replay = Replay(pager=pager2)
    h, entries = iter_snapshot(path)
    replay.load_snapshot(h, entries)
    broker2 = Broker(pager=pager2, durable=True)
    assert replay.build(broker2) >= 300
    got = [qm.message.properties["headers"] for qm in broker2.queues["q"].take(1000)]
    assert got == [headers(i) for i in range(200)] + [headers(-1)] * 100
