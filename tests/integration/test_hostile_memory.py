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
from tests.integration.helpers import WAIT, connect, queue_info

pytestmark = pytest.mark.timeout(300)

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
