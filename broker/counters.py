"""Plain-int counters the broker keeps for metrics (read by broker.metrics at scrape time).

Nothing here takes a lock or allocates per observation: the hot paths add to ints and
list slots once per batch, and the Prometheus collector (broker.metrics) turns these into
metric families only when ``/metrics`` is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from conveyor.broker.message import QueuedMessage

# Publish-to-delivery latency bucket bounds, in ms (Message.ts has ms resolution).
LATENCY_BOUNDS_MS: tuple[int, ...] = (
    1,
    2,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
)
# WAL fdatasync duration bucket bounds, in seconds.
FSYNC_BOUNDS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class Buckets:
    """A histogram as a list of per-bucket counts (not cumulative; the last slot is +Inf)
    plus the sum of the observations, in the bounds' unit."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        """``n`` observations of ``value`` (le semantics: value <= bound)."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def cumulative(self) -> list[int]:
        out: list[int] = []
        total = 0
        for c in self.counts:
            total += c
            out.append(total)
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


class LatencyHistogram(Buckets):
    """Publish-to-delivery latency (ms), recorded once per delivery batch."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(LATENCY_BOUNDS_MS)

    def observe_batch(self, batch: list[QueuedMessage], now: int) -> None:
        """Latency of each message of a delivery batch: ``now - Message.ts`` (ms).

        Batches come off a queue in publish order, so when the first and the last message
        fall into the same bucket every message does: one ``+= n`` for the batch (the sum
        then takes the midpoint). Otherwise (a batch spanning buckets, or out of publish
        order: priority lanes, delayed messages) each message is bucketed.
        """
        bounds = self.bounds
        first = now - batch[0].message.ts
        n = len(batch)
        if n == 1:
            if first < 0:
                first = 0
            self.counts[bisect_left(bounds, first)] += 1
            self.sum += first
            return
        last = now - batch[-1].message.ts
        i = bisect_left(bounds, first)
        if i == bisect_left(bounds, last) and first >= 0 and last >= 0:
            self.counts[i] += n
            self.sum += (first + last) * n / 2
            return
        counts = self.counts
        total = 0
        for qm in batch:
            lat = now - qm.message.ts
            if lat < 0:
                lat = 0
            counts[bisect_left(bounds, lat)] += 1
            total += lat
        self.sum += total
