"""A consumer that grants itself 2^32-1 credit on a paged backlog and never reads cannot
make the broker load the backlog into memory: nothing is dispatched to a connection whose
transport is paused (its socket buffers are full), a dispatch hands one consumer a bounded
batch, unacked bytes per consumer are capped, and paged bodies are read only when a batch
can be sent. The broker's RSS stays near its memory budget while bystanders (a consumer on
the same queue, a producer and consumer on another, a round-trip client, a new connection)
keep working.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.integration.bystanders import HEARTBEAT_MS, Bystanders, rss_bytes
from tests.integration.helpers import WAIT, connect, queue_info

pytestmark = pytest.mark.timeout(240)

BUDGET = 16 << 20
BODY = 64 << 10
BACKLOG = 2400  # 150 MiB of bodies, almost all of it paged


async def test_non_reading_consumer_with_huge_credit_stays_within_budget(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory("--memory-budget", str(BUDGET), "--fsync", "never")
    assert b.proc is not None
    producer = await connect(b.url)
    await producer.declare_queue("backlog", durable=False)
    for i in range(0, BACKLOG, 100):
        await producer.publish_batch(
            [b"%06d" % j + b"x" * (BODY - 6) for j in range(i, i + 100)],
            routing_key="backlog",
            timeout=WAIT * 6,
        )
    info = await queue_info(producer, "backlog")
    assert info is not None and info["messages"] == BACKLOG and info["paged"] > BACKLOG // 2
    rss_before = rss_bytes(b.proc.pid)

    by = await Bystanders(b.url).start()
    attackers: list[wire.Conn] = []
    peak = rss_before
    try:
        for no_ack in (False, True):  # one that acks nothing, one that needs no acks
            a = wire.Conn(b.port)
            a.handshake()
            a.send_frame("consume", 1, "backlog", "", no_ack, False, 0xFFFFFFFF, {})
            attackers.append(a)
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            peak = max(peak, rss_bytes(b.proc.pid))
            await asyncio.sleep(0.1)
        print(f"\nbroker RSS {rss_before >> 20} -> {peak >> 20} MiB with the attackers")
        # A well-behaved consumer on the same queue still gets messages, in order of
        # what is left, with the right bodies.
        good = await connect(b.url, heartbeat_ms=HEARTBEAT_MS)
        consumer = await good.consume("backlog", prefetch=32)
        got = []
        for _ in range(200):
            m = await consumer.get(WAIT)
            assert m is not None
            assert len(m.body) == BODY and m.body[6:] == b"x" * (BODY - 6)
            got.append(int(m.body[:6]))
            m.ack()
            peak = max(peak, rss_bytes(b.proc.pid))
        assert len(set(got)) == 200
        await asyncio.wait_for(good.close(), WAIT)
    finally:
        for a in attackers:
            a.sock.close()
        await by.stop()
        await asyncio.wait_for(producer.close(), WAIT)
    print(
        f"\nbystanders {by.figures()}; broker RSS after publishing {rss_before >> 20} MiB, "
        f"peak with the non-reading consumers {peak >> 20} MiB (budget {BUDGET >> 20} MiB)"
    )
    by.check()
    # Each consumer may hold about one dispatch batch in memory plus its socket buffers.
    assert peak - rss_before < 48 << 20, (rss_before, peak)
    assert b.alive()


async def test_non_reading_stream_consumer_is_not_fed_without_bound(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """The same on a stream (bodies on disk, read in chunks): a private-cursor consumer and
    a group member, both with 2^32-1 credit, that never read."""
    b = broker_factory("--fsync", "never")
    assert b.proc is not None
    producer = await connect(b.url)
    await producer.declare_queue("log", arguments={"queue_type": "stream"})
    for i in range(0, BACKLOG, 100):
        await producer.publish_batch(
            [b"%06d" % j + b"x" * (BODY - 6) for j in range(i, i + 100)],
            routing_key="log",
            timeout=WAIT * 6,
        )
    rss_before = rss_bytes(b.proc.pid)
    by = await Bystanders(b.url).start()
    attackers: list[wire.Conn] = []
    peak = rss_before
    try:
        for args in ({"offset": "first"}, {"group": "g", "offset": "first"}):
            a = wire.Conn(b.port)
            a.handshake()
            a.send_frame("consume", 1, "log", "", False, False, 0xFFFFFFFF, args)
            attackers.append(a)
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            peak = max(peak, rss_bytes(b.proc.pid))
            await asyncio.sleep(0.1)
    finally:
        for a in attackers:
            a.sock.close()
        await by.stop()
        await asyncio.wait_for(producer.close(), WAIT)
    print(
        f"\nbystanders {by.figures()}; broker RSS {rss_before >> 20} -> peak {peak >> 20} MiB "
        "with the non-reading stream consumers"
    )
    by.check()
    assert peak - rss_before < 48 << 20, (rss_before, peak)
    assert b.alive()
