"""Memory the broker must give back or bound: the messages of a deleted or purged queue
whose TTL or delay is 2^63 ms (their timers used to keep them alive for ever), and
headers of paged messages (paged with the body, counted in the memory budget).
Bystanders keep working throughout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.broker_process import BrokerProcess
from tests.integration.bystanders import Bystanders, rss_bytes
from tests.integration.helpers import WAIT, connect, queue_info, take

pytestmark = pytest.mark.timeout(180)

FOREVER = 1 << 63


async def _fill(conn: object, queue: str, n: int, **props: object) -> None:
    for i in range(0, n, 1000):
        await conn.publish_batch(  # type: ignore[attr-defined]
            [b"%07d" % j + b"x" * 1017 for j in range(i, i + 1000)],
            routing_key=queue,
            properties=props,
            timeout=WAIT * 6,
        )


@pytest.mark.parametrize("prop", ["ttl", "delay"])
async def test_deleted_and_purged_queues_give_their_messages_back(
    broker_factory: Callable[..., BrokerProcess], prop: str
) -> None:
    b = broker_factory("--fsync", "never")
    assert b.proc is not None
    by = await Bystanders(b.url).start()
    conn = await connect(b.url)
    rss: list[int] = []
    try:
        for r in range(4):
            name = f"forever-{r}"
            await conn.declare_queue(name, durable=False)
            await _fill(conn, name, 25_000, **{prop: FOREVER})
            info = await queue_info(conn, name)
            assert info is not None
            assert info["messages" if prop == "ttl" else "delayed"] == 25_000
            if r % 2:
                if prop == "ttl":
                    assert await conn.purge(name) == 25_000
                await conn.delete_queue(name)
            else:
                await conn.delete_queue(name)
            await conn.list("queues")  # a round trip: the deletion is done
            rss.append(rss_bytes(b.proc.pid))
    finally:
        await by.stop()
        await asyncio.wait_for(conn.close(), WAIT)
    print(f"\nbystanders {by.figures()}; RSS after each round {[x >> 20 for x in rss]} MiB")
    by.check()
    # 25k x 1 KiB is about 40 MiB of messages per round: what one round freed, the next
    # reuses, so the last round ends about where the first did.
    assert rss[-1] - rss[0] < 24 << 20, [x >> 20 for x in rss]
    assert b.alive()


@pytest.mark.parametrize("durable", [False, True])
async def test_headers_are_paged_with_their_bodies(
    broker_factory: Callable[..., BrokerProcess], durable: bool
) -> None:
    """3,000 messages with 60 KiB of headers each (180 MiB, max_header_bytes allows it)
    and a 16 MiB memory budget: the broker's RSS grows by about the budget, not by the
    headers (measured on a transient queue: a durable one also streams them through the
    log writer, whose freed buffers the allocator keeps). A durable queue's messages come
    back with all their headers after kill -9 and a restart."""
    n = 1000 if durable else 3000
    b = broker_factory("--memory-budget", str(16 << 20), "--fsync", "never")
    assert b.proc is not None
    by = await Bystanders(b.url).start()
    conn = await connect(b.url)
    try:
        await conn.declare_queue("heavy-headers", durable=durable)
        rss_before = rss_bytes(b.proc.pid)
        for i in range(0, n, 20):
            await asyncio.wait_for(
                asyncio.gather(
                    *[
                        conn.publish(
                            "",
                            "heavy-headers",
                            b"b%d" % j,
                            headers={"i": j, "pad": "h" * 60_000},
                            timeout=WAIT * 3,
                        )
                        for j in range(i, i + 20)
                    ]
                ),
                WAIT * 6,
            )
        info = await queue_info(conn, "heavy-headers")
        assert info is not None and info["messages"] == n and info["paged"] > n * 3 // 4
        rss_after = rss_bytes(b.proc.pid)
    finally:
        await by.stop()
        await asyncio.wait_for(conn.close(), WAIT)
    print(
        f"\nbystanders {by.figures()}; RSS {rss_before >> 20} -> {rss_after >> 20} MiB "
        f"for {n * 60_000 >> 20} MiB of headers"
    )
    by.check()
    if durable:
        b.kill()
        b.start()
    else:
        assert rss_after - rss_before < 48 << 20, (rss_before >> 20, rss_after >> 20)
    conn = await connect(b.url)
    try:
        consumer = await conn.consume("heavy-headers", prefetch=50)
        for j in range(n):
            m = await consumer.get(WAIT)
            assert m is not None and m.body == b"b%d" % j
            assert m.headers == {"i": j, "pad": "h" * 60_000}
            m.ack()
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def test_memory_watermark_is_not_overshot(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """Four connections publish 64 KiB messages as fast as their credit allows into a
    queue nothing consumes (no paging: a 1 GiB budget). Credit is granted only while what
    it may cost fits under memory_high_watermark, so the broker's RSS stays near the
    watermark instead of passing it by several credit windows between two samples; the
    publishers end up blocked with reason "memory", while a consumer of another queue and
    a new connection are still served."""
    watermark = 128 << 20
    b = broker_factory(
        "--memory-high-watermark",
        str(watermark),
        "--memory-budget",
        str(1 << 30),
        "--fsync",
        "never",
    )
    assert b.proc is not None
    quiet = await connect(b.url)
    await quiet.declare_queue("quiet", durable=False)
    await quiet.publish_batch([b"q%d" % i for i in range(200)], routing_key="quiet")
    publishers = [await connect(b.url) for _ in range(4)]
    await publishers[0].declare_queue("flood", durable=False)
    peak = rss_bytes(b.proc.pid)
    body = b"f" * (64 << 10)

    async def flood(conn: object) -> None:
        deadline = asyncio.get_running_loop().time() + 8
        while asyncio.get_running_loop().time() < deadline:
            try:
                await asyncio.wait_for(
                    conn.publish_batch([body] * 32, routing_key="flood"),  # type: ignore[attr-defined]
                    2.0,
                )
            except TimeoutError:
                return  # blocked: what the watermark is for

    tasks = [asyncio.create_task(flood(c)) for c in publishers]
    try:
        while not all(t.done() for t in tasks):
            peak = max(peak, rss_bytes(b.proc.pid))
            await asyncio.sleep(0.02)
        for t in tasks:
            t.result()
        blocked = [c.blocked for c in publishers]
        consumer = await quiet.consume("quiet", prefetch=50)
        got = await take(consumer, 200, ack=True)
        assert [m.body for m in got] == [b"q%d" % i for i in range(200)]
        fresh = await connect(b.url)
        assert await fresh.list("queues")
        await asyncio.wait_for(fresh.close(), WAIT)
    finally:
        for c in [quiet, *publishers]:
            await asyncio.wait_for(c.close(), WAIT)
    print(
        f"\npeak RSS {peak >> 20} MiB against a watermark of {watermark >> 20} MiB; "
        f"publishers blocked: {blocked}"
    )
    assert "memory" in blocked
    assert peak <= watermark + (16 << 20), peak >> 20
    assert b.alive()
