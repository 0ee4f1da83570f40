"""Backlog larger than memory: fill one durable queue with N GiB, report the broker's
resident memory while filling, after ``kill -9`` + recovery, and while draining; check
every message comes back once, in order.

    python bench/backlog.py --gib 5 --body 16384 [--budget-mib 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.client import connect
from tests.broker_process import BrokerProcess


def rss_mib(b: BrokerProcess) -> float:
    assert b.proc is not None
    for line in Path(f"/proc/{b.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def fill(b: BrokerProcess, count: int, size: int, peak: list[float]) -> float:
    t0 = time.monotonic()
    async with await connect(b.url) as conn:
        await conn.declare_queue("backlog")
        pad = b"x" * (size - 8)
        batch = max(1, (4 << 20) // size)
        for start in range(0, count, batch):
            n = min(batch, count - start)
            await conn.publish_batch(
                [b"%08d" % i + pad for i in range(start, start + n)],
                routing_key="backlog",
                timeout=120,
            )
            if start % (batch * 16) == 0:
                peak[0] = max(peak[0], rss_mib(b))
    return time.monotonic() - t0


async def drain(b: BrokerProcess, count: int, peak: list[float]) -> tuple[int, bool, float]:
    t0 = time.monotonic()
    got, in_order = 0, True
    async with await connect(b.url) as conn:
        consumer = await conn.consume("backlog", prefetch=500)
        async for batch in consumer.batches():
            for m in batch:
                if int(m.body[:8]) != got:
                    in_order = False
                got += 1
            conn.ack_all(batch)
            if got % 20000 < len(batch):
                peak[0] = max(peak[0], rss_mib(b))
            if got >= count:
                break
    return got, in_order, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=float, default=5.0)
    ap.add_argument("--body", type=int, default=16384)
    ap.add_argument("--budget-mib", type=int, default=256)
    ap.add_argument("--dir", default=None, help="data directory parent (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    count = int(args.gib * (1 << 30)) // args.body
    parent = Path(args.dir or tempfile.mkdtemp(prefix="conveyor-backlog-"))
    cfg = parent / "backlog.toml"
    parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f"memory_budget = {args.budget_mib << 20}\n")
    b = BrokerProcess(parent / "data", "--config", str(cfg), startup_timeout=3600).start()
    out: dict[str, object] = {
        "gib": args.gib,
        "body": args.body,
        "messages": count,
        "budget_mib": args.budget_mib,
    }
    try:
        out["rss_idle_mib"] = round(rss_mib(b), 1)
        peak = [0.0]
        secs = asyncio.run(fill(b, count, args.body, peak))
        out.update(
            fill_seconds=round(secs, 1),
            fill_mib_s=round(count * args.body / secs / 2**20),
            rss_fill_peak_mib=round(peak[0], 1),
            rss_after_fill_mib=round(rss_mib(b), 1),
        )
        disk = sum(p.stat().st_size for p in (parent / "data").rglob("*") if p.is_file())
        out["disk_gib"] = round(disk / 2**30, 2)
        b.kill()
        t0 = time.monotonic()
        b.start()
        out["restart_seconds"] = round(time.monotonic() - t0, 1)
        out["rss_after_recovery_mib"] = round(rss_mib(b), 1)
        peak = [0.0]
        got, in_order, secs = asyncio.run(drain(b, count, peak))
        out.update(
            drained=got,
            in_order=in_order,
            drain_seconds=round(secs, 1),
            rss_drain_peak_mib=round(peak[0], 1),
        )
    finally:
        b.stop()
        if args.dir is None:
            shutil.rmtree(parent, ignore_errors=True)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out.get("drained") == count and out.get("in_order") else 1


if __name__ == "__main__":
    raise SystemExit(main())
