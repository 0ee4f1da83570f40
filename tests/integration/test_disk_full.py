"""Write errors: publishers get a clear error, confirmed data stays intact, the broker
resumes by itself once writes succeed again.

The first test reproduces a write error with the broker's file-size limit (RLIMIT_FSIZE,
set from outside with prlimit: the next log write fails with EFBIG, the path ENOSPC
takes). The others fill a real small file system (a loop-mounted ext4, tests/loopfs.py;
skipped where mounting is not permitted) with a filler file and with a publisher.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conveyor import client
from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.loopfs import fill, free_bytes, small_fs_or_skip


def _segments(data: Path) -> list[Path]:
    return sorted((data / "wal").glob("seg-*.log"))


async def test_write_errors_refuse_publishes_then_recover(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory()
    assert b.proc is not None
    conn = await client.connect(b.url, reconnect=False, timeout=10)
    await conn.declare_queue("df")
    await conn.publish_batch([f"ok-{i}" for i in range(100)], routing_key="df")
    seg = _segments(b.data_dir)[-1]
    size = seg.stat().st_size
    inf = resource.RLIM_INFINITY
    try:  # lower the soft limit only, so it can be raised again without privileges
        resource.prlimit(b.proc.pid, resource.RLIMIT_FSIZE, (size + 200, inf))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot set the broker's file-size limit: {exc}")
    try:
        with pytest.raises(client.ConveyorError) as info:
            await conn.publish_batch([b"x" * 1000 for _ in range(10)], routing_key="df")
        assert info.value.code == 506  # resource-error: not stored, retry later
        # while the log cannot be written, new publishes are refused at once
        with pytest.raises(client.ConveyorError) as info2:
            await conn.publish("", "df", b"refused")
        assert info2.value.code == 506
        assert "cannot write" in info2.value.message or "could not store" in info2.value.message
    finally:
        resource.prlimit(b.proc.pid, resource.RLIMIT_FSIZE, (inf, inf))
    # resumes by itself (the store retries every second)
    deadline = time.monotonic() + 10
    while True:
        try:
            await conn.publish("", "df", b"after")
            break
        except client.ConveyorError as exc:
            assert exc.code == 506
            assert time.monotonic() < deadline, "broker did not resume after the fault cleared"
            await asyncio.sleep(0.2)
    await conn.close()
    # everything confirmed survives kill -9; the failed write left no torn record
    b.kill()
    b2 = BrokerProcess(b.data_dir).start()
    try:
        assert "torn tail" not in b2.log_text().split("recovered")[-1]
        conn = await client.connect(b2.url, reconnect=False, timeout=10)
        got = await conn.get("df", 1000, no_ack=True)
        bodies = [m.body for m in got]
        assert bodies[:100] == [f"ok-{i}".encode() for i in range(100)]
        assert b"after" in bodies
        assert b"refused" not in bodies
        await conn.close()
    finally:
        b2.stop()


# ---------------------------------------------------------------------- a real full disk
# The tests below run the broker on a small loop-mounted ext4 (tests/loopfs.py) and fill
# it for real: with a filler file (ENOSPC) and with a publisher (the disk-free guard).

KINDS = ("queue", "stream")
BODY = 8 << 10  # bytes per message body
BATCH = 64  # messages per pipelined round: one round is "one batch" of the guard
ROUND_BYTES = BATCH * BODY
GUARD = 8 << 20  # --disk-free-limit of the guard test
SLACK = 1 << 20  # file-system metadata and index blocks the byte count does not see
BIG_CREDIT = ("--publish-credit-messages", "1000000", "--publish-credit-bytes", str(1 << 30))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 mounted for this test (unmounted and detached at teardown)."""
    with small_fs_or_skip(tmp_path) as mnt:
        yield mnt


@pytest.fixture
def fs_broker(small_fs: Path, tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Start a broker whose data directory is on ``small_fs`` (its log is not: a full
    disk must not silence it); every one is stopped before the file system goes."""
    started: list[BrokerProcess] = []

    def start(*extra: str) -> BrokerProcess:
        b = BrokerProcess(small_fs / "data", *extra)
        b.log_path = tmp_path / f"broker{len(started)}.log"
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.stop()


def _body(key: str) -> bytes:
    return key.encode().ljust(BODY, b".")


async def _declare(conn: client.Connection, kind: str, name: str) -> None:
    if kind == "stream":
        await conn.declare_queue(name, queue_type="stream")
    else:
        await conn.declare_queue(name, durable=True)


async def _round(conn: client.Connection, name: str, keys: list[str], confirmed: set[str]) -> int:
    """Publish one message per key, pipelined; confirmed keys go to ``confirmed``.
    Returns how many were nacked with 506 (any other outcome fails the test)."""
    futs = [conn.publish_nowait("", name, _body(k)) for k in keys]
    results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
    nacked = 0
    for k, r in zip(keys, results, strict=True):
        if r is None:
            confirmed.add(k)
        elif isinstance(r, client.ConveyorError) and r.code == 506:
            nacked += 1
        else:
            raise AssertionError(f"publish {k}: unexpected outcome {r!r}")
    return nacked


async def _resumes(conn: client.Connection, name: str, tag: str, confirmed: set[str]) -> None:
    """After space came back: publishing succeeds by itself within seconds, and from then
    on every publish is confirmed (no error left over from the full disk)."""
    deadline = time.monotonic() + 15
    i = 0
    while True:
        i += 1
        if await _round(conn, name, [f"{tag}-{i}-0"], confirmed) == 0:
            break
        assert time.monotonic() < deadline, "publishes did not resume after space came back"
        await asyncio.sleep(0.2)
    for j in range(5):
        keys = [f"{tag}-after-{j}-{n}" for n in range(BATCH)]
        assert await _round(conn, name, keys, confirmed) == 0, "nacked after the disk recovered"


async def _present(b: BrokerProcess, kind: str, name: str) -> set[str]:
    """Every message body key in ``name`` (read after a restart)."""
    conn = await client.connect(b.url, reconnect=False, timeout=10)
    try:
        info = next(q for q in await conn.list("queues") if q["name"] == name)
        n = int(info["messages"])
        keys: set[str] = set()
        if kind == "stream":
            async with conn.stream(name, offset="first", prefetch=500) as s:
                for _ in range(n):
                    m = await s.get(10)
                    assert m is not None, f"{name}: only {len(keys)} of {n} came"
                    keys.add(m.body.rstrip(b".").decode())
                    m.ack()
        else:
            read = 0
            for _ in range(n + 1):  # GET_OK holds at least one message
                got = await conn.get(name, 1000, no_ack=True)
                if not got:
                    break
                read += len(got)
                keys.update(m.body.rstrip(b".").decode() for m in got)
            assert read == n, f"{name}: read {read} of {n} messages"
        assert len(keys) == n, f"{name}: {n} messages, {len(keys)} distinct"
        return keys
    finally:
        await conn.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_enospc_nacks_every_unstored_publish(
    kind: str, small_fs: Path, fs_broker: Callable[..., BrokerProcess]
) -> None:
    """The disk fills up under the broker (a filler file; the guard off): every publish is
    confirmed and survives kill -9, or is nacked with 506; once space is back publishing
    resumes by itself, with no stale error."""
    name = f"full-{kind}"
    b = fs_broker("--disk-free-limit", "0")
    conn = await client.connect(b.url, reconnect=False, timeout=10)
    confirmed: set[str] = set()
    nacked = 0
    try:
        await _declare(conn, kind, name)
        await _declare(conn, "queue", "side")
        # One message to each (the reproduction): the classic queue's commit comes
        # after the stream's append is durable, so nothing of the stream is pending when
        # the disk fills.
        assert await _round(conn, name, ["pre-0"], confirmed) == 0
        assert await _round(conn, "side", ["side-0"], set()) == 0
        filler = small_fs / "filler"
        fill(filler)
        for r in range(10):
            nacked += await _round(conn, name, [f"full-{r}-{n}" for n in range(BATCH)], confirmed)
        assert nacked, "nothing was refused although the disk is full"
        filler.unlink()
        await _resumes(conn, name, "back", confirmed)
    finally:
        await conn.close()
    b.kill()
    b2 = fs_broker("--disk-free-limit", "0")
    present = await _present(b2, kind, name)
    missing = confirmed - present
    assert not missing, f"{len(missing)} confirmed messages are gone, e.g. {sorted(missing)[:3]}"
    assert len(confirmed) >= 5 * BATCH + 2 and nacked > 0, (len(confirmed), nacked)


@pytest.mark.parametrize("kind", KINDS)
async def test_disk_free_guard_refuses_at_the_limit(
    kind: str, small_fs: Path, fs_broker: Callable[..., BrokerProcess]
) -> None:
    """A publisher holding plenty of credit fills the disk: the guard nacks (506) once free
    space is below --disk-free-limit, so free space never drops below it by more than one
    batch; after space is freed publishes succeed again; confirmed ones survive kill -9."""
    name = f"guard-{kind}"
    b = fs_broker("--disk-free-limit", str(GUARD), *BIG_CREDIT)
    conn = await client.connect(b.url, reconnect=False, timeout=10)
    confirmed: set[str] = set()
    nacked = 0
    lowest = free_bytes(small_fs)
    try:
        await _declare(conn, kind, name)
        filler = small_fs / "filler"
        fill(filler, leave=GUARD + (12 << 20))  # the publisher writes the last 12 MiB
        await asyncio.sleep(1.1)  # other writers show in the guard's next sample (1/s)
        assert await _round(conn, name, ["pre-0"], confirmed) == 0  # still above the guard
        for r in range(100):  # 12 MiB is about 24 rounds
            nacked += await _round(conn, name, [f"r{r}-{n}" for n in range(BATCH)], confirmed)
            lowest = min(lowest, free_bytes(small_fs))
            if nacked >= BATCH:
                break
        assert nacked >= BATCH, f"the guard never refused; {lowest} bytes free"
        assert lowest >= GUARD - ROUND_BYTES - SLACK, (
            f"free space fell to {lowest} bytes, guard {GUARD}, one batch {ROUND_BYTES}"
        )
        filler.unlink()
        await _resumes(conn, name, "freed", confirmed)
    finally:
        await conn.close()
    b.kill()
    b2 = fs_broker("--disk-free-limit", str(GUARD))
    present = await _present(b2, kind, name)
    missing = confirmed - present
    assert not missing, f"{len(missing)} confirmed messages are gone, e.g. {sorted(missing)[:3]}"


async def test_snapshot_on_a_full_disk_leaves_no_temp_file(
    small_fs: Path, tmp_path: Path, fs_broker: Callable[..., BrokerProcess]
) -> None:
    """A snapshot that hits ENOSPC removes its snap-*.tmp at once (it used to hold the
    disk's last free space until the next start); the next one succeeds once space is
    back, and nothing confirmed is lost."""
    cfg = tmp_path / "snap.toml"
    cfg.write_text("snapshot_interval_ms = 300\nsnapshot_bytes = 1073741824\n")
    b = fs_broker("--config", str(cfg), "--disk-free-limit", "0")
    assert b.proc is not None
    wal = b.data_dir / "wal"
    conn = await client.connect(b.url, reconnect=False, timeout=10)
    confirmed: set[str] = set()
    stopped = False
    try:
        await conn.declare_queue("snap", durable=True)
        for r in range(12):  # 6 MiB: a snapshot of the queue needs as much
            assert await _round(conn, "snap", [f"s{r}-{n}" for n in range(BATCH)], confirmed) == 0
        fill(small_fs / "filler", leave=1 << 20)
        before = b.log_text().count("snapshot failed")
        # a little more in the log makes the next snapshot due; the log itself has room
        assert await _round(conn, "snap", ["last"], confirmed) == 0
        deadline = time.monotonic() + 15
        while b.log_text().count("snapshot failed") == before:
            assert time.monotonic() < deadline, "no snapshot was attempted on the full disk"
            await asyncio.sleep(0.01)
        # Freeze the broker before its retry (0.5 s later) starts a new temp file.
        os.kill(b.proc.pid, signal.SIGSTOP)
        stopped = True
        assert "No space left" in b.log_text().split("snapshot failed")[-1].splitlines()[0]
        left = sorted(p.name for p in wal.glob("snap-*.tmp"))
        assert not left, f"the failed snapshot left {left}"
        assert free_bytes(small_fs) >= (1 << 20) - ROUND_BYTES, "its space was not released"
        os.kill(b.proc.pid, signal.SIGCONT)
        stopped = False
        (small_fs / "filler").unlink()
        done = b.log_text().count("snapshot snap-")
        deadline = time.monotonic() + 15
        while b.log_text().count("snapshot snap-") == done:
            assert time.monotonic() < deadline, "no snapshot succeeded after space came back"
            await asyncio.sleep(0.05)
        assert not list(wal.glob("snap-*.tmp"))
    finally:
        if stopped:
            os.kill(b.proc.pid, signal.SIGCONT)
        await conn.close()
    b.kill()
    b2 = fs_broker("--disk-free-limit", "0")
    present = await _present(b2, "queue", "snap")
    assert confirmed <= present and len(confirmed) == 12 * BATCH + 1


async def test_failed_stream_append_nacks_no_later_publish(
    small_fs: Path, fs_broker: Callable[..., BrokerProcess]
) -> None:
    """An append that no publisher waits for (an unconfirmed publish, seq 0) fails on the
    full disk: its error must not be handed to the next confirmed publish once space is
    back (streams write at once: the very first one is confirmed)."""
    b = fs_broker("--disk-free-limit", "0")
    conn = await client.connect(b.url, reconnect=False, timeout=10)
    confirmed: set[str] = set()
    try:
        await _declare(conn, "stream", "s")
        assert await _round(conn, "s", ["first"], confirmed) == 0
        fill(small_fs / "filler")
        assert await _round(conn, "s", [f"full-{n}" for n in range(BATCH)], confirmed) == BATCH
        fill(small_fs / "filler")  # what the cut-back failed writes released
        failures = b.log_text().count("append failed")
        with wire.open_conn(b.port) as raw:
            raw.send(wire.encode("publish", 0, "", "s", {}, b"u" * (256 << 10)))
            deadline = time.monotonic() + 10
            while b.log_text().count("append failed") == failures:
                assert time.monotonic() < deadline, "the unconfirmed append did not fail"
                await asyncio.sleep(0.01)
        (small_fs / "filler").unlink()
        assert await _round(conn, "s", ["after"], confirmed) == 0, "a stale error nacked it"
    finally:
        await conn.close()
    b.kill()
    present = await _present(fs_broker("--disk-free-limit", "0"), "stream", "s")
    assert present == {"first", "after"} == confirmed
