"""Message rates for the management API: counters sampled about once a second.

Queues count what they took (``published``), handed out (``delivered``) and had
acknowledged (``acked``). A sampler task reads them every ``INTERVAL`` seconds and keeps
per-second rates per queue and broker-wide (a deleted queue's counters just stop
contributing; rates never go negative).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.core import Broker

INTERVAL = 1.0
COUNTERS = ("publish", "deliver", "ack")
ZERO = {"publish": 0.0, "deliver": 0.0, "ack": 0.0}


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
        for fn in self.on_sample:
            fn()

    def queue(self, name: str) -> dict[str, float]:
        return self.queue_rates.get(name, dict(ZERO))

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
    for metric, attr, help_ in (("messages_ready", "ready", "Ready messages."),
                                ("messages_unacked", "unacked", "Delivered, not acked."),
                                ("published_total", "published", "Messages enqueued."),
                                ("delivered_total", "delivered", "Messages delivered."),
                                ("acked_total", "acked", "Messages acknowledged.")):
        kind = "counter" if metric.endswith("_total") else "gauge"
        lines += [f"# HELP conveyor_queue_{metric} {help_}",
                  f"# TYPE conveyor_queue_{metric} {kind}"]
        for name, q in sorted(broker.queues.items()):
            label = name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'conveyor_queue_{metric}{{queue="{label}"}} {getattr(q, attr)}')
    return "\n".join(lines) + "\n"
