"""Message rates for the management API: counters sampled about once a second.

Queues count what they took (``published``), handed out (``delivered``) and had
acknowledged (``acked``). A sampler task reads them every ``INTERVAL`` seconds and keeps
per-second rates per queue and broker-wide (a deleted queue's counters just stop
contributing; rates never go negative).

Every ``HISTORY_INTERVAL`` seconds it also records each queue's depth, unacked count and
rates over that interval into a bounded ring (``History``), so a chart opened later has
the last hour at once instead of starting empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.broker.core import Broker

INTERVAL = 1.0
COUNTERS = ("publish", "deliver", "ack")
ZERO = {"publish": 0.0, "deliver": 0.0, "ack": 0.0}
HISTORY_INTERVAL = 5.0  # seconds between two history samples of a queue
HISTORY_SAMPLES = 720  # samples kept per queue: the last hour
HISTORY_QUEUES = 1000  # queues with a history (8 floats x 720 each, ~35 KiB at most)
HISTORY_FIELDS = ("t", "messages", "unacked", "publish", "deliver", "ack")
_WIDTH = len(HISTORY_FIELDS)


class _Ring:
    """The last ``HISTORY_SAMPLES`` rows of one queue in one flat float array: it grows
    to its bound, then overwrites its oldest row."""

    __slots__ = ("data", "next")

    def __init__(self) -> None:
        self.data = array("d")
        self.next = 0  # row to overwrite once full

    def add(self, row: tuple[float, ...]) -> None:
        if len(self.data) < HISTORY_SAMPLES * _WIDTH:
            self.data.extend(row)
            return
        i = self.next * _WIDTH
        self.data[i : i + _WIDTH] = array("d", row)
        self.next = (self.next + 1) % HISTORY_SAMPLES

    def rows(self) -> list[tuple[float, ...]]:
        d = self.data
        n = len(d) // _WIDTH
        order = [(self.next + k) % n for k in range(n)] if n == HISTORY_SAMPLES else range(n)
        return [tuple(d[i * _WIDTH : (i + 1) * _WIDTH]) for i in order]


def history_row(
    t_ms: float, messages: int, unacked: int, rates: dict[str, float]
) -> dict[str, Any]:
    return {
        "t": int(t_ms),
        "messages": messages,
        "unacked": unacked,
        **{k: round(rates.get(k, 0.0), 2) for k in COUNTERS},
    }


def _counts(broker: Broker) -> dict[str, tuple[int, int, int]]:
    return {name: (q.published, q.delivered, q.acked) for name, q in broker.queues.items()}


class Stats:
    """Per-second publish/deliver/ack rates, per queue and in total."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._last = _counts(broker)
        self._at = time.monotonic()
        self.queue_rates: dict[str, dict[str, float]] = {}
        self.rates: dict[str, float] = dict(ZERO)
        self._task: asyncio.Task[None] | None = None
        self.on_sample: list[Any] = []  # callables run after each sample (housekeeping)
        self._rings: dict[str, _Ring] = {}
        self._hist_last: dict[str, tuple[int, int, int]] = {}
        self._hist_at = self._at

    def sample(self) -> None:
        now = time.monotonic()
        dt = max(now - self._at, 1e-3)
        cur = _counts(self.broker)
        total = [0.0, 0.0, 0.0]
        rates: dict[str, dict[str, float]] = {}
        for name, counts in cur.items():
            prev = self._last.get(name, (0, 0, 0))
            r = [max(0, c - p) / dt for c, p in zip(counts, prev, strict=True)]
            rates[name] = {k: round(v, 2) for k, v in zip(COUNTERS, r, strict=True)}
            for i in range(3):
                total[i] += r[i]
        self.queue_rates = rates
        self.rates = {k: round(v, 2) for k, v in zip(COUNTERS, total, strict=True)}
        self._last = cur
        self._at = now
        self._record_history(now, cur)
        for fn in self.on_sample:
            fn()

    def queue(self, name: str) -> dict[str, float]:
        return self.queue_rates.get(name, dict(ZERO))

    def _record_history(self, now: float, cur: dict[str, tuple[int, int, int]]) -> None:
        """A row per queue every HISTORY_INTERVAL (rates averaged over the interval); a
        queue seen for the first time gets its first row at once."""
        due = now - self._hist_at >= HISTORY_INTERVAL - 1e-3
        rings = self._rings
        for gone in [n for n in rings if n not in cur]:
            del rings[gone]
            self._hist_last.pop(gone, None)
        if not due and all(n in rings for n in cur):
            return
        wall = time.time() * 1000
        dt = max(now - self._hist_at, 1e-3)
        queues = self.broker.queues
        for name, counts in cur.items():
            ring = rings.get(name)
            if ring is None:
                if len(rings) >= HISTORY_QUEUES:
                    continue
                ring = rings[name] = _Ring()
                rates = self.queue(name)
                if not due:
                    self._hist_last[name] = counts
            elif not due:
                continue
            else:
                prev = self._hist_last.get(name, counts)
                rates = {
                    k: max(0, c - p) / dt for k, c, p in zip(COUNTERS, counts, prev, strict=True)
                }
            q = queues[name]
            ring.add((wall, q.ready, q.unacked, rates["publish"], rates["deliver"], rates["ack"]))
        if due:
            self._hist_last = dict(cur)
            self._hist_at = now

    def history(self, name: str) -> list[dict[str, Any]]:
        """The queue's recorded rows, oldest first (empty if it has none)."""
        ring = self._rings.get(name)
        if ring is None:
            return []
        return [
            history_row(t, int(m), int(u), dict(zip(COUNTERS, r, strict=True)))
            for t, m, u, *r in ring.rows()
        ]

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            self.sample()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def basic_metrics(broker: Broker, stats: Stats, connections: int) -> str:
    """A minimal Prometheus text exposition (used when no richer renderer is hooked in)."""
    lines = [
        "# HELP conveyor_connections Open client connections.",
        "# TYPE conveyor_connections gauge",
        f"conveyor_connections {connections}",
        "# HELP conveyor_queues Queues.",
        "# TYPE conveyor_queues gauge",
        f"conveyor_queues {len(broker.queues)}",
    ]
    for metric, attr, help_ in (
        ("messages_ready", "ready", "Ready messages."),
        ("messages_unacked", "unacked", "Delivered, not acked."),
        ("published_total", "published", "Messages enqueued."),
        ("delivered_total", "delivered", "Messages delivered."),
        ("acked_total", "acked", "Messages acknowledged."),
    ):
        kind = "counter" if metric.endswith("_total") else "gauge"
        lines += [
            f"# HELP conveyor_queue_{metric} {help_}",
            f"# TYPE conveyor_queue_{metric} {kind}",
        ]
        for name, q in sorted(broker.queues.items()):
            label = name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'conveyor_queue_{metric}{{queue="{label}"}} {getattr(q, attr)}')
    return "\n".join(lines) + "\n"
