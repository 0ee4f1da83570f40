"""Write-ahead log: append-only segment files, group commit, snapshots, recovery reads.

Layout of ``<data-dir>/wal/``::

    seg-00000000000000000001.log   segments, in order; one is open for appends
    snap-00000000000000000007.snap snapshot covering every segment numbered < 7
    *.corrupt                      segments set aside by --repair (never deleted)

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
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from broker.counters import FSYNC_BOUNDS_S, Buckets

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

    def __init__(self, path: Path, offset: int, why: str) -> None:
        super().__init__(f"{path}: damaged record at byte offset {offset}: {why}")
        self.path = path
        self.offset = offset


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


def iter_segment(path: Path, *, last: bool) -> Iterator[tuple[int, list[Any]]]:
    """Yield (offset, commands) per valid record.

    A damaged record at the end of the *last* segment is a torn tail (a crash mid-write):
    iteration stops by raising _TornTail with its offset (recover() truncates there).
    Damage anywhere else raises CorruptLog naming the file and offset.
    """
    data = path.read_bytes()
    end = len(data)
    pos = 0
    while pos < end:
        why = ""
        if end - pos < HEADER_SIZE:
            why = "incomplete header"
        else:
            length, crc, rtype = HEADER.unpack_from(data, pos)
            if length == 0 and not any(data[pos:]):
                why = "zero-filled tail"
            elif length < 1 or length > MAX_RECORD:
                why = f"impossible length {length}"
            elif pos + 4 + 4 + length > end:
                why = "record runs past end of file"
            else:
                body = data[pos + 8 : pos + 8 + length]
                if zlib.crc32(body) != crc:
                    why = "checksum mismatch"
                elif rtype != REC_COMMANDS:
                    why = f"unknown record type {rtype}"
        if why:
            tail_only = why in ("incomplete header", "zero-filled tail",
                                "record runs past end of file") or (
                why == "checksum mismatch" and pos + 8 + length >= end)
            if last and tail_only:
                raise _TornTail(pos, why)
            raise CorruptLog(path, pos, why)
        try:
            commands = msgpack.unpackb(data[pos + 9 : pos + 8 + length], raw=False,
                                       strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise CorruptLog(path, pos, f"undecodable payload ({exc})") from None
        yield pos, commands
        pos += 8 + length


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


def recover(wal_dir: Path, *, repair: bool = False,
            on_snapshot: Callable[[Any, Iterator[list[Any]]], None] | None = None,
            on_batch: Callable[[list[Any]], None] | None = None) -> Recovered:
    """Read the newest valid snapshot and every later segment; fix a torn tail.

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
    if snapshot is None and snaps and (not segs or _index(segs[0].name) > 1):
        raise CorruptLog(snaps[-1], 0, "no readable snapshot and the log it covered is gone")
    live = [p for p in segs if _index(p.name) >= start]
    if snapshot is not None and live and _index(live[0].name) != start:
        raise CorruptLog(live[0], 0, f"segment {start} (first after the snapshot) is missing")
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
    quarantined: list[str] = []
    total = 0
    for i, path in enumerate(live):
        last = i == len(live) - 1
        in_segment = 0
        try:
            for _off, commands in iter_segment(path, last=last):
                sink(commands)
                in_segment += 1
            total += path.stat().st_size
        except _TornTail as torn:
            size = path.stat().st_size
            with open(path, "r+b") as f:
                f.truncate(torn.offset)
                os.fsync(f.fileno())
            msg = (f"{path.name}: torn tail at byte {torn.offset} ({torn.why}); truncated "
                   f"{size - torn.offset} bytes")
            log.warning(msg)
            truncated.append(msg)
            total += torn.offset
        except CorruptLog as exc:
            if not repair:
                raise
            # What came before the damage was already handed over (iter_segment yielded
            # it); set the segment aside and carry on.
            dest = path.with_suffix(".corrupt")
            path.rename(dest)
            msg = (f"{path.name}: damaged at byte {exc.offset}; replayed the "
                   f"{in_segment} records before it and quarantined the file as {dest.name}")
            log.error(msg)
            quarantined.append(msg)
        finally:
            batches += in_segment
    next_seg = max([_index(p.name) for p in segs] + [start - 1, 0]) + 1
    return Recovered(snapshot, records, next_seg, truncated, quarantined, total, batches,
                     had_snapshot)


# ---------------------------------------------------------------------- writing


class WalStore:
    """The durable Store: see the module docstring."""

    def __init__(self, wal_dir: Path, next_segment: int, *, fsync: str = "always",
                 interval_ms: int = 100, segment_bytes: int = 64 << 20) -> None:
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
        self._schedule()

    def commit(self, callback: Callback) -> None:
        if self.closed:
            callback(ConnectionError("store closed"))
            return
        if not self._pending and not self._busy and not self._callbacks \
                and self.failed is None and not self._unsynced:
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

    def _done(self, fut: asyncio.Future[None], batch: list[tuple[int, bytes]],
              cbs: list[Callback]) -> None:
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

    def _failed(self, exc: BaseException, batch: list[tuple[int, bytes]],
                cbs: list[Callback]) -> None:
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


def write_snapshot(wal_dir: Path, index: int, head: Any,
                   entries: Iterable[Any] = ()) -> tuple[Path, int]:
    """Atomically write a snapshot (temp file, fsync, rename, fsync the directory);
    returns its path and size.

    ``entries`` (message records: sequences whose last element is the body) are
    consumed and written a chunk at a time, so a
    snapshot of a backlog larger than memory never holds it all (bodies come from page
    files as the iterator reads them)."""
    final = wal_dir / snap_name(index)
    tmp = final.with_suffix(".tmp")
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
    os.rename(tmp, final)
    _fsync_dir(wal_dir)
    return final, size
