"""Client behaviour when the broker dies, restarts, stalls or goes silent."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import client
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect, queue_info, take, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def stopper(broker: BrokerProcess) -> Iterator[Any]:
    """SIGSTOP / SIGCONT the test's broker; always continued before teardown."""

    class Stopper:
        stopped = False

        def stop(self) -> None:
            assert broker.proc is not None
            os.kill(broker.proc.pid, signal.SIGSTOP)
            self.stopped = True

        def cont(self) -> None:
            if self.stopped and broker.alive():
                assert broker.proc is not None
                os.kill(broker.proc.pid, signal.SIGCONT)
            self.stopped = False

    s = Stopper()
    yield s
    s.cont()


def _record_confirms(conn: client.Connection) -> set[int]:
    """Spy on the CONFIRM acks the client receives (sequence numbers)."""
    acked: set[int] = set()
    original = conn._on_confirm

    def on_confirm(f: Any) -> None:
        if f.ack:
            acked.update(range(f.first_seq, f.last_seq + 1))
        original(f)

    conn._on_confirm = on_confirm  # type: ignore[method-assign]
    return acked


def _record_publishes(conn: client.Connection) -> list[tuple[range, asyncio.Future[None]]]:
    """Spy on every publish call: its sequence numbers and its confirm future."""
    published: list[tuple[range, asyncio.Future[None]]] = []
    original = conn._publish_many

    async def publish_many(entries: Any, timeout: Any) -> asyncio.Future[None]:
        fut = await original(entries, timeout)
        last = conn._seq  # assigned by the call above, with no await since
        published.append((range(last - len(entries) + 1, last + 1), fut))
        return fut

    conn._publish_many = publish_many  # type: ignore[method-assign]
    return published


async def test_lost_connection_fails_every_unconfirmed_publish(broker: BrokerProcess) -> None:
    conn = await connect(broker.url)
    acked = _record_confirms(conn)
    published = _record_publishes(conn)
    try:
        await conn.declare_queue("inflight")
        for i in range(50):
            await conn.publish("", "inflight", b"before%d" % i)
        assert acked == set(range(1, 51))

        # Waves of concurrent publishes; the broker is killed (-9) in the middle.
        tasks: list[asyncio.Task[Any]] = []
        killed_at = 0
        for wave in range(40):
            tasks += [
                asyncio.create_task(conn.publish("", "inflight", b"w%d-%d" % (wave, i)))
                for i in range(200)
            ]
            tasks.append(
                asyncio.create_task(
                    conn.publish_batch([b"b%d" % i for i in range(100)], routing_key="inflight")
                )
            )
            await asyncio.sleep(0.002)
            if not killed_at and len(acked) > 2000:
                broker.kill()
                killed_at = len(acked)
        if not killed_at:
            broker.kill()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)

        ok = [r for r in results if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed, "the kill should leave publishes unconfirmed"
        assert all(isinstance(r, client.ConnectionClosed) for r in failed), failed[:3]
        assert ok, "publishes confirmed before the kill succeed"
        # Success was reported only for publishes whose every message was confirmed.
        succeeded = 0
        for seqs, fut in published:
            assert fut.done()
            if fut.exception() is None:
                succeeded += 1
                assert set(seqs) <= acked, seqs
            else:
                assert isinstance(fut.exception(), client.ConnectionClosed)
        assert succeeded == 50 + len(ok)
        assert not conn.is_open
        with pytest.raises(client.ConnectionClosed):
            await conn.publish("", "inflight", b"after")
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def test_publishes_to_a_killed_stalled_broker_all_fail(
    broker: BrokerProcess, stopper: Any
) -> None:
    conn = await connect(broker.url)
    acked = _record_confirms(conn)
    try:
        await conn.declare_queue("stalled")
        await conn.publish("", "stalled", b"confirmed")
        stopper.stop()
        tasks = [asyncio.create_task(conn.publish("", "stalled", b"p%d" % i)) for i in range(500)]
        tasks.append(asyncio.create_task(conn.publish_batch([b"b"] * 500, routing_key="stalled")))
        done, _ = await asyncio.wait(tasks, timeout=0.3)
        assert not done  # nothing can be confirmed by a stopped broker
        broker.kill()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
        assert all(isinstance(r, client.ConnectionClosed) for r in results), results[:3]
        assert acked == {1}
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def test_reconnect_restores_topology_and_consumers(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    conn = await connect(broker.url, reconnect=True, timeout=5)
    conn.reconnect_max_delay = 0.3
    replacement: BrokerProcess | None = None
    try:
        await conn.declare_exchange("rex", "topic")
        await conn.declare_queue("rq")
        await conn.bind("rex", "rq", "orders.*")
        consumer = await conn.consume("rq", prefetch=10)
        await conn.publish("rex", "orders.new", b"before", mandatory=True)
        (m,) = await take(consumer, 1)
        assert m.body == b"before"
        m.ack()
        old_tag = consumer.tag

        port = broker.port
        assert await asyncio.to_thread(broker.stop) == 0
        replacement = BrokerProcess(tmp_path / "replacement").start(port=port)
        assert replacement.port == port

        await wait_until(lambda: conn.reconnects == 1, timeout=WAIT)
        observer = await connect(replacement.url)
        try:
            # Restoring re-declares everything, then restarts the consumer.
            async def restored() -> bool:
                return any(c["queue"] == "rq" for c in await observer.list("consumers"))

            await wait_until(restored)
            assert conn.restore_errors == []
            exchanges = {e["name"]: e for e in await observer.list("exchanges")}
            assert exchanges["rex"]["type"] == "topic"
            assert {
                (b["exchange"], b["queue"], b["routing_key"])
                for b in await observer.list("bindings")
            } == {("rex", "rq", "orders.*")}

            await conn.publish("rex", "orders.paid", b"after", mandatory=True)
            (m2,) = await take(consumer, 1)
            assert (m2.body, m2.routing_key, m2.redelivered, m2.delivery_count) == (
                b"after",
                "orders.paid",
                False,
                1,
            )
            assert consumer.tag == old_tag
            m2.ack()
            q = await queue_info(observer, "rq")
            assert q is not None and (q["messages"], q["unacked"], q["consumers"]) == (0, 0, 1)
            assert conn.reconnects == 1
        finally:
            await asyncio.wait_for(observer.close(), WAIT)
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
        if replacement is not None:
            replacement.stop()


async def test_publish_timeout_on_stalled_broker(broker: BrokerProcess, stopper: Any) -> None:
    conn = await connect(broker.url)
    try:
        await conn.declare_queue("slow")
        stopper.stop()
        t0 = time.monotonic()
        with pytest.raises(client.PublishTimeout):
            await conn.publish("", "slow", b"late", timeout=0.5)
        assert 0.4 <= time.monotonic() - t0 < 3
        conn.timeout = 0.3  # the default bound of requests
        with pytest.raises(client.RequestTimeout):
            await conn.list("queues")
        conn.timeout = WAIT
        stopper.cont()
        # The broker catches up; the connection is still usable.
        await conn.publish("", "slow", b"on-time", timeout=WAIT)
        q = await queue_info(conn, "slow")
        assert q is not None and q["messages"] == 2  # the timed-out publish was stored later
    finally:
        stopper.cont()
        await asyncio.wait_for(conn.close(), WAIT)


async def test_close_fails_pending_requests(broker: BrokerProcess, stopper: Any) -> None:
    conn = await connect(broker.url)
    await conn.declare_queue("closing")
    consumer = await conn.consume("closing")
    stopper.stop()
    pending = [
        asyncio.create_task(conn.declare_queue("never")),
        asyncio.create_task(conn.list("queues")),
        asyncio.create_task(conn.publish("", "closing", b"never-confirmed")),
    ]
    done, _ = await asyncio.wait(pending, timeout=0.2)
    assert not done
    t0 = time.monotonic()
    await asyncio.wait_for(conn.close(), WAIT)  # waits (bounded) for CLOSE_OK, then gives up
    assert time.monotonic() - t0 < 8
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), WAIT)
    assert all(isinstance(r, client.ConnectionClosed) for r in results), results
    with pytest.raises(client.ConnectionClosed):
        await consumer.__anext__()
    with pytest.raises(client.ConnectionClosed):
        await conn.declare_queue("after-close")
    assert not conn.is_open


async def test_heartbeat_detects_a_silent_broker(broker: BrokerProcess, stopper: Any) -> None:
    conn = await connect(broker.url, heartbeat_ms=500)
    try:
        assert conn.server_heartbeat_ms == 500
        # Idle but healthy: heartbeats keep the connection open past 2 intervals.
        await asyncio.sleep(1.5)
        assert conn.is_open
        await conn.declare_queue("hb")

        stopper.stop()
        t0 = time.monotonic()
        await wait_until(lambda: not conn.is_open, timeout=5)
        assert time.monotonic() - t0 < 3
        with pytest.raises(client.ConnectionClosed):
            await conn.declare_queue("hb")
        with pytest.raises(client.ConnectionClosed):
            await conn.publish("", "hb", b"x")
    finally:
        stopper.cont()
        await asyncio.wait_for(conn.close(), WAIT)


async def test_server_shutdown_closes_clients_with_connection_forced(broker: BrokerProcess) -> None:
    conn = await connect(broker.url)
    try:
        await conn.declare_queue("bye")
        consumer = await conn.consume("bye")
        assert await asyncio.to_thread(broker.stop) == 0
        await wait_until(lambda: not conn.is_open, timeout=5)
        with pytest.raises(client.ConnectionClosed) as info:
            await asyncio.wait_for(consumer.__anext__(), WAIT)
        assert info.value.details.get("code") == 320
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
