"""Queue arguments, EXTEND, dead letters and queue-full from the client and mq-cli.

Most of these need the broker's side of those features (spec: [queue_arguments], EXTEND,
409 queue-full, the x-death header); the checks made before anything is sent do not.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from typing import Any

import pytest

from conveyor import client
from conveyor.protocol._generated import QUEUE_ARGUMENT_TYPES
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect, queue_info, take, wait_until
from tests.integration.test_cli import arun, ok, one_error_line, queues_json, run

pytestmark = pytest.mark.timeout(90)

# One value for every queue argument, as declare_queue keywords and as mq-cli flags.
ALL_ARGUMENTS: dict[str, Any] = {
    "ack_timeout_ms": 60_000,
    "delivery_limit": 5,
    "dead_letter_exchange": "dlx",
    "dead_letter_routing_key": "dead",
    "message_ttl_ms": 3_600_000,
    "expires_ms": 86_400_000,
    "max_priority": 5,
    "max_length": 1000,
    "max_length_bytes": 1 << 20,
    "overflow": "reject-publish",
    "dedup_window_ms": 10_000,
    "single_active_consumer": True,
}
# The stream-only arguments (tests/integration/test_streams_client.py uses them).
STREAM_ARGUMENTS: dict[str, Any] = {
    "queue_type": "stream",
    "max_age_ms": 86_400_000,
    "stream_segment_bytes": 1 << 20,
    "stream_compression": "zstd",
}


def _flags(args: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in args.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        else:
            out += [flag, str(v)]
    return out


async def _dead_letter_setup(conn: client.Connection, limit: int = 0) -> None:
    """Queue "work" dead-letters through direct exchange "dlx" into "work.dlq" (the dead
    letter keeps its routing key, "work")."""
    await conn.declare_exchange("dlx", "direct")
    await conn.declare_queue("work.dlq")
    await conn.bind("dlx", "work.dlq", "work")
    await conn.declare_queue("work", dead_letter_exchange="dlx", delivery_limit=limit or None)


async def _reject_all(conn: client.Connection, queue: str, n: int) -> None:
    consumer = await conn.consume(queue, prefetch=n)
    for m in await take(consumer, n):
        m.reject()  # requeue=False: dead-lettered
    await consumer.cancel()


async def _depth(conn: client.Connection, queue: str) -> int:
    q = await queue_info(conn, queue)
    assert q is not None, queue
    return int(q["messages"])


async def _wait_depth(conn: client.Connection, queue: str, n: int) -> None:
    async def reached() -> bool:
        return await _depth(conn, queue) == n

    await wait_until(reached)


def _check_death(d: dict[str, Any], reason: str, queue: str = "work") -> None:
    assert (d["reason"], d["queue"], d["exchange"], d["routing_key"], d["count"]) == (
        reason,
        queue,
        "",
        queue,
        1,
    )
    assert abs(d["time"] - time.time() * 1000) < 60_000


# ---------------------------------------------------------------------- client: declare
def test_declare_queue_has_a_keyword_for_every_spec_argument() -> None:
    params = inspect.signature(client.Connection.declare_queue).parameters
    for name in QUEUE_ARGUMENT_TYPES:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default is None, name
    assert set(ALL_ARGUMENTS) | set(STREAM_ARGUMENTS) == set(QUEUE_ARGUMENT_TYPES)


async def test_declare_queue_argument_given_twice_differently(conn: client.Connection) -> None:
    with pytest.raises(ValueError, match="max_length"):
        await conn.declare_queue("twice", arguments={"max_length": 1}, max_length=2)
    assert await queue_info(conn, "twice") is None  # refused before anything was sent


async def test_declare_queue_typed_arguments_round_trip(conn: client.Connection) -> None:
    await conn.declare_exchange("dlx", "direct")
    await conn.declare_queue("typed", **ALL_ARGUMENTS)
    q = await queue_info(conn, "typed")
    assert q is not None and q["arguments"] == ALL_ARGUMENTS
    # Same settings again, as keywords or as the map (or both): fine.
    await conn.declare_queue("typed", **ALL_ARGUMENTS)
    await conn.declare_queue("typed", arguments=dict(ALL_ARGUMENTS))
    await conn.declare_queue(
        "typed",
        arguments={"max_length": 1000},
        **{k: v for k, v in ALL_ARGUMENTS.items() if k != "max_length"},
    )
    with pytest.raises(client.PreconditionFailed):
        await conn.declare_queue("typed", **{**ALL_ARGUMENTS, "delivery_limit": 6})
    with pytest.raises(client.PreconditionFailed):
        await conn.declare_queue("typed", max_length=1000)  # the others left out
    q = await queue_info(conn, "typed")
    assert q is not None and q["arguments"] == ALL_ARGUMENTS
    # None means "not sent": a plain queue has no arguments.
    await conn.declare_queue("plain", max_length=None, overflow=None)
    q = await queue_info(conn, "plain")
    assert q is not None and q["arguments"] == {}


async def test_reject_publish_queue_full_raises_queue_full(conn: client.Connection) -> None:
    await conn.declare_queue("small", max_length=2, overflow="reject-publish")
    await conn.publish("", "small", b"1")
    await conn.publish("", "small", b"2")
    with pytest.raises(client.QueueFull) as exc_info:
        await conn.publish("", "small", b"3")
    assert exc_info.value.code == 409 and exc_info.value.retriable
    assert await _depth(conn, "small") == 2


# ---------------------------------------------------------------------- client: messages
async def test_extend_checks_before_sending(conn: client.Connection) -> None:
    await conn.declare_queue("ext-checks")
    await conn.publish("", "ext-checks", b"x")
    (msg,) = await conn.get("ext-checks")
    with pytest.raises(ValueError):
        msg.extend(-1)
    with pytest.raises(ValueError):
        msg.extend(1 << 64)
    msg.ack()
    with pytest.raises(RuntimeError):
        msg.extend()
    assert msg.deaths == []
    assert conn.is_open and await _depth(conn, "ext-checks") == 0


async def test_extend_holds_a_delivery_past_its_ack_timeout(conn: client.Connection) -> None:
    await conn.declare_queue("slow", ack_timeout_ms=500)
    await conn.publish("", "slow", b"kept")
    await conn.publish("", "slow", b"timed-out")
    first = await conn.consume("slow", prefetch=2)
    kept, _lapsed = await take(first, 2)
    kept.extend(3000)
    other = await conn.consume("slow", prefetch=2)
    # The one not extended comes back after ~500 ms, to either consumer...
    deadline = time.monotonic() + WAIT
    again: client.Message | None = None
    while again is None and time.monotonic() < deadline:
        for c in (first, other):
            m = await c.get(0.05)
            if m is not None:
                again = m
    assert again is not None and again.body == b"timed-out"
    assert again.redelivered and again.delivery_count == 2
    again.ack()  # else it too would pass its 500 ms deadline and come back
    # ...while the extended one (3 s from extend) is still held here; extend() with no
    # argument restarts the queue's 500 ms from now.
    # (``lapsed``, its first delivery, is left alone: that tag is void at the broker.)
    for _ in range(5):
        kept.extend()
        assert await other.get(0.2) is None and await first.get(0.01) is None
    kept.ack()
    await _wait_depth(conn, "slow", 0)
    assert conn.is_open and (await queue_info(conn, "slow") or {}).get("unacked") == 0


async def test_deaths_after_delivery_limit(conn: client.Connection) -> None:
    await _dead_letter_setup(conn, limit=2)
    await conn.publish("", "work", b"poison", message_id="p-1")
    consumer = await conn.consume("work", prefetch=1)
    (m1,) = await take(consumer, 1)
    assert (m1.delivery_count, m1.redelivered, m1.deaths) == (1, False, [])
    m1.nack()  # requeued: 1 delivery < limit 2
    (m2,) = await take(consumer, 1)
    assert (m2.delivery_count, m2.redelivered) == (2, True)
    m2.nack()  # the limit: dead-lettered instead of redelivered
    assert await consumer.get(0.3) is None
    await _wait_depth(conn, "work.dlq", 1)
    (dead,) = await conn.get("work.dlq")
    assert (dead.body, dead.message_id) == (b"poison", "p-1")
    assert len(dead.deaths) == 1
    _check_death(dict(dead.deaths[0]), "delivery-limit")
    dead.ack()


# ---------------------------------------------------------------------- CLI
def test_cli_declare_queue_every_argument_flag(broker: BrokerProcess) -> None:
    ok(run(broker, "declare-exchange", "dlx"))
    flags = _flags(ALL_ARGUMENTS)
    assert (
        ok(run(broker, "declare-queue", "flagged", *flags)) == "flagged\tmessages=0\tconsumers=0\n"
    )
    assert queues_json(broker)["flagged"]["arguments"] == ALL_ARGUMENTS
    ok(run(broker, "declare-queue", "flagged", *flags))  # same again: fine
    p = run(broker, "declare-queue", "flagged", *flags, "--max-length", "7")
    assert p.returncode == 1 and "precondition-failed (406)" in one_error_line(p)
    ok(run(broker, "declare-queue", "sac-off", "--no-single-active-consumer"))
    assert queues_json(broker)["sac-off"]["arguments"] == {"single_active_consumer": False}
    ok(run(broker, "declare-queue", "bare"))
    assert queues_json(broker)["bare"]["arguments"] == {}


def test_cli_declare_queue_flag_values_checked_locally() -> None:
    # Usage errors (2) come before any connection: no broker needed.
    for bad in (
        ["--overflow", "drop-tail"],
        ["--max-priority", "10"],
        ["--delivery-limit=-1"],
        ["--max-length", "many"],
    ):
        p = run(None, "declare-queue", "q", *bad, "--url", "mq://127.0.0.1:1")
        assert p.returncode == 2 and b"Traceback" not in p.stderr, (bad, p.stderr)


def test_cli_publish_to_full_queue_is_refused(broker: BrokerProcess) -> None:
    ok(run(broker, "declare-queue", "full", "--max-length", "1", "--overflow", "reject-publish"))
    ok(run(broker, "publish", "a", "-k", "full"))
    p = run(broker, "publish", "b", "-k", "full")
    assert p.returncode == 1 and "queue-full (409)" in one_error_line(p)


async def test_cli_consume_json_shows_x_death(broker: BrokerProcess) -> None:
    conn = await connect(broker.url)
    try:
        await _dead_letter_setup(conn)
        await conn.publish("", "work", b"dead", message_id="d-1")
        await _reject_all(conn, "work", 1)
        await _wait_depth(conn, "work.dlq", 1)
        await conn.declare_queue("alive")
        await conn.publish("", "alive", b"fine")
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
    out = json.loads(ok(await arun(broker, "consume", "-q", "work.dlq", "-n", "1", "--json")))
    assert (out["body"], out["routing_key"]) == ("dead", "work")
    assert isinstance(out["redelivered"], bool) and out["delivery_count"] >= 1
    (death,) = out["x_death"]
    _check_death(death, "rejected")
    assert out["properties"]["headers"]["x-death"] == out["x_death"]
    assert out["properties"]["message_id"] == "d-1"
    out = json.loads(ok(await arun(broker, "consume", "-q", "alive", "-n", "1", "--json")))
    assert "x_death" not in out and out["delivery_count"] == 1


async def test_cli_dlq_move_back_to_origin(broker: BrokerProcess) -> None:
    conn = await connect(broker.url)
    try:
        await _dead_letter_setup(conn)
        await conn.publish("", "work", b"w0", message_id="id-0", headers={"k": "v"})
        await conn.publish("", "work", b"w1", message_id="id-1", persistent=False)
        await conn.publish("", "work", b"w2", message_id="id-2", priority=3)
        await _reject_all(conn, "work", 3)
        await conn.publish("", "work.dlq", b"stray")  # no x-death: cannot be placed
        await _wait_depth(conn, "work.dlq", 4)

        p = await arun(broker, "dlq-move", "--from", "work.dlq", "--timeout", "0.5")
        assert p.returncode == 1, p.stderr
        assert p.stdout == b"moved 3, skipped 1\n"
        assert p.stderr.count(b"\n") == 1 and b"Traceback" not in p.stderr
        assert b"work.dlq" in p.stderr
        assert (await _depth(conn, "work"), await _depth(conn, "work.dlq")) == (3, 1)

        back = {m.message_id: m for m in await conn.get("work", 10)}
        assert set(back) == {"id-0", "id-1", "id-2"}
        assert [back[f"id-{i}"].body for i in range(3)] == [b"w0", b"w1", b"w2"]
        assert back["id-0"].headers["k"] == "v"
        assert back["id-1"].properties["persistent"] is False
        assert back["id-2"].properties["priority"] == 3
        for m in back.values():
            assert m.routing_key == "work" and m.exchange == ""
            # x- headers are the broker's: a republished message starts a new history
            assert m.deaths == [] and "x-death" not in m.headers
            m.ack()

        # --to places the stray one (and leaves the DLQ empty).
        await conn.declare_queue("elsewhere")
        p = await arun(
            broker, "dlq-move", "--from", "work.dlq", "--to", "elsewhere", "--timeout", "0.2"
        )
        assert ok(p) == "moved 1, skipped 0\n"
        assert (await _depth(conn, "work.dlq"), await _depth(conn, "elsewhere")) == (0, 1)
        (stray,) = await conn.get("elsewhere")
        assert (stray.body, stray.deaths) == (b"stray", [])
        stray.ack()
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def _dead_letter_into(
    conn: client.Connection, queue: str, msgs: list[tuple[bytes, dict[str, Any]]]
) -> None:
    """Publish ``msgs`` (body, publish kwargs) to ``queue`` and reject them: the broker
    dead-letters them (fanout "to-dlq") into "dlq" with an x-death record naming
    ``queue``."""
    await conn.declare_queue(queue, dead_letter_exchange="to-dlq")
    for body, kw in msgs:
        await conn.publish("", queue, body, **kw)
    await _reject_all(conn, queue, len(msgs))


async def test_cli_dlq_move_routes_by_the_newest_death(broker: BrokerProcess) -> None:
    """dlq-move reads only the x-death header (the broker's: a client-published x-death
    is stripped), so real dead letters from several queues test its routing, --count,
    refusals and skips."""
    conn = await connect(broker.url)
    try:
        await conn.declare_exchange("to-dlq", "fanout")
        await conn.declare_queue("dlq", dead_letter_exchange="to-dlq")
        await conn.bind("to-dlq", "dlq")
        await _dead_letter_into(
            conn,
            "orig-a",
            [
                (b"a%d" % i, {"message_id": f"a{i}", "headers": {"n": i}, "persistent": i != 1})
                for i in range(3)
            ],
        )
        await _dead_letter_into(conn, "orig-b", [(b"b", {})])
        await _dead_letter_into(conn, "gone", [(b"lost", {})])
        await conn.delete_queue("gone")
        await conn.publish("", "dlq", b"loop")
        consumer = await conn.consume("dlq", prefetch=10)
        for m in await take(consumer, 6):
            if m.body == b"loop":
                m.reject()  # dead-lettered into "dlq" itself: its x-death names "dlq"
            else:
                m.nack(requeue=True)
        await consumer.cancel()
        await _wait_depth(conn, "dlq", 6)
        # a forged x-death never reaches the queue: no usable record
        await conn.publish("", "dlq", b"bare", headers={"x-death": [{"queue": "orig-b"}]})
        await _wait_depth(conn, "dlq", 7)

        p = await arun(broker, "dlq-move", "--from", "dlq", "--count", "2")
        assert ok(p) == "moved 2, skipped 0\n"
        assert [await _depth(conn, q) for q in ("dlq", "orig-a", "orig-b")] == [5, 2, 0]

        t0 = time.monotonic()
        p = await arun(broker, "dlq-move", "--from", "dlq", "--timeout", "0.3")
        assert time.monotonic() - t0 < 20
        assert p.returncode == 1 and p.stdout == b"moved 2, skipped 3\n"
        assert p.stderr.count(b"\n") == 1 and b"Traceback" not in p.stderr
        # Nothing is lost: "lost" (no-route: no such queue), "loop" (names the DLQ
        # itself) and "bare" (no x-death) are back in the DLQ.
        assert [await _depth(conn, q) for q in ("dlq", "orig-a", "orig-b")] == [3, 3, 1]
        assert await queue_info(conn, "gone") is None

        moved = await conn.get("orig-a", 10)
        assert sorted(m.body for m in moved) == [b"a0", b"a1", b"a2"]
        for m in moved:
            i = int(m.body[1:])
            assert m.properties["message_id"] == f"a{i}"
            assert m.properties.get("persistent", True) is (i != 1)
            assert m.headers == {"n": i}  # the old history stays behind (x- is the broker's)
            assert (m.exchange, m.routing_key) == ("", "orig-a")
            m.ack()
        (b,) = await conn.get("orig-b")
        assert (b.body, b.deaths) == (b"b", [])
        b.ack()

        # --to takes the rest, x-death or not.
        p = await arun(broker, "dlq-move", "--from", "dlq", "--to", "orig-b", "--timeout", "0")
        assert ok(p) == "moved 3, skipped 0\n"
        assert sorted(m.body for m in await conn.get("orig-b", 10, no_ack=True)) == [
            b"bare",
            b"loop",
            b"lost",
        ]
        assert await _depth(conn, "dlq") == 0

        p = await arun(broker, "dlq-move", "--from", "dlq", "--to", "dlq")
        assert p.returncode == 2 and b"Traceback" not in p.stderr
        p = await arun(broker, "dlq-move", "--from", "no-such-dlq")
        assert p.returncode == 1 and "not-found (404)" in one_error_line(p)
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
