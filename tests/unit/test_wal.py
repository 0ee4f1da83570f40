"""Tests of the write-ahead log (broker.wal) without a broker process: record framing,
WalStore appends under each fsync policy, group commit, rotation and segment deletion,
snapshots, recovery of torn tails and of mid-log damage, and write-error handling."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import time
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest

from conveyor.broker import wal
from conveyor.broker.config import Config
from conveyor.broker.durability import Durability
from conveyor.broker.wal import (
    HEADER,
    HEADER_SIZE,
    CorruptLog,
    WalStore,
    frame_record,
    iter_segment,
    read_snapshot,
    recover,
    seg_name,
    snap_name,
    write_snapshot,
)

WAIT = 5.0

# --------------------------------------------------------------------------- helpers


def batch(i: int) -> list[list[Any]]:
    """A command batch that identifies itself by ``i``."""
    return [["p", i, ["q"], "", "q", {}, f"body-{i}".encode()], ["d", "q", [i]]]


def record(i: int) -> bytes:
    return frame_record(msgpack.packb(batch(i), use_bin_type=True))


def write_segment(wal_dir: Path, index: int, ids: list[int], tail: bytes = b"") -> Path:
    """A segment file holding one framed record per id (plus ``tail`` bytes)."""
    wal_dir.mkdir(parents=True, exist_ok=True)
    path = wal_dir / seg_name(index)
    path.write_bytes(b"".join(record(i) for i in ids) + tail)
    return path


def offsets(path: Path) -> list[int]:
    return [off for off, _ in iter_segment(path, last=True)]


def ids_of(records: list[list[Any]]) -> list[int]:
    return [cmds[0][1] for cmds in records]


def dir_contents(wal_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(wal_dir.iterdir())}


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


async def commit(store: WalStore) -> BaseException | None:
    """Commit and wait (bounded) for the callback; returns its error argument."""
    fut: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    store.commit(lambda err: fut.done() or fut.set_result(err))
    return await asyncio.wait_for(fut, WAIT)


# --------------------------------------------------------------------------- framing


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 40])
def test_frame_record_layout_and_round_trip(payload: bytes) -> None:
    framed = frame_record(payload)
    length, crc, rtype = HEADER.unpack_from(framed, 0)
    assert HEADER_SIZE == 9
    assert length == len(payload) + 1  # type byte + payload
    assert rtype == wal.REC_COMMANDS
    assert framed[HEADER_SIZE:] == payload
    assert crc == zlib.crc32(bytes([rtype]) + payload)
    assert len(framed) == 8 + length


def test_iter_segment_yields_offsets_and_commands(tmp_path: Path) -> None:
    path = write_segment(tmp_path, 1, [1, 2, 3])
    out = list(iter_segment(path, last=False))
    assert [c for _, c in out] == [batch(1), batch(2), batch(3)]
    sizes = [len(record(i)) for i in (1, 2)]
    assert [off for off, _ in out] == [0, sizes[0], sizes[0] + sizes[1]]


def test_empty_log_recovers_to_nothing(tmp_path: Path) -> None:
    rec = recover(tmp_path / "wal")
    assert rec.snapshot is None and rec.records == []
    assert rec.next_segment == 1
    assert rec.truncated == [] and rec.quarantined == []


# --------------------------------------------------------------------------- WalStore


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
async def test_append_commit_recover_in_order(tmp_path: Path, fsync: str) -> None:
    store = WalStore(tmp_path, 1, fsync=fsync, interval_ms=10)
    try:
        for i in range(1, 6):
            store.append(batch(i))
            assert await commit(store) is None
        # several appends, one commit
        for i in range(6, 20):
            store.append(batch(i))
        assert await commit(store) is None
        assert store.records_written == 19
        # the callback means written: a reader sees the records before close()
        assert ids_of([c for _, c in iter_segment(tmp_path / seg_name(1), last=True)]) == list(
            range(1, 20)
        )
    finally:
        store.close()
    rec = recover(tmp_path)
    assert rec.records == [batch(i) for i in range(1, 20)]
    assert rec.truncated == [] and rec.quarantined == []
    assert rec.next_segment == 2
    assert rec.bytes_replayed == (tmp_path / seg_name(1)).stat().st_size


async def test_fsync_always_syncs_before_confirming(tmp_path: Path) -> None:
    store = WalStore(tmp_path, 1, fsync="always")
    try:
        store.append(batch(1))
        assert await commit(store) is None
        assert store.fsyncs == 1
    finally:
        store.close()


async def test_write_through_writes_at_once_and_commit_still_syncs(tmp_path: Path) -> None:
    """write_through (before deliveries go out) puts the records in the file now, without
    fsync; a commit after it still waits for an fdatasync."""
    store = WalStore(tmp_path, 1, fsync="always")
    seg = tmp_path / seg_name(1)
    try:
        store.append(batch(1))
        assert seg.stat().st_size == 0  # the writer thread would write it later
        store.write_through()
        assert seg.stat().st_size > 0 and store.fsyncs == 0
        assert [r for _off, recs in iter_segment(seg, last=True) for r in recs] == [
            list(r) for r in batch(1)
        ]
        assert await commit(store) is None
        assert store.fsyncs == 1
        # while the writer thread syncs a batch, write_through writes after it, in order
        store.append(batch(2))
        fut = asyncio.ensure_future(commit(store))
        for _ in range(20):  # until the kick hands batch 2 to the writer thread
            if store._busy:
                break
            await asyncio.sleep(0)
        store.append(batch(3))
        store.write_through()
        assert not store._pending  # written, after batch 2
        assert await fut is None
        assert await commit(store) is None  # batch 3 is synced by now
        assert not store._unsynced and store.fsyncs >= 2
        recs = [r for _off, rs in iter_segment(seg, last=True) for r in rs]
        assert recs == [list(r) for n in (1, 2, 3) for r in batch(n)]
    finally:
        store.close()


async def test_fsync_interval_syncs_on_a_timer(tmp_path: Path) -> None:
    store = WalStore(tmp_path, 1, fsync="interval", interval_ms=20)
    try:
        store.append(batch(1))
        assert await commit(store) is None
        deadline = time.monotonic() + WAIT
        while store.fsyncs == 0:
            assert time.monotonic() < deadline, "interval fdatasync never ran"
            await asyncio.sleep(0.01)
    finally:
        store.close()


async def test_close_writes_pending_records(tmp_path: Path) -> None:
    store = WalStore(tmp_path, 1, fsync="always")
    store.append(batch(1))
    store.append(batch(2))
    got: list[BaseException | None] = []
    store.commit(got.append)
    store.close()  # before the writer ever ran
    assert got == [None]
    assert recover(tmp_path).records == [batch(1), batch(2)]
    # a closed store refuses commits and ignores appends
    store.commit(got.append)
    assert isinstance(got[-1], ConnectionError)


async def test_close_waits_for_a_write_in_flight_and_writes_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown while the writer thread is in a (slow) fdatasync: close() must not close
    the file under it, and must still write what was appended meanwhile."""
    store = WalStore(tmp_path, 1, fsync="always")
    real_sync = wal.os.fdatasync
    in_sync = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_sync(fd: int) -> None:
        loop.call_soon_threadsafe(in_sync.set)
        time.sleep(0.3)
        real_sync(fd)

    monkeypatch.setattr(wal.os, "fdatasync", slow_sync)
    store.append(batch(1))
    first = asyncio.ensure_future(commit(store))
    await asyncio.wait_for(in_sync.wait(), WAIT)
    store.append(batch(2))  # arrives while the first batch is being synced
    got: list[BaseException | None] = []
    store.commit(got.append)
    store.close()
    assert got == [None]
    assert await first is None
    monkeypatch.undo()
    assert recover(tmp_path).records == [batch(1), batch(2)]


async def test_group_commit_shares_fsyncs(tmp_path: Path) -> None:
    store = WalStore(tmp_path, 1, fsync="always")
    n = 200
    results: list[BaseException | None] = []
    done = asyncio.Event()

    def cb(err: BaseException | None) -> None:
        results.append(err)
        if len(results) == n:
            done.set()

    try:
        for i in range(n):  # all issued in one loop turn
            store.append(batch(i + 1))
            store.commit(cb)
        await asyncio.wait_for(done.wait(), WAIT)
        assert results == [None] * n
        assert 1 <= store.fsyncs < n
        assert store.fsyncs <= 2
    finally:
        store.close()
    assert recover(tmp_path).records == [batch(i + 1) for i in range(n)]


async def test_group_commit_batches_commits_arriving_during_a_sync(tmp_path: Path) -> None:
    """Commits issued from many tasks while the writer is busy share later fsyncs."""
    store = WalStore(tmp_path, 1, fsync="always")
    n = 300

    async def publisher(k: int) -> BaseException | None:
        await asyncio.sleep(0.0005 * (k % 10))
        store.append(batch(k))
        return await commit(store)

    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(publisher(k) for k in range(1, n + 1))), WAIT * 2
        )
        assert results == [None] * n
        assert store.fsyncs < n
    finally:
        store.close()
    assert sorted(ids_of(recover(tmp_path).records)) == list(range(1, n + 1))


# --------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("fsync", ["always", "never"])
async def test_rotation_puts_later_records_in_a_new_segment(tmp_path: Path, fsync: str) -> None:
    store = WalStore(tmp_path, 1, fsync=fsync)
    try:
        store.append(batch(1))
        store.append(batch(2))
        assert await commit(store) is None
        assert store.rotate() == 2
        assert store.bytes_since_snapshot == 0
        store.append(batch(3))
        assert await commit(store) is None
        # records appended before and after a rotation, written in one batch
        store.append(batch(4))
        assert store.rotate() == 3
        store.append(batch(5))
        assert await commit(store) is None
    finally:
        store.close()
    segs = sorted(p.name for p in tmp_path.glob("seg-*.log"))
    assert segs == [seg_name(1), seg_name(2), seg_name(3)]

    def ids_in(i: int) -> list[int]:
        return ids_of([c for _, c in iter_segment(tmp_path / seg_name(i), last=False)])

    assert ids_in(1) == [1, 2]
    assert ids_in(2) == [3, 4]
    assert ids_in(3) == [5]
    rec = recover(tmp_path)
    assert ids_of(rec.records) == [1, 2, 3, 4, 5]
    assert rec.next_segment == 4


async def test_delete_segments_before(tmp_path: Path) -> None:
    store = WalStore(tmp_path, 1, fsync="never")
    try:
        for i in range(1, 4):
            store.append(batch(i))
            assert await commit(store) is None
            store.rotate()
        # segments 1..3 written; index 4 is current but not yet opened (nothing written)
        write_snapshot(tmp_path, 2, {"old": True})
        assert store.delete_segments_before(4) == 2  # seg 3 is still the open file
        assert sorted(p.name for p in tmp_path.glob("seg-*.log")) == [seg_name(3)]
        assert not (tmp_path / snap_name(2)).exists()
        store.append(batch(4))
        assert await commit(store) is None
        assert (tmp_path / seg_name(4)).exists()
        write_snapshot(tmp_path, 4, {"new": True})
        assert store.delete_segments_before(4) == 1
        assert sorted(p.name for p in tmp_path.glob("seg-*.log")) == [seg_name(4)]
        assert (tmp_path / snap_name(4)).exists()  # not before 4: kept
    finally:
        store.close()
    rec = recover(tmp_path)
    assert rec.snapshot == {"new": True}
    assert ids_of(rec.records) == [4]


# --------------------------------------------------------------------------- snapshots


def test_snapshot_round_trip(tmp_path: Path) -> None:
    state = {
        "version": 1,
        "next_id": 9,
        "queues": [["q", False, {}]],
        "messages": [[1, "", "q", {"persistent": True}, b"\x00\xffbody"]],
        "queue_messages": {"q": [[1, 2]]},
    }
    path, size = write_snapshot(tmp_path, 7, state)
    assert path == tmp_path / snap_name(7)
    assert size == path.stat().st_size
    assert read_snapshot(path) == state
    assert list(tmp_path.glob("*.tmp")) == []


@pytest.mark.parametrize("where", [0, 8, 12, -1], ids=["magic", "crc", "body-start", "last"])
def test_damaged_snapshot_is_rejected(tmp_path: Path, where: int) -> None:
    path, _ = write_snapshot(tmp_path, 3, {"next_id": 1, "data": list(range(100))})
    flip(path, where if where >= 0 else path.stat().st_size - 1)
    with pytest.raises(ValueError):
        read_snapshot(path)


def test_short_snapshot_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / snap_name(3)
    path.write_bytes(wal.SNAP_MAGIC[:5])
    with pytest.raises(ValueError):
        read_snapshot(path)


def test_recover_uses_newest_snapshot_and_later_segments(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 3, {"at": 3})
    write_segment(tmp_path, 3, [30, 31])
    write_segment(tmp_path, 4, [40])
    (tmp_path / snap_name(5)).with_suffix(".tmp").write_bytes(b"interrupted snapshot")
    rec = recover(tmp_path)
    assert rec.snapshot == {"at": 3}
    assert ids_of(rec.records) == [30, 31, 40]
    assert rec.next_segment == 5
    assert list(tmp_path.glob("*.tmp")) == []  # interrupted snapshot removed


def test_recover_falls_back_to_older_snapshot(tmp_path: Path) -> None:
    # crash after snapshot 5 was written but before the segments it covers were deleted
    write_snapshot(tmp_path, 3, {"at": 3})
    write_segment(tmp_path, 3, [30])
    write_segment(tmp_path, 4, [40])
    path, _ = write_snapshot(tmp_path, 5, {"at": 5})
    write_segment(tmp_path, 5, [50])
    flip(path, path.stat().st_size - 2)
    rec = recover(tmp_path)
    assert rec.snapshot == {"at": 3}
    assert ids_of(rec.records) == [30, 40, 50]


def test_recover_fails_clearly_when_the_covered_log_is_gone(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 3, {"at": 3})
    path, _ = write_snapshot(tmp_path, 5, {"at": 5})
    write_segment(tmp_path, 5, [50])  # segments 3 and 4 were deleted after snapshot 5
    flip(path, 13)
    before = dir_contents(tmp_path)
    with pytest.raises(CorruptLog) as info:
        recover(tmp_path)
    assert "missing" in str(info.value)
    assert dir_contents(tmp_path) == before


def test_recover_fails_clearly_without_any_readable_snapshot(tmp_path: Path) -> None:
    path, _ = write_snapshot(tmp_path, 5, {"at": 5})
    write_segment(tmp_path, 5, [50])
    flip(path, 13)
    with pytest.raises(CorruptLog) as info:
        recover(tmp_path)
    assert snap_name(5) in str(info.value)
    assert "no readable snapshot" in str(info.value)


def test_recover_fails_clearly_when_only_a_damaged_snapshot_is_left(tmp_path: Path) -> None:
    """A snapshot with no segment at all (everything it covered was deleted): losing the
    snapshot must not silently start an empty broker."""
    path, _ = write_snapshot(tmp_path, 5, {"at": 5})
    flip(path, 13)
    with pytest.raises(CorruptLog):
        recover(tmp_path)


# --------------------------------------------------------------------------- torn tails

TORN_TAILS = {
    "truncated-header": record(99)[:5],
    "record-past-eof": record(99)[:-3],
    "header-only": record(99)[:HEADER_SIZE],
    "checksum-mismatch": record(99)[:-1] + bytes([record(99)[-1] ^ 0x01]),
    "zero-filled": bytes(4096),
    "short-zero-fill": bytes(3),
}


@pytest.mark.parametrize("tail", TORN_TAILS.values(), ids=TORN_TAILS.keys())
def test_torn_tail_of_last_segment_is_truncated(tmp_path: Path, tail: bytes) -> None:
    write_segment(tmp_path, 1, [1, 2])
    path = write_segment(tmp_path, 2, [3, 4, 5], tail)
    good = path.stat().st_size - len(tail)
    rec = recover(tmp_path)
    assert ids_of(rec.records) == [1, 2, 3, 4, 5]
    assert path.stat().st_size == good
    assert len(rec.truncated) == 1
    assert path.name in rec.truncated[0] and f"byte {good}" in rec.truncated[0]
    assert rec.quarantined == []
    assert rec.next_segment == 3
    assert torn_files(tmp_path) == {f"{path.name}.{good}.torn": tail}  # nothing destroyed
    # the repaired file is a clean log now
    rec2 = recover(tmp_path)
    assert ids_of(rec2.records) == [1, 2, 3, 4, 5] and rec2.truncated == []


def torn_files(wal_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in wal_dir.glob("*.torn")}


def garbage(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


# Bytes after the last record that are no record at all: a power loss, not corruption.
NOT_A_RECORD = {
    "random-garbage": garbage(5000),
    "zeros": bytes(20_000),
    "impossible-length": HEADER.pack(0xFFFF_FFF0, 0, wal.REC_COMMANDS) + b"rest",
    "garbage-after-zeros": bytes(4096) + garbage(300, 3),
}


@pytest.mark.parametrize("tail", NOT_A_RECORD.values(), ids=NOT_A_RECORD.keys())
def test_bytes_that_are_no_record_after_the_last_one_are_a_torn_tail(
    tmp_path: Path, tail: bytes
) -> None:
    path = write_segment(tmp_path, 1, list(range(1, 31)), tail)
    good = path.stat().st_size - len(tail)
    rec = recover(tmp_path)
    assert ids_of(rec.records) == list(range(1, 31))
    assert path.stat().st_size == good
    assert rec.quarantined == [] and len(rec.truncated) == 1
    assert f"{path.name}.{good}.torn" in rec.truncated[0]
    assert torn_files(tmp_path) == {f"{path.name}.{good}.torn": tail}
    assert ids_of(recover(tmp_path).records) == list(range(1, 31))  # clean from now on


def test_a_second_torn_tail_at_the_same_offset_keeps_the_first(tmp_path: Path) -> None:
    path = write_segment(tmp_path, 1, [1], b"first tail")
    recover(tmp_path)
    with open(path, "ab") as f:
        f.write(b"second tail")
    recover(tmp_path)
    assert sorted(torn_files(tmp_path).values()) == [b"first tail", b"second tail"]


def lengthen(path: Path, off: int, by: int) -> None:
    """Add ``by`` to the length field of the record at ``off`` (a flipped length byte)."""
    data = bytearray(path.read_bytes())
    length = HEADER.unpack_from(data, off)[0]
    data[off : off + 4] = (length + by).to_bytes(4, "big")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("by", [1 << 16, 1 << 8, 5], ids=["past-eof", "mid-file", "small"])
def test_flipped_length_byte_mid_newest_segment_refuses(tmp_path: Path, by: int) -> None:
    """A damaged length makes the record look like it runs past the end (or into the next
    one); valid records follow it, so it is corruption, not a torn tail."""
    write_segment(tmp_path, 1, [0])
    path = write_segment(tmp_path, 2, list(range(1, 101)))
    off = offsets(path)[10]
    lengthen(path, off, by)
    before = dir_contents(tmp_path)
    with pytest.raises(CorruptLog) as info:
        recover(tmp_path)
    assert info.value.path == path and info.value.offset == off
    assert f"{path}: damaged record at byte offset {off}" in str(info.value)
    assert "valid records follow" in str(info.value)
    assert dir_contents(tmp_path) == before  # nothing cut, nothing lost

    # --repair: only the length field was wrong, so the record is kept; nothing is lost
    rec = recover(tmp_path, repair=True)
    assert ids_of(rec.records) == list(range(0, 101))
    assert len(rec.quarantined) == 1 and "length field was wrong" in rec.quarantined[0]
    assert "dropped 0 damaged" in rec.quarantined[0]
    assert (tmp_path / (path.stem + ".corrupt")).read_bytes() == before[path.name]


def test_repair_drops_a_damaged_span_and_keeps_what_follows(tmp_path: Path) -> None:
    path = write_segment(tmp_path, 1, list(range(1, 11)))
    offs = offsets(path)
    data = bytearray(path.read_bytes())
    data[offs[3] : offs[5]] = garbage(offs[5] - offs[3])  # records 4 and 5 overwritten
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLog) as info:
        recover(tmp_path)
    assert info.value.offset == offs[3]
    rec = recover(tmp_path, repair=True)
    assert ids_of(rec.records) == [1, 2, 3, 6, 7, 8, 9, 10]
    (msg,) = rec.quarantined
    assert "dropped 1 damaged" in msg and f"dropped {offs[5] - offs[3]} bytes" in msg


def test_checksum_valid_record_of_unknown_type_at_the_end_is_not_a_torn_tail(
    tmp_path: Path,
) -> None:
    """A record whose checksum is right was written whole: not a crash mid-write."""
    write_segment(tmp_path, 1, [1, 2], frame_record(b"\x90", rtype=99))
    with pytest.raises(CorruptLog) as info:
        recover(tmp_path)
    assert "unknown record type 99" in str(info.value)
    rec = recover(tmp_path, repair=True)
    assert ids_of(rec.records) == [1, 2] and len(rec.quarantined) == 1


def test_torn_first_record_leaves_an_empty_segment(tmp_path: Path) -> None:
    path = write_segment(tmp_path, 1, [], record(1)[:-1])
    rec = recover(tmp_path)
    assert rec.records == []
    assert path.stat().st_size == 0
    assert len(rec.truncated) == 1


def test_torn_tail_and_snapshot(tmp_path: Path) -> None:
    write_snapshot(tmp_path, 2, {"at": 2})
    path = write_segment(tmp_path, 2, [20], b"\x00\x00\x01")
    rec = recover(tmp_path)
    assert rec.snapshot == {"at": 2}
    assert ids_of(rec.records) == [20]
    assert path.stat().st_size == len(record(20))


# --------------------------------------------------------------------------- mid-log damage


def test_damaged_record_followed_by_valid_ones_refuses(tmp_path: Path) -> None:
    path = write_segment(tmp_path, 1, [1, 2, 3, 4])
    off = offsets(path)[1]
    flip(path, off + HEADER_SIZE + 10)  # inside record 2's payload
    before = dir_contents(tmp_path)
    with pytest.raises(CorruptLog) as info:
        recover(tmp_path)
    assert info.value.offset == off
    assert info.value.path == path
    assert str(path) in str(info.value)
    assert f"byte offset {off}" in str(info.value)
    assert "checksum mismatch" in str(info.value)
    assert dir_contents(tmp_path) == before  # nothing changed


def test_damaged_type_byte_refuses(tmp_path: Path) -> None:
    path = write_segment(tmp_path, 1, [1, 2, 3])
    off = offsets(path)[1]
    flip(path, off + 8)
    with pytest.raises(CorruptLog) as info:
        recover(tmp_path)
    assert info.value.offset == off


def test_damage_in_a_non_last_segment_refuses(tmp_path: Path) -> None:
    # a torn tail is only possible at the very end of the log
    seg1 = write_segment(tmp_path, 1, [1, 2], record(3)[:-4])
    write_segment(tmp_path, 2, [4, 5])
    before = dir_contents(tmp_path)
    with pytest.raises(CorruptLog) as info:
        recover(tmp_path)
    assert info.value.path == seg1
    good = len(record(1)) + len(record(2))
    assert f"{seg1}: damaged record at byte offset {good}" in str(info.value)
    assert dir_contents(tmp_path) == before


def test_checksum_damage_in_last_record_of_a_non_last_segment_refuses(tmp_path: Path) -> None:
    seg1 = write_segment(tmp_path, 1, [1, 2])
    flip(seg1, seg1.stat().st_size - 1)
    write_segment(tmp_path, 2, [3])
    with pytest.raises(CorruptLog) as info:
        recover(tmp_path)
    assert info.value.offset == len(record(1))


def test_undecodable_payload_refuses(tmp_path: Path) -> None:
    payload = b"\xc1"  # never-used msgpack byte, valid CRC
    path = write_segment(tmp_path, 1, [1], frame_record(payload) + record(2))
    with pytest.raises(CorruptLog) as info:
        recover(tmp_path)
    assert info.value.offset == len(record(1))
    assert str(path) in str(info.value)


def test_repair_replays_prefix_quarantines_and_continues(tmp_path: Path) -> None:
    seg1 = write_segment(tmp_path, 1, [1, 2, 3, 4])
    write_segment(tmp_path, 2, [5, 6])
    seg3 = write_segment(tmp_path, 3, [7])
    off = offsets(seg1)[2]
    flip(seg1, off + HEADER_SIZE + 5)  # record 3 of segment 1
    damaged = seg1.read_bytes()
    rec = recover(tmp_path, repair=True)
    # every valid record exactly once (1, 2, 4: only 3 is damaged), then every later
    # segment
    assert ids_of(rec.records) == [1, 2, 4, 5, 6, 7]
    assert not seg1.exists()
    corrupt = tmp_path / (seg1.stem + ".corrupt")
    assert corrupt.read_bytes() == damaged  # set aside unchanged
    assert len(rec.quarantined) == 1
    msg = rec.quarantined[0]
    assert seg1.name in msg and corrupt.name in msg and f"byte {off}" in msg
    assert "3 valid records, dropped 1 damaged" in msg
    assert rec.truncated == []
    assert rec.next_segment == 4
    assert seg3.exists()
    # a restart after the repair sees a clean log (the .corrupt file is ignored, kept)
    rec2 = recover(tmp_path)
    assert ids_of(rec2.records) == [5, 6, 7]
    assert corrupt.exists()


def test_repair_of_the_last_segment(tmp_path: Path) -> None:
    write_segment(tmp_path, 1, [1])
    seg2 = write_segment(tmp_path, 2, [2, 3, 4])
    flip(seg2, offsets(seg2)[1] + HEADER_SIZE + 3)
    rec = recover(tmp_path, repair=True)
    assert ids_of(rec.records) == [1, 2, 4]
    assert (tmp_path / (seg2.stem + ".corrupt")).exists()
    assert rec.next_segment == 3  # new appends never go to the quarantined index


def test_repair_still_truncates_a_torn_tail(tmp_path: Path) -> None:
    write_segment(tmp_path, 1, [1, 2])
    seg2 = write_segment(tmp_path, 2, [3], b"\x00" * 20)
    rec = recover(tmp_path, repair=True)
    assert ids_of(rec.records) == [1, 2, 3]
    assert rec.quarantined == [] and len(rec.truncated) == 1
    assert seg2.stat().st_size == len(record(3))


# --------------------------------------------------------------------------- write errors


class FailingWrite:
    """Stands in for os.write in broker.wal: on the store's fd, the first call writes part
    of the data, the second fails with ENOSPC; every other call is the real os.write."""

    def __init__(self, real: Any, fd: int) -> None:
        self.real = real
        self.fd = fd
        self.calls = 0
        self.armed = True

    def __call__(self, fd: int, data: Any) -> int:
        if fd != self.fd or not self.armed:
            return int(self.real(fd, data))
        self.calls += 1
        if self.calls == 1 and len(data) > 2:
            return int(self.real(fd, bytes(data)[: len(data) // 2]))  # a short write
        self.armed = False
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
async def test_write_error_fails_commit_truncates_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: str
) -> None:
    store = WalStore(tmp_path, 1, fsync=fsync, interval_ms=10)
    seg = tmp_path / seg_name(1)
    try:
        store.append(batch(1))
        assert await commit(store) is None
        good = seg.stat().st_size
        fake = FailingWrite(wal.os.write, store._fd)
        monkeypatch.setattr(wal.os, "write", fake)

        store.append(batch(2))
        store.append(batch(3))
        err = await commit(store)
        assert isinstance(err, OSError) and err.errno == errno.ENOSPC
        assert store.failed is err
        assert fake.calls == 2  # a short write, then the failure
        assert seg.stat().st_size == good  # no torn bytes left behind

        # while failed, a new commit waits for the retry instead of failing at once
        store.append(batch(4))
        t0 = time.monotonic()
        assert await commit(store) is None  # the fault cleared: the 1 s retry succeeds
        assert 0.5 < time.monotonic() - t0 < WAIT
        assert store.failed is None
        monkeypatch.undo()
    finally:
        store.close()
    rec = recover(tmp_path)
    assert ids_of(rec.records) == [1, 2, 3, 4]  # failed records kept and retried, once
    assert rec.truncated == []


async def test_write_error_retry_without_new_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = WalStore(tmp_path, 1, fsync="always")
    try:
        fake = FailingWrite(wal.os.write, store._fd)
        monkeypatch.setattr(wal.os, "write", fake)
        store.append(batch(1))
        err = await commit(store)
        assert isinstance(err, OSError)
        assert store.failed is err
        assert (tmp_path / seg_name(1)).stat().st_size == 0
        deadline = time.monotonic() + WAIT
        while store.failed is not None:
            assert time.monotonic() < deadline, "the store never retried the write"
            await asyncio.sleep(0.05)
    finally:
        store.close()
    assert ids_of(recover(tmp_path).records) == [1]


async def test_write_error_persisting_keeps_failing_until_cleared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = WalStore(tmp_path, 1, fsync="never")
    calls = 0
    real = wal.os.write

    def always_full(fd: int, data: Any) -> int:
        nonlocal calls
        if fd == store._fd:
            calls += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return int(real(fd, data))

    try:
        monkeypatch.setattr(wal.os, "write", always_full)
        store.append(batch(1))
        assert isinstance(await commit(store), OSError)
        store.append(batch(2))
        # the retry after 1 s fails again: this commit gets the error too
        assert isinstance(await commit(store), OSError)
        assert calls == 2
        assert store.failed is not None
        monkeypatch.undo()
        store.append(batch(3))
        assert await commit(store) is None
        assert store.failed is None
    finally:
        store.close()
    assert ids_of(recover(tmp_path).records) == [1, 2, 3]


async def test_write_error_in_a_batch_spanning_a_rotation_writes_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first segment's part of a batch is written, the next segment's write fails:
    the retry must not write the first part again (duplicate records would replay
    deliveries and publishes twice)."""
    store = WalStore(tmp_path, 1, fsync="always")
    real = wal.os.write
    state = {"fail": True}

    def fail_new_segment(fd: int, data: Any) -> int:
        if state["fail"] and store._file_index == 2:
            state["fail"] = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return int(real(fd, data))

    try:
        store.append(batch(1))
        assert await commit(store) is None
        monkeypatch.setattr(wal.os, "write", fail_new_segment)
        store.append(batch(2))
        store.rotate()
        store.append(batch(3))
        assert isinstance(await commit(store), OSError)
        store.append(batch(4))
        assert await commit(store) is None
        monkeypatch.undo()
    finally:
        store.close()
    rec = recover(tmp_path)
    assert ids_of(rec.records) == [1, 2, 3, 4]
    seg1 = [c for _, c in iter_segment(tmp_path / seg_name(1), last=False)]
    assert ids_of(seg1) == [1, 2]


async def test_failure_opening_the_next_segment_leaves_the_store_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = WalStore(tmp_path, 1, fsync="always")
    real_open = wal.os.open
    failures = []

    def flaky_open(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(seg_name(2)) and not failures:
            failures.append(path)
            raise OSError(errno.EMFILE, "Too many open files")
        return int(real_open(path, flags, *args))

    try:
        store.append(batch(1))
        assert await commit(store) is None
        monkeypatch.setattr(wal.os, "open", flaky_open)
        store.rotate()
        store.append(batch(2))
        err = await commit(store)
        assert isinstance(err, OSError) and err.errno == errno.EMFILE
        store.append(batch(3))
        assert await commit(store) is None  # the retry opens segment 2 and writes both
        assert store.failed is None
        monkeypatch.undo()
    finally:
        store.close()
    assert ids_of(recover(tmp_path).records) == [1, 2, 3]
    assert ids_of([c for _, c in iter_segment(tmp_path / seg_name(2), last=True)]) == [2, 3]


# --------------------------------------------------------------------------- via Durability


def test_repaired_state_survives_the_next_restart(tmp_path: Path) -> None:
    """--repair replays the valid records of a quarantined segment; that state must be made
    durable, since the next start no longer reads the *.corrupt file."""

    def pub(i: int) -> list[list[Any]]:
        return [["p", i, ["q"], "", "q", {}, f"m{i}".encode()]]

    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    framed = [
        frame_record(msgpack.packb(b, use_bin_type=True))
        for b in ([["qd", "q", False, {}]], pub(1), pub(2), pub(3))
    ]
    seg1 = wal_dir / seg_name(1)
    seg1.write_bytes(b"".join(framed))
    (wal_dir / seg_name(2)).write_bytes(frame_record(msgpack.packb(pub(4))))
    flip(seg1, len(framed[0]) + len(framed[1]) + len(framed[2]) - 2)  # inside pub(2)

    def queue_bodies(repair: bool) -> list[bytes]:
        d = Durability(Config(data_dir=str(tmp_path), repair=repair))
        try:
            broker = d.open()
            return [qm.message.body for qm in broker.queues["q"].iter_messages()]
        finally:
            d.close()

    with pytest.raises(CorruptLog):
        queue_bodies(repair=False)
    assert queue_bodies(repair=True) == [b"m1", b"m3", b"m4"]
    assert (wal_dir / (seg1.stem + ".corrupt")).exists()
    assert queue_bodies(repair=False) == [b"m1", b"m3", b"m4"]
    assert queue_bodies(repair=False) == [b"m1", b"m3", b"m4"]


@pytest.mark.parametrize("fsync", ["always", "never"])
async def test_segments_rotate_by_size_and_recover_in_order(tmp_path: Path, fsync: str) -> None:
    store = WalStore(tmp_path, 1, fsync=fsync, segment_bytes=4096)
    try:
        for i in range(1, 201):
            store.append([["p", i, ["q"], "", "q", {}, b"x" * 100]])
            if i % 7 == 0:
                assert await commit(store) is None
        assert await commit(store) is None
    finally:
        store.close()
    segs = sorted(tmp_path.glob("seg-*.log"))
    assert len(segs) > 3
    # every segment but the last is only slightly over the limit (one record past it)
    assert all(s.stat().st_size < 4096 + 200 for s in segs)
    streamed: list[list[object]] = []
    rec = recover(tmp_path, on_batch=streamed.append)
    assert rec.records == [] and rec.batches == 200
    assert [b[0][1] for b in streamed] == list(range(1, 201))
    assert rec.next_segment == len(segs) + 1


# --------------------------------------------------------------------------- snapshot generations


def pub(i: int) -> list[list[Any]]:
    return [["p", i, ["q"], "", "q", {}, f"m{i}".encode()]]


def queue_log(wal_dir: Path, ids: list[int]) -> None:
    wal_dir.mkdir(parents=True, exist_ok=True)
    (wal_dir / seg_name(1)).write_bytes(
        b"".join(
            frame_record(msgpack.packb(b, use_bin_type=True))
            for b in ([["qd", "q", False, {}]], *(pub(i) for i in ids))
        )
    )


def open_bodies(data_dir: Path, repair: bool = False) -> list[bytes]:
    d = Durability(Config(data_dir=str(data_dir), repair=repair))
    try:
        broker = d.open()
        bodies = [qm.message.body for qm in broker.queues["q"].iter_messages()]
        return [b for b in bodies if b is not None]  # small bodies: never paged out
    finally:
        d.close()


async def test_snapshots_keep_the_previous_generation(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    queue_log(wal_dir, [1, 2, 3])
    d = Durability(Config(data_dir=str(tmp_path)))
    d.open()
    try:
        first = await d.snapshot()
        assert (wal_dir / seg_name(1)).exists()  # no previous snapshot: the whole log stays
        second = await d.snapshot()
        # the first snapshot (and the log after it) stays until a newer one is verified
        assert sorted(wal_dir.glob("snap-*.snap")) == [first, second]
        assert not (wal_dir / seg_name(1)).exists()
        third = await d.snapshot()
        assert sorted(wal_dir.glob("snap-*.snap")) == [second, third]
    finally:
        d.close()
    flip(third, third.stat().st_size // 2)
    assert open_bodies(tmp_path) == [b"m1", b"m2", b"m3"]
    assert third.with_suffix(".corrupt").exists() and not third.exists()


async def test_a_snapshot_that_does_not_read_back_deletes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wal_dir = tmp_path / "wal"
    queue_log(wal_dir, [1, 2])
    d = Durability(Config(data_dir=str(tmp_path)))
    d.open()
    try:
        first = await d.snapshot()
        second = await d.snapshot()
        real = wal.write_snapshot

        def bad_write(*args: Any) -> tuple[Path, int]:
            path, size = real(*args)
            flip(path, size - 3)  # the disk returned something else than was written
            return path, size

        monkeypatch.setattr("conveyor.broker.durability.write_snapshot", bad_write)
        with pytest.raises(OSError, match="did not read back"):
            await d.snapshot()
        assert sorted(wal_dir.glob("snap-*.snap")) == [first, second]
        assert len(list(wal_dir.glob("snap-*.corrupt"))) == 1
    finally:
        d.close()
    assert open_bodies(tmp_path) == [b"m1", b"m2"]


def test_damaged_snapshot_without_a_fallback_refuses_then_repair_rebuilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data directory whose previous generation is gone: startup refuses; --repair keeps
    the snapshot's head and every entries record that checks out, and says what was lost."""
    monkeypatch.setattr(wal, "SNAP_CHUNK_BYTES", 200)
    head = {
        "next_id": 31,
        "exchanges": [],
        "bindings": [],
        "queues": [["q", False, {}]],
        "queue_messages": {"q": [[i, 0] for i in range(1, 31)]},
    }
    entries = [[i, "", "q", {}, 0, f"m{i}".encode() * 10] for i in range(1, 31)]
    write_segment(tmp_path / "wal", 5, [])
    path, _ = write_snapshot(tmp_path / "wal", 5, head, entries)
    recs = [off for off, _ in _snapshot_offsets(path)]
    flip(path, recs[2] + 20)  # inside the second entries record
    before = dir_contents(tmp_path / "wal")
    with pytest.raises(CorruptLog) as info:
        open_bodies(tmp_path)
    assert snap_name(5) in str(info.value) and "nothing to fall back on" in str(info.value)
    assert dir_contents(tmp_path / "wal") == before

    bodies = open_bodies(tmp_path, repair=True)
    assert 0 < len(bodies) < 30
    assert bodies == [
        f"m{i}".encode() * 10 for i in range(1, 31) if f"m{i}".encode() * 10 in bodies
    ]
    assert (tmp_path / "wal" / (path.stem + ".corrupt")).read_bytes() == before[path.name]
    assert open_bodies(tmp_path) == bodies  # the repaired state was snapshotted


def _snapshot_offsets(path: Path) -> list[tuple[int, int]]:
    """(offset, type) of each record of a snapshot file."""
    data = path.read_bytes()
    pos, out = len(wal.SNAP_MAGIC), []
    while pos < len(data):
        length, _crc, rtype = HEADER.unpack_from(data, pos)
        out.append((pos, rtype))
        pos += 8 + length
    return out


def test_damaged_snapshot_head_cannot_be_repaired(tmp_path: Path) -> None:
    write_segment(tmp_path / "wal", 5, [])
    path, _ = write_snapshot(tmp_path / "wal", 5, {"next_id": 1, "queues": []})
    flip(path, len(wal.SNAP_MAGIC) + HEADER_SIZE + 2)
    with pytest.raises(CorruptLog, match="cannot be rebuilt, even with --repair"):
        recover(tmp_path / "wal", repair=True)


# --------------------------------------------------------------------------- any single flip

FLIP_ROUNDS = int(os.environ.get("CONVEYOR_FLIP_ROUNDS", "60"))


@pytest.mark.parametrize("seed", range(3))
def test_any_flipped_byte_is_refused_or_cut_aside_never_lost(tmp_path: Path, seed: int) -> None:
    """Flip one byte anywhere in the newest segment: recovery either refuses naming the
    damaged record, or (in the last record only) cuts it off into a *.torn file; --repair
    then loses at most that record. CONVEYOR_FLIP_ROUNDS sets the rounds (60 here)."""
    rng = random.Random(seed)
    ids = list(range(1, 41))
    clean = b"".join(record(i) for i in ids)
    starts = [sum(len(record(i)) for i in ids[:k]) for k in range(len(ids))]
    for r in range(FLIP_ROUNDS):
        d = tmp_path / f"r{r}"
        path = write_segment(d, 1, [])
        at = rng.randrange(len(clean))
        damaged = bytearray(clean)
        damaged[at] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        victim = max(k for k, s in enumerate(starts) if s <= at)
        try:
            rec = recover(d)
        except CorruptLog as exc:
            assert exc.offset == starts[victim] and victim < len(ids) - 1, (at, exc)
            assert path.read_bytes() == bytes(damaged)
            got = ids_of(recover(d, repair=True).records)
            assert got in (ids, ids[:victim] + ids[victim + 1 :]), (at, got)
        else:
            assert victim == len(ids) - 1, at  # only the last record can be a torn tail
            assert ids_of(rec.records) == ids[:-1]
            assert torn_files(d) == {
                f"{path.name}.{starts[victim]}.torn": bytes(damaged[starts[victim] :])
            }
