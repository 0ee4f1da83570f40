"""Queue state machine and consumers, driven by method calls (no sockets).

A queue holds ready messages in publish order plus a heap of requeued ones; since a
requeued message was at the head when it was delivered, every requeued message precedes
every never-delivered one, so "heap first, then deque" restores original order. Ready
messages are a resident head (``_ready``) and, under memory pressure, a paged tail
(``_paged``, bodies on disk: broker.pager) that follows it in order.

Commands that change state: enqueue, take (deliver), ack, requeue, discard (reject),
expire/drop (remove), release (delay over), purge. Each returns what changed so the caller
(the broker core) can log it, dead-letter it and produce frames; timers live in the core.

A queue with ``max_priority`` keeps one lane per priority instead (not paged); a
starvation guard gives every ``PRIORITY_GUARD``-th delivery, while lower lanes wait, to
the next waiting lower lane in turn, so low priorities keep moving under a steady stream
of high-priority work.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conveyor.broker.message import DELAYED, DELIVERED, GONE, READY, Message, QueuedMessage
from conveyor.broker.options import QueueOptions

if TYPE_CHECKING:
    from conveyor.broker.pager import Pager
    from conveyor.broker.session import Session


# What one dispatch hands one consumer at most: a consumer with a huge credit gets it in
# batches, the next one only once the previous was written out (not while its transport
# is paused), so the bodies read back from page files are the ones that can be sent.
DISPATCH_MESSAGES = 4096
DISPATCH_BYTES = 4 << 20
# Bytes charged per unacked delivery on top of Message.size (its bookkeeping), so that a
# consumer of tiny messages is bounded too (Consumer.unacked_bytes).
UNACKED_OVERHEAD = 256


class Consumer:
    """A push subscription: credit says how many more deliveries it may receive.

    ``unacked_bytes`` (sizes plus UNACKED_OVERHEAD each) is capped by
    ``max_unacked_bytes_per_consumer``; ``held`` says dispatch stopped at that cap, so an
    ack must wake the queue.
    """

    __slots__ = (
        "credit",
        "exclusive",
        "held",
        "no_ack",
        "queue",
        "session",
        "tag",
        "unacked",
        "unacked_bytes",
    )

    def __init__(
        self, tag: str, queue: Queue, session: Session, no_ack: bool, exclusive: bool, credit: int
    ) -> None:
        self.tag = tag
        self.queue = queue
        self.session = session
        self.no_ack = no_ack
        self.exclusive = exclusive
        self.credit = credit
        self.unacked = 0
        self.unacked_bytes = 0
        self.held = False


PRIORITY_GUARD = 10


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    """A queue's state at one moment, for readers outside the model (LIST, the HTTP
    management API, metrics, the slow-consumer check): they read this, never the
    queue's containers, so a queue kind (Stream) answers for itself."""

    name: str
    type: str  # "classic" or "stream"
    durable: bool
    exclusive: bool
    auto_delete: bool
    arguments: dict[str, Any]
    options: QueueOptions
    ready: int
    unacked: int
    delayed: int
    paged: int
    consumers: int
    ready_bytes: int  # bodies and headers of ready messages
    head_ts: int  # publish time (ms) of the oldest ready message, 0 if none
    published: int
    delivered: int
    acked: int
    redelivered: int
    dead_lettered: int
    expired: int
    dead_letter_dropped: int
    stream: dict[str, Any] | None  # a stream's offsets, bytes and groups (Stream.info)

    def type_fields(self) -> dict[str, Any]:
        """The listing fields that depend on the queue's type: ``{"type": "classic"}``,
        or a stream's ``type``, offsets, ``messages``, ``bytes`` and ``groups``."""
        return dict(self.stream) if self.stream is not None else {"type": "classic"}


class Queue:
    """One queue: ready messages, requeued messages, consumers in round-robin order."""

    def __init__(
        self,
        name: str,
        *,
        durable: bool = True,
        exclusive_owner: str | None = None,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.durable = durable
        self.exclusive_owner = exclusive_owner
        self.auto_delete = auto_delete
        self.arguments: dict[str, Any] = arguments or {}
        self.opts = QueueOptions(self.arguments)
        # Decided once: enqueue checks the length limits only for queues that have one.
        self.has_limit = bool(self.opts.max_length or self.opts.max_length_bytes)
        self._ready: deque[QueuedMessage] = deque()
        self._paged: deque[QueuedMessage] = deque()
        self._lanes: list[deque[QueuedMessage]] | None = (
            [deque() for _ in range(self.opts.max_priority + 1)] if self.opts.max_priority else None
        )
        self._streak = 0  # consecutive top-lane deliveries while lower lanes wait
        self._guard_next = 0
        self._requeued: list[QueuedMessage] = []
        self._delayed: list[tuple[int, int, QueuedMessage]] = []
        self._count = 0  # READY messages
        self._gone = 0  # GONE entries still sitting in the containers
        self.ready_bytes = 0
        self._next_seq = 0
        self.pager: Pager | None = None
        self.mem_bytes = 0  # bodies of ``_ready`` (counted in pager.resident too)
        self._dedup: dict[str, int] = {}
        self._dedup_order: deque[tuple[int, str]] = deque()
        self.consumers: list[Consumer] = []
        self._rr = 0
        self.unacked = 0
        self.had_consumer = False
        self.deleted = False
        self.last_used = 0  # ms; queue expiry counts from here
        # True when this queue's commands go to the write-ahead log (durable, not
        # exclusive, and the broker has a durable store).
        self.logged = False
        # (exchange, binding key) pairs pointing at this queue, so deletion is O(bindings).
        self.bindings: set[tuple[str, str]] = set()
        # counters for listings/metrics
        self.published = 0
        self.delivered = 0
        self.acked = 0
        self.dead_lettered = 0
        self.expired = 0
        # messages dropped instead of dead-lettered: the cycle guard cut every target, or
        # dead-lettering failed (Broker.dead_letter)
        self.dead_letter_dropped = 0
        self.redelivered = 0  # messages requeued to be delivered again (broker.metrics)
        # A dispatch stopped at DISPATCH_MESSAGES / DISPATCH_BYTES with credit left: the
        # broker dispatches again on the next loop turn, after the batch was written.
        self.more = False
        # Entries of Broker._timers that refer to this queue, and of those, how many the
        # last purge made pointless (TTL timers of purged messages).
        self.timers = 0
        self.purged_timers = 0

    # ------------------------------------------------------------------ queries
    @property
    def ready(self) -> int:
        return self._count

    @property
    def paged(self) -> int:
        return len(self._paged)

    @property
    def delayed(self) -> int:
        return len(self._delayed)

    def peek(self) -> QueuedMessage | None:
        """The message ``take`` would return next, without removing it."""
        if not self._count:
            return None
        got = self.take(1, 0)
        if not got:
            return None
        qm = got[0]
        qm.delivery_count -= 1
        self.delivered -= 1
        self.unacked -= 1
        self._put_back(qm)
        return qm

    def iter_messages(self) -> list[QueuedMessage]:
        """Live messages in delivery order, delayed ones last (snapshots, listings)."""
        lanes = [qm for lane in reversed(self._lanes) for qm in lane] if self._lanes else []
        out = sorted(self._requeued) + lanes + list(self._ready) + list(self._paged)
        out += [qm for _due, _seq, qm in sorted(self._delayed)]
        return [qm for qm in out if qm.state != GONE]

    def iter_waiting(self) -> Iterator[QueuedMessage]:
        """``iter_messages`` lazily: taking the first few of a deep queue (a peek, a
        redrive batch) costs that many steps, not a copy of the queue."""
        parts: list[Iterable[QueuedMessage]] = [
            heapq.nsmallest(len(self._requeued), self._requeued)
        ]
        if self._lanes:
            parts += [iter(lane) for lane in reversed(self._lanes)]
        parts += [iter(self._ready), iter(self._paged)]
        parts.append(qm for _due, _seq, qm in sorted(self._delayed))
        return (qm for qm in itertools.chain.from_iterable(parts) if qm.state != GONE)

    def statistics(self) -> QueueStatistics:
        """A snapshot of the counts and counters listings and metrics show."""
        return self._statistics("classic", None)

    def _statistics(self, kind: str, stream: dict[str, Any] | None) -> QueueStatistics:
        return QueueStatistics(
            self.name,
            kind,
            self.durable,
            self.exclusive_owner is not None,
            self.auto_delete,
            self.arguments,
            self.opts,
            self.ready,
            self.unacked,
            self.delayed,
            self.paged,
            len(self.consumers),
            self.ready_bytes,
            self.head_ts(),
            self.published,
            self.delivered,
            self.acked,
            self.redelivered,
            self.dead_lettered,
            self.expired,
            self.dead_letter_dropped,
            stream,
        )

    def waiting(self) -> Iterator[QueuedMessage]:
        """Waiting messages in delivery order, delayed ones last, lazily (management's
        peek and redrive)."""
        return self.iter_waiting()

    def head_ts(self, scan: int = 1000) -> int:
        """Publish time (ms) of the oldest ready message, 0 if none (for the consumer-lag
        metric, at scrape time; looks past at most ``scan`` removed entries per part)."""
        if not self._count:
            return 0
        oldest = 0
        # The requeued heap is not in order: the oldest of its first ``scan`` entries.
        for qm in self._requeued[:scan]:
            ts = qm.message.ts
            if qm.state == READY and ts and (not oldest or ts < oldest):
                oldest = ts
        for part in (*(self._lanes or ()), self._ready, self._paged):
            for i, qm in enumerate(part):
                if i >= scan:
                    break
                if qm.state == READY:
                    ts = qm.message.ts
                    if ts and (not oldest or ts < oldest):
                        oldest = ts
                    break
        return oldest

    def has_ready(self) -> bool:
        return self._count > 0

    def is_full(self, extra_bytes: int = 0) -> bool:
        """At max_length / max_length_bytes (for reject-publish)."""
        o = self.opts
        return bool(
            (o.max_length and self._count >= o.max_length)
            or (o.max_length_bytes and self.ready_bytes + extra_bytes > o.max_length_bytes)
        )

    def over_limit(self) -> bool:
        o = self.opts
        return bool(
            (o.max_length and self._count > o.max_length)
            or (o.max_length_bytes and self.ready_bytes > o.max_length_bytes)
        )

    def duplicate(self, message_id: str, now: int) -> bool:
        """True if ``message_id`` was enqueued within the dedup window; else record it."""
        window = self.opts.dedup_window_ms
        order = self._dedup_order
        while order and order[0][0] <= now - window:
            ts, mid = order.popleft()
            if self._dedup.get(mid) == ts:
                del self._dedup[mid]
        seen = self._dedup.get(message_id)
        if seen is not None and seen > now - window:
            return True
        self._dedup[message_id] = now
        order.append((now, message_id))
        return False

    def seen(self, message_id: str, now: int) -> bool:
        """``message_id`` was taken within the dedup window (unlike ``duplicate``, this
        records nothing)."""
        ts = self._dedup.get(message_id)
        return ts is not None and ts > now - self.opts.dedup_window_ms

    def load_dedup(self, seen: dict[str, int], now: int) -> None:
        window = self.opts.dedup_window_ms
        for mid, ts in sorted(seen.items(), key=lambda kv: kv[1]):
            if ts > now - window:
                self._dedup[mid] = ts
                self._dedup_order.append((ts, mid))

    def dedup_entries(self) -> list[list[Any]]:
        return [[mid, ts] for mid, ts in self._dedup.items()]

    # ------------------------------------------------------------------ commands
    def enqueue(self, message: Message, now: int = 0) -> QueuedMessage:
        """Add a message: delayed until ``ts + delay`` if that is in the future, with a
        TTL deadline from when it becomes visible. The caller arms the timers."""
        self._next_seq += 1
        qm = QueuedMessage(self._next_seq, message)
        self.published += 1
        props = message.properties
        if props:
            delay = props.get("delay")
            due = message.ts + delay if delay else 0
            ttl = props.get("ttl")
            qttl = self.opts.message_ttl_ms
            if qttl and (ttl is None or qttl < ttl):
                ttl = qttl
            if ttl is not None:
                qm.expires = max(due, message.ts or now) + ttl
            if due > now:
                qm.state = DELAYED
                heapq.heappush(self._delayed, (due, qm.seq, qm))
                return qm
        elif self.opts.message_ttl_ms:
            qm.expires = (message.ts or now) + self.opts.message_ttl_ms
        self._add_ready(qm)
        return qm

    def enqueue_many(self, messages: list[Message], now: int) -> list[QueuedMessage]:
        """``enqueue`` each of ``messages``; returns those that need timers (delay, TTL).

        The common case (no priority lanes, queue TTL or paged tail; no delay or TTL on
        the message) appends straight to the ready deque, with the counters updated once.
        """
        pager = self.pager
        if self._lanes is not None or self.opts.message_ttl_ms or (pager and self._paged):
            return [
                qm
                for qm in map(self.enqueue, messages, [now] * len(messages))
                if qm.state != READY or qm.expires
            ]
        armed: list[QueuedMessage] = []
        append = self._ready.append
        seq = self._next_seq
        size = 0
        n = 0
        for m in messages:
            p = m.properties
            if p and ("delay" in p or "ttl" in p):
                self._next_seq = seq
                qm = self.enqueue(m, now)
                seq = self._next_seq
                if qm.state != READY or qm.expires:
                    armed.append(qm)
                continue
            seq += 1
            append(QueuedMessage(seq, m))
            size += m.size
            n += 1
        self._next_seq = seq
        self.published += n
        self._count += n
        self.ready_bytes += size
        if pager is not None:
            self.mem_bytes += size
            pager.resident += size
        return armed

    def _add_ready(self, qm: QueuedMessage) -> None:
        message = qm.message
        self._count += 1
        self.ready_bytes += message.size
        if self._lanes is not None:
            p = message.properties.get("priority", 0) if message.properties else 0
            self._lanes[min(p, len(self._lanes) - 1)].append(qm)
            return
        pager = self.pager
        if pager is not None and (self._paged or message.body is None):
            # Behind a paged tail a message is paged too (order), at the next flush.
            self._paged.append(qm)
            if message.body is not None:
                pager.pending.append(message)
        else:
            self._ready.append(qm)
            if pager is not None:
                self.mem_bytes += message.size
                pager.resident += message.size

    def release(self, now: int) -> list[QueuedMessage]:
        """Delayed messages that are due become ready (appended in due order)."""
        out: list[QueuedMessage] = []
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            qm = heapq.heappop(delayed)[2]
            if qm.state == DELAYED:
                qm.state = READY
                self._add_ready(qm)
                out.append(qm)
        return out

    def next_due(self) -> int:
        return self._delayed[0][0] if self._delayed else 0

    def _pop_lane(self) -> QueuedMessage | None:
        lanes = self._lanes
        assert lanes is not None
        top = len(lanes) - 1
        while top >= 0 and not lanes[top]:
            top -= 1
        if top < 0:
            return None
        lower = [i for i in range(top) if lanes[i]]
        if not lower:
            self._streak = 0
            return lanes[top].popleft()
        self._streak += 1
        if self._streak <= PRIORITY_GUARD:
            return lanes[top].popleft()
        self._streak = 0
        pick = lower[self._guard_next % len(lower)]
        self._guard_next += 1
        return lanes[pick].popleft()

    def take(self, limit: int, deadline: int = 0, max_bytes: int = 0) -> list[QueuedMessage]:
        """Remove up to ``limit`` messages from the head for delivery (marks them unacked,
        with ack deadline ``deadline``); with ``max_bytes``, stop once that many bytes of
        messages were taken (at least one message is)."""
        out: list[QueuedMessage] = []
        requeued = self._requeued
        ready = self._ready
        paged = self._paged
        lanes = self._lanes
        freed = 0
        size = 0
        while len(out) < limit and self._count > len(out):
            if max_bytes and size >= max_bytes:
                break
            if requeued:
                qm = heapq.heappop(requeued)
            elif lanes is not None:
                qm = self._pop_lane()  # type: ignore[assignment]
                if qm is None:
                    break
            elif ready:
                qm = ready.popleft()
                freed += qm.message.size
            elif paged:
                qm = paged.popleft()
            else:
                break
            if qm.state:  # GONE: expired or dropped while waiting
                self._gone -= 1
                continue
            qm.state = DELIVERED
            qm.delivery_count += 1
            qm.deadline = deadline
            size += qm.message.size
            out.append(qm)
        pager = self.pager
        if pager is not None:
            if freed:
                self.mem_bytes -= freed
                pager.resident -= freed
            pager.load([qm.message for qm in out if qm.message.body is None])
        n = len(out)
        self._count -= n
        self.ready_bytes -= size
        self.unacked += n
        self.delivered += n
        return out

    def _put_back(self, qm: QueuedMessage) -> None:
        qm.state = READY
        lanes = self._lanes
        if lanes is not None:
            # Back into its priority lane, before the lane's later messages (it was at
            # the lane's head when taken): a requeue does not outrank higher priorities.
            p = qm.message.properties.get("priority", 0) if qm.message.properties else 0
            lane = lanes[min(p, len(lanes) - 1)]
            i = 0
            while i < len(lane) and lane[i].seq < qm.seq:
                i += 1
            lane.insert(i, qm)
        else:
            heapq.heappush(self._requeued, qm)
        self._count += 1
        self.ready_bytes += qm.message.size

    def ack(self, n: int = 1) -> None:
        """``n`` delivered messages were acknowledged (or delivered no-ack)."""
        self.unacked -= n
        self.acked += n

    def requeue(self, qms: list[QueuedMessage]) -> None:
        """Return delivered messages to their original positions, flagged redelivered."""
        self.unacked -= len(qms)
        if self.deleted:
            return
        self.redelivered += len(qms)
        for qm in qms:
            qm.redelivered = True
            self._put_back(qm)

    def discard(self, n: int) -> None:
        """Delivered messages leave without an ack (rejected, dead-lettered)."""
        self.unacked -= n

    # ----------------------------------------------------- kind hooks (Stream overrides)
    #: True for a queue whose publishes are appended to a log at the end of the batch
    #: (a stream) instead of going through ``enqueue``; such a queue takes the general
    #: publish path and stream consumer arguments.
    appends_to_log = False

    def append_if_log(self, message: Message) -> bool:
        """Take ``message`` by appending it to a log; False: use ``enqueue``."""
        return False

    def takes_pager(self) -> bool:
        """Whether ready bodies may be paged out to disk (not with priority lanes)."""
        return not self.opts.max_priority

    def check_purgeable(self) -> None:
        """Raise the typed error when this queue cannot be purged (a classic one can)."""

    # An ack of n deliveries of this kind is ack(n) and nothing else (a stream's commits each
    # delivery's group offset instead), so Session may settle a transient run by count.
    acks_by_count = True

    def settle_acked(self, qms: list[QueuedMessage]) -> bool:
        """Deliveries of this queue were acked. True when the caller logs the ack record
        (the log is the broker's; a stream settles its groups and logs nothing)."""
        self.ack(len(qms))
        return self.logged

    def settle_refused(self, qms: list[QueuedMessage], requeue: bool) -> bool:
        """Deliveries were nacked/rejected or their connection closed. False: the caller
        requeues or dead-letters them through the broker (a stream settles its groups)."""
        return False

    def on_removed(self) -> None:
        """The queue was deleted from the topology: release what it keeps elsewhere."""

    def drop_refused(self, qms: list[QueuedMessage]) -> bool:
        """Delivered messages that could not be sent leave for good. True when the
        caller still records their end (logs the acks, dead-letters them); a stream
        settles its own bookkeeping instead."""
        self.discard(len(qms))
        for qm in qms:
            qm.state = GONE
        return True

    def new_consumer(
        self,
        tag: str,
        session: Session,
        no_ack: bool,
        exclusive: bool,
        credit: int,
        arguments: dict[str, Any],
    ) -> Consumer:
        """The consumer kind this queue delivers to (arguments already checked)."""
        return Consumer(tag, self, session, no_ack, exclusive, credit)

    def remove(self, qm: QueuedMessage) -> bool:
        """Take a READY or DELAYED message out wherever it is (TTL expiry). False if it
        is not waiting here any more."""
        if qm.state == READY:
            self._count -= 1
            self.ready_bytes -= qm.message.size
            self._gone += 1
        elif qm.state != DELAYED:
            return False
        qm.state = GONE  # a delayed entry is skipped by release()
        return True

    def drop_head(self) -> QueuedMessage | None:
        """Remove the oldest ready message (max-length overflow drop-head)."""
        got = self.take(1, 0)
        if not got:
            return None
        self.unacked -= 1
        self.delivered -= 1
        qm = got[0]
        qm.delivery_count -= 1
        qm.state = GONE
        return qm

    def purge(self) -> int:
        n = self._count
        timed = 0
        for part in (self._ready, self._paged, self._requeued, *(self._lanes or ())):
            for qm in part:
                qm.state = GONE  # gone: a TTL timer still armed for it must skip it
                if qm.expires:
                    timed += 1
        self.purged_timers = timed
        self._ready.clear()
        self._paged.clear()
        self._requeued.clear()
        if self._lanes is not None:
            for lane in self._lanes:
                lane.clear()
        self._count = self._gone = self.ready_bytes = 0
        if self.pager is not None:
            self.pager.resident -= self.mem_bytes
            self.mem_bytes = 0
        return n

    def page_out(self, want: int, out: list[Message]) -> int:
        """Move messages from the resident head's tail to the paged tail until ``want``
        bytes are freed; their messages go to ``out`` (for one Pager.write). Returns bytes."""
        freed = 0
        ready, paged = self._ready, self._paged
        while ready and freed < want:
            qm = ready.pop()
            paged.appendleft(qm)
            freed += qm.message.size
            if qm.state != GONE:
                out.append(qm.message)
        self.mem_bytes -= freed
        if self.pager is not None:
            self.pager.resident -= freed
        return freed

    # ------------------------------------------------------------------ consumers
    def add_consumer(self, consumer: Consumer) -> None:
        self.consumers.append(consumer)
        self.had_consumer = True

    def remove_consumer(self, consumer: Consumer) -> None:
        try:
            idx = self.consumers.index(consumer)
        except ValueError:
            return
        del self.consumers[idx]
        if idx < self._rr:
            self._rr -= 1

    def dispatch(
        self, deliver: Callable[[Consumer, list[QueuedMessage]], None], now: int = 0
    ) -> int:
        """Hand ready messages to consumers with credit, round-robin. Returns count sent.

        With one consumer (or single-active-consumer) it takes a credit-sized batch at
        once; with several it deals one message per consumer per turn so competing
        consumers share fairly. A consumer whose connection is not writing (transport
        paused) or that holds ``max_unacked_bytes_per_consumer`` unacked is skipped, and a
        dispatch hands out at most DISPATCH_MESSAGES / DISPATCH_BYTES (``more`` is set if
        it stopped there), so memory follows what the sockets take.
        """
        consumers = self.consumers
        if not consumers or not self._count:
            return 0
        timeout = self.opts.ack_timeout_ms
        deadline = now + timeout if timeout and now else 0
        sent = 0
        cap = consumers[0].session.broker.limits.max_unacked_bytes_per_consumer
        if len(consumers) == 1 or self.opts.single_active_consumer:
            c = consumers[0]
            if c.credit > 0 and not c.session.write_paused:
                room = DISPATCH_BYTES
                if not c.no_ack:
                    room = min(room, cap - c.unacked_bytes)
                    if room <= 0:
                        c.held = True
                        return 0
                n = min(c.credit, DISPATCH_MESSAGES)
                batch = self.take(n, 0 if c.no_ack else deadline, room)
                if batch:
                    c.credit -= len(batch)
                    sent = len(batch)
                    deliver(c, batch)
                    if c.credit > 0 and self._count:
                        self.more = True
            return sent
        # Several consumers: deal round-robin; collect per consumer, deliver once each.
        pending: dict[int, tuple[Consumer, list[QueuedMessage]]] = {}
        n = len(consumers)
        able = []
        for c in consumers:
            ok = c.credit > 0 and not c.session.write_paused
            if ok and not c.no_ack and c.unacked_bytes >= cap:
                c.held = True
                ok = False
            able.append(ok)
        idle = 0
        size = 0
        i = self._rr % n
        while idle < n and self._count:
            c = consumers[i]
            if not able[i] or c.credit <= 0:
                i = (i + 1) % n
                idle += 1
                continue
            i = (i + 1) % n
            idle = 0
            if sent >= DISPATCH_MESSAGES or size >= DISPATCH_BYTES:
                self.more = True
                break
            got = self.take(1, 0 if c.no_ack else deadline)
            if not got:
                break
            qm = got[0]
            size += qm.message.size
            c.credit -= 1
            slot = pending.get(id(c))
            if slot is None:
                pending[id(c)] = (c, [qm])
            else:
                slot[1].append(qm)
            sent += 1
        self._rr = i
        for c, batch in pending.values():
            deliver(c, batch)
        return sent
