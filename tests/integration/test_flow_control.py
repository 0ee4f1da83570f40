"""Publisher flow control end to end: credit, rate limits, watermarks, full queues.

Publishers are slowed down by credit the broker withholds; nothing is lost, no connection
is closed, and why a publisher is blocked shows in ``conn.blocked`` and LIST connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conveyor import client
from conveyor.broker.config import Config
from conveyor.broker.server import BrokerServer
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect, wait_until


async def _listing(conn: client.Connection, conn_id: str) -> dict[str, Any]:
    (me,) = [c for c in await conn.list("connections") if c["id"] == conn_id]
    return me


async def _consume_all(conn: client.Connection, queue: str, n: int, timeout: float) -> list[bytes]:
    consumer = await conn.consume(queue, prefetch=1000)
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        msg = await consumer.get(max(0.01, deadline - time.monotonic()))
        if msg is None:
            break
        got.append(msg.body)
        msg.ack()
    # Anything beyond n would be a duplicate: give it a moment to show up.
    extra = await consumer.get(0.3)
    if extra is not None:
        got.append(extra.body)
    await consumer.cancel()
    return got


async def test_producer_limited_to_1000_per_second_takes_about_10s(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """The issue's example: 10,000 messages as fast as possible at 1,000 messages/s."""
    b = broker_factory("--publish-rate-messages", "1000")
    producer = await connect(b.url, timeout=30)
    observer = await connect(b.url)
    consumer_conn = await connect(b.url)
    try:
        await producer.declare_queue("rate-10k", durable=False)
        consumed = asyncio.create_task(_consume_all(consumer_conn, "rate-10k", 10_000, 25))
        seen: set[str] = set()
        stop = asyncio.Event()

        async def watch() -> None:  # LIST connections while the producer is limited
            # (Stopped with an event, not cancel(): 3.11's wait_for may swallow a cancel.)
            while not stop.is_set():
                seen.add((await _listing(observer, producer.connection_id))["blocked"])
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        bodies = [f"m-{i}".encode() for i in range(10_000)]
        futures: list[asyncio.Future[None]] = []
        blocked_seen: set[str | None] = set()
        start = time.monotonic()
        for body in bodies:  # as fast as the client lets it
            while True:
                try:
                    futures.append(producer.publish_nowait("", "rate-10k", body))
                    break
                except client.Backpressure:
                    blocked_seen.add(producer.blocked)
                    await producer.wait_for_capacity(timeout=5)
        await asyncio.wait_for(asyncio.gather(*futures), 20)
        elapsed = time.monotonic() - start
        stop.set()
        await asyncio.wait_for(watcher, WAIT)
        print(f"10,000 messages at 1,000/s: {elapsed:.2f}s")
        assert 8.5 <= elapsed <= 13, f"took {elapsed:.2f}s"
        # (The initial window is granted in full, so the first Backpressure may come
        # before the broker's first "rate" frame.)
        assert "rate" in blocked_seen and blocked_seen <= {"rate", None}
        assert "rate" in seen
        got = await consumed
        assert len(got) == 10_000 and set(got) == set(bodies), "lost or duplicated messages"
        assert producer.is_open and producer.reconnects == 0
        me = await _listing(observer, producer.connection_id)
        assert me["published"] == 10_000 and me["rate_messages"] == 1000
        assert me["blocked_ms"] >= 7000
        # Idle, the producer's credit refills and "rate" clears.
        await wait_until(lambda: producer.blocked is None, timeout=5)
    finally:
        for c in (producer, observer, consumer_conn):
            await asyncio.wait_for(c.close(), WAIT)


async def test_publish_batch_is_paced_by_credit(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """One publish_batch call larger than the credit: sent as credit arrives, one result."""
    b = broker_factory("--publish-rate-messages", "2000", "--publish-credit-messages", "500")
    conn = await connect(b.url, timeout=30)
    try:
        await conn.declare_queue("rate-batch", durable=False)
        assert conn.publish_credit[0] == 500
        start = time.monotonic()
        n = await conn.publish_batch(
            [b"b%d" % i for i in range(5000)], routing_key="rate-batch", timeout=20
        )
        elapsed = time.monotonic() - start
        assert n == 5000
        # The bucket holds one second (2,000): (5000 - 2000) / 2000 = 1.5 s.
        assert 1.2 <= elapsed <= 5, f"took {elapsed:.2f}s"
        info = await conn.declare_queue("rate-batch", durable=False)
        assert info.message_count == 5000
        # A caller's timeout bounds the wait for credit.
        with pytest.raises(client.PublishTimeout):
            await conn.publish_batch([b"x"] * 3000, routing_key="rate-batch", timeout=0.5)
        assert conn.is_open
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def test_memory_watermark_blocks_publishers_without_disconnecting(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory("--memory-high-watermark", "1")  # every broker is above one byte
    conn = await connect(b.url)
    try:
        assert conn.blocked == "memory" and conn.publish_credit == (0, 0)
        await conn.declare_queue("mem", durable=False)  # requests still work
        with pytest.raises(client.PublishTimeout, match="memory"):
            await conn.publish("", "mem", b"never", timeout=0.5)
        with pytest.raises(client.Backpressure):
            conn.publish_nowait("", "mem", b"never")
        me = await _listing(conn, conn.connection_id)
        assert me["blocked"] == "memory" and me["published"] == 0
        await asyncio.sleep(1.0)
        assert conn.is_open and b.alive()
        info = await conn.declare_queue("mem", durable=False)
        assert info.message_count == 0
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def test_memory_watermark_raised_unblocks(tmp_path: Path) -> None:
    """In-process broker, so the test can raise the watermark while a publish waits."""
    config = Config(
        host="127.0.0.1", port=0, data_dir=str(tmp_path), memory_high_watermark=1
    ).validate()
    server = BrokerServer(config)
    await server.start()
    try:
        conn = await connect(f"mq://127.0.0.1:{server.port}")
        try:
            assert conn.blocked == "memory"
            await conn.declare_queue("mem2", durable=False)
            pending = asyncio.create_task(conn.publish("", "mem2", b"waits", timeout=10))
            await asyncio.sleep(0.5)
            assert not pending.done()
            wm = server.broker.flow.watermarks
            assert wm is not None
            wm.memory_high_watermark = 1 << 60
            start = time.monotonic()
            await asyncio.wait_for(pending, 5)  # confirmed once credit arrives
            assert time.monotonic() - start < 2.5  # sampled at most once a second
            assert conn.blocked is None
            assert (await conn.get("mem2", 10, no_ack=True))[0].body == b"waits"
        finally:
            await asyncio.wait_for(conn.close(), WAIT)
    finally:
        await server.stop()


async def test_disk_free_limit_blocks_publishers(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory("--disk-free-limit", str(1 << 60))
    conn = await connect(b.url)
    try:
        assert conn.blocked == "disk"
        me = await _listing(conn, conn.connection_id)
        assert me["blocked"] == "disk"
        with pytest.raises(client.PublishTimeout, match="disk"):
            await conn.publish("", "nowhere", b"x", timeout=0.3)
        assert conn.is_open
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def test_full_reject_publish_queue_blocks_until_drained(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory("--publish-credit-messages", "20")
    conn = await connect(b.url)
    admin = await connect(b.url)
    try:
        await conn.declare_queue("full", durable=False, max_length=5, overflow="reject-publish")
        await conn.publish_batch([b"a"] * 5, routing_key="full")
        futures: list[asyncio.Future[None]] = []
        with contextlib.suppress(client.Backpressure):
            for _ in range(100):
                futures.append(conn.publish_nowait("", "full", b"over"))
        assert len(futures) < 100  # credit ran out before 100 more
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT)
        assert results and all(isinstance(r, client.QueueFull) for r in results)
        await wait_until(lambda: conn.blocked == "queue-full")
        me = await _listing(admin, conn.connection_id)
        assert me["blocked"] == "queue-full"
        with pytest.raises(client.Backpressure):
            conn.publish_nowait("", "full", b"blocked")
        # Drained: credit flows again and publishing works.
        assert await admin.purge("full") == 5
        await wait_until(lambda: conn.blocked is None, timeout=5)
        await conn.publish("", "full", b"after")
        assert conn.is_open and conn.reconnects == 0
    finally:
        for c in (conn, admin):
            await asyncio.wait_for(c.close(), WAIT)


async def test_drop_head_queue_never_blocks(broker_factory: Callable[..., BrokerProcess]) -> None:
    b = broker_factory("--publish-credit-messages", "20")
    conn = await connect(b.url)
    try:
        await conn.declare_queue("dh", durable=False, max_length=5)
        await conn.publish_batch([b"d%d" % i for i in range(200)], routing_key="dh")
        assert conn.blocked is None
        assert (await conn.declare_queue("dh", durable=False, max_length=5)).message_count == 5
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def test_cli_lists_connections(broker: BrokerProcess) -> None:
    conn = await connect(broker.url)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "conveyor.cli.main",
            "connections",
            "--url",
            broker.url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), WAIT)
        assert proc.returncode == 0, err
        text = out.decode()
        assert "BLOCKED" in text and conn.connection_id in text
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
