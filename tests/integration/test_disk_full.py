"""Write errors: publishers get a clear error, confirmed data stays intact, the broker
resumes by itself once writes succeed again.

The disk filling up is reproduced with a real write error: the broker's file-size limit
(RLIMIT_FSIZE, set from outside with prlimit) makes its next log write fail with EFBIG,
exactly the path ENOSPC takes.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import client
from tests.broker_process import BrokerProcess


def _segments(data: Path) -> list[Path]:
    return sorted((data / "wal").glob("seg-*.log"))


async def test_write_errors_refuse_publishes_then_recover(
        broker_factory: Callable[..., BrokerProcess]) -> None:
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
