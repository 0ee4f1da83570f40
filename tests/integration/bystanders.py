"""Well-behaved clients that run while a test attacks the broker, and what they saw.

``Bystanders`` keeps, on its own connections (heartbeats on, so a broker whose loop is
blocked drops them): a producer and a consumer on one queue, a client doing publish/get
round trips on another queue, and at the end a brand-new connection. Every loop is bounded
in count and time. ``check()`` fails the test unless every confirmed message arrived, the
connections stayed open and the new connection worked; ``figures()`` is for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conveyor import client
from tests.integration.helpers import WAIT, connect

HEARTBEAT_MS = 1000  # two missed intervals (2 s of a blocked broker loop) drop a connection


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class Bystanders:
    url: str
    queue: str = "bystander-work"
    other_queue: str = "bystander-other"
    max_messages: int = 100_000
    sent: int = 0
    received: int = 0
    round_trips: int = 0
    new_connection_ok: bool = False
    lost: list[str] = field(default_factory=list)
    _conns: list[client.Connection] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> Bystanders:
        producer = await connect(self.url, heartbeat_ms=HEARTBEAT_MS)
        consumer_conn = await connect(self.url, heartbeat_ms=HEARTBEAT_MS)
        other = await connect(self.url, heartbeat_ms=HEARTBEAT_MS)
        self._conns = [producer, consumer_conn, other]
        await producer.declare_queue(self.queue, durable=False)
        await other.declare_queue(self.other_queue, durable=False)
        consumer = await consumer_conn.consume(self.queue, prefetch=64)
        self._tasks = [
            asyncio.create_task(self._produce(producer), name="producer"),
            asyncio.create_task(self._consume(consumer), name="consumer"),
            asyncio.create_task(self._round_trips(other), name="round-trips"),
        ]
        return self

    async def _produce(self, conn: client.Connection) -> None:
        while not self._stop.is_set() and self.sent < self.max_messages:
            await conn.publish("", self.queue, b"work-%d" % self.sent, timeout=WAIT * 3)
            self.sent += 1
            await asyncio.sleep(0.005)

    async def _consume(self, consumer: client.Consumer) -> None:
        while self.received < self.max_messages:
            msg = await consumer.get(0.2)
            if msg is None:
                if self._stop.is_set() and self.received >= self.sent:
                    return
                continue
            assert msg.body == b"work-%d" % self.received, msg.body
            msg.ack()
            self.received += 1

    async def _round_trips(self, conn: client.Connection) -> None:
        while not self._stop.is_set() and self.round_trips < self.max_messages:
            body = b"rt-%d" % self.round_trips
            await conn.publish("", self.other_queue, body, timeout=WAIT * 3)
            got = await conn.get(self.other_queue, no_ack=True, timeout=WAIT * 3)
            assert [m.body for m in got] == [body], got
            self.round_trips += 1
            await asyncio.sleep(0.005)

    async def stop(self, timeout: float = 60.0) -> None:
        """Stop the loops (the consumer drains what was sent), then open a new connection."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._tasks:
            try:
                await asyncio.wait_for(t, max(0.1, deadline - time.monotonic()))
            except Exception as exc:  # recorded, asserted by check()
                self.lost.append(f"{t.get_name()}: {exc!r}")
        for c in self._conns:
            if not c.is_open:
                self.lost.append(f"connection {c} closed")
        try:
            fresh = await connect(self.url, heartbeat_ms=HEARTBEAT_MS)
            try:
                await fresh.declare_queue("bystander-fresh", durable=False)
                await fresh.publish("", "bystander-fresh", b"hello")
                got = await fresh.get("bystander-fresh", no_ack=True, timeout=WAIT)
                self.new_connection_ok = [m.body for m in got] == [b"hello"]
            finally:
                await asyncio.wait_for(fresh.close(), WAIT)
        except Exception as exc:  # recorded, asserted by check()
            self.lost.append(f"new connection: {exc!r}")
        for c in self._conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.close(), WAIT)

    def check(self) -> None:
        assert not self.lost, self.lost
        assert self.sent > 0 and self.round_trips > 0, self.figures()
        assert self.received == self.sent, self.figures()
        assert self.new_connection_ok, self.figures()

    def figures(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "received": self.received,
            "round_trips": self.round_trips,
            "new_connection_ok": self.new_connection_ok,
            "lost": self.lost,
        }
