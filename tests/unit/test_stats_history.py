"""The per-queue history ring of broker.http.stats: bounded, oldest first, wraps."""

from __future__ import annotations

from broker.http.stats import HISTORY_FIELDS, HISTORY_SAMPLES, _Ring


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
