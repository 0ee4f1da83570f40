"""Fixtures for integration tests against a real broker process over TCP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from conveyor import client
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect


@pytest.fixture
async def conn(broker: BrokerProcess) -> AsyncIterator[client.Connection]:
    """A connection (no reconnect) to the test's own broker, closed at teardown."""
    c = await connect(broker.url)
    try:
        yield c
    finally:
        await asyncio.wait_for(c.close(), WAIT)


@pytest.fixture
async def connect_to(broker: BrokerProcess) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Open more connections to the test's broker; all are closed at teardown."""
    opened: list[client.Connection] = []

    async def open_(**kw: Any) -> client.Connection:
        c = await connect(broker.url, **kw)
        opened.append(c)
        return c

    yield open_
    for c in opened:
        await asyncio.wait_for(c.close(), WAIT)
