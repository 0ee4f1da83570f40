"""Slow-consumer log lines.

A consumer is *slow* when, for ``stall_seconds`` in a row, its queue had ready messages
while the consumer had no credit left (it holds as many unacked deliveries as its
prefetch allows) and its connection received no new delivery: messages wait although it
is subscribed, because it does not settle what it holds. (A consumer that is merely
saturated by a backlog keeps getting deliveries as it acks, so it is not slow.) Each slow
consumer is logged once when it crosses the threshold and then at most every
``repeat_seconds`` while it stays slow; at most ``max_lines`` lines per check (the rest
are summed up in one line), so a broker with thousands of stuck consumers cannot flood
its log. The check runs once a second over the consumers (not on any message path).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conveyor.broker.core import Broker
    from conveyor.broker.queue import Consumer

log = logging.getLogger("conveyor.consumers")

STALL_SECONDS = 30.0
REPEAT_SECONDS = 300.0
MAX_LINES = 10


class SlowConsumers:
    def __init__(
        self,
        broker: Broker,
        *,
        stall_seconds: float = STALL_SECONDS,
        repeat_seconds: float = REPEAT_SECONDS,
        max_lines: int = MAX_LINES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.stall_seconds = stall_seconds
        self.repeat_seconds = repeat_seconds
        self.max_lines = max_lines
        self.clock = clock
        # stalled consumer -> (since when, its connection's last delivery tag then)
        self._since: dict[Consumer, tuple[float, int]] = {}
        self._logged: dict[Consumer, float] = {}  # -> when it was last logged
        self._task: asyncio.Task[None] | None = None
        self.slow = 0  # consumers slow at the last check

    def check(self) -> list[Consumer]:
        """Update the stall clocks; log (rate-limited) and return the slow consumers."""
        now = self.clock()
        since: dict[Consumer, tuple[float, int]] = {}
        slow: list[Consumer] = []
        for q in self.broker.queues.values():
            if not q.consumers or not q.statistics().ready:
                continue
            for c in q.consumers:
                if c.credit > 0:
                    continue
                tag = c.session.deliveries.next_tag  # moves with every delivery on the connection
                t, seen = self._since.get(c, (now, tag))
                if seen != tag:
                    t = now
                since[c] = (t, tag)
                if now - t >= self.stall_seconds:
                    slow.append(c)
        self._since = since
        self._logged = {c: t for c, t in self._logged.items() if c in since}
        self.slow = len(slow)
        lines = 0
        skipped = 0
        for c in slow:
            last = self._logged.get(c)
            if last is not None and now - last < self.repeat_seconds:
                continue
            if lines >= self.max_lines:
                skipped += 1
                continue
            lines += 1
            self._logged[c] = now
            q = c.queue
            ready = q.statistics().ready
            s = c.session
            stalled = round(now - since[c][0], 1)
            log.warning(
                "slow consumer %s on queue %r (connection %s): no credit for %.0fs with %d "
                "ready messages waiting, %d unacked",
                c.tag,
                q.name,
                s.id,
                stalled,
                ready,
                c.unacked,
                extra={
                    "event": "consumer.slow",
                    "queue": q.name,
                    "consumer_tag": c.tag,
                    "connection": s.id,
                    "peer": s.flow.peer,
                    "stalled_seconds": stalled,
                    "ready": ready,
                    "unacked": c.unacked,
                },
            )
        if skipped:
            log.warning(
                "%d more slow consumers not listed",
                skipped,
                extra={"event": "consumer.slow", "more": skipped},
            )
        return slow

    def start(self, interval: float = 1.0) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(interval))

    async def _run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.check()
            except Exception:  # a bug here must not stop the broker
                log.exception("slow-consumer check failed")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
