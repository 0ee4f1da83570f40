"""Write-ahead log: append-only segment files, group commit, snapshots, recovery reads.

Layout of ``<data-dir>/wal/``::

    seg-00000000000000000001.log   segments, in order; one is open for appends
    snap-00000000000000000007.snap snapshot covering every segment numbered < 7 (the
                                   previous one and the log after it are kept too)
    *.corrupt                      segments and snapshots set aside (never deleted)
    seg-...log.<offset>.torn       bytes cut off a torn tail at <offset> (never deleted)

Damage rules (recover()): damage is a torn tail only when no valid record follows it
in the newest segment; it is then cut off, the bytes kept in a ``*.torn`` file. Any
other damage refuses the start (CorruptLog) unless --repair, which keeps every valid
record and drops the damaged spans. A damaged snapshot falls back to the previous one.

Every record on disk is framed ``[u32 length][u32 crc32][u8 type][payload]`` (big-endian;
length counts type + payload; the CRC covers type + payload). A record's payload is one
msgpack array of commands (see ``broker.journal``): a batch, so a burst of publishes
costs one CRC and one write.

Group commit (``fsync="always"``): appends go to an in-memory buffer; a single writer
thread writes and fdatasyncs everything buffered so far while new appends accumulate, and
the commit callbacks of that batch (publisher confirms) run when it is on disk. So many
concurrent publishers share one fsync, and the event loop never blocks on the disk.
``interval`` writes at once (safe against a process crash) and fdatasyncs every N ms;
``never`` leaves flushing to the OS.

A write error (disk full, I/O error) truncates the segment back to its last good size,
fails that batch's callbacks, keeps its records and retries them every second; the broker
refuses new publishes meanwhile (resource-error) and resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from conveyor.broker.counters import FSYNC_BOUNDS_S, Buckets

log = logging.getLogger("conveyor.wal")

HEADER = struct.Struct(">IIB")
HEADER_SIZE = HEADER.size  # 9
REC_COMMANDS = 1
SNAP_MAGIC = b"CNVYSNP2"
SNAP_MAGIC_V1 = b"CNVYSNP1"  # still read
# Snapshot records (same framing as the log): the head (topology and per-queue indexes),
# message entries in chunks, and an end record holding the entry count; a snapshot
# without its end record is incomplete and ignored.
REC_SNAP_HEAD = 2
REC_SNAP_ENTRIES = 3
REC_SNAP_END = 4
SNAP_CHUNK_BYTES = 1 << 20
MAX_RECORD = 1 << 31
# Longest write_through waits for the writer thread to write the batch it holds.
WRITE_THROUGH_WAIT_S = 0.05
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack

Callback = Callable[[BaseException | None], None]


class CorruptLog(Exception):
    """Damage in the middle of the log: startup refuses unless --repair is given."""

    def __init__(
        self,
        path: Path,
        offset: int,
        why: str,
        hint: str = "start with --repair to replay every valid record and set the "
        "damaged file aside",
    ) -> None:
        super().__init__(f"{path}: damaged record at byte offset {offset}: {why}")
        self.path = path
        self.offset = offset
        self.hint = hint  # what the operator can do ("" when --repair cannot help)


def frame_record(payload: bytes, rtype: int = REC_COMMANDS) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(bytes([rtype])))
    return HEADER.pack(len(payload) + 1, crc, rtype) + payload


def seg_name(index: int) -> str:
    return f"seg-{index:020d}.log"


def snap_name(index: int) -> str:
    return f"snap-{index:020d}.snap"


def _index(name: str) -> int:
    return int(name.split("-", 1)[1].split(".", 1)[0])


# ---------------------------------------------------------------------- reading


def check_record(data: bytes | memoryview, pos: int, types: tuple[int, ...]) -> tuple[str, int]:
    """Whether a record starts at ``pos``: ("", its total size) if its header, CRC and type
    check out, else (why not, 0)."""
    end = len(data)
    if end - pos < HEADER_SIZE:
        return "incomplete header", 0
    length, crc, rtype = HEADER.unpack_from(data, pos)
    if length == 0 and not any(data[pos:]):
        return "zero-filled tail", 0
    if length < 1 or length > MAX_RECORD:
        return f"impossible length {length}", 0
    if pos + 8 + length > end:
        return "record runs past end of file", 0
    if zlib.crc32(data[pos + 8 : pos + 8 + length]) != crc:
        return "checksum mismatch", 0
    if rtype not in types:
        return f"unknown record type {rtype}", 0
    return "", 8 + length


def is_written(why: str) -> bool:
    """A record whose checksum is right was written whole: whatever is wrong with it (an
    unknown type, an undecodable payload) is not a torn write."""
    return why.startswith(("unknown record type", "undecodable payload"))


def find_record(
    data: bytes | memoryview, start: int, types: tuple[int, ...], *, chained: bool = False
) -> int | None:
    """Position of the first valid record (header, CRC and type) at or after ``start``, or
    None. Candidates are found by their type byte, so zeros and most garbage are skipped
    at memchr speed, and only one with a plausible length costs a CRC. ``chained``: only
    candidates that end at the end of the data or right before another plausible header
    (see ``followed_at``)."""
    raw = data if isinstance(data, bytes) else bytes(data)
    view = memoryview(raw)
    end = len(raw)
    best: int | None = None
    for rtype in types:
        marker = bytes([rtype])
        i = raw.find(marker, start + 8)
        while i != -1:
            pos = i - 8
            if best is not None and pos >= best:
                break
            length, crc, _t = HEADER.unpack_from(raw, pos)
            stop = pos + 8 + length
            if (
                1 <= length <= end - pos - 8
                and (
                    not chained
                    or stop == end
                    or (
                        end - stop >= HEADER_SIZE
                        and raw[stop + 8] in types
                        and 1 <= int.from_bytes(raw[stop : stop + 4], "big") <= end - stop - 8
                    )
                )
                and zlib.crc32(view[i:stop]) == crc
            ):
                best = pos
                break
            i = raw.find(marker, i + 1)
    return best


def followed_at(data: bytes | memoryview, pos: int, types: tuple[int, ...]) -> int | None:
    """Where a valid record follows damage at ``pos`` (None: nothing valid after it, so a
    torn tail if this is the last segment). Chained candidates are tried first: inside a
    large damaged record of random bytes that skips nearly every CRC, and the next real
    record is almost always followed by another one; the full search runs if that finds
    nothing."""
    nxt = find_record(data, pos + 1, types, chained=True)
    return nxt if nxt is not None else find_record(data, pos + 1, types)


@dataclass
class Damage:
    """One damaged span of a segment: from ``offset`` to ``end`` (the next valid record,
    or the end of the file). ``salvaged``: the span is one record whose length field
    alone was wrong (its checksum matches the span), so nothing in it was lost."""

    offset: int
    end: int
    why: str
    salvaged: bool = False

    def describe(self) -> str:
        if self.salvaged:
            return (
                f"byte {self.offset}: {self.why}; the record's length field was wrong, "
                f"its content checks out and was kept"
            )
        return f"byte {self.offset}: {self.why}; dropped {self.end - self.offset} bytes"


def resync(
    data: bytes | memoryview, pos: int, why: str, types: tuple[int, ...], size: int = 0
) -> Damage:
    """The damaged span starting at ``pos``: up to the next valid record (``size``: the
    damaged record's own size when its checksum was valid, so it is skipped whole)."""
    if size:
        return Damage(pos, pos + size, why)
    nxt = find_record(data, pos + 1, types)
    end = len(data) if nxt is None else nxt
    d = Damage(pos, end, why)
    if nxt is not None and end - pos > HEADER_SIZE:
        _length, crc, rtype = HEADER.unpack_from(data, pos)
        if rtype in types and zlib.crc32(data[pos + 8 : end]) == crc:
            d.salvaged = True
    return d


def reframe(data: bytes | memoryview, d: Damage) -> bytes:
    """A salvaged span as a record again, with its length field corrected."""
    _length, crc, rtype = HEADER.unpack_from(data, d.offset)
    return HEADER.pack(d.end - d.offset - 8, crc, rtype) + bytes(data[d.offset + 9 : d.end])


def keep_torn(path: Path, offset: int, data: bytes | memoryview) -> Path:
    """Save the bytes cut off a torn tail next to the segment (``<name>.<offset>.torn``,
    never overwriting an earlier one) and fsync them before the segment is truncated, so
    a truncation destroys nothing."""
    n = 0
    while True:
        dest = path.with_name(f"{path.name}.{offset}{f'-{n}' if n else ''}.torn")
        if not dest.exists():
            break
        n += 1
    with open(dest, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)
    return dest


def cut_torn_tail(path: Path, offset: int, data: bytes | memoryview) -> Path:
    """Keep the bytes from ``offset`` on aside (``keep_torn``), then truncate there."""
    dest = keep_torn(path, offset, data[offset:])
    with open(path, "r+b") as f:
        f.truncate(offset)
        os.fsync(f.fileno())
    return dest


_COMMAND_TYPES = (REC_COMMANDS,)


def iter_segment(
    path: Path, *, last: bool, damage: list[Damage] | None = None
) -> Iterator[tuple[int, list[Any]]]:
    """Yield (offset, commands) per valid record.

    Damage is a torn tail (a crash mid-write) only when no valid record follows it in the
    segment and the segment is the last one: iteration then stops by raising _TornTail
    with its offset (recover() cuts it off and keeps the bytes aside). Any other damage
    raises CorruptLog naming the file and offset, unless ``damage`` is given (--repair):
    then each damaged span is recorded there and skipped, a record whose length field
    alone was damaged is yielded whole, and iteration goes on with the next valid record.
    """
    data = path.read_bytes()
    end = len(data)
    pos = 0
    while pos < end:
        why, size = check_record(data, pos, _COMMAND_TYPES)
        commands: Any = None
        if not why:
            try:
                commands = msgpack.unpackb(
                    data[pos + 9 : pos + size], raw=False, strict_map_key=False
                )
            except (ValueError, msgpack.UnpackException) as exc:
                why = f"undecodable payload ({exc})"
        if not why:
            yield pos, commands
            pos += size
            continue
        written = is_written(why)
        rec_size = int(HEADER.unpack_from(data, pos)[0]) + 8 if written else 0
        nxt = None if written else followed_at(data, pos, _COMMAND_TYPES)
        if last and not written and nxt is None:
            raise _TornTail(pos, why)
        if damage is None:
            detail = why if nxt is None else f"{why}; valid records follow at byte {nxt}"
            raise CorruptLog(path, pos, detail)
        d = resync(data, pos, why, _COMMAND_TYPES, rec_size)
        damage.append(d)
        if d.salvaged:
            try:
                commands = msgpack.unpackb(data[pos + 9 : d.end], raw=False, strict_map_key=False)
            except (ValueError, msgpack.UnpackException):
                d.salvaged = False
            else:
                yield pos, commands
        pos = d.end


class _TornTail(Exception):
    def __init__(self, offset: int, why: str) -> None:
        super().__init__(why)
        self.offset = offset
        self.why = why


def _snapshot_records(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (type, payload) of each record of a snapshot file; ValueError if damaged."""
    with open(path, "rb") as f:
        if f.read(len(SNAP_MAGIC)) != SNAP_MAGIC:
            raise ValueError("bad magic")
        while True:
            header = f.read(HEADER_SIZE)
            if not header:
                raise ValueError("no end record (truncated)")
            if len(header) < HEADER_SIZE:
                raise ValueError("incomplete header")
            length, crc, rtype = HEADER.unpack(header)
            if not 1 <= length <= MAX_RECORD:
                raise ValueError(f"impossible length {length}")
            payload = f.read(length - 1)
            if len(payload) != length - 1:
                raise ValueError("record runs past end of file")
            if zlib.crc32(payload, zlib.crc32(bytes([rtype]))) != crc:
                raise ValueError("checksum mismatch")
            yield rtype, payload
            if rtype == REC_SNAP_END:
                return


def _unpack(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


def iter_snapshot(path: Path) -> tuple[Any, Iterator[list[Any]]]:
    """Verify a snapshot (every checksum and the end record), then return its head and an
    iterator over its message entries, read a chunk at a time (a backlog larger than
    memory stays on disk). Raises ValueError if the file is damaged."""
    with open(path, "rb") as f:
        magic = f.read(len(SNAP_MAGIC))
    if magic == SNAP_MAGIC_V1:
        return _read_v1(path)
    head: Any = None
    count = 0
    for rtype, payload in _snapshot_records(path):
        if rtype == REC_SNAP_HEAD:
            head = _unpack(payload)
        elif rtype == REC_SNAP_END:
            count = _unpack(payload)
        elif rtype != REC_SNAP_ENTRIES:
            raise ValueError(f"unknown record type {rtype}")
    if head is None:
        raise ValueError("no head record")

    def entries() -> Iterator[list[Any]]:
        seen = 0
        for rtype, payload in _snapshot_records(path):
            if rtype == REC_SNAP_ENTRIES:
                chunk = _unpack(payload)
                seen += len(chunk)
                yield from chunk
        if seen != count:
            raise ValueError(f"snapshot changed while read ({seen} of {count} entries)")

    return head, entries()


def _read_v1(path: Path) -> tuple[Any, Iterator[list[Any]]]:
    """Snapshots before format 2: one checksummed msgpack map holding "messages"."""
    data = path.read_bytes()
    if len(data) < 12:
        raise ValueError("bad magic")
    (crc,) = struct.unpack_from(">I", data, 8)
    if zlib.crc32(data[12:]) != crc:
        raise ValueError("checksum mismatch")
    head = _unpack(data[12:])
    return head, iter(head.pop("messages", []))


def verify_snapshot(path: Path) -> int:
    """Read a snapshot just written back from disk, every record and entry (ValueError if
    it does not check out); returns its entry count. Older snapshots are deleted only
    once a newer one passed this."""
    _head, entries = iter_snapshot(path)
    return sum(1 for _ in entries)


def read_snapshot(path: Path) -> Any:
    """Decode a whole snapshot: its head, with the entries (if any) under "entries"."""
    head, entries = iter_snapshot(path)
    rest = list(entries)
    if rest:
        head = dict(head, entries=rest)
    return head


@dataclass
class Recovered:
    snapshot: Any | None  # None also when it was handed to ``on_snapshot``
    records: list[list[Any]]  # command batches after the snapshot (empty with on_batch)
    next_segment: int
    truncated: list[str]
    quarantined: list[str]
    bytes_replayed: int
    batches: int = 0
    had_snapshot: bool = False
    snapshot_index: int = 0  # the snapshot recovery started from (0: none)
    fell_back: list[str] = field(default_factory=list)  # damaged snapshots skipped


_SNAP_TYPES = (REC_SNAP_HEAD, REC_SNAP_ENTRIES, REC_SNAP_END)


def salvage_snapshot(path: Path) -> tuple[Any, list[list[Any]], list[Damage]]:
    """--repair of a damaged snapshot with nothing to fall back on: its head and every
    entries record that still checks out (damaged spans are skipped as in a segment).
    Raises CorruptLog when the head itself is lost: without it nothing can be rebuilt."""
    data = path.read_bytes()
    damage: list[Damage] = []
    pos = len(SNAP_MAGIC)
    if data[:pos] != SNAP_MAGIC:
        damage.append(Damage(0, pos, "bad magic"))
    head: Any = None
    entries: list[list[Any]] = []
    while pos < len(data):
        why, size = check_record(data, pos, _SNAP_TYPES)
        if why:
            d = resync(data, pos, why, _SNAP_TYPES)
            damage.append(d)
            if not d.salvaged:
                pos = d.end
                continue
            size = d.end - pos
        rtype = data[pos + 8]
        try:
            obj = _unpack(data[pos + 9 : pos + size])
        except (ValueError, msgpack.UnpackException) as exc:
            damage.append(Damage(pos, pos + size, f"undecodable payload ({exc})"))
            obj = None
        else:
            if rtype == REC_SNAP_HEAD and head is None:
                head = obj
            elif rtype == REC_SNAP_ENTRIES:
                entries.extend(obj)
            elif rtype == REC_SNAP_END:
                break
        pos += size
    if head is None:
        at = damage[0].offset if damage else 0
        raise CorruptLog(
            path,
            at,
            "the snapshot's head record (topology and queue "
            "indexes) is damaged: it cannot be rebuilt, even with --repair",
            "restore the data directory from a backup",
        )
    return head, entries, damage


def _log_is_complete(segs: list[Path], start: int, has_snapshots: bool) -> str:
    """Why the segments from ``start`` cannot rebuild the state, or "" if they can (all
    present, none missing in between)."""
    indexes = [_index(p.name) for p in segs if _index(p.name) >= start]
    if start == 1 and has_snapshots and (not segs or _index(segs[0].name) > 1):
        return "no readable snapshot and the log it covered is gone"
    if start > 1 and indexes and indexes[0] != start:
        return f"segment {start} (first after the snapshot) is missing"
    for a, b in itertools.pairwise(indexes):
        if b != a + 1:
            return f"segment {a + 1} is missing"
    return ""


def recover(
    wal_dir: Path,
    *,
    repair: bool = False,
    on_snapshot: Callable[[Any, Iterator[list[Any]]], None] | None = None,
    on_batch: Callable[[list[Any]], None] | None = None,
) -> Recovered:
    """Read the newest valid snapshot and every later segment; fix a torn tail.

    A damaged snapshot is skipped for the previous one (the broker keeps it and the log
    after it until a newer snapshot is verified), automatically: replaying that longer
    log gives the same state. The damaged file is set aside as ``*.corrupt`` once
    recovery succeeds. With no usable fallback the start is refused; --repair then
    rebuilds what the damaged snapshot still holds.

    With ``on_snapshot`` / ``on_batch`` the snapshot and each command batch are handed
    over as they are read (in order, snapshot first) instead of being collected, so
    recovery holds one segment in memory at a time rather than the whole log.
    """
    wal_dir.mkdir(parents=True, exist_ok=True)
    segs = sorted((p for p in wal_dir.glob("seg-*.log")), key=lambda p: _index(p.name))
    snaps = sorted((p for p in wal_dir.glob("snap-*.snap")), key=lambda p: _index(p.name))
    for p in wal_dir.glob("*.tmp"):
        p.unlink()  # an interrupted snapshot
    snapshot = None
    entries: Iterator[list[Any]] = iter(())
    start = 1
    damaged: list[tuple[Path, str]] = []
    for sp in reversed(snaps):
        try:
            if on_snapshot is None:
                snapshot = read_snapshot(sp)
            else:
                snapshot, entries = iter_snapshot(sp)
            start = _index(sp.name)
            break
        except (OSError, ValueError) as exc:
            log.error("snapshot %s is unreadable (%s); trying an older one", sp, exc)
            damaged.append((sp, str(exc)))
    quarantined: list[str] = []
    gap = _log_is_complete(segs, start, bool(snaps))
    rebuilt: Path | None = None
    if gap and damaged:
        # No fallback for the newest damaged snapshot: refuse, or rebuild from it.
        newest, why = damaged[0]
        if not repair:
            raise CorruptLog(newest, 0, f"{why}; nothing to fall back on: {gap}")
        rebuilt = newest
        head, salvaged, snap_spans = salvage_snapshot(newest)
        snapshot, entries, start = head, iter(salvaged), _index(newest.name)
        if on_snapshot is None:
            snapshot = dict(head, entries=salvaged)
        msg = (
            f"{newest.name}: damaged ({why}) and nothing to fall back on; rebuilt from "
            f"its intact records ({len(salvaged)} message entries kept; "
            + "; ".join(d.describe() for d in snap_spans)
            + ")"
        )
        log.error(msg)
        quarantined.append(msg)
        damaged = [(newest, why)]
        gap = _log_is_complete(segs, start, True)
    if gap:
        if not repair:
            raise CorruptLog(wal_dir / (snap_name(start) if start > 1 else seg_name(1)), 0, gap)
        msg = f"--repair: {gap}; replaying the segments that exist"
        log.error(msg)
        quarantined.append(msg)
    live = [p for p in segs if _index(p.name) >= start]
    had_snapshot = snapshot is not None
    if on_snapshot is not None and snapshot is not None:
        try:
            on_snapshot(snapshot, entries)
        except ValueError as exc:  # the file changed under us after it was verified
            raise CorruptLog(wal_dir / snap_name(start), 0, str(exc)) from None
        snapshot = None
    records: list[list[Any]] = []
    sink = records.append if on_batch is None else on_batch
    batches = 0
    truncated: list[str] = []
    total = 0
    for i, path in enumerate(live):
        last = i == len(live) - 1
        in_segment = 0
        spans: list[Damage] | None = [] if repair else None
        try:
            for _off, commands in iter_segment(path, last=last, damage=spans):
                sink(commands)
                in_segment += 1
            total += path.stat().st_size
        except _TornTail as torn:
            size = path.stat().st_size
            kept = cut_torn_tail(path, torn.offset, path.read_bytes())
            msg = (
                f"{path.name}: torn tail at byte {torn.offset} ({torn.why}); truncated "
                f"{size - torn.offset} bytes (kept in {kept.name})"
            )
            log.warning(msg)
            truncated.append(msg)
            total += torn.offset
        finally:
            batches += in_segment
        if spans:
            # Every valid record of the segment was replayed; set the file aside as it
            # was (Durability then snapshots the repaired state).
            dest = path.with_suffix(".corrupt")
            path.rename(dest)
            dropped = sum(1 for d in spans if not d.salvaged)
            msg = (
                f"{path.name}: damaged at byte {spans[0].offset}; replayed the "
                f"{in_segment} valid records, dropped {dropped} damaged ones ("
                + "; ".join(d.describe() for d in spans)
                + f") and quarantined the file as {dest.name}"
            )
            log.error(msg)
            quarantined.append(msg)
    fell_back: list[str] = []
    for sp, why in damaged:
        dest = sp.with_suffix(".corrupt")
        sp.rename(dest)
        if sp != rebuilt:
            msg = (
                f"snapshot {sp.name} is damaged ({why}); recovered automatically from "
                + (
                    f"the previous snapshot {snap_name(start)}"
                    if had_snapshot and start < _index(sp.name)
                    else "the start of the log"
                )
                + f" and the log after it; the damaged file is kept as {dest.name}"
            )
            log.warning(msg)
            fell_back.append(msg)
    next_seg = max([_index(p.name) for p in segs] + [start - 1, 0]) + 1
    return Recovered(
        snapshot,
        records,
        next_seg,
        truncated,
        quarantined,
        total,
        batches,
        had_snapshot,
        start if had_snapshot else 0,
        fell_back,
    )


# ---------------------------------------------------------------------- writing


class WalStore:
    """The durable Store: see the module docstring."""

    def __init__(
        self,
        wal_dir: Path,
        next_segment: int,
        *,
        fsync: str = "always",
        interval_ms: int = 100,
        segment_bytes: int = 64 << 20,
    ) -> None:
        if fsync not in ("always", "interval", "never"):
            raise ValueError(f"unknown fsync policy {fsync!r}")
        self.dir = wal_dir
        self.fsync = fsync
        self.interval_ms = interval_ms
        self.segment_bytes = segment_bytes
        self.seg_index = next_segment
        self._file_index = next_segment
        self._fd = self._open(next_segment)
        self._size = 0
        self._pending: list[tuple[int, bytes]] = []  # (segment index, framed record)
        self._callbacks: list[Callback] = []
        self._busy = False
        # The batch handed to the writer thread, until it takes the lock (see close()).
        self._inflight: list[tuple[int, bytes]] | None = None
        self._inflight_written = False
        # Held while a batch is written: close() waits for the writer thread with it.
        self._io_lock = threading.RLock()
        self._kick_scheduled = False
        # Set once the writer thread has written (not yet synced) the batch it was handed:
        # from then on write_through may write after it, in order.
        self._batch_written = threading.Event()
        self._batch_written.set()
        # Records written to the OS by write_through that no fdatasync covers yet.
        self._unsynced = False
        self.failed: BaseException | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.bytes_since_snapshot = 0
        # Told the bytes of each appended batch (the disk-free guard, broker.flow).
        self.wrote: Callable[[int], None] | None = None
        self._seg_bytes = 0  # bytes appended to segment ``seg_index``
        self.closed = False
        # counters for operations and tests
        self.fsyncs = 0
        self.records_written = 0
        self.fsync_seconds = 0.0
        # per-fdatasync durations (broker.metrics); written by the writer thread
        self.fsync_hist = Buckets(FSYNC_BOUNDS_S)

    def _open(self, index: int) -> int:
        path = self.dir / seg_name(index)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fsync_dir(self.dir)
        return fd

    # ------------------------------------------------------------------ Store API
    def append(self, records: Iterable[Any]) -> None:
        batch = list(records)
        if not batch or self.closed:
            return
        data = frame_record(_packb(batch))
        if self._seg_bytes >= self.segment_bytes:
            self.seg_index += 1  # segments stay bounded: recovery reads one at a time
            self._seg_bytes = 0
        self._pending.append((self.seg_index, data))
        self._seg_bytes += len(data)
        self.bytes_since_snapshot += len(data)
        if self.wrote is not None:
            self.wrote(len(data))
        self._schedule()

    def commit(self, callback: Callback) -> None:
        if self.closed:
            callback(ConnectionError("store closed"))
            return
        if (
            not self._pending
            and not self._busy
            and not self._callbacks
            and self.failed is None
            and not self._unsynced
        ):
            # Nothing appended since the last write completed: all of it is already
            # durable (transient publishes, for one), so confirm without a disk round.
            callback(None)
            return
        self._callbacks.append(callback)
        self._schedule()

    def write_through(self) -> None:
        """Write the records appended so far to the OS now, without fsync: called before
        deliveries go to the socket, so a process crash (which keeps the page cache)
        never loses the record of a delivery the consumer already has. Commits still
        wait for an fdatasync. Records stay with the writer thread (written a moment
        later) if it has not yet written the batch it holds (order first: waits at most
        WRITE_THROUGH_WAIT_S), if they start a new segment, or while writes fail."""
        if not self._pending or self.closed or self.failed is not None:
            return
        if self._busy and not self._batch_written.wait(WRITE_THROUGH_WAIT_S):
            return
        batch = self._pending
        if any(index != self._file_index for index, _ in batch):
            return  # the writer thread opens the new segment (its fsync off the loop)
        self._pending = []
        try:
            if self._busy:  # the writer thread only syncs now; it holds the lock for that
                self._write_locked(batch, sync=False)
            else:
                with self._io_lock:
                    self._write_locked(batch, sync=False)
        except OSError:
            self._pending[:0] = batch  # what is left: the writer retries and reports
            return
        if self.fsync == "always":
            self._unsynced = True
        elif self.fsync == "interval" and self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.interval_ms / 1000, self._interval_sync)

    def close(self) -> None:
        """Write and fsync everything pending (synchronously), then close."""
        if self.closed:
            return
        for h in (self._retry, self._timer):
            if h is not None:
                h.cancel()
        with self._io_lock:  # a batch in flight in the writer thread finishes first
            # A batch handed to the writer thread that has not taken the lock yet is
            # written here, ahead of the pending records (it would find the store closed).
            inflight = self._inflight
            todo = (inflight or []) + self._pending
            if todo:
                try:
                    self._write_batch(list(todo), sync=True)
                    self._pending = []
                    self._inflight_written = inflight is not None
                except OSError as exc:
                    log.error("could not write the log on shutdown: %s", exc)
            cbs, self._callbacks = self._callbacks, []
            for cb in cbs:
                cb(None if not self._pending else ConnectionError("store closed"))
            self.closed = True
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)

    # ------------------------------------------------------------------ rotation
    def rotate(self) -> int:
        """Start a new segment for records appended from now on; returns its index."""
        self.seg_index += 1
        self._seg_bytes = 0
        self.bytes_since_snapshot = 0
        return self.seg_index

    def delete_segments_before(self, index: int) -> int:
        n = 0
        for p in self.dir.glob("seg-*.log"):
            if _index(p.name) < index and _index(p.name) < self._file_index:
                p.unlink()
                n += 1
        for p in self.dir.glob("snap-*.snap"):
            if _index(p.name) < index:
                p.unlink()
        _fsync_dir(self.dir)
        return n

    # ------------------------------------------------------------------ writer
    def _schedule(self) -> None:
        if not self._kick_scheduled and not self._busy:
            self._kick_scheduled = True
            asyncio.get_running_loop().call_soon(self._kick)

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self._busy or self.closed or (not self._pending and not self._callbacks):
            return
        if self.failed is not None and self._retry is not None:
            return  # waiting for the retry timer
        batch, self._pending = self._pending, []
        cbs, self._callbacks = self._callbacks, []
        if not batch and self.failed is None and not self._unsynced:
            # These callbacks' records were in the batch that just completed.
            for cb in cbs:
                cb(None)
            return
        if self.fsync == "always":
            self._busy = True
            self._unsynced = False  # this batch's fdatasync covers what write_through wrote
            self._batch_written.clear()
            self._inflight = batch
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(None, self._write_batch, batch, True)
            fut.add_done_callback(lambda f: self._done(f, batch, cbs))
            return
        try:
            self._write_batch(batch, sync=False)
        except OSError as exc:
            self._failed(exc, batch, cbs)
            return
        self._ok(cbs)
        if self.fsync == "interval" and self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.interval_ms / 1000, self._interval_sync)

    def _done(
        self, fut: asyncio.Future[None], batch: list[tuple[int, bytes]], cbs: list[Callback]
    ) -> None:
        self._busy = False
        self._batch_written.set()
        exc = fut.exception()
        if exc is not None:
            self._failed(exc, batch, cbs)
        else:
            self._ok(cbs)
        if self._pending or self._callbacks:
            self._schedule()

    def _ok(self, cbs: list[Callback]) -> None:
        if self.failed is not None:
            log.warning("the log is writable again; accepting publishes")
            self.failed = None
        for cb in cbs:
            cb(None)

    def _failed(
        self, exc: BaseException, batch: list[tuple[int, bytes]], cbs: list[Callback]
    ) -> None:
        if self.failed is None:
            log.error("write to the log failed (%s); refusing publishes until it succeeds", exc)
        self.failed = exc
        if self.fsync == "always":
            self._unsynced = True  # what was written may not be synced: sync on the retry
        self._pending[:0] = batch  # keep the records; retried in order
        for cb in cbs:
            cb(exc)
        loop = asyncio.get_running_loop()
        self._retry = loop.call_later(1.0, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._schedule()

    def _interval_sync(self) -> None:
        self._timer = None
        if not self.closed:
            t = time.monotonic()
            try:
                os.fdatasync(self._fd)
                self.fsyncs += 1
            except OSError as exc:
                log.error("fdatasync failed: %s", exc)
            dt = time.monotonic() - t
            self.fsync_seconds += dt
            self.fsync_hist.observe(dt)

    def _write_batch(self, batch: list[tuple[int, bytes]], sync: bool) -> None:
        """Write (and optionally fdatasync) a batch; runs in the writer thread for 'always'."""
        with self._io_lock:
            if batch is self._inflight:
                self._inflight = None
                if self._inflight_written:
                    return  # close() wrote it while this thread waited for the lock
            if self.closed:
                raise ConnectionError("store closed")
            self._write_locked(batch, sync)

    def _write_locked(self, batch: list[tuple[int, bytes]], sync: bool) -> None:
        i = 0
        while i < len(batch):
            index = batch[i][0]
            j = i
            while j < len(batch) and batch[j][0] == index:
                j += 1
            data = b"".join(d for _, d in batch[i:j])
            try:
                if index != self._file_index:
                    os.fsync(self._fd)
                    fd = self._open(index)  # before closing the old one: a failure here
                    os.close(self._fd)  # leaves the store on a valid fd for the retry
                    self._fd = fd
                    self._file_index = index
                    self._size = 0
                try:
                    _write_all(self._fd, data)
                except OSError:
                    # Leave no torn record behind: cut back to the last good size.
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fd, self._size)
                    raise
            except OSError:
                # The earlier segments' records are written: the retry must not write
                # them again (the caller re-queues what is left in ``batch``).
                del batch[:i]
                raise
            self._size += len(data)
            self.records_written += j - i
            i = j
        self._batch_written.set()  # written; only the fdatasync is left
        if sync:
            t = time.monotonic()
            os.fdatasync(self._fd)
            dt = time.monotonic() - t
            self.fsync_seconds += dt
            self.fsync_hist.observe(dt)
            self.fsyncs += 1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(
    wal_dir: Path, index: int, head: Any, entries: Iterable[Any] = ()
) -> tuple[Path, int]:
    """Atomically write a snapshot (temp file, fsync, rename, fsync the directory);
    returns its path and size.

    ``entries`` (message records: sequences whose last element is the body) are
    consumed and written a chunk at a time, so a
    snapshot of a backlog larger than memory never holds it all (bodies come from page
    files as the iterator reads them)."""
    final = wal_dir / snap_name(index)
    tmp = final.with_suffix(".tmp")
    try:
        size = _write_snapshot_tmp(tmp, head, entries)
    except BaseException:
        # Disk full (or any failure): the partial file would hold its space until the
        # next start (recover() removes *.tmp) and make the disk fuller still.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    os.rename(tmp, final)
    _fsync_dir(wal_dir)
    return final, size


def _write_snapshot_tmp(tmp: Path, head: Any, entries: Iterable[Any]) -> int:
    """Write and fsync a snapshot's temp file; returns its size."""
    size = 0
    with open(tmp, "wb") as f:

        def put(rtype: int, obj: Any) -> None:
            nonlocal size
            data = frame_record(_packb(obj), rtype)
            f.write(data)
            size += len(data)

        f.write(SNAP_MAGIC)
        size += len(SNAP_MAGIC)
        put(REC_SNAP_HEAD, head)
        chunk: list[Any] = []
        chunk_bytes = count = 0
        for e in entries:
            chunk.append(e)
            chunk_bytes += len(e[-1]) + 64
            if chunk_bytes >= SNAP_CHUNK_BYTES:
                put(REC_SNAP_ENTRIES, chunk)
                count += len(chunk)
                chunk, chunk_bytes = [], 0
        if chunk:
            put(REC_SNAP_ENTRIES, chunk)
            count += len(chunk)
        put(REC_SNAP_END, count)
        f.flush()
        os.fsync(f.fileno())
    return size
