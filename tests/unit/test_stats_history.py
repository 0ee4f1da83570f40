"""The per-queue history ring of broker.http.stats: bounded, oldest first, wraps."""

from __future__ import annotations

import time

import pytest

import conveyor.broker.http.stats as stats_mod
from conveyor.broker.core import Broker
from conveyor.broker.http.stats import (
    HISTORY_FIELDS,
    HISTORY_INTERVAL,
    HISTORY_SAMPLES,
    Stats,
    _Ring,
)


def test_ring_keeps_the_last_samples_in_order() -> None:
    ring = _Ring()
    assert ring.rows() == []
    for i in range(HISTORY_SAMPLES + 130):
        ring.add((float(i), float(i), 0.0, 1.0, 2.0, 3.0))
    rows = ring.rows()
    assert len(rows) == HISTORY_SAMPLES
    assert len(ring.data) == HISTORY_SAMPLES * len(HISTORY_FIELDS)  # never grows past it
    assert [r[0] for r in rows] == [float(i) for i in range(130, HISTORY_SAMPLES + 130)]
    assert rows[-1] == (float(HISTORY_SAMPLES + 129),) * 2 + (0.0, 1.0, 2.0, 3.0)


def test_ring_before_it_is_full() -> None:
    ring = _Ring()
    for i in range(3):
        ring.add((float(i), 5.0, 1.0, 0.0, 0.0, 0.0))
    assert [r[0] for r in ring.rows()] == [0.0, 1.0, 2.0]


def test_stats_history_per_queue_is_bounded_in_queues_and_follows_deletes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A queue gets a row the first time the sampler sees it, rows every interval after
    that, at most HISTORY_QUEUES queues have a history, and a deleted queue's goes."""
    monkeypatch.setattr(stats_mod, "HISTORY_QUEUES", 2)
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    broker = Broker()
    for name in ("a", "b", "c"):
        broker.declare_queue(None, name, durable=False)
    stats = Stats(broker)
    clock[0] += 1
    stats.sample()
    assert [len(stats.history(n)) for n in ("a", "b", "c")] == [1, 1, 0]
    for _ in range(int(HISTORY_INTERVAL) * 3):  # three intervals of 1 s samples
        clock[0] += 1
        stats.sample()
    assert [len(stats.history(n)) for n in ("a", "b", "c")] == [4, 4, 0]
    row = stats.history("a")[-1]
    assert set(row) == set(HISTORY_FIELDS) and row["messages"] == 0
    broker.delete_queue(None, "a")
    clock[0] += 1
    stats.sample()
    assert stats.history("a") == []
    assert len(stats.history("c")) == 1  # a's place went to c
