"""kill -9 the broker the moment a DELIVER arrives: the delivery record must survive.

The broker hands a delivery's record to the log before the DELIVER frame goes to the
socket (written to the OS, not fsynced: a process crash keeps the page cache), so a
broker killed right after a consumer received a message redelivers it after the restart
flagged ``redelivered`` with ``delivery_count`` one higher. Each round delivers the same
persistent message once more and kills the broker as soon as the client has it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from conveyor import client
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT

ROUNDS = int(os.environ.get("CONVEYOR_DELIVERY_KILL_ROUNDS", "15"))

pytestmark = pytest.mark.timeout(30 + ROUNDS * 10)


async def _deliver_and_kill(b: BrokerProcess, publish: bool) -> tuple[int, bool]:
    """Consume one message of "q" and SIGKILL the broker in the same instant;
    returns its (delivery_count, redelivered)."""
    conn = await client.connect(b.url, reconnect=False, timeout=WAIT)
    try:
        if publish:
            await conn.declare_queue("q")
            await conn.publish("", "q", b"m")  # confirmed: on disk
        consumer = await conn.consume("q", prefetch=1)
        m = await consumer.get(WAIT)
        assert m is not None, "no delivery"
        assert b.proc is not None
        os.kill(b.proc.pid, signal.SIGKILL)  # no await in between
        b.proc.wait(5)
        return m.delivery_count, m.redelivered
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


async def test_delivery_record_survives_a_kill_right_after_deliver(tmp_path: Path) -> None:
    b = BrokerProcess(tmp_path / "data")
    seen: list[tuple[int, bool]] = []
    try:
        for rnd in range(ROUNDS):
            b.start()
            seen.append(await _deliver_and_kill(b, publish=rnd == 0))
    finally:
        b.stop()
    # Round k must see one delivery more than round k-1 saw, and the flag with it.
    regressions = [
        (rnd, got)
        for rnd, got in enumerate(seen)
        if got != ((seen[rnd - 1][0] if rnd else 0) + 1, rnd > 0)
    ]
    print(
        f"{ROUNDS} kills right after DELIVER: {len(regressions)} delivery_count "
        f"regressions; counts {[c for c, _ in seen]}"
    )
    assert not regressions, (
        f"{len(regressions)} of {ROUNDS} rounds lost the delivery record: {regressions}"
    )
