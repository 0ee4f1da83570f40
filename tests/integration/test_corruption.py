"""Damaged logs with real broker processes: a torn tail after kill -9 is cut off and the
broker starts; damage in the middle of the log makes the broker refuse to start (naming
the segment and the byte offset) until it is started with --repair, which replays every
valid record around the damage and sets the segment aside; graceful restarts keep
everything; acks made durable by a later confirmed publish stay acked after kill -9."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from conveyor import client
from conveyor.broker.wal import HEADER, HEADER_SIZE, frame_record, iter_segment
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect, take

N_BATCHES = 6
PER_BATCH = 20

# --------------------------------------------------------------------------- helpers


def segments(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "wal").glob("seg-*.log"))


def wal_files(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((data_dir / "wal").iterdir())}


def bodies_for(batch: int) -> list[bytes]:
    return [f"b{batch}-m{i:03d}".encode() for i in range(PER_BATCH)]


ALL = [b for k in range(N_BATCHES) for b in bodies_for(k)]


async def publish_confirmed(b: BrokerProcess, queue: str = "q") -> None:
    """Declare ``queue`` and publish N_BATCHES confirmed batches of persistent messages
    (each awaited, so each lands in its own log records)."""
    conn = await connect(b.url)
    try:
        await conn.declare_queue(queue)
        for k in range(N_BATCHES):
            assert await conn.publish_batch(bodies_for(k), routing_key=queue) == PER_BATCH
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def queue_bodies(b: BrokerProcess, queue: str = "q") -> list[bytes]:
    """Every message in ``queue``, in order (taken with no-ack: the queue is drained)."""
    conn = await connect(b.url)
    try:
        out: list[bytes] = []
        while True:
            got = await conn.get(queue, 1000, no_ack=True)
            if not got:
                return out
            out.extend(m.body for m in got)
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


def published_in(commands: list[Any]) -> list[bytes]:
    return [cmd[6] for cmd in commands if cmd[0] == "p"]


def restart(data_dir: Path, *extra: str) -> tuple[BrokerProcess, str]:
    """Start a broker on ``data_dir``; returns it and the log text this start wrote."""
    b = BrokerProcess(data_dir, *extra)
    offset = len(b.log_text())
    b.start()
    return b, b.log_text()[offset:]


# --------------------------------------------------------------------------- torn tail

TAILS = {
    # an unconfirmed publish whose write was cut short by the crash
    "partial-record": frame_record(
        msgpack.packb([["p", 10**6, ["q"], "", "q", {}, b"never confirmed"]], use_bin_type=True)
    )[:-7],
    "partial-header": b"\x00\x00\x01",
    # blocks allocated by the file system but never written
    "zero-filled": bytes(8192),
}


@pytest.mark.parametrize("tail", TAILS.values(), ids=TAILS.keys())
async def test_torn_tail_is_truncated_and_confirmed_messages_survive(
    broker_factory: Callable[..., BrokerProcess], tail: bytes
) -> None:
    b = broker_factory()
    await publish_confirmed(b)
    b.kill()
    seg = segments(b.data_dir)[-1]
    good_size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(tail)

    b2, log = restart(b.data_dir)
    try:
        assert "torn tail" in log, log
        assert seg.name in log and f"truncated {len(tail)} bytes" in log, log
        assert seg.stat().st_size == good_size  # exactly the bytes that were not confirmed
        assert not list((b.data_dir / "wal").glob("*.corrupt"))
        assert await queue_bodies(b2) == ALL
    finally:
        b2.stop()
    # the repaired log is clean: the next start reports nothing (and the queue was drained)
    b3, log3 = restart(b.data_dir)
    try:
        assert "torn tail" not in log3
        assert await queue_bodies(b3) == []
    finally:
        b3.stop()


# --------------------------------------------------------------------------- mid-log damage


async def test_damage_mid_log_refuses_to_start_then_repair_quarantines(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory()
    await publish_confirmed(b)
    b.kill()
    (seg,) = segments(b.data_dir)
    records = list(iter_segment(seg, last=True))
    # an early record holding publishes, with valid records after it
    with_publishes = [i for i, (_off, cmds) in enumerate(records) if published_in(cmds)]
    victim = with_publishes[1]
    assert victim < len(records) - 2
    before = [body for _off, cmds in records[:victim] for body in published_in(cmds)]
    assert 0 < len(before) < len(ALL)
    assert ALL[: len(before)] == before
    lost = published_in(records[victim][1])
    kept = [body for body in ALL if body not in lost]
    off = records[victim][0]
    end = records[victim + 1][0]
    data = bytearray(seg.read_bytes())
    data[(off + HEADER_SIZE + end) // 2] ^= 0x5A  # the middle of the record's payload
    seg.write_bytes(bytes(data))
    damaged = wal_files(b.data_dir)

    b2 = BrokerProcess(b.data_dir)
    offset = len(b2.log_text())
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="broker did not start"):
        b2.start()
    assert time.monotonic() - t0 < 10
    assert b2.proc is not None and b2.proc.returncode not in (0, None)
    log = b2.log_text()[offset:]
    assert "refusing to start" in log, log
    assert str(seg) in log, log
    assert f"byte offset {off}" in log, log
    assert "--repair" in log
    assert wal_files(b.data_dir) == damaged  # nothing was changed

    b3, log3 = restart(b.data_dir, "--repair")
    try:
        assert "quarantined" in log3, log3
        assert seg.name in log3 and f"byte {off}" in log3, log3
        corrupt = seg.with_suffix(".corrupt")
        assert corrupt.read_bytes() == damaged[seg.name]  # set aside as it was
        assert not seg.exists()
        # every valid record is replayed, before and after the damaged one
        assert "dropped 1 damaged" in log3, log3
        assert await queue_bodies(b3) == kept
        # the repaired broker keeps working and its new log is clean
        conn = await connect(b3.url)
        await conn.publish_batch([b"after-repair"], routing_key="q")
        await conn.close()
    finally:
        b3.stop()
    b4, log4 = restart(b.data_dir)
    try:
        assert "quarantined" not in log4 and "torn tail" not in log4
        assert await queue_bodies(b4) == [b"after-repair"]
        assert corrupt.exists()  # never deleted
    finally:
        b4.stop()


async def test_damage_in_an_earlier_segment_refuses_to_start(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """A damaged record at the end of a segment that is not the last one is not a torn
    tail (later segments were written after it)."""
    b = broker_factory()
    await publish_confirmed(b)
    b.stop()  # graceful: the next start opens a new segment
    b2, _ = restart(b.data_dir)
    conn = await connect(b2.url)
    await conn.publish_batch([b"later"], routing_key="q")
    await conn.close()
    b2.kill()
    first, last = segments(b.data_dir)
    size = first.stat().st_size
    with open(first, "r+b") as f:
        f.truncate(size - 3)
    b3 = BrokerProcess(b.data_dir)
    offset = len(b3.log_text())
    with pytest.raises(RuntimeError):
        b3.start()
    log = b3.log_text()[offset:]
    assert str(first) in log and "damaged record at byte offset" in log, log
    assert first.stat().st_size == size - 3 and last.exists()


# --------------------------------------------------------------------------- graceful


async def test_graceful_restart_keeps_everything(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory()
    conn = await connect(b.url)
    await conn.declare_exchange("events", "topic")
    await conn.declare_queue("q")
    await conn.bind("events", "q", "order.*")
    for k in range(N_BATCHES):
        await conn.publish_batch(bodies_for(k), exchange="events", routing_key="order.new")
    consumer = await conn.consume("q", prefetch=10)
    got = await take(consumer, 10)
    conn.ack_all(got[:5])  # 5 acked, 5 held unacked when the broker stops
    await asyncio.sleep(0.2)
    assert b.stop() == 0  # SIGTERM: a clean exit
    with pytest.raises(client.ConnectionClosed):
        await asyncio.wait_for(conn.publish("", "q", b"x"), 2)
    await asyncio.wait_for(conn.close(), WAIT)

    b2, log = restart(b.data_dir)
    try:
        assert "torn tail" not in log and "quarantined" not in log
        conn2 = await connect(b2.url)
        bindings = await conn2.list("bindings")
        assert {"exchange": "events", "queue": "q", "routing_key": "order.*"} in bindings
        await conn2.publish("events", "order.paid", b"routed")
        await conn2.close()
        bodies = await queue_bodies(b2)
        assert bodies == [*ALL[5:], b"routed"]
    finally:
        b2.stop()


# --------------------------------------------------------------------------- acks


async def test_acks_followed_by_a_confirmed_publish_survive_kill9(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory()
    await publish_confirmed(b)
    conn = await connect(b.url)
    got = await conn.get("q", 50)  # pulled: nothing else gets delivered meanwhile
    assert [m.body for m in got] == ALL[:50]
    for m in got[:30]:
        m.ack()
    # a confirmed publish issued after the acks on the same connection: once it is
    # confirmed, the acks before it are on disk too
    await conn.publish("", "q", b"marker")
    b.kill()
    with pytest.raises(client.ConnectionClosed):
        await asyncio.wait_for(conn.publish("", "q", b"lost"), 2)
    await asyncio.wait_for(conn.close(), WAIT)

    b2, _ = restart(b.data_dir)
    try:
        conn2 = await connect(b2.url)
        c2 = await conn2.consume("q", prefetch=1000)
        msgs = await take(c2, len(ALL) - 30 + 1, ack=True)
        bodies = [m.body for m in msgs]
        assert bodies == [*ALL[30:], b"marker"]
        # the 20 delivered-but-unacked ones come back flagged, with their count
        assert [(m.redelivered, m.delivery_count) for m in msgs[:20]] == [(True, 2)] * 20
        assert all(not m.redelivered for m in msgs[20:])
        await conn2.close()
    finally:
        b2.stop()


# --------------------------------------------------------------------------- damage rules


def refused_start(data_dir: Path, *extra: str) -> str:
    """Start a broker that must refuse; returns the log text of that attempt."""
    b = BrokerProcess(data_dir, *extra)
    offset = len(b.log_text())
    with pytest.raises(RuntimeError, match="broker did not start"):
        b.start()
    assert b.proc is not None and b.proc.returncode not in (0, None)
    return b.log_text()[offset:]


async def test_flipped_length_byte_mid_newest_segment_refuses_then_repair_keeps_all(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """The damaged record looks like one running past the end of the file, but valid
    records follow it: refuse (naming file and offset) instead of truncating 90 confirmed
    messages away; --repair keeps the record, whose content is intact."""
    b = broker_factory()
    await publish_confirmed(b)  # 6 batches of 20: 120 confirmed messages
    b.kill()
    (seg,) = segments(b.data_dir)
    records = list(iter_segment(seg, last=True))
    victim = [i for i, (_o, cmds) in enumerate(records) if published_in(cmds)][1]
    off = records[victim][0]
    data = bytearray(seg.read_bytes())
    data[off + 1] ^= 0x01  # length + 65536: past the end of the file
    seg.write_bytes(bytes(data))
    damaged = wal_files(b.data_dir)

    log = refused_start(b.data_dir)
    assert "refusing to start" in log and "--repair" in log, log
    assert f"{seg}: damaged record at byte offset {off}" in log, log
    assert "valid records follow" in log, log
    assert wal_files(b.data_dir) == damaged  # nothing cut

    b3, log3 = restart(b.data_dir, "--repair")
    try:
        assert "length field was wrong" in log3 and "dropped 0 damaged" in log3, log3
        assert await queue_bodies(b3, "q") == ALL
    finally:
        b3.stop()
    assert seg.with_suffix(".corrupt").read_bytes() == damaged[seg.name]


NOT_A_RECORD = {
    "random-garbage": random.Random(5).randbytes(3000),
    "zeros": bytes(65536),
    "impossible-length": HEADER.pack(0xFFFFFF00, 12345, 1) + b"\x01" * 40,
}


@pytest.mark.parametrize("tail", NOT_A_RECORD.values(), ids=NOT_A_RECORD.keys())
async def test_bytes_that_are_no_record_after_the_last_one_are_cut_and_kept(
    broker_factory: Callable[..., BrokerProcess], tail: bytes
) -> None:
    """A power loss can leave anything after the last record: the broker starts by
    itself, cuts it off and keeps the cut bytes in a *.torn file."""
    b = broker_factory()
    await publish_confirmed(b)
    b.kill()
    seg = segments(b.data_dir)[-1]
    good = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(tail)
    b2, log = restart(b.data_dir)
    try:
        torn = b.data_dir / "wal" / f"{seg.name}.{good}.torn"
        assert f"torn tail at byte {good}" in log and torn.name in log, log
        assert torn.read_bytes() == tail
        assert seg.stat().st_size == good
        assert await queue_bodies(b2) == ALL
    finally:
        b2.stop()


def snapshot_lines(b: BrokerProcess) -> int:
    return b.log_text().count("verified;")


async def publish_in_generations(b: BrokerProcess) -> None:
    """Publish N_BATCHES confirmed batches, each followed by a snapshot (the broker runs
    with snapshot_interval_ms = 100), then kill -9 it."""
    conn = await connect(b.url)
    try:
        await conn.declare_queue("q")
        for k in range(N_BATCHES):
            before = snapshot_lines(b)
            assert await conn.publish_batch(bodies_for(k), routing_key="q") == PER_BATCH
            deadline = time.monotonic() + WAIT
            while snapshot_lines(b) == before and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert snapshot_lines(b) > before, b.log_text()[-2000:]
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
    b.kill()


def snapshotting_broker(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> BrokerProcess:
    cfg = tmp_path / "snap.toml"
    cfg.write_text("snapshot_interval_ms = 100\n")
    return broker_factory("--config", str(cfg))


async def test_damaged_newest_snapshot_falls_back_to_the_previous_one(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    b = snapshotting_broker(broker_factory, tmp_path)
    await publish_in_generations(b)
    wal = b.data_dir / "wal"
    snaps = sorted(wal.glob("snap-*.snap"))
    assert len(snaps) == 2  # the newest and the previous one, with the log after it
    newest = snaps[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x5A
    newest.write_bytes(bytes(data))

    b2, log = restart(b.data_dir)
    try:
        assert f"snapshot {newest.name} is damaged" in log, log
        assert f"recovered automatically from the previous snapshot {snaps[0].name}" in log
        assert newest.with_suffix(".corrupt").read_bytes() == bytes(data)  # kept aside
        assert await queue_bodies(b2) == ALL
    finally:
        b2.stop()
    b3, log3 = restart(b.data_dir)
    try:
        assert " is damaged" not in log3 and "torn tail" not in log3, log3
    finally:
        b3.stop()


# --------------------------------------------------------------------------- stream segments

STREAM_ARGS = {"queue_type": "stream", "stream_segment_bytes": 8192}


async def fill_stream(b: BrokerProcess, n: int = 300, segment_bytes: int = 8192) -> None:
    """``n`` confirmed messages in stream "s", 30 per publish (so in many records)."""
    conn = await connect(b.url)
    try:
        await conn.declare_queue(
            "s", arguments={**STREAM_ARGS, "stream_segment_bytes": segment_bytes}
        )
        for i in range(0, n, 30):
            bodies = [f"s{k:04d}".encode() + b"." * 60 for k in range(i, i + 30)]
            assert await conn.publish_batch(bodies, routing_key="s") == 30
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def stream_offsets(b: BrokerProcess, n: int) -> list[int]:
    """The offsets a reader from the first one gets (``n`` expected)."""
    conn = await connect(b.url)
    try:
        c = await conn.consume("s", prefetch=1000, arguments={"offset": "first"})
        got = await take(c, n)
        return [m.properties["headers"]["x-stream-offset"] for m in got]
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


def stream_segments(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("streams/*/*.seg"))


def record_starts(path: Path) -> list[int]:
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        out.append(pos)
        pos += 8 + int.from_bytes(data[pos : pos + 4], "big")
    return out


@pytest.mark.parametrize("where", ["older-payload", "newest-length"])
async def test_damaged_stream_segment_refuses_then_repair_is_defined(
    broker_factory: Callable[..., BrokerProcess], where: str
) -> None:
    b = broker_factory()
    # "newest": one large segment, so the damaged record has many valid ones after it
    await fill_stream(b, segment_bytes=8192 if where == "older-payload" else 1 << 20)
    b.kill()
    segs = stream_segments(b.data_dir)
    assert len(segs) >= (3 if where == "older-payload" else 1)
    seg = segs[0] if where == "older-payload" else segs[-1]
    starts = record_starts(seg)
    assert len(starts) >= 3
    off = starts[len(starts) // 2]
    data = bytearray(seg.read_bytes())
    if where == "older-payload":
        data[off + 20] ^= 0x5A
    else:
        data[off + 1] ^= 0x01  # the length field: seems to run past the end of the file
    seg.write_bytes(bytes(data))
    streams = {p: p.read_bytes() for p in sorted(b.data_dir.glob("streams/*/*"))}

    log = refused_start(b.data_dir)
    assert "refusing to start" in log and "--repair" in log, log
    assert f"{seg}: damaged record at byte offset {off}" in log, log
    assert {p: p.read_bytes() for p in sorted(b.data_dir.glob("streams/*/*"))} == streams

    b2, log2 = restart(b.data_dir, "--repair")
    try:
        assert f"stream segment {seg}: damaged at byte {off}" in log2, log2
        if where == "newest-length":  # the record's content is intact: nothing lost
            assert "nothing lost" in log2, log2
            assert await stream_offsets(b2, 300) == list(range(300))
        else:  # the damaged record's offsets are gone, and the log says which
            m = re.search(r"lost offsets (\d+)\.\.(\d+)", log2)
            assert m, log2
            lo, hi = int(m.group(1)), int(m.group(2))
            assert 0 < lo <= hi < 300
            expect = [i for i in range(300) if not lo <= i <= hi]
            assert await stream_offsets(b2, len(expect)) == expect
    finally:
        b2.stop()
    assert seg.with_name(seg.name + ".corrupt").read_bytes() == streams[seg]


@pytest.mark.parametrize("tail", NOT_A_RECORD.values(), ids=NOT_A_RECORD.keys())
async def test_bytes_after_the_last_stream_record_are_cut_and_kept(
    broker_factory: Callable[..., BrokerProcess], tail: bytes
) -> None:
    b = broker_factory()
    await fill_stream(b)
    b.kill()
    seg = stream_segments(b.data_dir)[-1]
    good = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(tail)
    b2, log = restart(b.data_dir)
    try:
        torn = seg.with_name(f"{seg.name}.{good}.torn")
        assert f"torn tail at byte {good}" in log and torn.name in log, log
        assert torn.read_bytes() == tail and seg.stat().st_size == good
        assert await stream_offsets(b2, 300) == list(range(300))
    finally:
        b2.stop()


async def test_damaged_snapshots_without_fallback_refuse_then_repair_rebuilds(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """Both generations' entries damaged: the start is refused, naming the newest
    snapshot; --repair rebuilds from its head and the log after it and counts the
    messages it could not get back (it no longer refuses the same way)."""
    b = snapshotting_broker(broker_factory, tmp_path)
    await publish_in_generations(b)
    wal = b.data_dir / "wal"
    snaps = sorted(wal.glob("snap-*.snap"))
    assert len(snaps) == 2
    for s in snaps:
        data = bytearray(s.read_bytes())
        data[len(data) // 2] ^= 0x5A  # inside the entries record, after the head
        s.write_bytes(bytes(data))
    damaged = wal_files(b.data_dir)

    log = refused_start(b.data_dir)
    assert f"{snaps[-1]}: damaged record at byte offset 0" in log, log
    assert "nothing to fall back on" in log and "--repair" in log, log
    assert wal_files(b.data_dir) == damaged

    b2, log2 = restart(b.data_dir, "--repair")
    try:
        assert "rebuilt from its intact records" in log2, log2
        m = re.search(r"--repair: (\d+) messages whose entries were in the damaged part", log2)
        assert m, log2
        bodies = await queue_bodies(b2)
        assert int(m.group(1)) + len(bodies) == len(ALL)
        assert bodies == [x for x in ALL if x in bodies]  # the rest, in order
    finally:
        b2.stop()
    assert (wal / (snaps[-1].stem + ".corrupt")).read_bytes() == damaged[snaps[-1].name]
