"""One connection's unacked deliveries: tags, deadlines, settling.

A :class:`Deliveries` is the only owner of this state (the binary Session and the HTTP
gateway's session both go through it), so tags, the earliest ack deadline the broker's
sweep reads and the "already timed out" memory cannot drift apart. Everything that
changes it is batch-shaped: a dispatch batch is recorded in one call, a cumulative ack
removes its run in one call. Readers get ``len()``, ``in``, :meth:`get`, :attr:`view`
(a read-only mapping tag -> delivery), :attr:`next_tag` and :attr:`min_deadline`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from types import MappingProxyType
from typing import TYPE_CHECKING

from conveyor.protocol import PreconditionFailed

if TYPE_CHECKING:
    from conveyor.broker.message import QueuedMessage
    from conveyor.broker.queue import Consumer, Queue

# An unacked delivery: (message in its queue, the queue, the consumer or None for GET).
Unacked = tuple["QueuedMessage", "Queue", "Consumer | None"]

# Timed-out tags remembered so a late ack/nack of one is ignored rather than refused.
TIMED_OUT_MAX = 100_000


class Deliveries:
    """Unacked deliveries of one connection, keyed by delivery tag in tag order."""

    __slots__ = ("_min_deadline", "_next_tag", "_timed_out", "_unacked", "view")

    def __init__(self) -> None:
        self._unacked: OrderedDict[int, Unacked] = OrderedDict()
        # Read-only window on the deliveries (listings, snapshots, tests).
        self.view: MappingProxyType[int, Unacked] = MappingProxyType(self._unacked)
        self._next_tag = 0  # the last tag handed out
        self._min_deadline = 0  # earliest ack deadline (0 = none): the sweep skips until then
        self._timed_out: OrderedDict[int, None] = OrderedDict()

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._unacked)

    def __bool__(self) -> bool:
        return bool(self._unacked)

    def __contains__(self, tag: object) -> bool:
        return tag in self._unacked

    def get(self, tag: int) -> Unacked | None:
        return self._unacked.get(tag)

    @property
    def next_tag(self) -> int:
        """The last delivery tag used: it moves with every delivery (slow-consumer check)."""
        return self._next_tag

    @property
    def min_deadline(self) -> int:
        """Earliest ack deadline among the deliveries, broker clock ms (0 = none)."""
        return self._min_deadline

    def timed_out(self, tag: int) -> bool:
        """Whether ``tag``'s ack deadline passed (it was requeued)."""
        return tag in self._timed_out

    # ------------------------------------------------------------------ recording
    def add(
        self, batch: list[QueuedMessage], queue: Queue, consumer: Consumer | None, no_ack: bool
    ) -> int:
        """Hand ``batch`` consecutive new tags and, unless ``no_ack``, record each as
        unacked until its ``deadline`` (the batch's first sets the min deadline: one
        dispatch or GET takes them all at once). Returns the first tag."""
        first = self._next_tag + 1
        self._next_tag = last = first + len(batch) - 1
        if no_ack:
            return first
        if len(batch) == 1:
            self._unacked[first] = (batch[0], queue, consumer)
        else:
            self._unacked.update(
                zip(range(first, last + 1), [(qm, queue, consumer) for qm in batch], strict=True)
            )
        dl = batch[0].deadline
        if dl and (not self._min_deadline or dl < self._min_deadline):
            self._min_deadline = dl
        return first

    # ------------------------------------------------------------------ settling
    def settle(self, tag: int, multiple: bool) -> list[Unacked]:
        """Remove and return the deliveries an ack/nack/reject names (``multiple``: every
        one up to ``tag``, 0 = all). A timed-out tag settles nothing; an unknown one is
        406 (PreconditionFailed)."""
        unacked = self._unacked
        if not multiple:
            u = unacked.pop(tag, None)
            if u is None:
                if tag in self._timed_out:
                    return []  # its ack deadline passed: already back in the queue
                raise PreconditionFailed(f"unknown delivery tag {tag}", {"delivery_tag": tag})
            return [u]
        if unacked and (not tag or next(reversed(unacked)) <= tag):
            out = list(unacked.values())  # the usual cumulative ack: everything
            unacked.clear()
            return out
        out = []
        while unacked:
            first = next(iter(unacked))
            if tag and first > tag:
                break
            out.append(unacked.popitem(last=False)[1])
        if not out and tag and tag not in self._timed_out:
            raise PreconditionFailed(f"unknown delivery tag {tag}", {"delivery_tag": tag})
        return out

    def pop(self, tag: int) -> Unacked | None:
        """Remove one delivery (the gateway's handles, undeliverable frames)."""
        return self._unacked.pop(tag, None)

    def pop_many(self, tags: Iterable[int]) -> list[Unacked]:
        """Remove the live deliveries among ``tags``."""
        pop = self._unacked.pop
        return [u for u in map(lambda t: pop(t, None), tags) if u is not None]

    def extend(self, tag: int, timeout_ms: int, now: int) -> bool:
        """Restart ``tag``'s ack deadline: ``timeout_ms`` from ``now``, or the queue's ack
        timeout if 0 (none: no deadline). False if no such live delivery."""
        u = self._unacked.get(tag)
        if u is None:
            return False
        qm, q, _c = u
        ms = timeout_ms or q.opts.ack_timeout_ms
        qm.deadline = now + ms if ms else 0
        if qm.deadline and (not self._min_deadline or qm.deadline < self._min_deadline):
            self._min_deadline = qm.deadline
        return True

    def expire(self, now: int) -> list[Unacked]:
        """Remove and return the deliveries whose deadline is at or before ``now``; their
        tags are remembered as timed out. Cheap until the min deadline is reached."""
        if not self._min_deadline or now < self._min_deadline:
            return []
        expired: list[int] = []
        nxt = 0
        for tag, (qm, _q, _c) in self._unacked.items():
            dl = qm.deadline
            if dl:
                if dl <= now:
                    expired.append(tag)
                elif not nxt or dl < nxt:
                    nxt = dl
        self._min_deadline = nxt
        if not expired:
            return []
        pop = self._unacked.pop
        timed_out = self._timed_out
        out = []
        for tag in expired:
            out.append(pop(tag))
            timed_out[tag] = None
        while len(timed_out) > TIMED_OUT_MAX:
            timed_out.popitem(last=False)
        return out

    def drain(self) -> list[Unacked]:
        """Remove and return every delivery (the connection closed)."""
        out = list(self._unacked.values())
        self._unacked.clear()
        self._min_deadline = 0
        return out
