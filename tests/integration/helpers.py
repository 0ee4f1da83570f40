"""Bounded helpers for the integration tests (no wait here can hang a run)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

from conveyor import client

# Default bound for one wait inside a test.
WAIT = 10.0


async def connect(url: str, **kw: Any) -> client.Connection:
    kw.setdefault("reconnect", False)
    kw.setdefault("timeout", WAIT)
    return await asyncio.wait_for(client.connect(url, **kw), WAIT + 5)


async def take(
    consumer: client.Consumer, n: int, timeout: float = WAIT, *, ack: bool = False
) -> list[client.Message]:
    """Exactly ``n`` messages from ``consumer`` (fails if they do not come in ``timeout``).

    With ``ack`` each message is acked as it arrives (needed when ``n`` > prefetch).
    """
    out: list[client.Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        msg = await consumer.get(remaining)
        if msg is None:
            break
        out.append(msg)
        if ack:
            msg.ack()
    assert len(out) == n, f"expected {n} messages, got {len(out)}: {out[:5]}"
    return out


async def drain(
    consumer: client.Consumer, quiet: float = 0.3, limit: int = 100_000
) -> list[client.Message]:
    """Every message that arrives until ``quiet`` seconds pass with none."""
    out: list[client.Message] = []
    while len(out) < limit:
        msg = await consumer.get(quiet)
        if msg is None:
            break
        out.append(msg)
    return out


async def wait_until(
    pred: Callable[[], Any], timeout: float = WAIT, interval: float = 0.02
) -> None:
    """Poll ``pred`` (sync or async) until it is truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def queue_info(conn: client.Connection, name: str) -> dict[str, Any] | None:
    """The broker's listing entry for queue ``name`` (None if it does not exist)."""
    for q in await conn.list("queues"):
        if q["name"] == name:
            return q
    return None


def bodies(msgs: list[client.Message]) -> list[bytes]:
    return [m.body for m in msgs]


def non_loopback_ip() -> str | None:
    """This machine's address on a non-loopback interface (to connect as a remote peer
    would), or None if it has none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent
            ip = str(s.getsockname()[0])
    except OSError:
        return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip
