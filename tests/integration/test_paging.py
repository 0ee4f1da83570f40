"""A backlog larger than the memory budget: bodies live in page files, the broker's
resident memory stays far below the backlog, and everything comes back in order, also
after ``kill -9`` and a restart that recovers the backlog under the same budget."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from conveyor.client import connect
from tests.broker_process import BrokerProcess

BODY = 16 * 1024
COUNT = 4000  # 64 MiB of bodies against a 4 MiB budget
MIB = 1 << 20


def rss(b: BrokerProcess) -> int:
    assert b.proc is not None
    for line in Path(f"/proc/{b.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def body(i: int) -> bytes:
    return (b"%08d" % i) * (BODY // 8)


async def fill(url: str) -> None:
    async with await connect(url) as conn:
        await conn.declare_queue("big")
        for start in range(0, COUNT, 200):
            await conn.publish_batch(
                [body(i) for i in range(start, start + 200)], routing_key="big", timeout=30
            )


async def drain(url: str) -> list[bytes]:
    got: list[bytes] = []
    async with await connect(url) as conn:
        consumer = await conn.consume("big", prefetch=100)
        async for batch in consumer.batches():
            got.extend(m.body for m in batch)
            conn.ack_all(batch)
            if len(got) >= COUNT:
                break
    return got


def test_backlog_larger_than_memory(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    cfg = tmp_path / "paging.toml"
    cfg.write_text(f"memory_budget = {4 * MIB}\nsnapshot_bytes = {16 * MIB}\n")
    b = broker_factory("--config", str(cfg))
    base = rss(b)
    asyncio.run(asyncio.wait_for(fill(b.url), 120))
    grown = rss(b) - base
    pages = b.data_dir / "pages"
    paged_bytes = sum(p.stat().st_size for p in pages.iterdir())
    print(f"grown {grown / MIB:.1f} MiB, paged {paged_bytes / MIB:.1f} MiB")
    assert paged_bytes >= (COUNT * BODY) // 2, paged_bytes
    # 64 MiB published; the broker holds a fraction of it.
    assert grown < 32 * MIB, f"RSS grew {grown / MIB:.1f} MiB for a 64 MiB backlog"

    b.kill()
    b.start()
    assert rss(b) - base < 32 * MIB, f"after recovery RSS is {rss(b) / MIB:.1f} MiB"
    print(f"after recovery {(rss(b) - base) / MIB:.1f} MiB")
    got = asyncio.run(asyncio.wait_for(drain(b.url), 120))
    assert len(got) == COUNT
    assert got == [body(i) for i in range(COUNT)]
