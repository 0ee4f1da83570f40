"""kill -9 the broker at random moments during confirmed publishing and consuming.

Each round starts the broker on the same data directory, publishes persistent messages
(pipelined, confirms awaited) and consumes with acks on one connection, then kills the
broker with SIGKILL at a random moment. A final round drains the queue. Checks:

* every confirmed message is delivered at least once;
* no durably acked message comes back: an ack is durable once a publish issued after it
  on the same connection was confirmed (the log is ordered and group-committed);
* per-queue order holds for first deliveries (redeliveries may repeat earlier messages).

The mixed-traffic loop does the same over a classic queue, a dead-lettering one (every
third message rejected into its DLQ), a priority queue and a stream read by a consumer
group, all on one connection: no confirmed message is lost (a rejected
one must arrive in the DLQ) and no queued message's delivery_count goes backwards.
20 kills by default (``CONVEYOR_MIXED_KILLS``); ``CONVEYOR_LONG=1`` runs 110.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import pytest

from conveyor import client
from tests.broker_process import BrokerProcess

ROUNDS = int(os.environ.get("CONVEYOR_CRASH_ROUNDS", "24"))
SEED = int(os.environ.get("CONVEYOR_CRASH_SEED", str(random.randrange(1 << 30))))


class Ledger:
    def __init__(self) -> None:
        self.confirmed: set[str] = set()
        self.issued = 0  # publishes issued so far (across rounds, monotonic)
        self.max_confirmed_issue = -1  # highest issue index confirmed
        self.acks: list[tuple[str, int]] = []  # (body, issue count at ack time)
        self.durable_acked: dict[str, int] = {}  # body -> receive index of its ack
        self.received: list[tuple[str, bool]] = []  # (body, redelivered) in order

    def settle_acks(self) -> None:
        keep = []
        for body, mark in self.acks:
            if mark <= self.max_confirmed_issue:
                self.durable_acked.setdefault(body, len(self.received))
            else:
                keep.append((body, mark))
        self.acks = keep


async def _round(
    b: BrokerProcess, ledger: Ledger, rnd: int, rng: random.Random, kill: bool
) -> None:
    conn = await client.connect(b.url, reconnect=False, timeout=10)
    await conn.declare_queue("crash")
    consumer = await conn.consume("crash", prefetch=100)
    stop = asyncio.Event()

    async def publish() -> None:
        i = 0
        while not stop.is_set():
            futs = []
            for _ in range(rng.randint(1, 60)):
                body = f"{rnd}:{i:06d}"
                i += 1
                idx = ledger.issued
                ledger.issued += 1
                fut = conn.publish_nowait("", "crash", body)

                def done(f: asyncio.Future[None], body: str = body, idx: int = idx) -> None:
                    if not f.cancelled() and f.exception() is None:
                        ledger.confirmed.add(body)
                        ledger.max_confirmed_issue = max(ledger.max_confirmed_issue, idx)
                        ledger.settle_acks()

                fut.add_done_callback(done)
                futs.append(fut)
            await asyncio.gather(*futs, return_exceptions=True)
            if not kill and i >= 300:
                return

    async def consume() -> None:
        while True:
            msg = await consumer.get(timeout=1.0 if not kill else 5.0)
            if msg is None:
                return
            body = msg.body.decode()
            ledger.received.append((body, msg.redelivered))
            try:
                msg.ack()
            except client.ConnectionClosed:
                return
            ledger.acks.append((body, ledger.issued))

    pub = asyncio.create_task(publish())
    con = asyncio.create_task(consume())
    if kill:
        await asyncio.sleep(rng.uniform(0.05, 0.5))
        await asyncio.to_thread(b.kill)
        stop.set()
        await asyncio.wait([pub, con], timeout=15)
    else:
        await asyncio.wait_for(pub, 30)
        await asyncio.wait_for(con, 60)  # drains until 1 s without a message
    for t in (pub, con):
        if not t.done():
            t.cancel()
        await asyncio.gather(t, return_exceptions=True)
    await conn.close()
    # Only a confirm on the same connection vouches for an ack: acks this connection had
    # not had vouched for by now may have died with the broker.
    ledger.acks.clear()


async def test_kill9_during_publish_and_consume_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    ledger = Ledger()
    data = tmp_path / "data"
    for rnd in range(ROUNDS + 1):
        last = rnd == ROUNDS
        b = BrokerProcess(data).start()
        try:
            await _round(b, ledger, rnd, rng, kill=not last)
        finally:
            b.stop()
    ledger.settle_acks()

    received = [body for body, _ in ledger.received]
    seen = set(received)
    lost = ledger.confirmed - seen
    assert not lost, (
        f"seed {SEED}: {len(lost)} confirmed messages never delivered: {sorted(lost)[:10]}"
    )
    # no durably acked message is delivered again after its ack became durable
    last_seen: dict[str, int] = {}
    for i, body in enumerate(received):
        last_seen[body] = i
    for body, ack_pos in ledger.durable_acked.items():
        assert last_seen[body] < ack_pos, f"seed {SEED}: {body} came back after a durable ack"
    # order: the first delivery of each message arrives in publish order. (A message
    # delivered just before a kill may come back without the redelivered flag when its
    # delivery record had not reached the disk, so "first" is judged by what we received.)
    firsts: list[str] = []
    got_before: set[str] = set()
    for body, _redelivered in ledger.received:
        if body not in got_before:
            got_before.add(body)
            firsts.append(body)
    keys = [(int(r), int(i)) for r, i in (b.split(":") for b in firsts)]
    assert keys == sorted(keys), f"seed {SEED}: order broken among first deliveries"
    # the final round drained the queue: nothing confirmed is left behind
    assert ledger.confirmed, "no message was confirmed at all"
    print(
        f"crash test seed {SEED}: {ROUNDS} kills, {len(ledger.confirmed)} confirmed, "
        f"{len(received)} deliveries, {sum(1 for _, r in ledger.received if r)} redelivered, "
        f"{len(ledger.durable_acked)} durable acks, 0 lost"
    )


# ---------------------------------------------------------------------- mixed traffic
# kill -9 loop over classic, dead-letter, priority and stream-group traffic, through the
# client library. CONVEYOR_LONG=1 runs 110 kills instead of 20.
MIXED_KILLS = int(
    os.environ.get("CONVEYOR_MIXED_KILLS", "110" if os.environ.get("CONVEYOR_LONG") else "20")
)
QUEUED = ("c", "d", "p")  # classic, dead-lettering ("d" -> "d.dlq"), priority
REJECT_EVERY = 3  # "d" rejects every third message: dead-lettered to "d.dlq"


class MixedLedger:
    def __init__(self) -> None:
        self.confirmed: dict[str, set[str]] = {q: set() for q in (*QUEUED, "s")}
        self.seen: dict[str, set[str]] = {q: set() for q in (*QUEUED, "d.dlq", "s")}
        self.counts: dict[tuple[str, str], int] = {}  # (queue, body) -> last delivery_count
        self.regressions: list[tuple[str, str, int, int]] = []
        self.deliveries = 0
        self.redelivered = 0
        self.issued = 0

    def received(self, queue: str, m: client.Message) -> None:
        body = m.body.decode()
        self.deliveries += 1
        self.redelivered += m.redelivered
        self.seen[queue].add(body)
        if queue == "s":
            return  # a group's delivery counts are not kept across restarts (spec)
        key = (queue, body)
        last = self.counts.get(key, 0)
        if m.delivery_count <= last or m.redelivered != (m.delivery_count > 1):
            self.regressions.append((queue, body, last, m.delivery_count))
        self.counts[key] = max(last, m.delivery_count)


async def _mixed_round(
    b: BrokerProcess, ledger: MixedLedger, rnd: int, rng: random.Random, kill: bool
) -> None:
    conn = await client.connect(b.url, reconnect=False, timeout=10)
    await conn.declare_exchange("dlx", "fanout")
    await conn.declare_queue("d.dlq")
    await conn.bind("dlx", "d.dlq")
    await conn.declare_queue("c")
    await conn.declare_queue("d", dead_letter_exchange="dlx")
    await conn.declare_queue("p", max_priority=9)
    await conn.declare_queue("s", queue_type="stream")
    # Every consumer on the publishing connection: settlements of different queues
    # interleave on it (a reject after an out-of-order ack once lost the rejected message).
    consumers: dict[str, Any] = {q: await conn.consume(q, prefetch=50) for q in (*QUEUED, "d.dlq")}
    consumers["s"] = conn.stream("s", offset="first", group="g", prefetch=100)
    stop = asyncio.Event()

    async def publish() -> None:
        i = 0
        while kill and not stop.is_set():
            futs = []
            for _ in range(rng.randint(1, 40)):
                q = rng.choice((*QUEUED, "s"))
                body = f"{q}:{rnd}:{i}"
                i += 1
                ledger.issued += 1
                props: dict[str, Any] = {"priority": rng.randint(0, 9)} if q == "p" else {}
                try:
                    fut = conn.publish_nowait("", q, body, properties=props)
                except (client.Backpressure, client.ConnectionClosed):
                    break

                def done(f: asyncio.Future[None], q: str = q, body: str = body) -> None:
                    if not f.cancelled() and f.exception() is None:
                        ledger.confirmed[q].add(body)

                fut.add_done_callback(done)
                futs.append(fut)
            await asyncio.gather(*futs, return_exceptions=True)
            await asyncio.sleep(0)

    async def consume(q: str) -> None:
        consumer = consumers[q]
        while True:
            m = await consumer.get(5.0 if kill else 1.5)
            if m is None:
                return
            ledger.received(q, m)
            try:
                if q == "d" and int(m.body.decode().rsplit(":", 1)[1]) % REJECT_EVERY == 0:
                    m.reject()
                elif q != "s":  # the stream consumer commits as it asks for the next
                    m.ack()
            except client.ConnectionClosed:
                return

    tasks = [asyncio.create_task(publish())] + [asyncio.create_task(consume(q)) for q in consumers]
    if kill:
        await asyncio.sleep(rng.uniform(0.05, 0.4))
        await asyncio.to_thread(b.kill)
        stop.set()
        await asyncio.wait(tasks, timeout=15)
    else:
        await asyncio.wait(tasks, timeout=60)  # drains until 1.5 s without a message
    for t in tasks:
        if not t.done():
            t.cancel()
        await asyncio.gather(t, return_exceptions=True)
    await conn.close()


@pytest.mark.timeout(60 + MIXED_KILLS * 6)
async def test_kill9_loop_mixed_traffic_through_the_client(tmp_path: Path) -> None:
    """Every confirmed message is delivered (a rejected one from the DLQ too) and no
    delivery_count of a queued message goes backwards across kill -9 and restart."""
    rng = random.Random(SEED)
    ledger = MixedLedger()
    data = tmp_path / "data"
    for rnd in range(MIXED_KILLS + 1):
        b = BrokerProcess(data).start()
        try:
            await _mixed_round(b, ledger, rnd, rng, kill=rnd < MIXED_KILLS)
        finally:
            b.stop()
    lost = {q: ledger.confirmed[q] - ledger.seen[q] for q in ledger.confirmed}
    rejected = {b for b in ledger.confirmed["d"] if int(b.rsplit(":", 1)[1]) % REJECT_EVERY == 0}
    lost["d.dlq"] = rejected - ledger.seen["d.dlq"]
    n_lost = sum(len(v) for v in lost.values())
    confirmed = sum(len(v) for v in ledger.confirmed.values())
    print(
        f"mixed crash test seed {SEED}: {MIXED_KILLS} kills, {confirmed} confirmed "
        f"({', '.join(f'{q} {len(v)}' for q, v in ledger.confirmed.items())}), "
        f"{ledger.deliveries} deliveries, {ledger.redelivered} redelivered, "
        f"{len(rejected)} dead-lettered, {n_lost} lost, "
        f"{len(ledger.regressions)} delivery_count regressions"
    )
    assert all(ledger.confirmed.values()), f"a queue had nothing confirmed: {confirmed}"
    assert not n_lost, f"seed {SEED}: confirmed messages lost: " + str(
        {q: sorted(v)[:5] for q, v in lost.items() if v}
    )
    assert not ledger.regressions, f"seed {SEED}: {ledger.regressions[:10]}"
