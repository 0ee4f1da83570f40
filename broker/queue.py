"""Queue state machine and consumers, driven by method calls (no sockets).

A queue holds ready messages in publish order plus a heap of requeued ones; since a
requeued message was at the head when it was delivered, every requeued message precedes
every never-delivered one, so "heap first, then deque" restores original order. Ready
messages are a resident head (``_ready``) and, under memory pressure, a paged tail
(``_paged``, bodies on disk: broker.pager) that follows it in order.

Commands that change state: enqueue, take (deliver), ack, requeue, discard (reject),
purge. Each returns what changed so the caller (the broker core) can log it to the store
and produce frames.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker.message import Message, QueuedMessage

if TYPE_CHECKING:
    from broker.pager import Pager
    from broker.session import Session


class Consumer:
    """A push subscription: credit says how many more deliveries it may receive."""

    __slots__ = ("credit", "exclusive", "no_ack", "queue", "session", "tag", "unacked")

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
        self._ready: deque[QueuedMessage] = deque()
        self._paged: deque[QueuedMessage] = deque()
        self._requeued: list[QueuedMessage] = []
        self.pager: Pager | None = None
        self.mem_bytes = 0  # bodies of ``_ready`` (counted in pager.resident too)
        self._next_seq = 0
        self.consumers: list[Consumer] = []
        self._rr = 0
        self.unacked = 0
        self.had_consumer = False
        self.deleted = False
        # True when this queue's commands go to the write-ahead log (durable, not
        # exclusive, and the broker has a durable store).
        self.logged = False
        # (exchange, binding key) pairs pointing at this queue, so deletion is O(bindings).
        self.bindings: set[tuple[str, str]] = set()
        # counters for listings/metrics
        self.published = 0
        self.delivered = 0
        self.acked = 0

    # ------------------------------------------------------------------ queries
    @property
    def ready(self) -> int:
        return len(self._ready) + len(self._paged) + len(self._requeued)

    @property
    def paged(self) -> int:
        return len(self._paged)

    def peek(self) -> QueuedMessage | None:
        """The message ``take`` would return next, without removing it."""
        if self._requeued:
            return self._requeued[0]
        if self._ready:
            return self._ready[0]
        return self._paged[0] if self._paged else None

    def iter_messages(self) -> list[QueuedMessage]:
        """Ready messages in delivery order (for snapshots and listings)."""
        return sorted(self._requeued) + list(self._ready) + list(self._paged)

    def has_ready(self) -> bool:
        return bool(self._ready) or bool(self._requeued) or bool(self._paged)

    # ------------------------------------------------------------------ commands
    def enqueue(self, message: Message) -> QueuedMessage:
        self._next_seq += 1
        qm = QueuedMessage(self._next_seq, message)
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
        self.published += 1
        return qm

    def take(self, limit: int) -> list[QueuedMessage]:
        """Remove up to ``limit`` messages from the head for delivery (marks them unacked)."""
        out: list[QueuedMessage] = []
        requeued = self._requeued
        ready = self._ready
        freed = 0
        while len(out) < limit:
            if requeued:
                qm = heapq.heappop(requeued)
            elif ready:
                qm = ready.popleft()
                freed += qm.message.size
            elif self._paged:
                qm = self._paged.popleft()
            else:
                break
            qm.delivery_count += 1
            out.append(qm)
        pager = self.pager
        if pager is not None:
            if freed:
                self.mem_bytes -= freed
                pager.resident -= freed
            pager.load([qm.message for qm in out if qm.message.body is None])
        n = len(out)
        self.unacked += n
        self.delivered += n
        return out

    def ack(self, n: int = 1) -> None:
        """``n`` delivered messages were acknowledged (or delivered no-ack)."""
        self.unacked -= n
        self.acked += n

    def requeue(self, qms: list[QueuedMessage]) -> None:
        """Return delivered messages to their original positions, flagged redelivered."""
        self.unacked -= len(qms)
        if self.deleted:
            return
        for qm in qms:
            qm.redelivered = True
            heapq.heappush(self._requeued, qm)

    def discard(self, n: int) -> None:
        """Delivered messages rejected without requeue (dead-lettering hooks in here)."""
        self.unacked -= n

    def purge(self) -> int:
        n = self.ready
        self._ready.clear()
        self._paged.clear()
        self._requeued.clear()
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

    def dispatch(self, deliver: Callable[[Consumer, list[QueuedMessage]], None]) -> int:
        """Hand ready messages to consumers with credit, round-robin. Returns count sent.

        With one consumer it takes a whole credit-sized batch at once; with several it
        deals one message per consumer per turn so competing consumers share fairly.
        """
        consumers = self.consumers
        if not consumers or not self.has_ready():
            return 0
        sent = 0
        if len(consumers) == 1:
            c = consumers[0]
            if c.credit > 0:
                batch = self.take(c.credit)
                if batch:
                    c.credit -= len(batch)
                    sent = len(batch)
                    deliver(c, batch)
            return sent
        # Several consumers: deal round-robin; collect per consumer, deliver once each.
        pending: dict[int, tuple[Consumer, list[QueuedMessage]]] = {}
        n = len(consumers)
        idle = 0
        i = self._rr % n
        while idle < n and self.has_ready():
            c = consumers[i]
            i = (i + 1) % n
            if c.credit <= 0:
                idle += 1
                continue
            idle = 0
            qm = self.take(1)[0]
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
