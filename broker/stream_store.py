"""Segment storage of one stream: append-only files of framed records, sparse indexes.

Layout of ``<data-dir>/streams/<escaped name>/``::

    00000000000000000000.seg   segment, named by its first offset (records, see below)
    00000000000000000000.idx   its sparse index: 24-byte entries (offset, file position,
                               newest timestamp so far), one every ~64 KiB or 64 records
    groups                     committed offsets of the consumer groups (broker.stream)

A record uses the write-ahead log's framing (``broker.wal.frame_record``: ``[u32 length]
[u32 crc32][u8 type][payload]``) with type ``REC_STREAM``; its payload is a msgpack array
of entries ``[offset, ts, exchange, routing_key, properties, body]`` with consecutive
offsets: one append batch (a pump's worth of messages for this stream). With the queue
argument ``stream_compression = "zstd"`` records are written as ``REC_STREAM_ZSTD``: the
same msgpack array, zstd-compressed (one zstd frame with its content size); the CRC covers
the compressed payload like any record. Readers take both types, so a stream may change the
setting across restarts; offsets and indexes (file positions) are unaffected.

Seeking to an offset is a bisect over the segments, a bisect over that segment's index
and a scan of at most one index interval; seeking to a timestamp is the same over the
index's running-maximum timestamps. Indexes are not fsynced: they are hints validated on
open (entries past the segment's end or out of order are dropped; the tail after the last
entry is rescanned and re-indexed).

On open every record of every segment is checked, and the log's damage rules apply
(broker.wal): damage with no valid record after it, in the last segment, is a torn tail
(cut off, bytes kept in ``<segment>.<offset>.torn``); any other damage refuses the start
unless --repair, which rewrites the segment without the damaged spans (the original kept
as ``<segment>.corrupt``) and logs the offsets lost.

Durability follows the broker's fsync policy: records are written at once (the event loop
never waits for the disk beyond a write into the page cache); with ``always``, ``commit``
callbacks run once a writer thread's fdatasync covers everything written before them
(group commit: one fdatasync for all the commits waiting), with ``interval`` an
fdatasync runs every ``interval_ms``, with ``never`` the OS decides.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import os
import shutil
import struct
import zlib
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zstandard

from conveyor.broker.wal import (
    HEADER,
    HEADER_SIZE,
    MAX_RECORD,
    CorruptLog,
    _fsync_dir,
    _write_all,
    check_record,
    cut_torn_tail,
    followed_at,
    frame_record,
    is_written,
    reframe,
    resync,
)

log = logging.getLogger("conveyor.stream")

REC_STREAM = 16
REC_STREAM_ZSTD = 17  # the same payload, zstd-compressed (queue argument stream_compression)
RECORD_TYPES = (REC_STREAM, REC_STREAM_ZSTD)
INDEX = struct.Struct(">QQQ")
INDEX_BYTES = 64 << 10  # an index entry at least every this many bytes ...
INDEX_RECORDS = 64  # ... or this many records
RECORD_BYTES = 1 << 20  # an append batch is split into records of about this size
CACHE_BYTES = 8 << 20  # newest entries kept in memory for tailing readers
CACHE_ENTRIES = 65536

# (offset, ts ms, exchange, routing key, properties, body)
Entry = tuple[int, int, str, str, dict[str, Any], bytes]
Callback = Callable[[BaseException | None], None]
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def seg_file(first: int) -> str:
    return f"{first:020d}.seg"


class CorruptSegment(Exception):
    pass


class Segment:
    """One segment file and its in-memory sparse index."""

    __slots__ = (
        "first",
        "index",
        "last_ts",
        "next",
        "path",
        "records_since",
        "since_index",
        "size",
    )

    def __init__(self, path: Path, first: int) -> None:
        self.path = path
        self.first = first
        self.next = first  # offset after its last entry
        self.size = 0
        self.last_ts = 0  # newest timestamp in it (running maximum)
        self.index: list[tuple[int, int, int]] = []  # (offset, position, running max ts)
        self.since_index = 0  # bytes written since the last index entry
        self.records_since = 0

    @property
    def idx_path(self) -> Path:
        return self.path.with_suffix(".idx")

    def count(self) -> int:
        return self.next - self.first


_zstd_compress = zstandard.ZstdCompressor(level=3).compress
_zstd_decompress = zstandard.ZstdDecompressor().decompress


def _decode(body: bytes, rtype: int = REC_STREAM) -> list[list[Any]]:
    if rtype == REC_STREAM_ZSTD:
        try:
            body = _zstd_decompress(body, max_output_size=MAX_RECORD * 16)
        except zstandard.ZstdError as exc:
            raise ValueError(f"bad zstd record: {exc}") from None
    out: list[list[Any]] = msgpack.unpackb(body, raw=False, strict_map_key=False)
    return out


def scan_records(
    data: bytes | memoryview, start: int
) -> tuple[list[tuple[int, list[list[Any]]]], int, str]:
    """Records of ``data`` from ``start``: ([(position, entries)], end of the last valid
    record, why the scan stopped early or "")."""
    out: list[tuple[int, list[list[Any]]]] = []
    pos = start
    end = len(data)
    while pos < end:
        if end - pos < HEADER_SIZE:
            return out, pos, "incomplete header"
        length, crc, rtype = HEADER.unpack_from(data, pos)
        if length < 1 or length > MAX_RECORD:
            return out, pos, f"impossible length {length}"
        if pos + 8 + length > end:
            return out, pos, "record runs past end of file"
        body = bytes(data[pos + 8 : pos + 8 + length])
        if zlib.crc32(body) != crc:
            return out, pos, "checksum mismatch"
        if rtype not in RECORD_TYPES:
            return out, pos, f"unknown record type {rtype}"
        try:
            entries = _decode(body[1:], rtype)
        except (ValueError, msgpack.UnpackException) as exc:
            return out, pos, f"undecodable payload ({exc})"
        out.append((pos, entries))
        pos += 8 + length
    return out, pos, ""


def _verify(data: bytes, stop: int) -> str:
    """Check the records of ``data`` before ``stop`` by checksum alone (no decoding):
    why they do not check out or do not end exactly at ``stop``, or ""."""
    pos = 0
    while pos < stop:
        why, size = check_record(data, pos, RECORD_TYPES)
        if why:
            return why
        pos += size
    return "" if pos == stop else "records do not end at the index hint"


class StreamLog:
    """The segments of one stream: append, read by offset or time, retention, fsync."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = 64 << 20,
        fsync: str = "always",
        interval_ms: int = 100,
        cache_bytes: int = CACHE_BYTES,
        compression: str = "none",
        repair: bool = False,
    ) -> None:
        self.dir = directory
        self.compression = compression  # "zstd": new records are REC_STREAM_ZSTD
        self.segment_bytes = max(segment_bytes, 4096)
        self.fsync = fsync
        self.interval_ms = interval_ms
        self.cache_bytes = cache_bytes
        self.segments: list[Segment] = []
        self._firsts: list[int] = []
        self._fd = -1  # the active (last) segment, opened for appends
        self._idx_fd = -1
        self._retired: list[int] = []  # fds of rolled segments awaiting a sync and close
        self._cache: deque[Entry] = deque()
        self._cache_size = 0
        self.written = 0  # bytes written since open (all segments)
        self.durable = 0  # of those, bytes known to be on disk
        self._waiters: list[tuple[int, Callback]] = []
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self.failed: BaseException | None = None
        self.closed = False
        self.truncated = ""  # what open() cut off a torn tail, for logs and tests
        self.repair = repair  # --repair: cut damaged records out instead of refusing
        self.repaired: list[str] = []  # what the repair did, for logs and tests
        self.fsyncs = 0

    # ------------------------------------------------------------------ queries
    @property
    def first_offset(self) -> int:
        return self.segments[0].first if self.segments else 0

    @property
    def head(self) -> int:
        """The offset the next appended entry gets."""
        return self.segments[-1].next if self.segments else 0

    @property
    def disk_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def count(self) -> int:
        return self.head - self.first_offset

    # ------------------------------------------------------------------ open
    def open(self) -> StreamLog:
        """Load the segments; fix a torn tail of the last one (truncate at the CRC)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.glob("*.tmp"):
            p.unlink()
        paths = sorted(self.dir.glob("*.seg"))
        segs: list[Segment] = []
        for i, p in enumerate(paths):
            try:
                first = int(p.stem)
            except ValueError:
                continue
            seg = Segment(p, first)
            seg.size = p.stat().st_size
            if seg.size == 0 and i < len(paths) - 1:
                p.unlink()  # created by a roll, then the process died: nothing in it
                seg.idx_path.unlink(missing_ok=True)
                continue
            self._load(seg, last=i == len(paths) - 1)
            segs.append(seg)
        for p in self.dir.glob("*.idx"):
            if not p.with_suffix(".seg").exists():
                p.unlink()
        for a, b in itertools.pairwise(segs):
            if a.next != b.first:
                log.warning(
                    "stream %s: offsets %d..%d are missing (segment %s)",
                    self.dir,
                    a.next,
                    b.first - 1,
                    b.path.name,
                )
        self.segments = segs
        self._firsts = [s.first for s in segs]
        if segs:
            self._open_active(segs[-1])
        return self

    def _load(self, seg: Segment, last: bool) -> None:
        """Check a segment's records and rebuild its index; apply the damage rules.

        Every record is checked (by checksum up to the last index hint, decoded after it),
        so damage anywhere is found here, not by a reader skipping offsets later. Damage
        with no valid record after it, in the last segment, is a torn tail: cut off, the
        bytes kept in a ``*.torn`` file. Anything else refuses to start (CorruptLog,
        naming file and offset) unless ``repair``: then the damaged spans are cut out
        (the original kept as ``*.corrupt``) and the segment is loaded again.
        """
        with open(seg.path, "rb") as f:
            data = f.read()
        hint = [e for e in _read_index(seg.idx_path) if e[1] < seg.size and e[0] >= seg.first]
        start = hint[-1][1] if hint else 0
        if hint and _verify(data, start):
            hint, start = [], 0  # damage before the hint, or the hint is off: decode all
        records, end, why = scan_records(data, start)
        if hint and (not records or records[0][1][0][0] != hint[-1][0]):
            hint, start = [], 0  # the hint disagrees with the data: rescan the segment
            records, end, why = scan_records(data, 0)
        seg.index = hint[:-1]
        seg.last_ts = hint[-1][2] if hint else 0
        seg.next = seg.first
        since = recs = 0
        for i, (pos, entries) in enumerate(records):
            rec_len = (records[i + 1][0] if i + 1 < len(records) else end) - pos
            if not entries:
                continue
            if (i == 0 and hint) or not seg.index or since >= INDEX_BYTES or recs >= INDEX_RECORDS:
                seg.index.append((entries[0][0], pos, max(seg.last_ts, entries[0][1])))
                since = recs = 0
            since += rec_len
            recs += 1
            for e in entries:
                if e[1] > seg.last_ts:
                    seg.last_ts = e[1]
            seg.next = entries[-1][0] + 1
        seg.since_index = since
        seg.records_since = recs
        del records
        if why:
            written = is_written(why)
            nxt = None if written else followed_at(data, end, RECORD_TYPES)
            if last and nxt is None and not written:
                kept = cut_torn_tail(seg.path, end, data)
                self.truncated = (
                    f"{seg.path.name}: torn tail at byte {end} ({why}); "
                    f"truncated {seg.size - end} bytes (kept in {kept.name})"
                )
                log.warning("stream %s", self.truncated)
            elif not self.repair:
                detail = why if nxt is None else f"{why}; valid records follow at byte {nxt}"
                if not last and nxt is None:
                    detail += " (not the last segment: later ones were written after it)"
                raise CorruptLog(
                    seg.path,
                    end,
                    f"stream segment: {detail}",
                    "start with --repair to cut the damaged records out of "
                    "the stream segment (the original is kept as *.corrupt)",
                )
            else:
                self._repair(seg, data, end, why)
                del data
                seg.size = seg.path.stat().st_size
                return self._load(seg, last)
        seg.size = end
        _write_index(seg)

    def _repair(self, seg: Segment, data: bytes, at: int, why: str) -> None:
        """--repair: rewrite the segment without its damaged spans (a record whose length
        field alone was damaged is kept, reframed), the original hard-linked aside as
        ``*.corrupt`` first; log which offsets were lost."""
        parts: list[bytes] = [data[:at]]
        notes: list[str] = []
        lost: list[str] = []
        after = seg.next  # the offset after the last entry before the damage
        pos = at
        while why:
            size = int(HEADER.unpack_from(data, pos)[0]) + 8 if is_written(why) else 0
            d = resync(data, pos, why, RECORD_TYPES, size)
            if d.salvaged:
                framed = reframe(data, d)
                recs, _end, bad = scan_records(framed, 0)
                if bad:
                    d.salvaged = False
                else:
                    parts.append(framed)
                    after = recs[-1][1][-1][0] + 1 if recs and recs[-1][1] else after
            notes.append(d.describe())
            recs, end, why = scan_records(data, d.end)
            if not d.salvaged:
                first = recs[0][1][0][0] if recs and recs[0][1] else None
                lost.append(
                    f"offsets {after}..{first - 1}"
                    if first is not None
                    else f"offsets from {after} to the segment's end"
                )
            parts.append(data[d.end : end])
            for _p, entries in recs:
                if entries:
                    after = entries[-1][0] + 1
            pos = end
        n = 0
        while True:
            corrupt = seg.path.with_name(f"{seg.path.name}{f'.{n}' if n else ''}.corrupt")
            if not corrupt.exists():
                break
            n += 1
        os.link(seg.path, corrupt)  # the damaged file as it was, under its new name
        tmp = seg.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, seg.path)
        seg.idx_path.unlink(missing_ok=True)  # positions changed: rebuilt by the reload
        _fsync_dir(self.dir)
        msg = (
            f"stream segment {seg.path}: damaged at byte {at}; "
            + "; ".join(notes)
            + ("; lost " + ", ".join(lost) if lost else "; nothing lost")
            + f"; the original is kept as {corrupt.name}"
        )
        log.error(msg)
        self.repaired.append(msg)

    def _open_active(self, seg: Segment) -> None:
        self._fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._idx_fd = os.open(seg.idx_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    # ------------------------------------------------------------------ append
    def append(self, items: list[tuple[int, str, str, dict[str, Any], bytes]]) -> int:
        """Append (ts, exchange, routing key, properties, body) items; returns the offset
        of the first. Written at once (records of about RECORD_BYTES); raises OSError if
        the write fails (nothing of the failed record stays on disk)."""
        if self.closed:
            raise OSError("stream closed")
        first = self.head
        offset = first
        chunk: list[list[Any]] = []
        size = 0
        for ts, exchange, rk, props, body in items:
            chunk.append([offset, ts, exchange, rk, props, body])
            offset += 1
            size += len(body) + 64
            if size >= RECORD_BYTES:
                self._write_record(chunk)
                chunk, size = [], 0
        if chunk:
            self._write_record(chunk)
        return first

    def _write_record(self, entries: list[list[Any]]) -> None:
        seg = self.segments[-1] if self.segments else None
        if seg is None or (seg.size >= self.segment_bytes and seg.count()):
            seg = self._roll(entries[0][0])
        if self.compression == "zstd":
            data = frame_record(_zstd_compress(_packb(entries)), REC_STREAM_ZSTD)
        else:
            data = frame_record(_packb(entries), REC_STREAM)
        pos = seg.size
        try:
            _write_all(self._fd, data)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, pos)
            raise
        seg.size += len(data)
        self.written += len(data)
        if not seg.index or seg.since_index >= INDEX_BYTES or seg.records_since >= INDEX_RECORDS:
            entry = (entries[0][0], pos, max(seg.last_ts, entries[0][1]))
            seg.index.append(entry)
            with contextlib.suppress(OSError):  # a hint: rebuilt on open if lost
                _write_all(self._idx_fd, INDEX.pack(*entry))
            seg.since_index = seg.records_since = 0
        seg.since_index += len(data)
        seg.records_since += 1
        for e in entries:
            if e[1] > seg.last_ts:
                seg.last_ts = e[1]
            self._cache.append((e[0], e[1], e[2], e[3], e[4], e[5]))
            self._cache_size += len(e[5]) + 64
        seg.next = entries[-1][0] + 1
        cache = self._cache
        while cache and (self._cache_size > self.cache_bytes or len(cache) > CACHE_ENTRIES):
            self._cache_size -= len(cache.popleft()[5]) + 64
        if self.fsync == "interval":
            self._arm_interval()

    def _roll(self, first: int) -> Segment:
        seg = Segment(self.dir / seg_file(first), first)
        if self.segments:
            seg.last_ts = self.segments[-1].last_ts
        old_fd, old_idx = self._fd, self._idx_fd
        try:
            self._open_active(seg)
            _fsync_dir(self.dir)
        except OSError:
            # Disk full (or another error) creating the segment: stay on the old one, as
            # if the roll had not started; the append fails and the next one rolls again.
            for fd in (self._fd, self._idx_fd):
                if fd not in (old_fd, old_idx):
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._fd, self._idx_fd = old_fd, old_idx
            seg.path.unlink(missing_ok=True)
            seg.idx_path.unlink(missing_ok=True)
            raise
        if old_fd >= 0:
            self._retired.append(old_fd)
            with contextlib.suppress(OSError):
                os.close(old_idx)
        self.segments.append(seg)
        self._firsts.append(first)
        if self.fsync == "never":
            for fd in self._retired:
                os.close(fd)
            self._retired.clear()
        elif self.fsync == "always":
            self._kick()  # the rolled segment is synced and closed off the event loop
        return seg

    @property
    def rolled(self) -> int:
        return len(self.segments)

    # ------------------------------------------------------------------ durability
    def commit(self, callback: Callback) -> None:
        """``callback(None)`` once everything written so far is on disk (per policy)."""
        if self.failed is not None:
            err, self.failed = self.failed, None
            callback(err)
            return
        if self.fsync != "always" or self.durable >= self.written or self.closed:
            callback(None)
            return
        self._waiters.append((self.written, callback))
        self._kick()

    @property
    def syncing(self) -> bool:
        return bool(self._waiters) or self._busy

    def _kick(self) -> None:
        if self._busy or not (self._waiters or self._retired) or self.closed:
            return
        target = self.written
        fds = [self._fd, *self._retired] if self._fd >= 0 else list(self._retired)
        retired = list(self._retired)
        self._retired.clear()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            err: BaseException | None = None
            try:
                _sync(fds)
            except OSError as exc:
                err = exc
            self._synced(target, retired, err)
            return
        self._busy = True
        fut = loop.run_in_executor(None, _sync, fds)
        fut.add_done_callback(lambda f: self._synced(target, retired, f.exception()))

    def _synced(self, target: int, retired: list[int], err: BaseException | None) -> None:
        self._busy = False
        self.fsyncs += 1
        for fd in retired:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.closed:
            self._close_fds()
        if err is None and target > self.durable:
            self.durable = target
        waiters = self._waiters
        done = [cb for t, cb in waiters if t <= target or err is not None]
        self._waiters = [(t, cb) for t, cb in waiters if t > target and err is None]
        if err is not None:
            log.error("stream %s: fdatasync failed: %s", self.dir, err)
        for cb in done:
            cb(err)
        if self._waiters:
            self._kick()

    def _arm_interval(self) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self.interval_ms / 1000, self._interval_sync)

    def _interval_sync(self) -> None:
        self._timer = None
        if self.closed:
            return
        fds = [self._fd, *self._retired]
        self._retired.clear()
        try:
            _sync(fds[:1])
            self.fsyncs += 1
        except OSError as exc:
            log.error("stream %s: fdatasync failed: %s", self.dir, exc)
        for fd in fds[1:]:
            with contextlib.suppress(OSError):
                os.fdatasync(fd)
            os.close(fd)
        self.durable = self.written

    # ------------------------------------------------------------------ read
    def read(self, offset: int, max_count: int, max_bytes: int = 1 << 20) -> list[Entry]:
        """Entries from ``offset`` (clamped to the first retained one): at most
        ``max_count``, and stopping once ``max_bytes`` of bodies are collected."""
        if max_count <= 0:
            return []
        offset = max(offset, self.first_offset)
        head = self.head
        if offset >= head:
            return []
        cache = self._cache
        if cache and offset >= cache[0][0]:
            i = offset - cache[0][0]
            out: list[Entry] = []
            size = 0
            n = len(cache)
            while i < n and len(out) < max_count and size < max_bytes:
                e = cache[i]
                out.append(e)
                size += len(e[5])
                i += 1
            return out
        return self._read_disk(offset, max_count, max_bytes)

    def _read_disk(self, offset: int, max_count: int, max_bytes: int) -> list[Entry]:
        out: list[Entry] = []
        size = 0
        si = max(bisect.bisect_right(self._firsts, offset) - 1, 0)
        while si < len(self.segments) and len(out) < max_count and size < max_bytes:
            seg = self.segments[si]
            si += 1
            if seg.next <= offset:
                continue
            keys = [e[0] for e in seg.index]
            k = bisect.bisect_right(keys, offset) - 1
            pos = seg.index[k][1] if k >= 0 else 0
            try:
                f = open(seg.path, "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                continue  # deleted by retention meanwhile
            with f:
                f.seek(pos)
                while pos < seg.size and len(out) < max_count and size < max_bytes:
                    header = f.read(HEADER_SIZE)
                    if len(header) < HEADER_SIZE:
                        break
                    length, crc, rtype = HEADER.unpack(header)
                    if length < 1 or pos + 8 + length > seg.size:
                        break
                    payload = f.read(length - 1)
                    if zlib.crc32(payload, zlib.crc32(bytes([rtype]))) != crc:
                        log.error(
                            "stream segment %s: checksum mismatch at byte %d; "
                            "skipping the rest of it",
                            seg.path,
                            pos,
                        )
                        break
                    pos += 8 + length
                    if rtype not in RECORD_TYPES:
                        break
                    for e in _decode(payload, rtype):
                        if e[0] < offset:
                            continue
                        if len(out) >= max_count or size >= max_bytes:
                            break
                        out.append((e[0], e[1], e[2], e[3], e[4], e[5]))
                        size += len(e[5])
            if out:
                offset = out[-1][0] + 1
        return out

    def seek_time(self, ts: int) -> int:
        """Offset of the first entry with a timestamp >= ``ts`` (the head if none)."""
        segs = self.segments
        for seg in segs:
            if seg.last_ts < ts or seg.next == seg.first:
                continue
            keys = [e[2] for e in seg.index]
            k = bisect.bisect_left(keys, ts) - 1  # last entry whose running max < ts
            offset = seg.index[k][0] if k >= 0 else seg.first
            while offset < seg.next:
                chunk = self._read_disk(offset, 512, 4 << 20)
                if not chunk:
                    break
                for e in chunk:
                    if e[1] >= ts:
                        return e[0]
                offset = chunk[-1][0] + 1
        return self.head

    # ------------------------------------------------------------------ retention
    def retain(self, now: int, max_age_ms: int = 0, max_bytes: int = 0) -> int:
        """Delete whole oldest segments (never the active one) past the age or size
        limit; returns how many went."""
        n = 0
        total = self.disk_bytes
        while len(self.segments) > 1:
            seg = self.segments[0]
            too_old = bool(max_age_ms) and seg.last_ts < now - max_age_ms
            too_big = bool(max_bytes) and total > max_bytes
            if not (too_old or too_big):
                break
            total -= seg.size
            self.segments.pop(0)
            self._firsts.pop(0)
            seg.path.unlink(missing_ok=True)
            seg.idx_path.unlink(missing_ok=True)
            n += 1
        if n:
            cache = self._cache
            first = self.first_offset
            while cache and cache[0][0] < first:
                self._cache_size -= len(cache.popleft()[5]) + 64
        return n

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Sync and close (graceful shutdown)."""
        if self.closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        with contextlib.suppress(OSError):
            if self._fd >= 0 and not self._busy:
                os.fdatasync(self._fd)
        self.closed = True
        waiters, self._waiters = self._waiters, []
        for _t, cb in waiters:
            cb(None)
        if not self._busy:
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._fd, self._idx_fd, *self._retired):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._idx_fd = -1
        self._retired = []

    def destroy(self) -> None:
        """Close and delete the whole directory (the stream was deleted)."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            _fsync_dir(self.dir.parent)


def _sync(fds: list[int]) -> None:
    for fd in fds:
        os.fdatasync(fd)


def _read_index(path: Path) -> list[tuple[int, int, int]]:
    """Entries of an index file, up to the first one out of order or torn."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out: list[tuple[int, int, int]] = []
    for i in range(len(data) // INDEX.size):
        e: tuple[int, int, int] = INDEX.unpack_from(data, i * INDEX.size)
        if out and (e[0] <= out[-1][0] or e[1] <= out[-1][1] or e[2] < out[-1][2]):
            break
        out.append(e)
    return out


def _write_index(seg: Segment) -> None:
    """Rewrite a segment's index file from memory (after open's validation)."""
    tmp = seg.idx_path.with_suffix(".tmp")
    tmp.write_bytes(b"".join(INDEX.pack(*e) for e in seg.index))
    os.replace(tmp, seg.idx_path)
