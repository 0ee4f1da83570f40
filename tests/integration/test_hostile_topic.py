"""A client that binds thousands of `*`/`#` patterns to amq.topic and publishes long keys
cannot freeze the broker: patterns over max_binding_words / max_binding_wildcards are
refused (400), bindings over max_bindings_per_exchange / max_bindings_per_queue are
refused (506), and routing through what is accepted stays cheap (broker.topic), so the
bystanders keep their heartbeats and their messages and the broker's memory stays flat.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from functools import partial

import pytest

from conveyor import client
from conveyor.broker.topic import topic_matches
from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.integration.bystanders import HEARTBEAT_MS, Bystanders, rss_bytes
from tests.integration.helpers import WAIT, connect, queue_info, wait_until

pytestmark = pytest.mark.timeout(240)

RESOURCE_ERROR = wire.code("resource-error")
INVALID_ARGUMENT = wire.code("invalid-argument")
LONG_KEY = ".".join(["a"] * 127)  # 253 bytes: the most words a routing key can have


async def _refused(coro: object, code: int, limit: str) -> None:
    with pytest.raises(client.ConveyorError) as info:
        await asyncio.wait_for(coro, WAIT)  # type: ignore[arg-type]
    assert info.value.code == code and info.value.details.get("limit") == limit, info.value


def _patterns(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct hostile patterns within the default limits: mostly wildcards, with
    literal words the long key is made of, so every one of them is live for that key."""
    out: set[str] = set()
    while len(out) < n:
        wild = [rng.choice("*#") for _ in range(rng.randint(1, 8))]
        words = wild + ["a"] * rng.randint(0, 16 - len(wild))
        rng.shuffle(words)
        out.add(".".join(words))
    return sorted(out)


async def test_wildcard_bindings_cannot_freeze_the_broker(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory("--heartbeat-ms", str(HEARTBEAT_MS), "--max-bindings-per-exchange", "3000")
    assert b.proc is not None
    by = await Bystanders(b.url).start()
    attacker = await connect(b.url)
    try:
        rss_before = rss_bytes(b.proc.pid)
        # Over the per-pattern limits: refused before anything is stored.
        await attacker.declare_queue("victim0", durable=False)
        await _refused(
            attacker.bind("amq.topic", "victim0", ".".join(["a"] * 17)),
            INVALID_ARGUMENT,
            "max_binding_words",
        )
        await _refused(
            attacker.bind("amq.topic", "victim0", ".".join(["#", "*"] * 5)),
            INVALID_ARGUMENT,
            "max_binding_wildcards",
        )
        await _refused(
            attacker.bind("amq.topic", "victim0", ".".join(["*"] * 127)),
            INVALID_ARGUMENT,
            "max_binding_words",
        )
        # Within them: 3,000 bindings over three queues (1,000 each, the queue limit).
        patterns = _patterns(random.Random(7), 3000)
        for i in range(3):
            await attacker.declare_queue(f"victim{i}", durable=False)
            chunk = patterns[i * 1000 : (i + 1) * 1000]
            for j in range(0, len(chunk), 100):
                await asyncio.wait_for(
                    asyncio.gather(
                        *[attacker.bind("amq.topic", f"victim{i}", p) for p in chunk[j : j + 100]]
                    ),
                    WAIT * 3,
                )
        await attacker.declare_queue("victim3", durable=False)
        await _refused(
            attacker.bind("amq.topic", "victim3", "x.#"),
            RESOURCE_ERROR,
            "max_bindings_per_exchange",
        )
        await _refused(
            attacker.bind("amq.direct", "victim0", "x"), RESOURCE_ERROR, "max_bindings_per_queue"
        )
        bindings = [x for x in await attacker.list("bindings") if x["exchange"] == "amq.topic"]
        assert len(bindings) == 3000
        # Publishes with the most expensive key and a few short ones.
        keys = [LONG_KEY] * 40 + ["a", "a.a.a", "", "b.a"] * 5
        for k in keys:
            await attacker.publish("amq.topic", k, b"x", timeout=WAIT * 3)
        for i in range(3):
            chunk = patterns[i * 1000 : (i + 1) * 1000]
            want = sum(1 for k in keys if any(topic_matches(p, k) for p in chunk))
            await wait_until(partial(_ready_is, attacker, f"victim{i}", want))
        rss_after = rss_bytes(b.proc.pid)
    finally:
        await by.stop()
        await asyncio.wait_for(attacker.close(), WAIT)
    print(f"\nbystanders {by.figures()}; broker RSS {rss_before >> 20} -> {rss_after >> 20} MiB")
    by.check()
    assert rss_after - rss_before < 64 << 20, (rss_before, rss_after)
    assert b.alive()
    assert "heartbeat" not in b.log_text()


async def _ready_is(conn: client.Connection, queue: str, n: int) -> bool:
    info = await queue_info(conn, queue)
    return info is not None and info["messages"] == n
