"""Streams: append-only queues read by offset (spec/PROTOCOL.md section 20).

A ``Stream`` is a Queue subclass so it lives in ``Broker.queues`` under its name and
bindings, routing, the default exchange, deletion, passive declare and LIST treat it like
any queue. What differs:

* ``Broker.enqueue`` hands every routed message to :meth:`Stream.append` (persistent or
  not); appends are buffered and written as one batch per stream by :meth:`Streams.flush`
  (called from ``Broker.flush_journal`` and ``Broker.pump``), into a ``StreamLog``
  (broker.stream_store). ``Broker.commit`` waits for the WAL *and* every stream written
  since its last fsync, so publisher confirms mean "on disk" for stream messages too.
* Reading never removes anything. A consumer without a group has a private cursor; its
  acks and nacks are accepted and change nothing. Consumers with a group share the
  group's position: each offset goes to one member; acks advance the group's committed
  offset over the contiguous acked prefix; a nack with requeue or a lost connection hands
  the offset to another member (redelivered). Committed offsets are written to
  ``<stream dir>/groups`` (atomic replace) at most every SWEEP_MS and on shutdown.
* Retention deletes whole oldest segments past ``max_age_ms`` / ``max_length_bytes``
  after each append batch that rolled a segment and every RETENTION_MS.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from conveyor.broker.commands import group_offsets, stream_entry
from conveyor.broker.message import DELIVERED, Message, QueuedMessage
from conveyor.broker.queue import DISPATCH_BYTES, Consumer, Queue, QueueStatistics
from conveyor.broker.stream_store import Entry, StreamLog
from conveyor.protocol import InvalidArgument
from conveyor.protocol.limits import CONSUME_ARGUMENT_TYPES, NAME_MAX, U64_MAX

if TYPE_CHECKING:
    from conveyor.broker.interfaces import Scheduler
    from conveyor.broker.session import Session
    from conveyor.broker.store import Store

log = logging.getLogger("conveyor.stream")

# Arguments a stream refuses (they describe classic-queue behaviour).
CLASSIC_ONLY = frozenset(
    {
        "max_priority",
        "message_ttl_ms",
        "dedup_window_ms",
        "max_length",
        "overflow",
        "delivery_limit",
        "dead_letter_exchange",
        "dead_letter_routing_key",
        "single_active_consumer",
        "ack_timeout_ms",
        "expires_ms",
    }
)
STREAM_ONLY = frozenset({"max_age_ms", "stream_compression", "stream_segment_bytes"})
CHUNK = 256  # entries read per consumer per dispatch round (catch-up stays bounded)
CHUNK_BYTES = 1 << 20
RETENTION_MS = 2000
OFFSET_HEADER = "x-stream-offset"
TIMESTAMP_HEADER = "x-stream-timestamp"
GROUPS_FILE = "groups"


def stream_dir_name(name: str) -> str:
    """A file-system-safe directory name for a queue name (long names are hashed)."""
    quoted = urllib.parse.quote(name, safe="-_")
    if len(quoted) > 200:
        return "h-" + sha256(name.encode()).hexdigest()
    return "q-" + quoted


def check_declare(
    arguments: dict[str, Any], durable: bool, exclusive: bool, auto_delete: bool
) -> None:
    """400 unless a stream declaration is durable, shared and uses stream arguments."""
    if not durable or exclusive or auto_delete:
        raise InvalidArgument(
            "a stream must be durable, not exclusive and not auto_delete",
            {"argument": "queue_type"},
        )
    for key in arguments:
        if key in CLASSIC_ONLY:
            raise InvalidArgument(
                f"queue argument {key!r} does not apply to a stream", {"argument": key}
            )


def check_classic(arguments: dict[str, Any]) -> None:
    for key in arguments:
        if key in STREAM_ONLY:
            raise InvalidArgument(
                f"queue argument {key!r} applies to streams only", {"argument": key}
            )


def check_consume_arguments(arguments: dict[str, Any], queue: Queue | None) -> None:
    """Unknown consumer arguments are 400, and so are stream ones on a classic queue
    (``queue`` None: only the keys are checked)."""
    for key, value in arguments.items():
        if key not in CONSUME_ARGUMENT_TYPES:
            raise InvalidArgument(f"unknown consumer argument {key!r}", {"argument": key})
        if queue is None:
            continue
        if not queue.appends_to_log:
            raise InvalidArgument(
                f"consumer argument {key!r} applies to streams only", {"argument": key}
            )
        ok = True
        if key == "offset":
            ok = value in ("first", "last", "next") or (
                type(value) is int and 0 <= value <= U64_MAX
            )
        elif key == "timestamp":
            ok = type(value) is int and 0 <= value <= U64_MAX
        elif key == "group":
            ok = type(value) is str and 0 < len(value.encode()) <= NAME_MAX
        if not ok:
            raise InvalidArgument(f"bad consumer argument {key}={value!r}", {"argument": key})


class StreamConsumer(Consumer):
    """A consumer of a stream: a private cursor, or a member of a group."""

    __slots__ = ("cursor", "group", "group_name", "start")

    def __init__(
        self,
        tag: str,
        queue: Queue,
        session: Session,
        no_ack: bool,
        exclusive: bool,
        credit: int,
        arguments: dict[str, Any],
    ) -> None:
        super().__init__(tag, queue, session, no_ack, exclusive, credit)
        self.start: int | str = arguments.get("offset", "next")
        ts = arguments.get("timestamp")
        if ts is not None:
            self.start = -1 - int(ts)  # negative: a timestamp (resolved on subscribe)
        self.group_name: str | None = arguments.get("group")
        self.group: Group | None = None
        self.cursor = 0


class StreamDelivery(QueuedMessage):
    """A delivery of a stream entry (``seq`` is its offset)."""

    __slots__ = ("group",)

    def __init__(self, offset: int, message: Message, group: Group | None) -> None:
        super().__init__(offset, message)
        self.group = group


class Group:
    """A consumer group's position: committed prefix, outstanding and acked offsets."""

    def __init__(self, name: str, committed: int) -> None:
        self.name = name
        self.committed = committed  # every offset below is done
        self.stored = committed  # the committed offset as last written to disk (LIST)
        self.next = committed  # next never-delivered offset
        self.redeliver: list[int] = []  # heap: offsets handed back (nack, lost member)
        self.counts: dict[int, int] = {}  # deliveries so far of redelivered offsets
        self.pending: dict[int, StreamConsumer] = {}  # delivered, not yet settled
        self.done: set[int] = set()  # settled, above ``committed``
        self.members: list[StreamConsumer] = []
        self.rr = 0

    def settle(self, offset: int) -> bool:
        """Offset acked (or rejected); True if the committed offset moved."""
        self.pending.pop(offset, None)
        self.counts.pop(offset, None)
        if offset < self.committed:
            return False
        self.done.add(offset)
        moved = False
        while self.committed in self.done:
            self.done.discard(self.committed)
            self.committed += 1
            moved = True
        return moved

    def give_back(self, offset: int) -> None:
        if self.pending.pop(offset, None) is not None:
            self.counts[offset] = self.counts.get(offset, 1)
            heapq.heappush(self.redeliver, offset)

    def skip_to(self, first: int) -> None:
        """Retention removed everything below ``first``."""
        if self.committed < first:
            self.committed = first
            self.done = {o for o in self.done if o >= first}
            self.redeliver = [o for o in self.redeliver if o >= first]
            heapq.heapify(self.redeliver)
            while self.committed in self.done:
                self.done.discard(self.committed)
                self.committed += 1
        self.next = max(self.next, first)


class Stream(Queue):
    """A stream queue (see the module docstring)."""

    def __init__(
        self, name: str, slog: StreamLog, owner: Streams, arguments: dict[str, Any]
    ) -> None:
        super().__init__(name, durable=True, arguments=arguments)
        self.log = slog
        self.owner = owner
        self.groups: dict[str, Group] = {}
        self._pending: list[tuple[int, str, str, dict[str, Any], bytes]] = []
        self.groups_dirty = False
        self._saving = False
        self._load_groups()

    # ------------------------------------------------------------------ queries
    @property
    def ready(self) -> int:
        return self.log.count + len(self._pending)

    def has_ready(self) -> bool:
        return False

    def peek(self) -> QueuedMessage | None:
        raise InvalidArgument(
            f"queue {self.name!r} is a stream: use CONSUME with an offset", {"queue": self.name}
        )

    def iter_messages(self) -> list[QueuedMessage]:
        return []  # on disk in its own segments, not in WAL snapshots

    def head_ts(self, scan: int = 1000) -> int:
        return 0

    def statistics(self) -> QueueStatistics:
        return self._statistics("stream", self.info())

    def waiting(self) -> Iterator[QueuedMessage]:
        return iter(())  # in its own segments, read by offset (CONSUME), not waiting

    def info(self) -> dict[str, Any]:
        slog = self.log
        head = slog.head
        return {
            "type": "stream",
            "first_offset": slog.first_offset,
            "head_offset": head,
            "messages": slog.count,
            "bytes": slog.disk_bytes,
            "groups": {
                name: {
                    "committed": g.stored,
                    "lag": max(head - g.stored, 0),
                    "members": len(g.members),
                }
                for name, g in sorted(self.groups.items())
            },
        }

    # ------------------------------------------------------------------ append
    def append(self, message: Message) -> None:
        self._pending.append(stream_entry(message))
        self.published += 1
        self.owner.pending.add(self)

    def purge(self) -> int:
        return self.ready  # only called by deletion (PURGE of a stream is refused)

    def flush(self) -> None:
        """Write the buffered appends as one batch."""
        items = self._pending
        if not items or self.deleted:
            return
        self._pending = []
        segments = len(self.log.segments)
        head = self.log.head
        written = self.log.written
        try:
            self.log.append(items)
        except OSError as exc:
            stored = self.log.head - head  # records of the batch written before the failure
            log.error(
                "stream %r: append failed (%s); %d messages not stored",
                self.name,
                exc,
                len(items) - stored,
            )
            self._failed(exc)
            self.published -= len(items) - stored
            self.owner.unsynced.add(self)
            self.owner.wrote(self.log.written - written)
            if stored and self.consumers:
                self.owner.wake(self)
            return
        self.owner.unsynced.add(self)
        self.owner.wrote(self.log.written - written)
        if len(self.log.segments) != segments:
            self.retain(self.owner.clock())
        if self.consumers:
            self.owner.wake(self)

    def _failed(self, exc: OSError) -> None:
        """An append failed: the next commit, the one the publishes of this append wait
        for (a session commits right after its flush, in the same loop turn), gets the
        error and nacks them. A failure no commit took in that turn (unconfirmed
        publishes, dead-lettering) is forgotten on the next turn: it must not nack a
        later, stored publish."""
        self.log.failed = exc
        self.owner.scheduler.call_soon(self._forget, exc)

    def _forget(self, exc: OSError) -> None:
        if self.log.failed is exc:
            self.log.failed = None

    def retain(self, now: int) -> None:
        o = self.opts
        if (o.max_age_ms or o.max_length_bytes) and self.log.retain(
            now, o.max_age_ms, o.max_length_bytes
        ):
            first = self.log.first_offset
            for g in self.groups.values():
                if g.committed < first:
                    g.skip_to(first)
                    self.groups_dirty = True
                else:
                    g.next = max(g.next, first)

    # ------------------------------------------------------------------ consumers
    def add_consumer(self, consumer: Consumer) -> None:
        assert isinstance(consumer, StreamConsumer)
        super().add_consumer(consumer)
        if consumer.group_name is not None:
            g = self.groups.get(consumer.group_name)
            if g is None:
                g = Group(consumer.group_name, self._resolve(consumer.start))
                self.groups[g.name] = g
                self.groups_dirty = True
            g.members.append(consumer)
            consumer.group = g
        else:
            consumer.cursor = self._resolve(consumer.start)

    def _resolve(self, start: int | str) -> int:
        slog = self.log
        head = slog.head + len(self._pending)
        if isinstance(start, int):
            if start < 0:
                self.owner.flush()
                return self.log.seek_time(-1 - start)
            return max(start, slog.first_offset)
        if start == "first":
            return slog.first_offset
        if start == "last":
            return max(head - 1, slog.first_offset)
        return head

    def remove_consumer(self, consumer: Consumer) -> None:
        super().remove_consumer(consumer)
        if isinstance(consumer, StreamConsumer) and consumer.group is not None:
            g = consumer.group
            if consumer in g.members:
                g.members.remove(consumer)

    # ------------------------------------------------------------------ delivery
    def _delivery(self, e: Entry, group: Group | None, count: int) -> StreamDelivery:
        props = dict(e[4]) if e[4] else {}
        headers = dict(props.get("headers") or {})
        headers[OFFSET_HEADER] = e[0]
        headers[TIMESTAMP_HEADER] = e[1]
        props["headers"] = headers
        d = StreamDelivery(e[0], Message(e[2], e[3], props, e[5], ts=e[1]), group)
        d.state = DELIVERED
        d.delivery_count = count
        d.redelivered = count > 1
        return d

    def dispatch(
        self, deliver: Callable[[Consumer, list[QueuedMessage]], None], now: int = 0
    ) -> int:
        if not self.consumers:
            return 0
        if self._pending:
            self.owner.flush()
        slog = self.log
        head = slog.head
        sent = 0
        more = False
        for c in list(self.consumers):
            assert isinstance(c, StreamConsumer)
            if c.group is not None or c.credit <= 0 or c.cursor >= head:
                continue
            if c.session.write_paused:  # its socket is full: resume_writing wakes us
                continue
            if c.session.pending_bytes >= DISPATCH_BYTES:  # write that first (next turn)
                more = True
                continue
            entries = slog.read(c.cursor, min(c.credit, CHUNK), CHUNK_BYTES)
            if not entries:
                c.cursor = max(c.cursor, slog.first_offset)
                continue
            c.cursor = entries[-1][0] + 1
            batch: list[QueuedMessage] = [self._delivery(e, None, 1) for e in entries]
            sent += self._hand(c, batch, deliver)
            if c.credit > 0 and c.cursor < head:
                more = True
        for g in self.groups.values():
            if g.members:
                if any(m.session.pending_bytes >= DISPATCH_BYTES for m in g.members):
                    more = True  # a member has a batch to write first (next turn)
                    continue
                n, again = self._dispatch_group(g, deliver, head)
                sent += n
                more = more or again
        if more:  # catch-up continues next round (or next loop turn: pump does 16 rounds)
            self.owner.wake(self)
            self.owner.pump_soon()
        return sent

    def _hand(
        self,
        c: StreamConsumer,
        batch: list[QueuedMessage],
        deliver: Callable[[Consumer, list[QueuedMessage]], None],
    ) -> int:
        n = len(batch)
        c.credit -= n
        self.unacked += n
        self.delivered += n
        deliver(c, batch)  # with no_ack, Session.deliver acks them (Queue.ack)
        return n

    def _dispatch_group(
        self, g: Group, deliver: Callable[[Consumer, list[QueuedMessage]], None], head: int
    ) -> tuple[int, bool]:
        members = [m for m in g.members if m.credit > 0 and not m.session.write_paused]
        if not members:
            return 0, False
        want = min(sum(min(m.credit, CHUNK) for m in members), CHUNK * 4)
        first = self.log.first_offset
        if g.committed < first:
            g.skip_to(first)
            self.groups_dirty = True
        g.next = max(g.next, first)
        todo: list[StreamDelivery] = []
        while g.redeliver and len(todo) < want:
            off = heapq.heappop(g.redeliver)
            got = self.log.read(off, 1)
            if not got or got[0][0] != off:
                g.settle(off)  # gone with retention
                continue
            count = g.counts.get(off, 1) + 1
            g.counts[off] = count
            todo.append(self._delivery(got[0], g, count))
        if len(todo) < want and g.next < head:
            entries = self.log.read(g.next, want - len(todo), CHUNK_BYTES)
            if entries:
                g.next = entries[-1][0] + 1
                todo.extend(self._delivery(e, g, 1) for e in entries)
        if not todo:
            return 0, False
        # Deal round-robin among the members with credit.
        out: dict[int, tuple[StreamConsumer, list[QueuedMessage]]] = {}
        n = len(g.members)
        i = g.rr % n
        idle = 0
        k = 0
        while k < len(todo) and idle < n:
            m = g.members[i]
            i = (i + 1) % n
            if m.credit - len(out.get(id(m), (m, []))[1]) <= 0:
                idle += 1
                continue
            idle = 0
            d = todo[k]
            k += 1
            out.setdefault(id(m), (m, []))[1].append(d)
            if m.no_ack:
                g.settle(d.seq)
            else:
                g.pending[d.seq] = m
        for d in todo[k:]:  # no credit left for these (cannot happen: want <= credit)
            g.pending[d.seq] = g.members[0]
            g.give_back(d.seq)
        g.rr = i
        sent = 0
        for m, batch in out.values():
            sent += self._hand(m, batch, deliver)
        if any(m.no_ack for m, _b in out.values()):
            self.groups_dirty = True
        again = bool(g.redeliver) or g.next < head
        return sent, again and any(m.credit > 0 for m in g.members)

    # ------------------------------------------------------------------ settlement
    acks_by_count = False

    def settle_acked(self, qms: list[QueuedMessage]) -> bool:
        """Deliveries of this stream were acked (Session.ack_settled): commit group offsets."""
        self.ack(len(qms))
        for qm in qms:
            g = qm.group if isinstance(qm, StreamDelivery) else None
            if g is not None and g.settle(qm.seq):
                self.groups_dirty = True
        return False

    # ---------------------------------------------------- kind hooks (see Queue)
    appends_to_log = True

    def append_if_log(self, message: Message) -> bool:
        self.append(message)  # written at the end of the batch (Streams.flush)
        return True

    def takes_pager(self) -> bool:
        return False

    def check_purgeable(self) -> None:
        raise InvalidArgument(
            f"queue {self.name!r} is a stream: streams cannot be purged "
            "(retention removes old segments)",
            {"queue": self.name},
        )

    def on_removed(self) -> None:
        self.owner.remove(self)

    def drop_refused(self, qms: list[QueuedMessage]) -> bool:
        self.settle_refused(qms, requeue=False)
        return False

    def new_consumer(
        self,
        tag: str,
        session: Session,
        no_ack: bool,
        exclusive: bool,
        credit: int,
        arguments: dict[str, Any],
    ) -> Consumer:
        return StreamConsumer(tag, self, session, no_ack, exclusive, credit, arguments)

    def settle_refused(self, qms: list[QueuedMessage], requeue: bool) -> bool:
        """Nacked/rejected, or their connection closed (requeue=True)."""
        self.unacked -= len(qms)
        woke = False
        for qm in qms:
            g = qm.group if isinstance(qm, StreamDelivery) else None
            if g is None:
                continue
            if requeue:
                g.give_back(qm.seq)
                self.redelivered += 1
                woke = True
            elif g.settle(qm.seq):
                self.groups_dirty = True
        if woke and not self.deleted:
            self.owner.wake(self)
        return True

    # ------------------------------------------------------------------ groups file
    def _groups_path(self) -> Path:
        return self.log.dir / GROUPS_FILE

    def _load_groups(self) -> None:
        try:
            data = msgpack.unpackb(self._groups_path().read_bytes(), raw=False)
        except FileNotFoundError:
            return
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            log.error("stream %r: unreadable groups file (%s); groups start over", self.name, exc)
            return
        for name, committed in dict(data).items():
            self.groups[str(name)] = Group(str(name), int(committed))

    def save_groups(self, sync: bool = False) -> None:
        """Write the committed offsets (atomically) if they changed."""
        if not self.groups_dirty or self._saving or self.deleted:
            return
        self.groups_dirty = False
        offsets = group_offsets((n, g.committed) for n, g in self.groups.items())
        data = msgpack.packb(offsets)
        path = self._groups_path()
        scheduler = self.owner.scheduler
        if sync or not scheduler.running():
            _write_atomic(path, data)
            self._stored(offsets)
            return
        self._saving = True
        fut = scheduler.run_in_executor(_write_atomic, path, data)

        def done(f: asyncio.Future[None]) -> None:
            self._saving = False
            exc = f.exception()
            if exc is not None and not self.deleted:
                log.error("stream %r: could not write group offsets: %s", self.name, exc)
                self.groups_dirty = True
            elif exc is None:
                self._stored(offsets)

        fut.add_done_callback(done)

    def save_groups_at_close(self) -> None:
        """Shutdown: write every group's offset now, in this thread, whatever is pending."""
        self.groups_dirty = self.groups_dirty or bool(self.groups)
        self._saving = False
        self.save_groups(sync=True)

    def _stored(self, offsets: dict[str, int]) -> None:
        for name, committed in offsets.items():
            g = self.groups.get(name)
            if g is not None and committed > g.stored:
                g.stored = committed


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a partial copy
        raise
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ignore(_n: int) -> None:
    pass


class Streams:
    """The broker's streams: where they live, buffered appends, commit, housekeeping."""

    def __init__(
        self,
        clock: Callable[[], int],
        wake: Callable[[Queue], None],
        pump_soon: Callable[[], None],
        scheduler: Scheduler,
    ) -> None:
        self.dir: Path | None = None
        self.scheduler = scheduler  # deferred work (group-offset writes, error expiry)
        self.pump_soon = pump_soon
        self.fsync = "always"
        self.interval_ms = 100
        self.clock = clock
        self.wake = wake
        self.all: dict[str, Stream] = {}
        self.pending: set[Stream] = set()  # appends buffered, not yet written
        self.unsynced: set[Stream] = set()  # written, maybe not yet fsynced
        # Told the bytes of each append batch (the disk-free guard, broker.flow.Watermarks).
        self.wrote: Callable[[int], None] = _ignore
        self._last_retention = 0
        self.repair = False  # --repair: damaged segments are cut, not refused, on open

    def configure(self, directory: Path, fsync: str, interval_ms: int) -> None:
        self.dir = directory
        self.fsync = fsync
        self.interval_ms = interval_ms

    def create(self, name: str, arguments: dict[str, Any], *, fresh: bool) -> Stream:
        """A new stream (``fresh``: any leftover directory of that name is wiped) or one
        reopened from its directory (recovery)."""
        if self.dir is None:
            raise InvalidArgument(
                "streams need a broker with a data directory", {"argument": "queue_type"}
            )
        path = self.dir / stream_dir_name(name)
        if fresh and path.exists():
            shutil.rmtree(path, ignore_errors=True)
        opts_seg = int(arguments.get("stream_segment_bytes") or 64 << 20)
        slog = StreamLog(
            path,
            segment_bytes=opts_seg,
            fsync=self.fsync,
            interval_ms=self.interval_ms,
            compression=str(arguments.get("stream_compression") or "none"),
            repair=self.repair,
        ).open()
        s = Stream(name, slog, self, arguments)
        self.all[name] = s
        return s

    def remove(self, s: Stream) -> None:
        self.all.pop(s.name, None)
        self.pending.discard(s)
        self.unsynced.discard(s)
        s.log.destroy()

    def cleanup_orphans(self) -> None:
        """Directories of streams the topology does not know (deleted, or declared but
        never confirmed before a crash)."""
        if self.dir is None or not self.dir.exists():
            return
        known = {stream_dir_name(n) for n in self.all}
        for p in self.dir.iterdir():
            if p.is_dir() and p.name not in known:
                log.info("removing the directory of a deleted stream: %s", p)
                shutil.rmtree(p, ignore_errors=True)

    def flush(self) -> None:
        while self.pending:
            pending = self.pending
            self.pending = set()
            for s in pending:
                s.flush()

    def commit(self, store: Store, callback: Callable[[BaseException | None], None]) -> None:
        """``callback`` once the WAL and every stream written so far are durable."""
        waiting = [
            s for s in self.unsynced if s.log.durable < s.log.written or s.log.failed is not None
        ]
        self.unsynced = set(waiting)
        if not waiting:
            store.commit(callback)
            return
        left = [len(waiting) + 1]
        first_err: list[BaseException | None] = [None]

        def part(err: BaseException | None) -> None:
            if err is not None and first_err[0] is None:
                first_err[0] = err
            left[0] -= 1
            if left[0] == 0:
                callback(first_err[0])

        for s in waiting:
            s.log.commit(part)
        store.commit(part)

    def housekeeping(self, now: int) -> None:
        """Every sweep: persist changed group offsets; every RETENTION_MS: retention."""
        if not self.all:
            return
        retention = now - self._last_retention >= RETENTION_MS
        if retention:
            self._last_retention = now
        for s in self.all.values():
            if s.groups_dirty:
                s.save_groups()
            if retention:
                s.retain(now)

    def close(self) -> None:
        """Graceful shutdown: write buffered appends, sync, save group offsets."""
        self.flush()
        for s in self.all.values():
            with contextlib.suppress(OSError):
                s.save_groups_at_close()
            s.log.close()
