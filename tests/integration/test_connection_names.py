"""``connect(name=...)``: the name reaches the broker's log lines, LIST ``connections``, the
management API and ``mq-cli connections``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.broker_process import BrokerProcess
from tests.conformance.wire import open_conn
from tests.integration.helpers import WAIT, connect, wait_until
from tests.integration.http_helpers import cli, http

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def http_broker(broker_factory: Any) -> BrokerProcess:
    b: BrokerProcess = broker_factory("--http-port", "0")
    return b


async def test_connection_name_is_shown_everywhere(http_broker: BrokerProcess) -> None:
    b = http_broker
    named = await connect(b.url, name="billing-worker-1")
    unnamed = await connect(b.url)
    try:
        rows = {r["id"]: r for r in await unnamed.list("connections")}
        assert rows[named.connection_id]["name"] == "billing-worker-1"
        assert rows[unnamed.connection_id]["name"] == ""

        status, body = await http(b, "GET", "/api/connections")
        assert status == 200
        api = {r["id"]: r for r in body}
        assert api[named.connection_id]["name"] == "billing-worker-1"
        assert api[unnamed.connection_id]["name"] == ""

        p = await cli("connections", "--url", b.url)
        assert p.returncode == 0, p.stderr
        header, *lines = p.stdout.decode().splitlines()
        assert header.split()[:2] == ["ID", "NAME"]
        line = next(ln for ln in lines if ln.startswith(named.connection_id + " "))
        assert line.split()[1] == "billing-worker-1"
        p = await cli("connections", "--json", "--url", b.url)
        assert {r["id"]: r["name"] for r in json.loads(p.stdout)}[
            named.connection_id
        ] == "billing-worker-1"

        await wait_until(
            lambda: f"connection {named.connection_id} ('billing-worker-1') open" in b.log_text(),
            WAIT,
        )
    finally:
        await asyncio.wait_for(named.close(), WAIT)
        await asyncio.wait_for(unnamed.close(), WAIT)
    await wait_until(
        lambda: f"connection {named.connection_id} ('billing-worker-1') from " in b.log_text(), WAIT
    )  # the close line names it too


async def test_connection_name_cannot_forge_log_lines(broker: BrokerProcess) -> None:
    conn = await connect(broker.url, name="x\nERROR forged line" + "y" * 400)
    try:
        row = next(r for r in await conn.list("connections") if r["id"] == conn.connection_id)
        assert row["name"].startswith("x?ERROR forged line")
        assert len(row["name"]) == 255
        await wait_until(lambda: f"connection {conn.connection_id} (" in broker.log_text(), WAIT)
        assert "\nERROR forged line" not in broker.log_text()
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


@pytest.mark.parametrize("name", [12345, ["a", "b"], {"n": 1}, None, b"bytes", True])
def test_a_connection_name_that_is_not_a_string_is_no_name(
    broker: BrokerProcess, name: Any
) -> None:
    # client_properties are informational: a wrong type opens the connection unnamed.
    with open_conn(
        broker.port, 5.0, "anonymous", "", {"library": "raw", "connection_name": name}, 0, 0
    ) as c:
        f = c.request("list", 1, "connections")
        assert f.kind == "list_ok"
        assert c.open_ok is not None
        (row,) = [r for r in f["items"] if r["id"] == c.open_ok["connection_id"]]
        assert row["name"] == ""
