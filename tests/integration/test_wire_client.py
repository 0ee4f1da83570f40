"""The client library and the 1.2 wire additions: the announced maximum message size
(HELLO / OPEN_OK.max_message_size) and AUTH.compression, against a real broker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from conveyor import client
from tests.conformance import wire

SERVER_MAX = wire.MAX_FRAME_SIZE_DEFAULT - 8192  # the broker's default max_message_size
OVERHEAD = wire.SPEC["protocol"]["message_frame_overhead"]


async def test_client_exposes_the_maximum_message_size(
    conn: client.Connection, connect_to: Callable[..., Awaitable[Any]]
) -> None:
    assert conn.max_message_size == SERVER_MAX
    small = await connect_to(max_frame_size=wire.MAX_FRAME_SIZE_FLOOR)
    assert small.max_message_size == wire.MAX_FRAME_SIZE_FLOOR - OVERHEAD


@pytest.mark.parametrize("how", ["publish", "publish_batch"])
async def test_too_large_publish_is_refused_locally_with_a_clear_error(
    conn: client.Connection, how: str
) -> None:
    """A message over max_message_size whose frame would still fit (so it used to be
    sent and nacked by the broker) fails before anything is sent, naming the limit; the
    connection keeps working."""
    await conn.declare_queue("wc-big", durable=False)
    body = b"x" * (SERVER_MAX + 1)  # PUBLISH of it is under 1 MiB
    with pytest.raises(client.MessageTooLarge) as exc:
        if how == "publish":
            await conn.publish("", "wc-big", body)
        else:
            await conn.publish_batch([b"ok", body], routing_key="wc-big")
    assert exc.value.details == {"limit": "max_message_size", "max_message_size": SERVER_MAX}
    assert "maximum message size" in exc.value.message
    await conn.publish("", "wc-big", b"x" * SERVER_MAX)  # exactly the limit: accepted
    info = await conn.declare_queue("wc-big", durable=False)
    assert info.message_count == 1  # the refused batch sent nothing at all


async def test_compression_is_negotiated_in_the_auth_field(
    connect_to: Callable[..., Awaitable[Any]],
) -> None:
    c = await connect_to(compression="zstd")
    assert c._proto is not None and c._proto.compress
    assert c._proto.open_ok is not None and c._proto.open_ok.compression == "zstd"
