"""Stream segment storage (broker.stream_store): segments, sparse indexes, seeks, torn
tails, retention; and the stream model's groups (broker.stream) without a network."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from conveyor.broker.core import Broker
from conveyor.broker.message import Message, QueuedMessage
from conveyor.broker.queue import Consumer
from conveyor.broker.stream import Stream, StreamConsumer
from conveyor.broker.stream_store import INDEX, StreamLog, seg_file
from conveyor.broker.wal import CorruptLog
from conveyor.protocol import InvalidArgument


def _items(n: int, start_ts: int = 1000, size: int = 100) -> list[tuple[Any, ...]]:
    return [
        (start_ts + i, "ex", f"k{i}", {"headers": {"i": i}}, bytes([i % 256]) * size)
        for i in range(n)
    ]


def _log(tmp_path: Path, **kw: Any) -> StreamLog:
    kw.setdefault("segment_bytes", 4096)
    return StreamLog(tmp_path / "s", **kw).open()


def test_append_read_across_segments(tmp_path: Path) -> None:
    slog = _log(tmp_path)
    for i in range(0, 500, 10):
        slog.append(_items(10, 1000 + i)[:10])
    assert (slog.first_offset, slog.head, slog.count) == (0, 500, 500)
    assert len(slog.segments) > 5
    names = sorted(p.name for p in (tmp_path / "s").glob("*.seg"))
    assert names[0] == seg_file(0)
    assert [int(n.split(".")[0]) for n in names] == [s.first for s in slog.segments]
    # read from disk (bypass the cache) at every offset: exactly that entry first
    slog._cache.clear()
    for off in (0, 1, 9, 10, 137, 255, 499):
        got = slog.read(off, 3)
        assert [e[0] for e in got] == list(range(off, min(off + 3, 500)))
    everything = slog.read(0, 10_000, 1 << 30)
    assert [e[0] for e in everything] == list(range(500))
    assert slog.read(500, 10) == []


def test_index_is_sparse_and_survives_reopen(tmp_path: Path) -> None:
    slog = _log(tmp_path, segment_bytes=1 << 20)
    for i in range(300):
        slog.append([(1000 + i, "", "k", {}, b"x" * 1000)])
    seg = slog.segments[0]
    assert 1 < len(seg.index) < 300 / 10  # one per ~64 KiB, not one per record
    idx_size = seg.idx_path.stat().st_size
    assert idx_size == len(seg.index) * INDEX.size
    slog.close()
    again = _log(tmp_path, segment_bytes=1 << 20)
    assert again.head == 300
    assert again.segments[0].index == seg.index
    assert [e[0] for e in again.read(250, 5)] == [250, 251, 252, 253, 254]


def test_seek_by_timestamp(tmp_path: Path) -> None:
    slog = _log(tmp_path)
    for i in range(400):
        slog.append([(10_000 + 10 * i, "", "k", {}, b"y" * 50)])
    assert slog.seek_time(0) == 0
    assert slog.seek_time(10_000) == 0
    assert slog.seek_time(10_001) == 1
    assert slog.seek_time(10_000 + 10 * 250) == 250
    assert slog.seek_time(10_000 + 10 * 250 - 5) == 250
    assert slog.seek_time(10_000 + 10 * 399) == 399
    assert slog.seek_time(10**9) == 400  # after the newest: the head


def test_torn_tail_is_truncated(tmp_path: Path) -> None:
    slog = _log(tmp_path, segment_bytes=1 << 20)
    for i in range(20):
        slog.append([(1000 + i, "", "k", {}, b"z" * 100)])
    slog.close()
    path = slog.segments[-1].path
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x01\x00garbage-half-record")
    again = _log(tmp_path, segment_bytes=1 << 20)
    assert again.head == 20
    assert "torn tail" in again.truncated
    assert path.stat().st_size == good
    again.append([(2000, "", "k", {}, b"after")])
    assert again.read(20, 1)[0][5] == b"after"
    # a record cut in half (crash mid-write): the whole record goes
    again.close()
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 3)
    third = _log(tmp_path, segment_bytes=1 << 20)
    assert third.head == 20
    assert [e[0] for e in third.read(0, 100)] == list(range(20))


def test_bad_index_hint_is_rebuilt(tmp_path: Path) -> None:
    slog = _log(tmp_path, segment_bytes=1 << 20)
    for i in range(200):
        slog.append([(1000 + i, "", "k", {}, b"w" * 1000)])
    slog.close()
    idx = slog.segments[0].idx_path
    idx.write_bytes(INDEX.pack(0, 0, 1000) + INDEX.pack(5, 77, 1005))  # wrong position
    again = _log(tmp_path, segment_bytes=1 << 20)
    assert again.head == 200
    assert [e[0] for e in again.read(150, 2)] == [150, 151]


def test_retention_by_size_and_age(tmp_path: Path) -> None:
    slog = _log(tmp_path)
    limit = 20_000
    for i in range(1000):
        slog.append([(1000 + i, "", "k", {}, b"r" * 200)])
        slog.retain(0, 0, limit)
        assert slog.disk_bytes <= limit + slog.segment_bytes + 512
    assert slog.first_offset > 0
    assert slog.head == 1000
    first = slog.first_offset
    assert slog.read(0, 1)[0][0] == first  # before the first retained: skips forward
    on_disk = sum(p.stat().st_size for p in (tmp_path / "s").glob("*.seg"))
    assert on_disk == slog.disk_bytes
    # by age: everything but the active segment is older than 10 ms at time 3000
    n = slog.retain(3000, 10, 0)
    assert n >= 1 and len(slog.segments) == 1
    assert slog.retain(3000, 10, 0) == 0  # never the active segment


def test_commit_without_loop(tmp_path: Path) -> None:
    slog = _log(tmp_path)
    slog.append([(1, "", "k", {}, b"a")])
    got: list[Any] = []
    slog.commit(got.append)
    assert got == [None] and slog.durable == slog.written


# ---------------------------------------------------------------------- model


class _FakeSession:
    def __init__(self) -> None:
        self.got: list[tuple[Consumer, list[QueuedMessage]]] = []
        self.consumers: dict[str, Consumer] = {}
        self.write_paused = False  # what Stream.dispatch reads of a Session
        self.pending_bytes = 0


def _broker(tmp_path: Path) -> Broker:
    b = Broker(durable=False)
    b.streams.configure(tmp_path / "streams", "never", 100)
    return b


def _deliver(out: list[tuple[Consumer, list[QueuedMessage]]]) -> Any:
    def deliver(c: Consumer, batch: list[QueuedMessage]) -> None:
        c.credit  # noqa: B018
        out.append((c, batch))

    return deliver


def test_declare_rules(tmp_path: Path) -> None:
    b = _broker(tmp_path)
    with pytest.raises(InvalidArgument):
        b.declare_queue(None, "s", durable=False, arguments={"queue_type": "stream"})
    with pytest.raises(InvalidArgument):
        b.declare_queue(None, "s", arguments={"queue_type": "stream", "max_priority": 3})
    with pytest.raises(InvalidArgument):
        b.declare_queue(None, "c", arguments={"max_age_ms": 5})
    s = b.declare_queue(None, "s", arguments={"queue_type": "stream"})
    assert isinstance(s, Stream)
    with pytest.raises(InvalidArgument):
        b.purge_queue(None, "s")
    with pytest.raises(InvalidArgument):
        s.peek()
    b.delete_queue(None, "s")
    assert not (tmp_path / "streams" / "q-s").exists()


def test_groups_share_and_commit(tmp_path: Path) -> None:
    b = _broker(tmp_path)
    s = b.declare_queue(None, "s", arguments={"queue_type": "stream"})
    assert isinstance(s, Stream)
    for i in range(10):
        b.enqueue(Message("", "s", {}, f"m{i}".encode()), ["s"])
    b.streams.flush()
    sess: Any = _FakeSession()
    a = StreamConsumer("a", s, sess, False, False, 3, {"group": "g", "offset": "first"})
    c = StreamConsumer("c", s, sess, False, False, 3, {"group": "g"})
    s.add_consumer(a)
    s.add_consumer(c)
    out: list[tuple[Consumer, list[QueuedMessage]]] = []
    s.dispatch(_deliver(out))
    got = {cons.tag: [qm.seq for qm in batch] for cons, batch in out}
    assert sorted(got["a"] + got["c"]) == list(range(6))
    assert len(got["a"]) == 3 and len(got["c"]) == 3
    # a acks, c's deliveries come back (its connection closed)
    s.settle_acked([qm for cons, batch in out if cons is a for qm in batch])
    g = s.groups["g"]
    assert g.committed == 1  # 0 done; 1 is c's (round-robin dealt 0 to a, 1 to c)
    s.settle_refused([qm for cons, batch in out if cons is c for qm in batch], True)
    s.remove_consumer(c)
    a.credit = 10
    out.clear()
    s.dispatch(_deliver(out))
    seqs = [qm.seq for _c, batch in out for qm in batch]
    redelivered = [qm.seq for _c, batch in out for qm in batch if qm.redelivered]
    assert sorted(redelivered) == sorted(got["c"])
    assert sorted(seqs) == sorted(got["c"]) + list(range(6, 10))
    s.settle_acked([qm for _c, batch in out for qm in batch])
    assert g.committed == 10
    s.save_groups(sync=True)
    assert os.path.exists(s.log.dir / "groups")


# --------------------------------------------------------------------------- damage rules


def _filled(tmp_path: Path, n: int = 1000, **kw: Any) -> StreamLog:
    """A closed stream of ``n`` one-entry records over several 64 KiB segments, each
    with several index entries."""
    kw.setdefault("segment_bytes", 64 << 10)
    slog = _log(tmp_path, **kw)
    for i in range(n):
        slog.append([(1000 + i, "", "k", {}, b"v" * 100)])
    slog.close()
    return slog


def _record_starts(path: Path) -> list[int]:
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        out.append(pos)
        pos += 8 + int.from_bytes(data[pos : pos + 4], "big")
    return out


def _dir_contents(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _all_offsets(slog: StreamLog) -> list[int]:
    slog._cache.clear()
    return [e[0] for e in slog.read(0, 100_000, 1 << 30)]


NOT_A_RECORD = {
    "random-garbage": random.Random(11).randbytes(3000),
    "zeros": bytes(20_000),
    "impossible-length": (0xFFFF_FF00).to_bytes(4, "big") + bytes(4) + b"\x10rest",
}


@pytest.mark.parametrize("tail", NOT_A_RECORD.values(), ids=NOT_A_RECORD.keys())
def test_bytes_that_are_no_record_after_the_last_one_are_cut_and_kept(
    tmp_path: Path, tail: bytes
) -> None:
    slog = _filled(tmp_path)
    path = slog.segments[-1].path
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(tail)
    again = _log(tmp_path, segment_bytes=64 << 10)
    assert again.head == 1000 and _all_offsets(again) == list(range(1000))
    assert path.stat().st_size == good
    torn = path.with_name(f"{path.name}.{good}.torn")
    assert torn.read_bytes() == tail and torn.name in again.truncated
    again.close()


@pytest.mark.parametrize("where", ["newest", "older"])
def test_flipped_length_byte_refuses_then_repair_keeps_everything(
    tmp_path: Path, where: str
) -> None:
    slog = _filled(tmp_path)
    assert len(slog.segments) >= 2
    path = slog.segments[-1 if where == "newest" else 0].path
    off = _record_starts(path)[len(_record_starts(path)) // 2]
    data = bytearray(path.read_bytes())
    data[off + 1] ^= 0x01  # the length field: the record now seems to run past the end
    path.write_bytes(bytes(data))
    before = _dir_contents(tmp_path / "s")
    with pytest.raises(CorruptLog) as info:
        _log(tmp_path, segment_bytes=64 << 10)
    assert info.value.path == path and info.value.offset == off
    assert f"{path}: damaged record at byte offset {off}" in str(info.value)
    assert "valid records follow" in str(info.value)
    assert _dir_contents(tmp_path / "s") == before  # nothing truncated

    fixed = _log(tmp_path, segment_bytes=64 << 10, repair=True)
    assert _all_offsets(fixed) == list(range(1000))
    assert len(fixed.repaired) == 1 and "nothing lost" in fixed.repaired[0]
    assert path.with_name(path.name + ".corrupt").read_bytes() == before[path.name]
    fixed.close()
    assert _all_offsets(_log(tmp_path, segment_bytes=64 << 10)) == list(range(1000))


def test_damage_in_an_older_segment_refuses_instead_of_skipping_offsets(tmp_path: Path) -> None:
    """Damage early in an older segment (before its last index hint) is found on open:
    no reader silently skips the rest of that segment."""
    slog = _filled(tmp_path)
    first = slog.segments[0]
    assert len(first.index) > 2
    starts = _record_starts(first.path)
    victim = starts[10]
    data = bytearray(first.path.read_bytes())
    data[victim + 30] ^= 0x5A  # inside record 10's payload
    first.path.write_bytes(bytes(data))
    before = _dir_contents(tmp_path / "s")
    with pytest.raises(CorruptLog) as info:
        _log(tmp_path, segment_bytes=64 << 10)
    assert info.value.path == first.path and info.value.offset == victim
    assert "checksum mismatch" in str(info.value)
    assert _dir_contents(tmp_path / "s") == before

    fixed = _log(tmp_path, segment_bytes=64 << 10, repair=True)
    assert _all_offsets(fixed) == [i for i in range(1000) if i != 10]
    assert "lost offsets 10..10" in fixed.repaired[0]
    fixed.close()


def test_torn_tail_of_an_older_segment_is_not_a_torn_tail(tmp_path: Path) -> None:
    slog = _filled(tmp_path)
    first = slog.segments[0].path
    with open(first, "r+b") as f:
        f.truncate(first.stat().st_size - 5)
    with pytest.raises(CorruptLog, match="not the last segment"):
        _log(tmp_path, segment_bytes=64 << 10)
    fixed = _log(tmp_path, segment_bytes=64 << 10, repair=True)
    n = slog.segments[1].first
    assert _all_offsets(fixed) == [i for i in range(1000) if i != n - 1]
    assert f"lost offsets from {n - 1}" in fixed.repaired[0]
    fixed.close()


FLIP_ROUNDS = int(os.environ.get("CONVEYOR_FLIP_ROUNDS", "40"))


def test_any_flipped_byte_is_refused_or_cut_aside_never_lost(tmp_path: Path) -> None:
    """Flip one bit anywhere in a one-segment stream of 150 one-entry records (so several
    index hints): open refuses naming the damaged record, or (last record only) cuts it
    into *.torn; --repair loses at most that record's offset. CONVEYOR_FLIP_ROUNDS sets
    the rounds (40 here)."""
    rng = random.Random(3)
    src = tmp_path / "src"
    slog = StreamLog(src / "s", segment_bytes=1 << 20).open()
    for i in range(150):
        slog.append([(1000 + i, "", "k", {}, bytes([i]) * 40)])
    slog.close()
    seg = slog.segments[0]
    assert len(seg.index) > 1
    clean = seg.path.read_bytes()
    idx = seg.idx_path.read_bytes()
    starts = _record_starts(seg.path)
    for r in range(FLIP_ROUNDS):
        d = tmp_path / f"r{r}"
        (d / "s").mkdir(parents=True)
        at = rng.randrange(len(clean))
        damaged = bytearray(clean)
        damaged[at] ^= 1 << rng.randrange(8)
        path = d / "s" / seg.path.name
        path.write_bytes(bytes(damaged))
        (d / "s" / seg.idx_path.name).write_bytes(idx)
        victim = max(k for k, s in enumerate(starts) if s <= at)
        try:
            again = StreamLog(d / "s", segment_bytes=1 << 20).open()
        except CorruptLog as exc:
            assert exc.offset == starts[victim] and victim < len(starts) - 1, (at, exc)
            assert path.read_bytes() == bytes(damaged)
            fixed = StreamLog(d / "s", segment_bytes=1 << 20, repair=True).open()
            got = _all_offsets(fixed)
            assert got in (list(range(150)), [i for i in range(150) if i != victim]), at
            fixed.close()
        else:
            assert victim == len(starts) - 1, at
            assert _all_offsets(again) == list(range(149))
            torn = path.with_name(f"{path.name}.{starts[victim]}.torn")
            assert torn.read_bytes() == bytes(damaged[starts[victim] :])
            again.close()
