"""Python API habits from aio-pika against a real broker: ``async with msg.process()``,
awaitable settles, typed listings, and publish keywords checked by mypy."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conveyor import client
from tests.integration.helpers import queue_info, take, wait_until

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


async def test_process_acks_on_success(conn: client.Connection) -> None:
    await conn.declare_queue("pr-ok")
    await conn.publish("", "pr-ok", b"a")
    [m] = await conn.get("pr-ok")
    async with m.process() as same:
        assert same is m
    assert m.settled
    await wait_until(lambda: _acked(conn, "pr-ok", 1))


async def _acked(conn: client.Connection, q: str, n: int) -> bool:
    info = await queue_info(conn, q)
    return info is not None and info["acked"] == n and info["unacked"] == 0


async def test_process_rejects_and_reraises(conn: client.Connection) -> None:
    await conn.declare_exchange("pr-dlx", "fanout")
    await conn.declare_queue("pr-dead")
    await conn.bind("pr-dlx", "pr-dead")
    await conn.declare_queue("pr-fail", dead_letter_exchange="pr-dlx")
    await conn.publish("", "pr-fail", b"poison")
    await conn.publish("", "pr-fail", b"retry me")
    # Default: rejected without requeue (dead-lettered here), the error propagates.
    [m] = await conn.get("pr-fail")
    with pytest.raises(ValueError, match="boom"):
        async with m.process():
            raise ValueError("boom")
    assert m.settled
    # requeue=True: back in the queue, redelivered.
    [m] = await conn.get("pr-fail")
    assert m.body == b"retry me"
    with pytest.raises(KeyError):
        async with m.process(requeue=True):
            raise KeyError("again")
    [m] = await conn.get("pr-fail")
    assert (m.body, m.redelivered) == (b"retry me", True)
    # reject_on_redelivered: a redelivered message that fails again is not requeued.
    with pytest.raises(RuntimeError):
        async with m.process(requeue=True, reject_on_redelivered=True):
            raise RuntimeError("still failing")
    assert await conn.get("pr-fail") == []
    dead = await conn.get("pr-dead", 10, no_ack=True)
    assert sorted(d.body for d in dead) == [b"poison", b"retry me"]
    assert {d.deaths[0]["reason"] for d in dead} == {"rejected"}


async def test_process_leaves_a_message_the_block_settled(conn: client.Connection) -> None:
    await conn.declare_queue("pr-self")
    await conn.publish("", "pr-self", b"x")
    await conn.publish("", "pr-self", b"y")
    [m] = await conn.get("pr-self")
    async with m.process():
        m.nack(requeue=True)  # no second settle (which would raise "already settled")
    [m2] = await conn.get("pr-self")  # back at its place in the queue: the head
    assert (m2.body, m2.redelivered) == (b"x", True)
    [m3] = await conn.get("pr-self")
    assert m3.body == b"y"
    async with m2.process(), m3.process():
        pass
    # No-ack messages are settled already: process() does nothing to them.
    await conn.publish("", "pr-self", b"z")
    [n] = await conn.get("pr-self", no_ack=True)
    async with n.process():
        pass
    await wait_until(lambda: _acked(conn, "pr-self", 3))


async def test_process_in_a_consumer_loop(conn: client.Connection) -> None:
    await conn.declare_queue("pr-loop")
    for i in range(6):
        await conn.publish("", "pr-loop", str(i).encode())
    handled: list[bytes] = []
    async with await conn.consume("pr-loop", prefetch=10) as consumer:
        msgs = await take(consumer, 6)
        for m in msgs:
            try:
                async with m.process(requeue=True):
                    if m.body == b"3" and not m.redelivered:
                        raise ValueError("transient")
                    handled.append(m.body)
            except ValueError:
                pass
        [again] = await take(consumer, 1)
        async with again.process():
            handled.append(again.body)
    assert sorted(handled) == [b"0", b"1", b"2", b"3", b"4", b"5"]
    await wait_until(lambda: _acked(conn, "pr-loop", 6))


async def test_settles_may_be_awaited_or_not(conn: client.Connection) -> None:
    await conn.declare_queue("aw")
    for b in (b"1", b"2", b"3", b"4"):
        await conn.publish("", "aw", b)
    m1, m2, m3, m4 = await conn.get("aw", 4)
    assert await m1.ack() is None
    await m2.nack(requeue=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an un-awaited settle warns about nothing
        m3.ack()
        m4.reject(requeue=True)
    [back] = await conn.get("aw")
    assert back.body == b"4"
    await back.ack()
    with pytest.raises(RuntimeError, match="already settled"):
        await back.ack()
    await wait_until(lambda: _acked(conn, "aw", 3))


async def test_typed_listings(conn: client.Connection, connect_to: object) -> None:
    await conn.declare_queue("ls-q", max_priority=3)
    await conn.declare_exchange("ls-x", "topic")
    await conn.bind("ls-x", "ls-q", "a.*")
    await conn.publish("", "ls-q", b"x")
    consumer = await conn.consume("ls-q", prefetch=5)
    try:
        await take(consumer, 1)
        queues = {q.name: q for q in await conn.queues()}
        q = queues["ls-q"]
        assert isinstance(q, client.QueueListing)
        assert (q.messages, q.unacked, q.consumers, q.published, q.type) == (0, 1, 1, 1, "classic")
        assert q.arguments == {"max_priority": 3}
        with pytest.raises(dataclasses.FrozenInstanceError):
            q.messages = 5  # type: ignore[misc]
        xs = {x.name: x for x in await conn.exchanges()}
        assert (xs["ls-x"].type, xs["ls-x"].bindings) == ("topic", 1)
        assert "amq.topic" in xs
        assert client.BindingListing("ls-x", "ls-q", "a.*") in await conn.bindings()
        [c] = [c for c in await conn.consumers() if c.queue == "ls-q"]
        assert (c.consumer_tag, c.unacked) == (consumer.tag, 1)
        conns = await conn.connections()
        assert conns and all(isinstance(x, client.ConnectionListing) for x in conns)
        assert c.connection in {x.id for x in conns}
        # Fields the dataclass does not name are kept in extra: nothing the broker
        # reports is lost. list() still returns the dicts.
        raw_conns = {r["id"]: r for r in await conn.list("connections")}
        for x in conns:
            named = {f.name for f in dataclasses.fields(x)} - {"extra"}
            row = raw_conns[x.id]
            assert (named & set(row)) | set(x.extra) == set(row)
            assert not named & set(x.extra)
            assert x.subject == row["subject"] and x.published <= row["published"]
        raw = await conn.list("queues")
        assert [r["name"] for r in raw] == sorted(queues)
    finally:
        await consumer.cancel()


async def test_streams_listing_keeps_their_fields(conn: client.Connection) -> None:
    await conn.declare_queue("ls-stream", queue_type="stream")
    await conn.publish("", "ls-stream", b"e")
    [s] = [q for q in await conn.queues() if q.name == "ls-stream"]
    assert s.type == "stream" and s.extra["head_offset"] == 1


async def test_unknown_publish_keyword_is_still_a_runtime_error(conn: client.Connection) -> None:
    await conn.declare_queue("kw")
    with pytest.raises(TypeError, match="corelation_id"):
        await conn.publish("", "kw", b"x", corelation_id="c")  # type: ignore[call-arg]
    await conn.publish("", "kw", b"x", correlation_id="c", priority=1)
    [m] = await conn.get("kw", no_ack=True)
    assert m.correlation_id == "c"


SNIPPET = """
from conveyor import client

async def main(conn: client.Connection, m: client.Message) -> None:
    await conn.publish("", "q", b"x", correlation_id="c", headers={"a": 1}, ttl=5)
    conn.publish_nowait("", "q", b"x", priority=3)
    await conn.publish("", "q", b"x", corelation_id="c")
    conn.publish_nowait("", "q", b"x", priority="high")
    await m.ack()
    m.nack()
    async with m.process(requeue=True) as same:
        same.body.decode()
    for q in await conn.queues():
        q.messages + 1
"""


def test_mypy_catches_unknown_and_mistyped_publish_keywords(tmp_path: Path) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    env = dict(os.environ, MYPYPATH=str(ROOT))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--follow-imports",
            "silent",
            str(snippet),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
        check=False,
    )
    out = p.stdout
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 2, out
    assert 'snippet.py:7: error: Unexpected keyword argument "corelation_id"' in out, out
    assert "snippet.py:8: error:" in out and '"priority"' in out, out


async def test_a_refusal_between_acks_reaches_the_broker(conn: client.Connection) -> None:
    """ack, nack, ack, reject in one loop turn: the cumulative ACK written before the
    REJECT must not cover its tag (the broker answered 'unknown delivery tag' and the
    message stayed unacked instead of going back to the queue)."""
    await conn.declare_queue("mix")
    for b in (b"1", b"2", b"3", b"4"):
        await conn.publish("", "mix", b)
    m1, m2, m3, m4 = await conn.get("mix", 4)
    m1.ack()
    m2.nack(requeue=False)
    m3.ack()
    m4.reject(requeue=True)
    [back] = await conn.get("mix")
    assert back.body == b"4"
