"""A declare/bind reply for a durable object is sent only once it is on disk: kill -9
right after the reply, and the object is there after the restart."""

from __future__ import annotations

import asyncio

from conveyor.client import connect
from tests.broker_process import BrokerProcess


async def declare_all(url: str, n: int) -> None:
    async with await connect(url) as conn:
        await conn.declare_exchange("topo.x", "topic")
        for i in range(n):
            await conn.declare_queue(f"topo.q{i}", max_length=10 + i)
            await conn.bind("topo.x", f"topo.q{i}", f"k.{i}")


async def listing(url: str) -> tuple[set[str], set[tuple[str, str, str]]]:
    async with await connect(url) as conn:
        queues = {q["name"] for q in await conn.list("queues")}
        bindings = {
            (b["exchange"], b["queue"], b["routing_key"]) for b in await conn.list("bindings")
        }
    return queues, bindings


def test_replied_declares_survive_kill_9(broker: BrokerProcess) -> None:
    n = 20
    asyncio.run(asyncio.wait_for(declare_all(broker.url, n), 30))
    broker.kill()  # no publish, no graceful stop: only the replies vouch for the log
    broker.start()
    queues, bindings = asyncio.run(asyncio.wait_for(listing(broker.url), 30))
    assert {f"topo.q{i}" for i in range(n)} <= queues
    assert {("topo.x", f"topo.q{i}", f"k.{i}") for i in range(n)} <= bindings
