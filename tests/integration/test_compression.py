"""Optional zstd compression against a real broker: compressed stream segments on disk
(queue argument stream_compression) and compressed batches on the wire (negotiated in the
handshake with ``connect(compression="zstd")``; spec "Compressed frames")."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import conveyor.client._protocol as cproto
import conveyor.client.publishing as cpub
from conveyor import client
from conveyor.protocol._generated import Compressed
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect, take

pytestmark = pytest.mark.timeout(120)

N = 5000


def body(i: int) -> bytes:
    """Compressible, distinct, ~300 bytes: what JSON events look like."""
    return (
        b'{"order": %08d, "status": "shipped", "warehouse": "north-east-3", '
        b'"items": [' % i + b'{"sku": "ABC-123", "qty": 1}, ' * 8 + b"]}"
    )


def stream_dir_bytes(b: BrokerProcess, name: str) -> int:
    dirs = [p for p in (b.data_dir / "streams").iterdir() if p.is_dir() and name in p.name]
    assert len(dirs) == 1, dirs
    return sum(p.stat().st_size for p in dirs[0].rglob("*.seg"))


async def publish_all(conn: client.Connection, rk: str) -> None:
    for lo in range(0, N, 1000):
        await conn.publish_batch(
            [body(i) for i in range(lo, lo + 1000)], routing_key=rk, timeout=60
        )


async def read_stream(conn: client.Connection, name: str) -> list[bytes]:
    out: list[bytes] = []
    async with conn.stream(name, offset="first") as s:
        while len(out) < N:
            m = await s.get(WAIT)
            assert m is not None, f"{name}: only {len(out)} of {N} came"
            out.append(m.body)
    return out


async def round_trip(conn: client.Connection, queue: str) -> None:
    """N messages through a classic queue: every one back, in order."""
    await conn.declare_queue(queue)
    consumer = await conn.consume(queue, prefetch=2000)
    await publish_all(conn, queue)
    got = await take(consumer, N, ack=True)
    assert [m.body for m in got] == [body(i) for i in range(N)]


@pytest.fixture
def wire_counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts COMPRESSED frames the client receives and sends."""
    counts = {"received": 0, "sent": 0}
    fast = cproto._FAST[Compressed.TYPE]

    def received(proto: Any, data: Any) -> Any:
        counts["received"] += 1
        return fast(proto, data)

    real = cpub.compress_frame

    def sent(frame: bytes) -> bytes:
        out = real(frame)
        counts["sent"] += out[4] == Compressed.TYPE
        return out

    monkeypatch.setitem(cproto._FAST, Compressed.TYPE, received)
    monkeypatch.setattr(cpub, "compress_frame", sent)
    return counts


async def test_compressed_stream_is_smaller_on_disk_and_survives_restart(
    broker: BrokerProcess,
) -> None:
    conn = await connect(broker.url)
    try:
        await conn.declare_queue("plain", queue_type="stream")
        await conn.declare_queue("packed", queue_type="stream", stream_compression="zstd")
        await publish_all(conn, "plain")
        await publish_all(conn, "packed")
        want = [body(i) for i in range(N)]
        assert await read_stream(conn, "packed") == want
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
    plain, packed = stream_dir_bytes(broker, "plain"), stream_dir_bytes(broker, "packed")
    print(f"stream segments: plain {plain} B, zstd {packed} B, ratio {plain / packed:.1f}x")
    assert packed * 5 < plain, (plain, packed)
    broker.stop()
    broker.start()
    conn = await connect(broker.url)
    try:
        assert await read_stream(conn, "packed") == want
        # redeclaring with the same argument is fine; a classic queue refuses it
        await conn.declare_queue("packed", queue_type="stream", stream_compression="zstd")
        with pytest.raises(client.ConveyorError) as err:
            await conn.declare_queue("classic-z", stream_compression="zstd")
        assert err.value.code == 400
        with pytest.raises(client.ConveyorError):
            await conn.declare_queue("bad", queue_type="stream", stream_compression="gzip")
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def test_wire_compression_classic_queue_and_stream(
    broker: BrokerProcess, wire_counts: dict[str, int]
) -> None:
    conn = await connect(broker.url, compression="zstd")
    try:
        assert conn.negotiated_compression == "zstd"
        assert conn._proto is not None and conn._proto.open_ok is not None
        assert conn._proto.open_ok.compression == "zstd"
        await round_trip(conn, "wq")
        await conn.declare_queue("ws", queue_type="stream")
        await publish_all(conn, "ws")
        assert await read_stream(conn, "ws") == [body(i) for i in range(N)]
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
    assert wire_counts["sent"] > 0 and wire_counts["received"] > 0, wire_counts


async def test_without_compression_no_compressed_frames(
    broker: BrokerProcess, wire_counts: dict[str, int]
) -> None:
    conn = await connect(broker.url)
    try:
        assert conn.negotiated_compression == ""
        await round_trip(conn, "pq")
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
    assert wire_counts == {"received": 0, "sent": 0}


async def test_server_can_refuse_wire_compression(broker_factory: Any) -> None:
    b = broker_factory("--no-wire-compression")
    conn = await connect(b.url, compression="zstd")
    try:
        assert conn.negotiated_compression == ""
        await round_trip(conn, "nq")
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
