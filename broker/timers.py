"""The broker's timer heap: delay release, TTL expiry, queue expiry and the periodic
ack-deadline sweep, as (due ms, seq, kind, owner, item) entries.

A leaf module: it knows nothing of queues or messages beyond the ``TimerOwner``
protocol (a live-entry counter), so the caller decides what each kind means
(``Broker.tick``) and which entries went stale (a callback)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class TimerOwner(Protocol):
    """What an entry's owner keeps: how many heap entries refer to it."""

    timers: int


O = TypeVar("O", bound=TimerOwner)  # noqa: E741 -- the owner type of an entry
I = TypeVar("I")  # noqa: E741 -- the item type of an entry


class TimerHeap(Generic[O, I]):
    """A min-heap of timers plus the transport's one-shot wake-up ``hook``.

    ``hook(seconds from now)`` is called whenever a new earliest entry appears, so
    the transport wakes the broker (``due``) when it is time."""

    def __init__(
        self, clock: Callable[[], int], is_stale: Callable[[int, O, I | None], bool]
    ) -> None:
        self.clock = clock
        self.hook: Callable[[float], None] | None = None
        self.heap: list[tuple[int, int, int, O | None, I | None]] = []
        self._seq = itertools.count()
        self._armed = 0
        self._is_stale = is_stale
        # Entries that point at nothing any more: dropped in one pass once they are a
        # large share of the heap (drop_stale).
        self._stale = 0

    def add(self, due: int, kind: int, owner: O | None, item: I | None) -> None:
        heapq.heappush(self.heap, (due, next(self._seq), kind, owner, item))
        if owner is not None:
            owner.timers += 1
        if self.hook is not None and (not self._armed or due < self._armed):
            self._armed = due
            self.hook(max(0.0, (due - self.clock()) / 1000))

    def next_due(self) -> int:
        """When the earliest timer is due (ms since the epoch), 0 if none."""
        return self.heap[0][0] if self.heap else 0

    def due(self, now: int) -> Iterator[tuple[int, O | None, I | None]]:
        """Pop and yield (kind, owner, item) of every entry due by ``now``, including
        ones added while iterating; ``rearm`` afterwards."""
        heap = self.heap
        self._armed = 0
        while heap and heap[0][0] <= now:
            _due, _seq, kind, owner, item = heapq.heappop(heap)
            if owner is not None:
                owner.timers -= 1
            yield kind, owner, item

    def rearm(self, now: int) -> None:
        """Point the transport's wake-up at the earliest remaining entry."""
        if self.heap and self.hook is not None:
            self._armed = self.heap[0][0]
            self.hook(max(0.0, (self.heap[0][0] - now) / 1000))

    def start(self) -> None:
        """The hook was just set: arm it for the entries added before."""
        self._armed = 0

    def arm(self) -> None:
        """Arm the hook for the earliest entry (after ``start`` and its first adds)."""
        if self.hook is not None and self.heap:
            self._armed = self.heap[0][0]
            self.hook(max(0.0, (self._armed - self.clock()) / 1000))

    def drop_stale(self, stale: int) -> None:
        """``stale`` more entries point at nothing (deleted owner, gone item): once such
        entries are half the heap (or 65,536), drop them all in one pass, so what they
        reference (a TTL of 2^63 ms keeps its entry for ever) is freed, at O(1)
        amortised cost per entry."""
        if not stale:
            return
        self._stale += stale
        heap = self.heap
        if self._stale * 2 < len(heap) and self._stale < 65536:
            return
        keep = []
        is_stale = self._is_stale
        for t in heap:
            owner = t[3]
            if owner is not None and is_stale(t[2], owner, t[4]):
                owner.timers -= 1
                continue
            keep.append(t)
        heap[:] = keep  # in place: a caller may be iterating over this list
        heapq.heapify(heap)
        self._stale = 0
