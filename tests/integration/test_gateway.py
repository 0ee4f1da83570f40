"""REST messaging gateway: POST/GET/DELETE /queues/{queue}/messages against a real broker,
interoperating with the binary protocol (mq-cli publish / consume, the Python client)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.broker_process import BrokerProcess
from tests.integration.helpers import connect, queue_info, take
from tests.integration.http_helpers import cli, http

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def hb(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    b = broker_factory("--http-port", "0")
    assert b.http_port > 0
    return b


async def test_posted_message_is_consumed_by_mq_cli(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    await conn.declare_queue("gw-in")
    await conn.close()
    status, body = await http(hb, "POST", "/queues/gw-in/messages",
                              json={"message": "hello over http", "priority": 5,
                                    "headers": {"k": "v"}})
    assert status == 201, body
    mid = body["id"]
    p = await cli("consume", "-q", "gw-in", "-n", "1", "--timeout", "10", "--json",
                  "--url", hb.url)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.decode().splitlines()[0])
    assert got["body"] == "hello over http"
    assert got["properties"]["message_id"] == mid
    assert got["properties"]["priority"] == 5
    assert got["properties"]["persistent"] is True
    assert got["properties"]["headers"] == {"k": "v"}
    # A queue that does not exist: 404 with the spec's error.
    status, body = await http(hb, "POST", "/queues/no-such-q/messages", json={"message": "x"})
    assert status == 404
    assert body["error"]["name"] == "not-found" and body["error"]["code"] == 404
    status, body = await http(hb, "POST", "/queues/gw-in/messages", json={"msg": "x"})
    assert status == 400 and body["error"]["name"] == "invalid-argument"


async def test_mq_cli_publish_then_get_and_delete(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("gw-out")
        p = await cli("publish", "from the cli", "-k", "gw-out", "--message-id", "m-1",
                      "--url", hb.url)
        assert p.returncode == 0, p.stderr
        status, body = await http(hb, "GET", "/queues/gw-out/messages",
                                  params={"batch_size": 10, "visibility_timeout": 30})
        assert status == 200
        [m] = body["messages"]
        assert (m["body"], m["encoding"], m["id"], m["delivery_count"]) == (
            "from the cli", "utf-8", "m-1", 1)
        info = await queue_info(conn, "gw-out")
        assert info is not None and (info["messages"], info["unacked"]) == (0, 1)
        # Invisible to others while unacked.
        status, body = await http(hb, "GET", "/queues/gw-out/messages")
        assert (status, body) == (200, {"messages": []})
        status, _ = await http(hb, "DELETE", f"/queues/gw-out/messages/{m['receipt_handle']}")
        assert status == 204
        info = await queue_info(conn, "gw-out")
        assert info is not None and (info["messages"], info["unacked"], info["acked"]) == (
            0, 0, 1)
        status, body = await http(hb, "DELETE",
                                  f"/queues/gw-out/messages/{m['receipt_handle']}")
        assert status == 404 and body["error"]["name"] == "not-found"
        status, _ = await http(hb, "DELETE", "/queues/gw-out/messages/garbage")
        assert status == 404
    finally:
        await conn.close()


async def test_visibility_timeout_returns_undeleted_message(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    await conn.declare_queue("gw-vis")
    await conn.close()
    status, _ = await http(hb, "POST", "/queues/gw-vis/messages", json={"message": "again"})
    assert status == 201
    status, body = await http(hb, "GET", "/queues/gw-vis/messages",
                              params={"visibility_timeout": 1})
    [first] = body["messages"]
    assert first["delivery_count"] == 1
    status, body = await http(hb, "GET", "/queues/gw-vis/messages")
    assert body["messages"] == []
    await asyncio.sleep(1.5)
    status, body = await http(hb, "GET", "/queues/gw-vis/messages",
                              params={"visibility_timeout": 30})
    [second] = body["messages"]
    assert second["body"] == "again" and second["id"] == first["id"]
    assert second["delivery_count"] == 2 and second["redelivered"] is True
    # The first receipt expired with its visibility timeout.
    status, _ = await http(hb, "DELETE", f"/queues/gw-vis/messages/{first['receipt_handle']}")
    assert status == 404
    status, _ = await http(hb, "DELETE",
                           f"/queues/gw-vis/messages/{second['receipt_handle']}")
    assert status == 204


async def test_non_utf8_bodies_travel_base64(hb: BrokerProcess) -> None:
    raw = bytes(range(256))
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("gw-bin")
        status, _ = await http(hb, "POST", "/queues/gw-bin/messages",
                               json={"message": base64.b64encode(raw).decode(),
                                     "encoding": "base64"})
        assert status == 201
        consumer = await conn.consume("gw-bin")
        [msg] = await take(consumer, 1)
        assert msg.body == raw
        msg.ack()
        await consumer.cancel()
        await conn.publish("", "gw-bin", b"\xff\xfe binary")
        status, body = await http(hb, "GET", "/queues/gw-bin/messages")
        [m] = body["messages"]
        assert m["encoding"] == "base64"
        assert base64.b64decode(m["body"]) == b"\xff\xfe binary"
        status, body = await http(hb, "POST", "/queues/gw-bin/messages",
                                  json={"message": "%%%", "encoding": "base64"})
        assert status == 400
    finally:
        await conn.close()


async def test_delay_and_batches(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    await conn.declare_queue("gw-batch")
    await conn.close()
    for i in range(5):
        status, _ = await http(hb, "POST", "/queues/gw-batch/messages",
                               json={"message": f"m{i}"})
        assert status == 201
    status, _ = await http(hb, "POST", "/queues/gw-batch/messages",
                           json={"message": "later", "delay": 3600})
    assert status == 201
    status, body = await http(hb, "GET", "/queues/gw-batch/messages",
                              params={"batch_size": 100})
    assert [m["body"] for m in body["messages"]] == [f"m{i}" for i in range(5)]
    status, body = await http(hb, "GET", "/queues/gw-batch/messages",
                              params={"batch_size": 0})
    assert status == 400
    status, body = await http(hb, "GET", "/api/queues/gw-batch/peek")
    assert [m["body"] for m in body["messages"]] == ["later"]
    assert body["messages"][0]["delayed"] is True


async def test_received_messages_survive_a_restart(tmp_path: Path) -> None:
    """Unacked HTTP deliveries are requeued at shutdown (and logged as delivered, so a
    restart finds them again, redelivered)."""
    b = BrokerProcess(tmp_path / "data", "--http-port", "0").start()
    try:
        conn = await connect(b.url)
        await conn.declare_queue("gw-durable")
        await conn.close()
        status, _ = await http(b, "POST", "/queues/gw-durable/messages",
                               json={"message": "keep me"})
        assert status == 201
        _s, body = await http(b, "GET", "/queues/gw-durable/messages",
                              params={"visibility_timeout": 3600})
        assert [m["body"] for m in body["messages"]] == ["keep me"]
    finally:
        b.stop()
    b = BrokerProcess(tmp_path / "data", "--http-port", "0").start()
    try:
        _s, body = await http(b, "GET", "/queues/gw-durable/messages")
        [m] = body["messages"]
        assert m["body"] == "keep me" and m["redelivered"] is True
    finally:
        b.stop()
