"""Streams from the client's side (``Connection.stream``, ``mq-cli consume --offset/--group``)
against real brokers: consumer groups at different speeds, replay by offset and by
timestamp, group resume after ``kill -9``, retention by size, and the CLI.

``CONVEYOR_STREAM_MESSAGES`` sets the message count of the two-groups test (default
20,000; e.g. 1000000 for the long run).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import client
from conveyor.client.consumer import stream_arguments, timestamp_ms
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect, queue_info, wait_until

N_MESSAGES = int(os.environ.get("CONVEYOR_STREAM_MESSAGES", "20000"))

pytestmark = pytest.mark.timeout(max(120, N_MESSAGES // 2000))

# Spec section 20: a group's commit is stored at most ~100 ms after the ack. Waits past it
# (and the bound on what a crash within it may redeliver) use these.
COMMIT_DELAY = 0.5
COMMIT_SLACK = 0.4

CLI = [sys.executable, "-m", "conveyor.cli.main"]


# ---------------------------------------------------------------------- helpers
def body(i: int) -> bytes:
    return b"%08d" % i


async def declare_stream(conn: client.Connection, name: str, **kw: Any) -> None:
    await conn.declare_queue(name, queue_type="stream", **kw)
    info = await queue_info(conn, name)
    assert info is not None and info.get("type") == "stream", (
        f"broker side: declaring {name!r} with queue_type 'stream' made {info!r}"
    )


async def publish_range(
    conn: client.Connection, stream: str, start: int, stop: int, chunk: int = 5000, size: int = 0
) -> None:
    pad = b"p" * max(0, size - 8)
    for lo in range(start, stop, chunk):
        hi = min(stop, lo + chunk)
        await conn.publish_batch(
            [body(i) + pad for i in range(lo, hi)], routing_key=stream, timeout=60
        )


async def group_info(conn: client.Connection, stream: str, group: str) -> dict[str, Any]:
    info = await queue_info(conn, stream)
    assert info is not None
    groups: dict[str, Any] = info.get("groups") or {}
    return groups.get(group) or {}


async def wait_lag(
    conn: client.Connection, stream: str, group: str, lag: int, timeout: float = WAIT
) -> dict[str, Any]:
    last: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal last
        last = await group_info(conn, stream, group)
        return last.get("lag") == lag

    try:
        await wait_until(done, timeout, interval=0.05)
    except AssertionError:
        raise AssertionError(
            f"group {group!r} of {stream!r}: lag {lag} expected, LIST says {last}"
        ) from None
    return last


async def read_all(
    conn: client.Connection,
    stream: str,
    n: int,
    **kw: Any,
) -> list[client.Message]:
    """``n`` messages of ``stream`` from a consumer without a group."""
    out: list[client.Message] = []
    async with conn.stream(stream, **kw) as s:
        while len(out) < n:
            m = await s.get(WAIT)
            assert m is not None, f"{stream}: only {len(out)} of {n} messages came ({kw})"
            out.append(m)
    return out


def stream_bytes(b: BrokerProcess) -> int:
    root = b.data_dir / "streams"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def cli(b: BrokerProcess, *args: str, timeout: float = 60) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("CONVEYOR_URL", None)
    p = subprocess.run(
        [*CLI, *args, "--url", b.url], capture_output=True, timeout=timeout, env=env, check=False
    )
    assert p.returncode == 0, (args, p.returncode, p.stderr.decode())
    return p.stdout.decode()


# ---------------------------------------------------------------------- client side only
def test_stream_arguments_are_checked_before_sending() -> None:
    assert stream_arguments() == {}
    assert stream_arguments("first", group="g") == {"offset": "first", "group": "g"}
    assert stream_arguments(7) == {"offset": 7}
    utc = datetime.UTC
    when = datetime.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=utc)
    # Rounded up: the first message at or after a time between two milliseconds.
    assert stream_arguments(timestamp=when) == {"timestamp": 1714564800124}
    assert (
        timestamp_ms(datetime.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=utc)) == 1714564800123
    )
    assert timestamp_ms(1714564800123) == 1714564800123
    assert timestamp_ms(1714564800122.5) == 1714564800123
    for bad in ("oldest", -1, True, 2**64, 1.5):
        with pytest.raises(ValueError):
            stream_arguments(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        stream_arguments(group="")
    with pytest.raises(ValueError):
        timestamp_ms(float("nan"))


def test_message_offset_and_timestamp_read_the_stream_headers() -> None:
    origin = client.message.Origin(None, None, 0)  # type: ignore[arg-type]
    m = client.Message(
        origin,
        (
            1,
            False,
            "",
            "s",
            {"headers": {"x-stream-offset": 5, "x-stream-timestamp": 1700000000000}},
            b"x",
            1,
        ),
    )
    assert (m.offset, m.timestamp) == (5, 1700000000000)
    plain = client.Message(origin, (2, False, "", "q", {"timestamp": 3}, b"x", 1))
    assert (plain.offset, plain.timestamp) == (None, None)


# ---------------------------------------------------------------------- groups
async def _group_reader(
    conn: client.Connection, stream: str, group: str, n: int, *, prefetch: int, slow: bool
) -> dict[str, Any]:
    """Read ``n`` messages as ``group``; check each comes once, in offset order."""
    got = 0
    first_offset: int | None = None
    prev: int | None = None
    t0 = time.monotonic()

    def check(m: client.Message) -> None:
        nonlocal got, first_offset, prev
        off = m.offset
        assert off is not None, f"{group}: no x-stream-offset header: {m.properties}"
        assert m.timestamp is not None, f"{group}: no x-stream-timestamp: {m.properties}"
        if first_offset is None:
            first_offset = off
        assert m.body[:8] == body(got), (
            f"{group}: message #{got} is {m.body[:8]!r} (offset {off}, previous {prev})"
        )
        assert prev is None or off > prev, f"{group}: offset {off} after {prev}"
        prev = off
        got += 1

    s = await conn.stream(stream, offset="first", group=group, prefetch=prefetch)
    last: client.Message | None = None
    if slow:
        async for m in s:
            check(m)
            last = m
            if got % 256 == 0:
                await asyncio.sleep(0.001)
            if got == n:
                break
    else:
        async for batch in s.batches():
            for m in batch:
                check(m)
            last = batch[-1]
            if got >= n:
                break
    assert last is not None
    s.commit(last)  # auto_commit acks a message when the next one is asked for
    extra = await s.get(0.5)
    assert extra is None, f"{group}: a message past the end: {extra!r} {extra and extra.offset}"
    await s.cancel()
    return {
        "group": group,
        "messages": got,
        "first_offset": first_offset,
        "last_offset": prev,
        "seconds": round(time.monotonic() - t0, 2),
    }


async def test_two_groups_at_different_speeds_each_get_every_message_once(
    broker: BrokerProcess,
) -> None:
    n = N_MESSAGES
    async with (
        await connect(broker.url) as pub,
        await connect(broker.url) as c1,
        await connect(broker.url) as c2,
    ):
        await declare_stream(pub, "events")
        await publish_range(pub, "events", 0, n // 2)
        fast = asyncio.create_task(
            _group_reader(c1, "events", "fast", n, prefetch=1000, slow=False)
        )
        slow = asyncio.create_task(_group_reader(c2, "events", "slow", n, prefetch=8, slow=True))
        await publish_range(pub, "events", n // 2, n)  # while both read
        budget = max(60.0, n / 2000)
        results = await asyncio.wait_for(asyncio.gather(fast, slow), budget)
        for r in results:
            assert r["messages"] == n
            assert r["last_offset"] - r["first_offset"] == n - 1, (
                f"{r['group']}: offsets not contiguous: {r}"
            )
        assert results[0]["first_offset"] == results[1]["first_offset"]
        info = await queue_info(pub, "events")
        assert info is not None
        assert info.get("messages") == n, info
        for g in ("fast", "slow"):
            await wait_lag(pub, "events", g, 0)
        # A third consumer replays from a timestamp in the middle of the stream.
        first = results[0]["first_offset"]
        mid = await _one(c1, "events", first + n // 2)
        assert mid.timestamp is not None and mid.offset is not None
        t_replay = time.monotonic()
        replay = await c1.stream("events", timestamp=mid.timestamp, prefetch=1000)
        start: client.Message | None = None
        count = 0
        async for batch in replay.batches():
            if start is None:
                start = batch[0]
            count += len(batch)
            if batch[-1].offset == first + n - 1:
                break
        await replay.cancel()
        assert start is not None and start.offset is not None and start.timestamp is not None
        # It starts at the first message published at or after that time: not later than
        # the middle message, and the message before it is older.
        assert start.timestamp >= mid.timestamp and start.offset <= mid.offset
        if start.offset > first:
            before = await _one(c1, "events", start.offset - 1)
            assert before.timestamp is not None and before.timestamp < mid.timestamp
        assert count == first + n - start.offset
        print(
            f"\ntwo groups, {n} messages: {results}; replay from the middle "
            f"(offset {start.offset}): {count} messages in "
            f"{time.monotonic() - t_replay:.2f}s"
        )


async def _one(conn: client.Connection, stream: str, offset: int) -> client.Message:
    """The message at ``offset`` (a private reader, no group)."""
    s = await conn.stream(stream, offset=offset, prefetch=1)
    m = await s.get(WAIT)
    await s.cancel()
    assert m is not None and m.offset == offset, m
    return m


async def test_members_of_one_group_share_the_stream(broker: BrokerProcess) -> None:
    n = 2000
    async with (
        await connect(broker.url) as pub,
        await connect(broker.url) as ca,
        await connect(broker.url) as cb,
    ):
        await declare_stream(pub, "shared")
        a = await ca.stream("shared", offset="first", group="workers", prefetch=50)
        b = await cb.stream("shared", offset="first", group="workers", prefetch=50)
        await publish_range(pub, "shared", 0, n)
        seen: dict[int, str] = {}

        async def take(s: client.StreamConsumer, name: str) -> None:
            while len(seen) < n:
                m = await s.get(1.0)
                if m is None:
                    continue
                assert m.offset is not None and m.offset not in seen, (
                    f"offset {m.offset} delivered to {seen.get(m.offset or -1)} and {name}"
                )
                seen[m.offset] = name

        await asyncio.wait_for(asyncio.gather(take(a, "a"), take(b, "b")), 60)
        assert len(seen) == n
        assert len(set(seen.values())) == 2, "one member got every message"
        await asyncio.sleep(0.3)
        assert await a.get(0.2) is None and await b.get(0.2) is None


# ---------------------------------------------------------------------- replay
async def test_replay_from_an_offset_and_from_a_timestamp(broker: BrokerProcess) -> None:
    async with await connect(broker.url) as conn:
        await declare_stream(conn, "replay")
        for k in range(4):  # bursts apart in time: distinct timestamps to start from
            await publish_range(conn, "replay", k * 500, (k + 1) * 500, chunk=250)
            await asyncio.sleep(0.05)
        everything = await read_all(conn, "replay", 2000, offset="first")
        offsets = [m.offset or 0 for m in everything]
        stamps = [m.timestamp or 0 for m in everything]
        assert [m.body for m in everything] == [body(i) for i in range(2000)]
        assert all(m.offset is not None and m.timestamp for m in everything)
        assert stamps == sorted(stamps), "timestamps go backwards"
        assert offsets == list(range(offsets[0], offsets[0] + 2000)), offsets[:5]

        # A timestamp in the middle that no message has (between two bursts): the replay
        # starts at the first message after it. Then one that a message has exactly.
        k = next(i for i in range(1000, 2000) if stamps[i] != stamps[i - 1])
        for ts, want in ((stamps[k - 1] + 1, k), (stamps[k], k)):
            got = await read_all(conn, "replay", 5, timestamp=ts, offset="first")
            assert [m.offset for m in got] == offsets[want : want + 5], (
                ts,
                k,
                stamps[k - 2 : k + 2],
            )
        # The same as a datetime (whole ms in UTC: exact).
        when = datetime.datetime.fromtimestamp(stamps[k] / 1000, datetime.UTC)
        got = await read_all(conn, "replay", 1, timestamp=when)
        assert got[0].offset == offsets[k]

        start = offsets[1234]
        got = await read_all(conn, "replay", 3, offset=start)
        assert [m.body for m in got] == [body(1234), body(1235), body(1236)]
        got = await read_all(conn, "replay", 1, offset="last")
        assert got[0].body == body(1999)
        # "next" (the default) sees only what is appended from now on.
        async with conn.stream("replay") as s:
            assert await s.get(0.3) is None
            await conn.publish("", "replay", b"new")
            m = await s.get(WAIT)
            assert m is not None and m.body == b"new" and m.offset == offsets[-1] + 1


# ---------------------------------------------------------------------- resume
async def test_group_resumes_exactly_after_its_commit_after_kill_9(broker_factory: Any) -> None:
    b: BrokerProcess = broker_factory()
    async with await connect(b.url) as conn:
        await declare_stream(conn, "orders")
        await publish_range(conn, "orders", 0, 5000)
        # Manual commits: the credit window must hold everything left unacked.
        s = await conn.stream(
            "orders", offset="first", group="billing", prefetch=1500, auto_commit=False
        )
        msgs: list[client.Message] = []
        while len(msgs) < 1500 and (m := await s.get(WAIT)) is not None:
            msgs.append(m)
        assert len(msgs) == 1500
        s.commit(msgs[999])  # 1000 committed, 500 handed out but not committed
        await wait_lag(conn, "orders", "billing", 4000)
        # The broker stores a commit at most ~100 ms after the ack (spec section 20).
        await asyncio.sleep(COMMIT_DELAY)
    b.kill()
    b.start()
    async with await connect(b.url) as conn:
        s = await conn.stream("orders", offset="last", group="billing", prefetch=200)
        m = await s.get(WAIT)
        assert m is not None
        assert m.offset == msgs[1000].offset and m.body == body(1000), (
            f"after kill -9 the group resumed at {m.offset} ({m.body!r}); committed up to "
            f"{msgs[999].offset}"
        )


@pytest.mark.parametrize("pause", [COMMIT_DELAY, 0.0], ids=["quiet", "mid-flight"])
async def test_group_resume_after_kill_9_mid_read_has_no_gap(
    broker_factory: Any, pause: float
) -> None:
    b: BrokerProcess = broker_factory()
    n, prefetch, cut = 20_000, 100, 7000
    async with await connect(b.url) as conn:
        await declare_stream(conn, "clicks")
        await publish_range(conn, "clicks", 0, n)
    seen: list[int] = []
    taken_at: list[float] = []  # when each message was handed out (= the previous acked)
    conn = await connect(b.url)
    try:
        s = await conn.stream("clicks", offset="first", group="g", prefetch=prefetch)
        async for m in s:
            seen.append(int(m.body[:8]))
            taken_at.append(time.monotonic())
            if len(seen) == cut:
                # The last message is being worked on (not acked), more are buffered; with
                # no pause, acks are in flight and within the broker's ~100 ms window.
                await asyncio.sleep(pause)
                killed_at = time.monotonic()
                b.kill()
                break
    finally:
        await conn.close()
    assert seen == list(range(cut))
    b.start()
    async with await connect(b.url) as conn:
        # "first" applies only if the group was lost entirely (never stored).
        s = await conn.stream("clicks", offset="first", group="g", prefetch=prefetch)
        rest: list[int] = []
        while (nxt := await s.get(2.0)) is not None:
            rest.append(int(nxt.body[:8]))
        assert rest, "nothing after the resume"
        first = rest[0]
        assert first <= cut - 1, f"gap: resumed at #{first}, #{cut - 1} was not acked"
        assert rest == list(range(first, n)), "not contiguous after the resume"
        if pause:
            # Every ack older than the commit window is stored: exactly the message being
            # worked on comes again.
            assert first == cut - 1, f"resumed at #{first}, committed up to #{cut - 2}"
        else:
            # At most what was acked within the commit window (plus transit) comes again.
            recent = next(i for i, t in enumerate(taken_at) if t >= killed_at - COMMIT_SLACK)
            assert first >= recent - 1, (
                f"resumed at #{first}: messages acked up to {killed_at - taken_at[first + 1]:.3f}"
                f" s before the kill came again (#{recent - 1} was acked "
                f"{killed_at - taken_at[recent]:.3f} s before it)"
            )


# ---------------------------------------------------------------------- retention
async def test_retention_by_size_bounds_disk_use(broker: BrokerProcess) -> None:
    limit, segment = 4 << 20, 1 << 20
    async with await connect(broker.url) as conn:
        await declare_stream(conn, "metrics", max_length_bytes=limit, stream_segment_bytes=segment)
        size = 4096
        per_round = 1000  # ~4 MiB
        worst = 0
        for r in range(10):  # ~40 MiB through a 4 MiB stream
            await publish_range(
                conn, "metrics", r * per_round, (r + 1) * per_round, chunk=250, size=size
            )
            used = stream_bytes(broker)
            worst = max(worst, used)
            assert used <= limit + segment, (
                f"after {(r + 1) * per_round * size >> 20} MiB published: {used} bytes under "
                f"{broker.data_dir / 'streams'} (limit {limit} + one segment {segment})"
            )
        assert worst > limit // 2, f"the stream holds suspiciously little: {worst} bytes"
        info = await queue_info(conn, "metrics")
        assert info is not None
        assert info["first_offset"] > 0, f"nothing was deleted: {info}"
        assert info["bytes"] <= limit + segment, info
        # Reading from "first" starts at the oldest message retention kept, and what is
        # kept is the newest messages, contiguous up to the last one published.
        oldest = (await read_all(conn, "metrics", 1, offset="first"))[0]
        newest = (await read_all(conn, "metrics", 1, offset="last"))[0]
        assert oldest.offset == info["first_offset"], (oldest.offset, info)
        assert newest.body[:8] == body(10 * per_round - 1)
        assert oldest.offset is not None and newest.offset is not None
        assert int(oldest.body[:8]) == 10 * per_round - 1 - (newest.offset - oldest.offset)


# ---------------------------------------------------------------------- CLI
async def test_cli_consume_offsets_times_and_groups(broker: BrokerProcess) -> None:
    out = await asyncio.to_thread(
        cli,
        broker,
        "declare-queue",
        "audit",
        "--type",
        "stream",
        "--max-age",
        "7d",
        "--stream-segment-bytes",
        "1048576",
    )
    assert out.startswith("audit\t")
    async with await connect(broker.url) as conn:
        info = await queue_info(conn, "audit")
        assert info is not None and info.get("type") == "stream", info
        assert info["arguments"] == {
            "queue_type": "stream",
            "max_age_ms": 7 * 86_400_000,
            "stream_segment_bytes": 1 << 20,
        }
        for k in range(3):
            await publish_range(conn, "audit", k * 40, (k + 1) * 40)
            await asyncio.sleep(0.05)
        everything = await read_all(conn, "audit", 120, offset="first")
    offsets = [m.offset or 0 for m in everything]
    stamps = [m.timestamp or 0 for m in everything]

    def consume(*args: str) -> list[dict[str, Any]]:
        out = cli(broker, "consume", "-q", "audit", "--json", "--timeout", "1", *args)
        return [json.loads(line) for line in out.splitlines()]

    lines = await asyncio.to_thread(consume, "--offset", "first", "-n", "120")
    assert [x["body"] for x in lines] == [body(i).decode() for i in range(120)]
    assert [x["offset"] for x in lines] == offsets
    assert [x["timestamp"] for x in lines] == stamps

    lines = await asyncio.to_thread(consume, "--offset", str(offsets[57]), "-n", "3")
    assert [x["offset"] for x in lines] == offsets[57:60]

    k = next(i for i in range(41, 120) if stamps[i] != stamps[i - 1])
    iso = datetime.datetime.fromtimestamp(stamps[k] / 1000, datetime.UTC).isoformat()
    lines = await asyncio.to_thread(consume, "--offset", iso, "-n", "2")
    assert [x["offset"] for x in lines] == offsets[k : k + 2], (iso, k)
    iso_z = iso.replace("+00:00", "Z")
    lines = await asyncio.to_thread(consume, "--offset", iso_z, "-n", "1")
    assert lines[0]["offset"] == offsets[k]

    # A group commits as it acks: the next run resumes after it, whatever --offset says.
    lines = await asyncio.to_thread(consume, "--group", "cli", "--offset", "first", "-n", "30")
    assert [x["offset"] for x in lines] == offsets[:30]
    lines = await asyncio.to_thread(consume, "--group", "cli", "--offset", "last", "-n", "30")
    assert [x["offset"] for x in lines] == offsets[30:60]

    table = (await asyncio.to_thread(cli, broker, "queues")).splitlines()
    header = table[0].split()
    assert header[-1] == "GROUP_LAG", table
    row = next(line.split() for line in table[1:] if line.split()[0] == "audit")
    assert row[-1] == "cli=60", table


def test_cli_rejects_a_bad_offset(tmp_path: Path) -> None:
    p = subprocess.run(
        [*CLI, "consume", "-q", "s", "--offset", "yesterday", "--url", "mq://127.0.0.1:1"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert p.returncode == 2 and b"--offset" in p.stderr, p.stderr


async def test_reader_without_a_group_resumes_where_it_was_after_a_reconnect(
    broker_factory: Any,
) -> None:
    b: BrokerProcess = broker_factory()
    async with await connect(b.url) as conn:
        await declare_stream(conn, "log")
        await publish_range(conn, "log", 0, 3000)
    conn = await connect(b.url, reconnect=True)
    try:
        s = conn.stream("log", offset="first", prefetch=100)
        got: list[int] = []
        async for m in s:
            got.append(int(m.body[:8]))
            if len(got) == 1000:
                port = b.port
                b.stop()  # the connection drops; buffered deliveries are discarded
                b.start(port=port)
            if got[-1] == 2999 or len(got) > 4000:
                break
        assert conn.reconnects == 1
        # Asking for the next message settled #999 (auto_commit): the consumer resubscribed
        # right after it; nothing skipped, nothing again.
        assert got == list(range(3000)), got[995:1005]
    finally:
        await conn.close()
