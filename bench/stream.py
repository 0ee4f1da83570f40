"""Streams: publish N messages into a stream with ``publish_batch``, then let a consumer
group catch up from the first offset; report the publish rate, the read rate and the
broker's peak resident memory (sampled every 50 ms in both phases). Checks that the group
got every message once, in offset order. Starts (and stops) its own broker.

    python bench/stream.py [--messages 1000000] [--size 128] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.client import connect
from tests.broker_process import BrokerProcess

STREAM = "bench-stream"


def rss_mib(b: BrokerProcess) -> float:
    if b.proc is None:
        return 0.0
    try:
        for line in Path(f"/proc/{b.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler:
    """The broker's peak RSS, sampled from a thread (the event loop is busy)."""

    def __init__(self, b: BrokerProcess, interval: float = 0.05) -> None:
        self.b = b
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.b))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib(self.b))


async def publish(url: str, count: int, size: int, batch: int, inflight: int) -> float:
    """Publish ``count`` bodies (an 8-digit sequence number, padded to ``size``),
    ``inflight`` batches at a time; returns the seconds until the last confirm."""
    pad = b"x" * max(0, size - 8)
    async with await connect(url, timeout=120) as conn:
        await conn.declare_queue(STREAM, queue_type="stream")
        t0 = time.monotonic()
        sem = asyncio.Semaphore(inflight)
        tasks: list[asyncio.Task[int]] = []

        async def send(lo: int, hi: int) -> int:
            try:
                return await conn.publish_batch(
                    [b"%08d" % i + pad for i in range(lo, hi)], routing_key=STREAM, timeout=120
                )
            finally:
                sem.release()

        for lo in range(0, count, batch):
            await sem.acquire()
            tasks.append(asyncio.create_task(send(lo, min(count, lo + batch))))
        published = sum(await asyncio.gather(*tasks))
        assert published == count
        return time.monotonic() - t0


async def catch_up(url: str, count: int, prefetch: int) -> tuple[int, bool, float, int]:
    """A group reads from "first" to the end; returns (messages, in order, seconds,
    the group's lag the broker lists after the final commit: 0 unless it stays behind)."""
    async with await connect(url, timeout=120) as conn:
        t0 = time.monotonic()
        got, in_order, prev = 0, True, -1
        s = await conn.stream(STREAM, offset="first", group="bench", prefetch=prefetch)
        last = None
        async for batch in s.batches():  # auto_commit: a batch is acked when the next is asked
            for m in batch:
                off = m.offset
                if off is None or off <= prev or int(m.body[:8]) != got:
                    in_order = False
                prev = off if off is not None else prev
                got += 1
            last = batch[-1]
            if got >= count:
                break
        secs = time.monotonic() - t0
        if last is not None:
            s.commit(last)
        await s.cancel()
        lag = -1
        for _ in range(50):  # the broker applies the last acks shortly after
            for q in await conn.list("queues"):
                if q["name"] == STREAM:
                    lag = int((q.get("groups") or {}).get("bench", {}).get("lag", -1))
            if lag == 0:
                break
            await asyncio.sleep(0.1)
        return got, in_order, secs, lag


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=128, help="body bytes")
    ap.add_argument("--batch", type=int, default=2000, help="messages per publish_batch")
    ap.add_argument("--inflight", type=int, default=4, help="publish_batch calls in flight")
    ap.add_argument("--prefetch", type=int, default=2000, help="the group's credit window")
    ap.add_argument("--broker-args", default="", help="extra flags for the broker")
    ap.add_argument("--dir", default=None, help="data directory parent (default: a temp dir)")
    ap.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="print the results as JSON (or write them to PATH)",
    )
    args = ap.parse_args()
    parent = Path(args.dir or tempfile.mkdtemp(prefix="conveyor-stream-bench-"))
    parent.mkdir(parents=True, exist_ok=True)
    b = BrokerProcess(parent / "data", *args.broker_args.split(), startup_timeout=120).start()
    out: dict[str, Any] = {
        "messages": args.messages,
        "size": args.size,
        "batch": args.batch,
        "inflight": args.inflight,
        "prefetch": args.prefetch,
        "python": platform.python_version(),
    }
    try:
        out["rss_idle_mib"] = round(rss_mib(b), 1)
        with RssSampler(b) as rss:
            secs = asyncio.run(publish(b.url, args.messages, args.size, args.batch, args.inflight))
        out.update(
            publish_seconds=round(secs, 2),
            publish_rate=round(args.messages / secs),
            publish_mib_s=round(args.messages * args.size / secs / 2**20, 1),
            rss_publish_peak_mib=round(rss.peak, 1),
        )
        streams = parent / "data" / "streams"
        out["disk_mib"] = (
            round(sum(p.stat().st_size for p in streams.rglob("*") if p.is_file()) / 2**20, 1)
            if streams.exists()
            else None
        )
        with RssSampler(b) as rss:
            got, in_order, secs, lag = asyncio.run(catch_up(b.url, args.messages, args.prefetch))
        out.update(
            read=got,
            in_order=in_order,
            read_seconds=round(secs, 2),
            read_rate=round(got / secs),
            rss_read_peak_mib=round(rss.peak, 1),
            lag_after=lag,
            rss_end_mib=round(rss_mib(b), 1),
        )
    finally:
        b.stop()
        if args.dir is None:
            shutil.rmtree(parent, ignore_errors=True)
    ok = out.get("read") == args.messages and bool(out.get("in_order"))
    if args.json is None:
        print(
            f"published {args.messages} x {args.size} B in {out['publish_seconds']} s: "
            f"{out['publish_rate']} msg/s ({out['publish_mib_s']} MiB/s), broker RSS peak "
            f"{out['rss_publish_peak_mib']} MiB"
        )
        if "read_rate" in out:
            print(
                f"group caught up from 'first': {out['read']} messages in "
                f"{out['read_seconds']} s: {out['read_rate']} msg/s, in order: "
                f"{out['in_order']}, broker RSS peak {out['rss_read_peak_mib']} MiB"
            )
    elif args.json == "-":
        print(json.dumps(out, indent=2))
    else:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
