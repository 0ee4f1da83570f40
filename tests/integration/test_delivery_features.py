"""The broker's delivery features end to end: a real broker process, real TCP.

Delivery limit, dead-lettering (x-death records, cycle guard), ack timeout and EXTEND,
TTL (per message and per queue, expiring from the middle of a queue), queue expiry,
delayed delivery, priority lanes with the starvation guard, length limits (drop-head and
reject-publish), message_id deduplication and single active consumer; and which of them
survive a restart, graceful (SIGTERM) and kill -9.

Timings use short TTLs/timeouts (hundreds of ms); every wait is bounded. Before a kill -9
a confirmed publish serves as a barrier: the log is ordered and group-committed, so once
it is confirmed every record logged before it (deliveries, nacks, acks) is on disk.
(test_delivery_client_cli.py covers the client API and mq-cli side of these features.)
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from conveyor import client
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, drain, queue_info, take, wait_until
from tests.integration.http_helpers import http

pytestmark = pytest.mark.timeout(60)

Connect = Callable[..., Awaitable[client.Connection]]
RESTARTS = ["graceful", "kill"]


# ---------------------------------------------------------------------- helpers
async def _dlq(conn: client.Connection, dlq: str = "dlq", exchange: str = "dlx") -> None:
    """Fanout exchange ``exchange`` delivering every dead letter to queue ``dlq``."""
    await conn.declare_exchange(exchange, "fanout")
    await conn.declare_queue(dlq)
    await conn.bind(exchange, dlq)


async def _poison_nacked_twice(conn: client.Connection) -> client.Consumer:
    """Queue "work" (delivery_limit 3, dead letters to "dlq"); one message delivered and
    nacked twice (counts 1 and 2 checked). Returns the consumer, prefetch 1."""
    await _dlq(conn)
    await conn.declare_queue("work", delivery_limit=3, dead_letter_exchange="dlx")
    await conn.publish("", "work", b"poison")
    consumer = await conn.consume("work", prefetch=1)
    for n in (1, 2):
        (m,) = await take(consumer, 1)
        assert m.delivery_count == n
        m.nack()
    return consumer


async def _info(conn: client.Connection, queue: str) -> dict[str, Any]:
    q = await queue_info(conn, queue)
    assert q is not None, f"no queue {queue!r}"
    return q


async def _depth(conn: client.Connection, queue: str) -> int:
    return int((await _info(conn, queue))["messages"])


async def _wait_depth(conn: client.Connection, queue: str, n: int, timeout: float = WAIT) -> None:
    async def reached() -> bool:
        return await _depth(conn, queue) == n

    await wait_until(reached, timeout)


async def _gone(conn: client.Connection, queue: str) -> bool:
    return await queue_info(conn, queue) is None


def _death(m: client.Message, i: int = 0) -> dict[str, Any]:
    return dict(m.deaths[i])


def _check_death(
    d: dict[str, Any],
    reason: str,
    queue: str,
    count: int = 1,
    exchange: str = "",
    routing_key: str | None = None,
) -> None:
    assert (d["reason"], d["queue"], d["exchange"], d["routing_key"], d["count"]) == (
        reason,
        queue,
        exchange,
        queue if routing_key is None else routing_key,
        count,
    ), d
    assert abs(d["time"] - time.time() * 1000) < 60_000, d


async def _barrier(conn: client.Connection) -> None:
    """Once this confirmed persistent publish is acked, everything the broker logged
    before it is on disk (so a kill -9 after it loses none of it)."""
    await conn.declare_queue("barrier")
    await conn.publish("", "barrier", b"barrier")


async def _restart(broker: BrokerProcess, how: str, *conns: client.Connection) -> None:
    """Stop the broker (SIGTERM, or SIGKILL) and start it again on the same data dir."""
    if how == "kill":
        broker.kill()
    else:  # in a thread: the clients (on this loop) answer the broker's CLOSE meanwhile
        await asyncio.to_thread(broker.stop)
    for c in conns:
        await asyncio.wait_for(c.close(), WAIT)  # already lost: returns at once
    broker.start()


async def _get_one(conn: client.Connection, queue: str) -> client.Message:
    msgs = await conn.get(queue)
    assert len(msgs) == 1, f"{queue!r} is empty"
    return msgs[0]


# ---------------------------------------------------------------------- delivery limit
async def test_poison_message_dead_lettered_after_exactly_three_deliveries(
    connect_to: Connect,
) -> None:
    conn = await connect_to()
    await _dlq(conn)
    await conn.declare_queue("work", delivery_limit=3, dead_letter_exchange="dlx")
    await conn.publish("", "work", b"poison", message_id="poison-1")
    consumer = await conn.consume("work", prefetch=1)
    seen: list[tuple[int, bool]] = []
    for _ in range(3):
        (m,) = await take(consumer, 1)
        assert m.body == b"poison"
        seen.append((m.delivery_count, m.redelivered))
        m.nack(requeue=True)
    assert seen == [(1, False), (2, True), (3, True)]
    # The third nack dead-letters it: no 4th delivery (the consumer has credit again).
    assert await consumer.get(0.5) is None
    await _wait_depth(conn, "dlq", 1)
    work = await _info(conn, "work")
    assert (work["messages"], work["unacked"], work["dead_lettered"]) == (0, 0, 1)
    dead = await _get_one(conn, "dlq")
    assert (dead.body, dead.message_id, dead.redelivered) == (b"poison", "poison-1", False)
    assert dead.exchange == "dlx" and dead.routing_key == "work"
    assert len(dead.deaths) == 1
    _check_death(_death(dead), "delivery-limit", "work")
    dead.ack()


async def test_delivery_limit_counts_ack_timeouts_and_lost_connections(connect_to: Connect) -> None:
    """Every way back to the queue counts: a nack, an ack timeout, a lost connection."""
    c1 = await connect_to()
    await _dlq(c1)
    await c1.declare_queue("work", delivery_limit=3, ack_timeout_ms=300, dead_letter_exchange="dlx")
    await c1.publish("", "work", b"poison")
    first = await c1.consume("work", prefetch=1)
    (m1,) = await take(first, 1)
    assert m1.delivery_count == 1
    m1.nack()  # back 1: requeued
    (m2,) = await take(first, 1)
    assert (m2.delivery_count, m2.redelivered) == (2, True)
    c2 = await connect_to()
    second = await c2.consume("work", prefetch=1)
    # back 2: m2 passes its ack timeout; ``first`` has no credit, so ``second`` gets it
    (m3,) = await take(second, 1, timeout=3)
    assert (m3.body, m3.delivery_count, m3.redelivered) == (b"poison", 3, True)
    m2.ack()  # late: ignored by the broker, but gives ``first`` its credit back
    await c2.close()  # back 3: the connection holding it is gone -> limit reached
    await _wait_depth(c1, "dlq", 1)
    assert await first.get(0.4) is None  # never a 4th delivery
    assert c1.is_open and await _depth(c1, "work") == 0
    assert (await _info(c1, "work"))["unacked"] == 0
    dead = await _get_one(c1, "dlq")
    _check_death(_death(dead), "delivery-limit", "work")
    dead.ack()


@pytest.mark.parametrize("how", RESTARTS)
async def test_delivery_count_survives_restart(
    broker: BrokerProcess, connect_to: Connect, how: str
) -> None:
    conn = await connect_to()
    consumer = await _poison_nacked_twice(conn)
    (m,) = await take(consumer, 1)  # the third delivery, held when the broker stops
    assert m.delivery_count == 3
    await consumer.cancel()
    await _barrier(conn)
    await _restart(broker, how, conn)

    conn = await connect_to()
    # Held unacked at the stop: its connection was lost with its 3rd delivery, so the
    # limit dead-letters it rather than delivering it a 4th time.
    consumer = await conn.consume("work", prefetch=1)
    got = await consumer.get(0.5)
    assert got is None, f"delivered again after restart: count {got.delivery_count}"
    await _wait_depth(conn, "dlq", 1, timeout=2)
    dead = await _get_one(conn, "dlq")
    assert dead.body == b"poison"
    _check_death(_death(dead), "delivery-limit", "work")
    dead.ack()


@pytest.mark.parametrize("how", RESTARTS)
async def test_delivery_limit_applies_across_restart(
    broker: BrokerProcess, connect_to: Connect, how: str
) -> None:
    conn = await connect_to()
    consumer = await _poison_nacked_twice(conn)
    await consumer.cancel()
    await _barrier(conn)
    await _restart(broker, how, conn)

    conn = await connect_to()
    assert await _depth(conn, "work") == 1
    consumer = await conn.consume("work", prefetch=1)
    (m,) = await take(consumer, 1)
    assert (m.delivery_count, m.redelivered) == (3, True)  # 2 before the restart
    m.nack()
    assert await consumer.get(0.4) is None
    await _wait_depth(conn, "dlq", 1)
    _check_death(_death(await _get_one(conn, "dlq")), "delivery-limit", "work")


# ---------------------------------------------------------------------- dead letters
async def test_dead_letter_routing_key_reasons_and_dropping(connect_to: Connect) -> None:
    conn = await connect_to()
    await conn.declare_exchange("dlx", "direct")
    await conn.declare_queue("dlq")
    await conn.bind("dlx", "dlq", "dead")
    await conn.declare_queue("work", dead_letter_exchange="dlx", dead_letter_routing_key="dead")
    await conn.declare_queue("nodlx")  # no dead-letter exchange: refused ones are dropped
    await conn.publish(
        "", "work", b"w", ttl=60_000, delay=0, priority=2, headers={"app": 1}, correlation_id="c"
    )
    await conn.publish("", "nodlx", b"n")
    (w,) = await conn.get("work")
    w.reject()
    (n,) = await conn.get("nodlx")
    n.reject()
    await _wait_depth(conn, "dlq", 1)
    assert (await _depth(conn, "nodlx"), (await _info(conn, "nodlx"))["unacked"]) == (0, 0)
    dead = await _get_one(conn, "dlq")
    assert (dead.exchange, dead.routing_key) == ("dlx", "dead")
    _check_death(_death(dead), "rejected", "work")
    # Properties are copied, except ttl and delay; headers gain x-death.
    p = dead.properties
    assert "ttl" not in p and "delay" not in p
    assert (p["priority"], p["correlation_id"], p["headers"]["app"]) == (2, "c", 1)
    # Moved back by a client and rejected again: x- headers are the broker's, so the
    # republished x-death was stripped and the history starts afresh (as in RabbitMQ 4).
    await conn.publish("", "work", dead.body, properties=dict(dead.properties))
    dead.ack()
    (w,) = await conn.get("work")
    assert w.headers == {"app": 1}
    w.reject()
    await _wait_depth(conn, "dlq", 1)
    again = await _get_one(conn, "dlq")
    assert len(again.deaths) == 1
    _check_death(_death(again), "rejected", "work", count=1)
    again.ack()


async def test_dead_letter_exchange_missing_drops(connect_to: Connect) -> None:
    conn = await connect_to()
    await conn.declare_queue("work", dead_letter_exchange="no-such-exchange")
    await conn.publish("", "work", b"x")
    (m,) = await conn.get("work")
    m.reject()
    await wait_until(lambda: _unacked_is(conn, "work", 0))
    assert await _depth(conn, "work") == 0 and conn.is_open
    await conn.publish("", "work", b"still works")
    assert await _depth(conn, "work") == 1


async def test_dead_letter_cycle_is_broken(connect_to: Connect) -> None:
    """a -(expired)-> b -(expired)-> a would loop forever: a is no target the second
    time; a queue bound alongside it still gets the message, with both records."""
    conn = await connect_to()
    await conn.declare_exchange("to-b", "fanout")
    await conn.declare_exchange("to-a", "fanout")
    await conn.declare_queue("a", message_ttl_ms=100, dead_letter_exchange="to-b")
    await conn.declare_queue("b", message_ttl_ms=100, dead_letter_exchange="to-a")
    await conn.declare_queue("watch")
    await conn.bind("to-b", "b")
    await conn.bind("to-a", "a")
    await conn.bind("to-a", "watch")
    await conn.publish("", "a", b"loop")
    await _wait_depth(conn, "watch", 1, timeout=3)
    await asyncio.sleep(0.4)  # would have gone round again by now
    a, b = await _info(conn, "a"), await _info(conn, "b")
    assert (a["messages"], b["messages"]) == (0, 0)
    assert (a["dead_lettered"], b["dead_lettered"]) == (1, 1)
    assert await _depth(conn, "watch") == 1
    m = await _get_one(conn, "watch")
    assert [(d["queue"], d["reason"]) for d in m.deaths] == [("b", "expired"), ("a", "expired")]
    m.ack()


async def _retry_recipe(conn: client.Connection, backoff_ms: int = 40) -> None:
    """docs/delivery.md's retry with back-off: "work" dead-letters to "work.retry" (its fanout
    exchange), whose message_ttl_ms dead-letters back to "work"; delivery_limit 2 on
    "work" stops a message that keeps coming back without a rejection."""
    await conn.declare_exchange("work.retry", "fanout")
    await conn.declare_exchange("work.back", "fanout")
    await conn.declare_queue("work", dead_letter_exchange="work.retry", delivery_limit=2)
    await conn.declare_queue(
        "work.retry", message_ttl_ms=backoff_ms, dead_letter_exchange="work.back"
    )
    await conn.bind("work.retry", "work.retry")
    await conn.bind("work.back", "work")


def _metric(text: str, name: str, queue: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{queue="{queue}"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} for {queue!r} in the scrape")


async def test_retry_with_back_off_ten_rounds_then_delivery_limit(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """Rejected ten times, the message comes back after each back-off with one more
    rejection and one more expiry in its history (a cycle with a rejection in it is no
    loop). Then it comes back without a rejection (nacked with requeue) until
    delivery_limit dead-letters it: its history already has work.retry -(expired)-> work,
    so work -(delivery-limit)-> work.retry would close a cycle of automatic deaths; the
    guard cuts it, and the drop is counted (queue stats and metrics) and logged, not
    silent."""
    b = broker_factory("--http-port", "0")
    conn = await client.connect(b.url, reconnect=False, timeout=WAIT)
    try:
        await _retry_recipe(conn)
        await conn.publish("", "work", b"job", headers={"attempt": "first"})
        consumer = await conn.consume("work", prefetch=1)
        for rnd in range(1, 11):
            (m,) = await take(consumer, 1, timeout=5)
            assert m.body == b"job" and m.headers["attempt"] == "first"
            assert m.delivery_count == 1 and not m.redelivered
            deaths = [(d["queue"], d["reason"], d["count"]) for d in m.deaths]
            if rnd == 1:
                assert deaths == []
            else:
                assert deaths == [
                    ("work.retry", "expired", rnd - 1),
                    ("work", "rejected", rnd - 1),
                ], (rnd, deaths)
            m.reject()
        (m,) = await take(consumer, 1, timeout=5)
        assert [(d["queue"], d["count"]) for d in m.deaths] == [("work.retry", 10), ("work", 10)]
        m.nack()  # requeue: delivery 1 of 2
        (m,) = await take(consumer, 1, timeout=5)
        assert (m.delivery_count, m.redelivered) == (2, True)
        m.nack()  # past delivery_limit: dead-lettered (delivery-limit), cut by the guard

        async def dropped() -> bool:
            return int((await _info(conn, "work"))["dead_letter_dropped"]) == 1

        await wait_until(dropped, 5)
        assert await drain(consumer, quiet=0.3) == []
        work, retry = await _info(conn, "work"), await _info(conn, "work.retry")
        assert (work["messages"], work["unacked"], retry["messages"]) == (0, 0, 0)
        assert (work["dead_lettered"], retry["dead_lettered"]) == (10, 10)
        assert retry["dead_letter_dropped"] == 0
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"{b.http_url}/metrics", timeout=WAIT).read()
        )
        scrape = text.decode()
        assert _metric(scrape, "conveyor_queue_dead_letter_dropped_total", "work") == 1
        assert "conveyor_messages_dead_letter_dropped_total 1.0" in scrape
        status, body = await http(b, "GET", "/api/queues/work")
        assert status == 200 and body["counters"]["dead_letter_dropped"] == 1, body
        log = b.log_text()
        assert (
            "queue 'work': message dead-lettered (delivery-limit) in an automatic "
            "cycle back to 'work.retry'; dropped" in log
        )
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def test_reject_after_an_out_of_order_ack_is_dead_lettered(connect_to: Connect) -> None:
    """An ack past an unsettled delivery, then a reject of that delivery: the reject must
    reach the broker before any cumulative ACK that covers its tag, or the broker takes
    the rejected message as acked (its REJECT then gets "unknown delivery tag") and it
    is neither dead-lettered nor redelivered."""
    conn = await connect_to()
    await _dlq(conn)
    await conn.declare_queue("work", dead_letter_exchange="dlx")
    for body in (b"m1", b"m2", b"m3"):
        await conn.publish("", "work", body)
    m1, m2, m3 = await take(await conn.consume("work", prefetch=3), 3)
    m2.ack()  # out of order: waits for m1
    m1.reject()
    m3.ack()
    await _wait_depth(conn, "dlq", 1, timeout=5)
    (dead,) = await conn.get("dlq")
    assert dead.body == b"m1" and dead.deaths[0]["reason"] == "rejected"
    dead.ack()
    info = await _info(conn, "work")
    assert (info["messages"], info["unacked"], info["acked"]) == (0, 0, 2)


# ---------------------------------------------------------------------- ack timeout
async def test_ack_timeout_redelivers_to_another_consumer(
    connect_to: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "conveyor.client")
    slow_conn, other_conn = await connect_to(), await connect_to()
    await slow_conn.declare_queue("jobs", ack_timeout_ms=300)
    slow = await slow_conn.consume("jobs", prefetch=1)
    await slow_conn.publish("", "jobs", b"job")
    (held,) = await take(slow, 1)
    t0 = time.monotonic()
    other = await other_conn.consume("jobs", prefetch=1)
    (again,) = await take(other, 1, timeout=3)
    waited = time.monotonic() - t0
    assert 0.2 <= waited <= 1.5, waited  # 300 ms (+ up to one 100 ms sweep)
    assert (again.body, again.redelivered, again.delivery_count) == (b"job", True, 2)
    held.ack()  # late: ignored silently (no error, connection stays up, nothing acked)
    await asyncio.sleep(0.1)
    assert slow_conn.is_open
    # (an unknown tag would be a 406 ERROR frame, which the client logs)
    assert not [r for r in caplog.records if "broker" in r.getMessage()], caplog.text
    assert (await _info(other_conn, "jobs"))["unacked"] == 1
    again.ack()
    await wait_until(lambda: _unacked_is(other_conn, "jobs", 0))
    assert await slow.get(0.4) is None and await other.get(0.01) is None
    assert await _depth(other_conn, "jobs") == 0


async def _unacked_is(conn: client.Connection, queue: str, n: int) -> bool:
    return int((await _info(conn, queue))["unacked"]) == n


async def test_extend_pushes_the_deadline_then_it_still_applies(connect_to: Connect) -> None:
    slow_conn, other_conn = await connect_to(), await connect_to()
    await slow_conn.declare_queue("jobs", ack_timeout_ms=300)
    slow = await slow_conn.consume("jobs", prefetch=1)
    await slow_conn.publish("", "jobs", b"long job")
    (held,) = await take(slow, 1)
    other = await other_conn.consume("jobs", prefetch=1)
    t0 = time.monotonic()
    held.extend(900)  # 3x the queue's ack timeout, from now
    assert await other.get(0.7) is None and await slow.get(0.01) is None
    # Not extended again: the 900 ms run out and it goes back to the queue.
    (again,) = await take(other, 1, timeout=3)
    waited = time.monotonic() - t0
    assert 0.85 <= waited <= 2.0, waited
    assert (again.body, again.delivery_count) == (b"long job", 2)
    again.ack()


# ---------------------------------------------------------------------- TTL
async def test_ttl_expires_message_behind_long_lived_head(connect_to: Connect) -> None:
    conn = await connect_to()
    await _dlq(conn)
    await conn.declare_queue("work", dead_letter_exchange="dlx")
    await conn.publish("", "work", b"head")  # never expires, never consumed
    t0 = time.monotonic()
    await conn.publish("", "work", b"short", ttl=200)
    await conn.publish("", "work", b"tail")
    assert await _depth(conn, "work") == 3
    await _wait_depth(conn, "work", 2, timeout=3)  # nothing consumed
    waited = time.monotonic() - t0
    assert 0.18 <= waited <= 1.0, waited
    await _wait_depth(conn, "dlq", 1)
    info = await _info(conn, "work")
    assert (info["expired"], info["dead_lettered"], info["delivered"]) == (1, 1, 0)
    dead = await _get_one(conn, "dlq")
    assert dead.body == b"short" and "ttl" not in dead.properties
    _check_death(_death(dead), "expired", "work")
    dead.ack()
    left = await conn.get("work", 10)
    assert [m.body for m in left] == [b"head", b"tail"]
    conn.ack_all(left)


async def test_ttl_queue_and_message_ttl_shorter_wins(connect_to: Connect) -> None:
    conn = await connect_to()
    await _dlq(conn)
    await conn.declare_queue("work", message_ttl_ms=400, dead_letter_exchange="dlx")
    await conn.publish("", "work", b"queue-ttl", ttl=60_000)  # 400 ms applies
    await conn.publish("", "work", b"own-ttl", ttl=100)  # its own, shorter
    await conn.publish("", "work", b"plain")  # 400 ms
    await _wait_depth(conn, "dlq", 1, timeout=3)
    assert await _depth(conn, "work") == 2  # own-ttl gone well before the others
    await _wait_depth(conn, "dlq", 3, timeout=3)
    dead = await conn.get("dlq", 10)
    assert [m.body for m in dead] == [b"own-ttl", b"queue-ttl", b"plain"]
    for m in dead:
        _check_death(_death(m), "expired", "work")
    conn.ack_all(dead)


async def test_ttl_counts_from_when_a_delayed_message_becomes_visible(connect_to: Connect) -> None:
    conn = await connect_to()
    await conn.declare_queue("work")
    t0 = time.monotonic()
    await conn.publish("", "work", b"later", delay=300, ttl=500)
    await _wait_depth(conn, "work", 1, timeout=2)  # visible at ~300 ms
    # Counting from publish it would expire at 500 ms; from visibility, at 800 ms.
    await asyncio.sleep(max(0.0, t0 + 0.65 - time.monotonic()))
    assert await _depth(conn, "work") == 1
    await _wait_depth(conn, "work", 0, timeout=3)
    waited = time.monotonic() - t0
    assert 0.75 <= waited <= 1.5, waited
    assert (await _info(conn, "work"))["expired"] == 1


async def test_requeued_message_past_its_ttl_is_dead_lettered(connect_to: Connect) -> None:
    conn = await connect_to()
    await _dlq(conn)
    await conn.declare_queue("work", dead_letter_exchange="dlx")
    await conn.publish("", "work", b"slow", ttl=200)
    consumer = await conn.consume("work", prefetch=1)
    (m,) = await take(consumer, 1)
    await asyncio.sleep(0.35)  # its TTL passes while it is delivered: it stays delivered
    assert (await _info(conn, "work"))["unacked"] == 1
    m.nack(requeue=True)
    assert await consumer.get(0.3) is None  # not redelivered
    await _wait_depth(conn, "dlq", 1)
    assert await _depth(conn, "work") == 0
    _check_death(_death(await _get_one(conn, "dlq")), "expired", "work")


@pytest.mark.parametrize("how", RESTARTS)
async def test_ttl_still_expires_after_restart(
    broker: BrokerProcess, connect_to: Connect, how: str
) -> None:
    conn = await connect_to()
    await _dlq(conn)
    await conn.declare_queue("work", dead_letter_exchange="dlx")
    await conn.publish("", "work", b"keep")
    t0 = time.monotonic()
    # soon's TTL outlasts a restart even on a loaded machine (a restart takes ~1 s there)
    await conn.publish("", "work", b"soon", ttl=3000)
    await conn.publish("", "work", b"while-down", ttl=150)
    await _restart(broker, how, conn)
    await asyncio.sleep(max(0.0, t0 + 0.3 - time.monotonic()))  # ttl 150 passed
    conn = await connect_to()
    # while-down expired before the restart finished (or at once after it).
    await _wait_depth(conn, "dlq", 1, timeout=2)
    assert await _depth(conn, "work") == 2
    await _wait_depth(conn, "work", 1, timeout=6)  # soon: still counted from publish
    waited = time.monotonic() - t0
    assert 2.9 <= waited <= 4.5, waited
    await _wait_depth(conn, "dlq", 2)
    dead = await conn.get("dlq", 10)
    assert [m.body for m in dead] == [b"while-down", b"soon"]
    for m in dead:
        _check_death(_death(m), "expired", "work")
    conn.ack_all(dead)
    (keep,) = await conn.get("work")
    assert keep.body == b"keep"
    keep.ack()


async def test_purged_message_does_not_expire_later(connect_to: Connect) -> None:
    """A purged message is gone: its TTL timer must not dead-letter it (or count it)."""
    conn = await connect_to()
    await _dlq(conn)
    await conn.declare_queue("work", dead_letter_exchange="dlx")
    await conn.publish("", "work", b"purged", ttl=200)
    assert await conn.purge("work") == 1
    await asyncio.sleep(0.4)
    info = await _info(conn, "work")
    assert (info["messages"], info["expired"], info["dead_lettered"]) == (0, 0, 0)
    assert await _depth(conn, "dlq") == 0
    await conn.publish("", "work", b"after")
    assert await _depth(conn, "work") == 1


# ---------------------------------------------------------------------- delay
async def test_delayed_message_arrives_on_time(connect_to: Connect) -> None:
    conn = await connect_to()
    await conn.declare_queue("later")
    consumer = await conn.consume("later", prefetch=10)
    assert await consumer.get(0.05) is None  # the consumer is waiting
    t0 = time.monotonic()
    await conn.publish("", "later", b"delayed", delay=500)
    await conn.publish("", "later", b"now")  # not held up behind the delayed one
    (now,) = await take(consumer, 1)
    t_now = time.monotonic() - t0
    info = await _info(conn, "later")
    (late,) = await take(consumer, 1, timeout=2)
    t_late = time.monotonic() - t0
    print(
        f"delayed 500 ms: arrived after {t_late * 1000:.1f} ms; "
        f"undelayed after {t_now * 1000:.1f} ms"
    )
    assert now.body == b"now" and t_now < 0.3
    assert (info["delayed"], info["messages"]) == (1, 0)
    assert late.body == b"delayed" and late.delivery_count == 1
    assert 0.5 <= t_late <= 0.6, t_late
    conn.ack_all([now, late])


@pytest.mark.parametrize("how", RESTARTS)
async def test_delayed_message_survives_restart(
    broker: BrokerProcess, connect_to: Connect, how: str
) -> None:
    conn = await connect_to()
    await conn.declare_queue("later")
    t0 = time.monotonic()
    # the delay outlasts a restart even on a loaded machine (a restart takes ~1 s there)
    await conn.publish("", "later", b"delayed", delay=3000)
    await conn.publish("", "later", b"transient", delay=3000, persistent=False)
    await _restart(broker, how, conn)
    conn = await connect_to()
    info = await _info(conn, "later")
    assert (info["delayed"], info["messages"]) == (1, 0)  # still waiting: not released
    consumer = await conn.consume("later", prefetch=10)
    (m,) = await take(consumer, 1, timeout=6)
    waited = time.monotonic() - t0
    # due at publish + 3000 ms: the publish time was logged, the restart (~1 s) does not
    # reset it (a reset would make it due a whole restart later)
    assert 3.0 <= waited <= 3.8, waited
    assert (m.body, m.delivery_count, m.redelivered) == (b"delayed", 1, False)
    m.ack()
    assert await consumer.get(0.2) is None  # the transient one did not survive


@pytest.mark.parametrize("how", RESTARTS)
async def test_purge_keeps_delayed_messages_across_restart(
    broker: BrokerProcess, connect_to: Connect, how: str
) -> None:
    """Purge removes ready messages only: a delayed one stays, before and after a restart."""
    conn = await connect_to()
    await conn.declare_queue("later")
    t0 = time.monotonic()
    # the delay outlasts a restart even on a loaded machine (a restart takes ~1 s there)
    await conn.publish("", "later", b"delayed", delay=3000)
    await conn.publish("", "later", b"ready")
    assert await conn.purge("later") == 1
    await _barrier(conn)
    await _restart(broker, how, conn)
    conn = await connect_to()
    info = await _info(conn, "later")
    assert (info["delayed"], info["messages"]) == (1, 0)
    consumer = await conn.consume("later")
    (m,) = await take(consumer, 1, timeout=6)
    assert m.body == b"delayed" and 3.0 <= time.monotonic() - t0 <= 4.5
    m.ack()


# ---------------------------------------------------------------------- priority
def _prio_messages(spec: list[tuple[int, int]]) -> list[client.OutgoingMessage]:
    out = []
    for prio, n in spec:
        out += [
            client.OutgoingMessage(
                f"p{prio}-{i}".encode(), routing_key="prio", properties={"priority": prio}
            )
            for i in range(n)
        ]
    return out


async def _consume_one_by_one(
    conn: client.Connection,
    queue: str,
    n: int,
    each: Callable[[client.Message], Awaitable[None]] | None = None,
) -> list[client.Message]:
    """Prefetch 1: every delivery is its own dispatch decision."""
    consumer = await conn.consume(queue, prefetch=1)
    out = []
    for _ in range(n):
        (m,) = await take(consumer, 1)
        if each is not None:
            await each(m)
        m.ack()
        out.append(m)
    await consumer.cancel()
    return out


def _prio(m: client.Message) -> int:
    return int(m.properties["priority"])


async def test_priority_higher_first_low_keeps_moving(connect_to: Connect) -> None:
    conn = await connect_to()
    await conn.declare_queue("prio", max_priority=9)
    await conn.publish_batch(_prio_messages([(9, 100), (0, 20)]))
    got = await _consume_one_by_one(conn, "prio", 120)
    prios = [_prio(m) for m in got]
    assert prios[0] == 9
    low = [i for i, p in enumerate(prios) if p == 0]
    print(f"priority 0 delivered at positions {low}")
    # After 10 top-lane deliveries while priority 0 waits, the 11th is priority 0.
    assert low == [11 * k + 10 for k in range(10)] + list(range(110, 120))
    # Each lane stays in publish order.
    assert [m.body for m in got if _prio(m) == 0] == [b"p0-%d" % i for i in range(20)]
    assert [m.body for m in got if _prio(m) == 9] == [b"p9-%d" % i for i in range(100)]
    assert await _depth(conn, "prio") == 0


async def test_priority_order_guard_rotates_and_caps(connect_to: Connect) -> None:
    conn = await connect_to()
    await conn.declare_queue("prio", max_priority=5)
    # 7 is capped to 5: the same lane as 5, in publish order.
    await conn.publish_batch(_prio_messages([(1, 3), (7, 1), (3, 2), (5, 25), (0, 3)]))
    got = await _consume_one_by_one(conn, "prio", 34)
    bodies = [m.body.decode() for m in got]
    assert bodies[:10] == ["p7-0"] + [f"p5-{i}" for i in range(9)]
    # The guard turns (11th, 22nd) go to waiting lower lanes, a different one each time.
    guard = [_prio(got[10]), _prio(got[21])]
    assert guard[0] in (0, 1, 3) and guard[1] in (0, 1, 3) and guard[0] != guard[1], bodies
    # Apart from those, highest first, each lane in publish order.
    rest = [m for i, m in enumerate(got) if i not in (10, 21)]
    assert [m.body for m in rest] == [
        m.body for m in sorted(rest, key=lambda m: -min(_prio(m), 5))
    ], bodies
    assert len(set(bodies)) == 34  # each exactly once


async def test_priority_under_a_steady_stream_of_high_priority(connect_to: Connect) -> None:
    """Each delivery makes the publisher add another priority-9 message: the top lane
    never empties, yet the low ones all get through."""
    conn = await connect_to()
    await conn.declare_queue("prio", max_priority=9)
    await conn.publish_batch(_prio_messages([(0, 5), (9, 5)]))
    n = 0

    async def more(_m: client.Message) -> None:
        nonlocal n
        n += 1
        await conn.publish("", "prio", b"more-%d" % n, priority=9)

    got = await _consume_one_by_one(conn, "prio", 60, more)
    low = [i for i, m in enumerate(got) if _prio(m) == 0]
    assert low == [10, 21, 32, 43, 54], low
    assert await _depth(conn, "prio") == 10  # 10 + 60 published, 60 taken


async def test_priority_requeue_does_not_outrank_higher_priority(connect_to: Connect) -> None:
    conn = await connect_to()
    await conn.declare_queue("prio", max_priority=9)
    await conn.publish("", "prio", b"low", priority=0)
    consumer = await conn.consume("prio", prefetch=1)
    (low,) = await take(consumer, 1)
    await conn.publish("", "prio", b"high", priority=9)  # waits: no credit
    low.nack()  # back into its lane, behind the waiting priority 9
    got = await take(consumer, 2, ack=True)
    assert [(m.body, m.redelivered) for m in got] == [(b"high", False), (b"low", True)]


# ---------------------------------------------------------------------- length limits
async def test_drop_head_dead_letters_the_oldest(connect_to: Connect) -> None:
    conn = await connect_to()
    await _dlq(conn)
    await conn.declare_queue("bounded", max_length=3, dead_letter_exchange="dlx")
    await conn.declare_queue("bytes", max_length_bytes=10)  # no DLX: dropped
    for i in range(5):
        await conn.publish("", "bounded", b"m%d" % i)
        await conn.publish("", "bytes", b"b%03d" % i)  # 4 bytes each: 2 fit
    assert await _depth(conn, "bounded") == 3 and await _depth(conn, "bytes") == 2
    await _wait_depth(conn, "dlq", 2)
    dead = await conn.get("dlq", 10)
    assert [m.body for m in dead] == [b"m0", b"m1"]
    for m in dead:
        _check_death(_death(m), "max-length", "bounded")
    conn.ack_all(dead)
    kept = await conn.get("bounded", 10)
    assert [m.body for m in kept] == [b"m2", b"m3", b"m4"]
    conn.ack_all(kept)
    kept = await conn.get("bytes", 10)
    assert [m.body for m in kept] == [b"b003", b"b004"]
    conn.ack_all(kept)


async def test_reject_publish_refuses_and_keeps_contents(connect_to: Connect) -> None:
    conn = await connect_to()
    await conn.declare_exchange("both", "fanout")
    await conn.declare_queue("full", max_length=2, overflow="reject-publish")
    await conn.declare_queue("roomy")
    await conn.declare_queue("full-bytes", max_length_bytes=5, overflow="reject-publish")
    await conn.bind("both", "full")
    await conn.bind("both", "roomy")
    await conn.publish("both", "", b"a")
    await conn.publish("both", "", b"b")
    with pytest.raises(client.QueueFull) as exc_info:
        await conn.publish("both", "", b"c")
    assert exc_info.value.code == 409
    # Refused as a whole: "roomy" (not full) did not get it either.
    assert (await _depth(conn, "full"), await _depth(conn, "roomy")) == (2, 2)
    await conn.publish("", "full-bytes", b"12345")
    with pytest.raises(client.QueueFull):
        await conn.publish("", "full-bytes", b"6")
    assert await _depth(conn, "full-bytes") == 1
    assert conn.is_open
    (a,) = await conn.get("full")
    assert a.body == b"a"
    a.ack()
    await conn.publish("both", "", b"d")  # room again
    kept = await conn.get("full", 10)
    assert [m.body for m in kept] == [b"b", b"d"]
    conn.ack_all(kept)
    kept = await conn.get("roomy", 10)
    assert [m.body for m in kept] == [b"a", b"b", b"d"]
    conn.ack_all(kept)


# ---------------------------------------------------------------------- dedup
async def test_retried_publish_is_stored_once(connect_to: Connect) -> None:
    conn = await connect_to()
    await conn.declare_queue("orders", dedup_window_ms=60_000)
    await conn.publish("", "orders", b"order 1", message_id="order-1")
    await conn.publish("", "orders", b"order 1", message_id="order-1")  # retry: confirmed
    await conn.publish("", "orders", b"order 1", message_id="order-1", mandatory=True)
    retry = await connect_to()  # a publisher that reconnected and retried
    await retry.publish("", "orders", b"order 1 again", message_id="order-1")
    await retry.publish_batch(
        [
            client.OutgoingMessage(
                b"order 1", routing_key="orders", properties={"message_id": "order-1"}
            )
        ]
        * 3
    )
    info = await _info(conn, "orders")
    assert (info["messages"], info["published"]) == (1, 1)
    consumer = await conn.consume("orders", prefetch=10)
    got = await drain(consumer, quiet=0.3)
    assert [(m.body, m.message_id) for m in got] == [(b"order 1", "order-1")]
    got[0].ack()
    # Consumed, the id is still remembered for the window; other ids are not affected.
    await conn.publish("", "orders", b"order 1", message_id="order-1")
    await conn.publish("", "orders", b"order 2", message_id="order-2")
    await conn.publish("", "orders", b"no id")
    await conn.publish("", "orders", b"no id")
    got = await drain(consumer, quiet=0.3)
    assert [m.body for m in got] == [b"order 2", b"no id", b"no id"]
    consumer.ack_all(got)


async def test_dedup_window_passes(connect_to: Connect) -> None:
    conn = await connect_to()
    await conn.declare_queue("orders", dedup_window_ms=300)
    await conn.declare_queue("plain")
    await conn.publish("", "orders", b"1", message_id="x")
    await conn.publish("", "orders", b"2", message_id="x")
    assert await _depth(conn, "orders") == 1
    await asyncio.sleep(0.4)
    await conn.publish("", "orders", b"3", message_id="x")  # window over: taken again
    await conn.publish("", "plain", b"p", message_id="x")  # no window on this queue
    await conn.publish("", "plain", b"p", message_id="x")
    assert await _depth(conn, "orders") == 2 and await _depth(conn, "plain") == 2
    got = await conn.get("orders", 10)
    assert [m.body for m in got] == [b"1", b"3"]
    conn.ack_all(got)


async def test_retry_into_a_full_queue_that_has_it_is_confirmed(connect_to: Connect) -> None:
    """The queue holds the message already: the retry is confirmed, not refused as full."""
    conn = await connect_to()
    await conn.declare_queue(
        "orders", max_length=1, overflow="reject-publish", dedup_window_ms=60_000
    )
    await conn.publish("", "orders", b"order 1", message_id="order-1")
    await conn.publish("", "orders", b"order 1", message_id="order-1")  # retry
    with pytest.raises(client.QueueFull):
        await conn.publish("", "orders", b"order 2", message_id="order-2")
    got = await conn.get("orders", 10)
    assert [m.body for m in got] == [b"order 1"]
    conn.ack_all(got)


@pytest.mark.parametrize("how", RESTARTS)
async def test_dedup_survives_restart(broker: BrokerProcess, connect_to: Connect, how: str) -> None:
    conn = await connect_to()
    await conn.declare_queue("orders", dedup_window_ms=60_000)
    await conn.publish("", "orders", b"acked", message_id="acked")
    await conn.publish("", "orders", b"kept", message_id="kept")
    (m,) = await conn.get("orders")
    assert m.body == b"acked"
    m.ack()  # consumed before the restart: its id is still within the window
    await _barrier(conn)
    await _restart(broker, how, conn)
    conn = await connect_to()
    for mid in ("kept", "acked"):
        await conn.publish("", "orders", b"retry", message_id=mid)
    await conn.publish("", "orders", b"new", message_id="new")
    got = await conn.get("orders", 10)
    assert [m.body for m in got] == [b"kept", b"new"]
    conn.ack_all(got)


async def test_dedup_survives_restart_from_snapshot(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """The ids are kept in snapshots too (the log they were in is deleted)."""
    from tests.integration.helpers import connect

    b = broker_factory("--snapshot-bytes", "4096")
    conn = await connect(b.url)
    try:
        await conn.declare_queue("orders", dedup_window_ms=60_000)
        await conn.publish("", "orders", b"first", message_id="first")
        (m,) = await conn.get("orders")
        m.ack()
        await conn.declare_queue("filler")
        await conn.publish_batch([b"x" * 1000] * 10, routing_key="filler")  # > 4096 B of log
        await wait_until(lambda: any((b.data_dir / "wal").glob("snap-*.snap")), timeout=5)
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
    b.kill()
    b.start()
    segs = sorted(p.name for p in (b.data_dir / "wal").glob("seg-*.log"))
    conn = await connect(b.url)
    try:
        await conn.publish("", "orders", b"retry", message_id="first")
        await conn.publish("", "orders", b"second", message_id="second")
        got = await conn.get("orders", 10)
        assert [m.body for m in got] == [b"second"], segs
        conn.ack_all(got)
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


# ---------------------------------------------------------------------- queue expiry
async def test_queue_expiry_deletes_unused_queue_only(connect_to: Connect) -> None:
    conn, consuming = await connect_to(), await connect_to()
    t0 = time.monotonic()
    await conn.declare_queue("idle", expires_ms=300)
    await conn.publish("", "idle", b"published: not a use")
    await conn.declare_queue("busy", expires_ms=300)
    await conn.declare_queue("touched", expires_ms=300)
    consumer = await consuming.consume("busy")
    await wait_until(lambda: _gone(conn, "idle"), timeout=3)
    assert 0.28 <= time.monotonic() - t0 <= 1.2
    # Redeclared (or GET) every 100 ms: stays; a consumer: stays.
    for _ in range(6):
        await conn.declare_queue("touched", expires_ms=300)
        await asyncio.sleep(0.1)
    await conn.get("touched")
    assert await queue_info(conn, "busy") is not None
    assert await queue_info(conn, "touched") is not None
    t1 = time.monotonic()
    await consumer.cancel()  # from now unused: expires 300 ms later
    await wait_until(lambda: _gone(conn, "busy"), timeout=3)
    assert 0.25 <= time.monotonic() - t1 <= 1.2
    await wait_until(lambda: _gone(conn, "touched"), timeout=3)
    with pytest.raises(client.NotFound):
        await conn.declare_queue("idle", passive=True)


@pytest.mark.parametrize("how", RESTARTS)
async def test_queue_expiry_after_restart(
    broker: BrokerProcess, connect_to: Connect, how: str
) -> None:
    conn = await connect_to()
    await conn.declare_queue("idle", expires_ms=600)
    await conn.publish("", "idle", b"x")
    await conn.declare_queue("kept")
    await _barrier(conn)  # a declare's reply does not wait for the disk; a confirm does
    await _restart(broker, how, conn)
    t0 = time.monotonic()
    conn = await connect_to()
    info = await _info(conn, "idle")
    assert (info["arguments"], info["messages"]) == ({"expires_ms": 600}, 1)
    await wait_until(lambda: _gone(conn, "idle"), timeout=3)  # counted from the restart
    assert 0.4 <= time.monotonic() - t0 <= 2.0
    await _barrier(conn)
    await _restart(broker, "kill", conn)  # the deletion was logged: it stays deleted
    conn = await connect_to()
    assert await _gone(conn, "idle") and not await _gone(conn, "kept")


# ---------------------------------------------------------------------- single active
async def test_single_active_consumer_takes_over_in_order(connect_to: Connect) -> None:
    c1, c2, c3 = await connect_to(), await connect_to(), await connect_to()
    await c1.declare_queue("sac", single_active_consumer=True)
    active = await c1.consume("sac", prefetch=3)
    standby = await c2.consume("sac", prefetch=10)
    last = await c3.consume("sac", prefetch=10)
    await c1.publish_batch([b"m%d" % i for i in range(6)], routing_key="sac")
    got = await take(active, 3)
    assert [m.body for m in got] == [b"m0", b"m1", b"m2"]
    # The active one is out of credit: still nothing for the others.
    assert await standby.get(0.4) is None and await last.get(0.01) is None
    active.ack_all(got)
    got = await take(active, 3)
    assert [m.body for m in got] == [b"m3", b"m4", b"m5"]
    got[0].ack()
    await active.cancel()  # m4, m5 stay unacked on c1 until it closes
    await c1.publish("", "sac", b"m6")
    (m6,) = await take(standby, 1)
    assert m6.body == b"m6"
    assert await last.get(0.3) is None
    await c1.close()  # its unacked m4, m5 come back: to the active consumer
    back = await take(standby, 2)
    assert [(m.body, m.redelivered) for m in back] == [(b"m4", True), (b"m5", True)]
    assert await last.get(0.3) is None
    await c2.close()  # connection gone: the last one takes over (gets m6..m5 back)
    again = await take(last, 3)
    assert sorted(m.body for m in again) == [b"m4", b"m5", b"m6"]
    last.ack_all(again)


# ---------------------------------------------------------------------- restart: arguments
@pytest.mark.parametrize("how", RESTARTS)
async def test_queue_arguments_survive_restart(
    broker: BrokerProcess, connect_to: Connect, how: str
) -> None:
    args: dict[str, Any] = {
        "ack_timeout_ms": 250,
        "delivery_limit": 2,
        "dead_letter_exchange": "dlx",
        "message_ttl_ms": 60_000,
        "max_priority": 9,
        "max_length": 4,
        "overflow": "reject-publish",
        "dedup_window_ms": 60_000,
        "single_active_consumer": True,
    }
    conn = await connect_to()
    await _dlq(conn)
    await conn.declare_queue("all", **args)
    await conn.declare_queue("small", max_length=1, dead_letter_exchange="dlx")
    await conn.publish_batch(
        [
            client.OutgoingMessage(
                b"p%d" % p, routing_key="all", properties={"priority": p, "message_id": f"id{p}"}
            )
            for p in (1, 5, 9)
        ]
    )
    await conn.publish("", "small", b"s0")
    await _restart(broker, how, conn)

    conn = await connect_to()
    assert (await _info(conn, "all"))["arguments"] == args
    await conn.declare_queue("all", **args)  # same arguments: accepted
    with pytest.raises(client.PreconditionFailed):
        await conn.declare_queue("all", **{**args, "max_length": 5})
    # dedup, then reject-publish at 4
    await conn.publish("", "all", b"dup", message_id="id5")
    await conn.publish("", "all", b"p0", priority=0, message_id="id0")
    with pytest.raises(client.QueueFull):
        await conn.publish("", "all", b"p7", priority=7, message_id="id7")
    # drop-head on the other queue
    await conn.publish("", "small", b"s1")
    await _wait_depth(conn, "dlq", 1)
    # single active consumer + priority order + ack timeout + delivery limit
    other = await connect_to()
    first = await conn.consume("all", prefetch=4)
    second = await other.consume("all", prefetch=4)
    got = await take(first, 4)
    assert [m.body for m in got] == [b"p9", b"p5", b"p1", b"p0"]
    assert await second.get(0.1) is None
    # not acked: after 250 ms they come back (count 2 = limit: next time, dead-lettered)
    await first.cancel()
    again = await take(second, 4, timeout=3)
    assert [(m.body, m.delivery_count) for m in again] == [
        (b"p9", 2),
        (b"p5", 2),
        (b"p1", 2),
        (b"p0", 2),
    ]
    for m in again:
        m.nack()
    await _wait_depth(conn, "dlq", 5)
    dead = await conn.get("dlq", 10)
    assert [(m.body, m.deaths[0]["reason"]) for m in dead] == [
        (b"s0", "max-length"),
        (b"p9", "delivery-limit"),
        (b"p5", "delivery-limit"),
        (b"p1", "delivery-limit"),
        (b"p0", "delivery-limit"),
    ]
    conn.ack_all(dead)
