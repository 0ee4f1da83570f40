"""REST messaging gateway: POST/GET/DELETE /queues/{queue}/messages against a real broker,
interoperating with the binary protocol (mq-cli publish / consume, the Python client)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
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
    status, body = await http(
        hb,
        "POST",
        "/queues/gw-in/messages",
        json={"message": "hello over http", "priority": 5, "headers": {"k": "v"}},
    )
    assert status == 201, body
    mid = body["id"]
    p = await cli("consume", "-q", "gw-in", "-n", "1", "--timeout", "10", "--json", "--url", hb.url)
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
        p = await cli(
            "publish", "from the cli", "-k", "gw-out", "--message-id", "m-1", "--url", hb.url
        )
        assert p.returncode == 0, p.stderr
        status, body = await http(
            hb,
            "GET",
            "/queues/gw-out/messages",
            params={"batch_size": 10, "visibility_timeout": 30},
        )
        assert status == 200
        [m] = body["messages"]
        assert (m["body"], m["encoding"], m["id"], m["delivery_count"]) == (
            "from the cli",
            "utf-8",
            "m-1",
            1,
        )
        info = await queue_info(conn, "gw-out")
        assert info is not None and (info["messages"], info["unacked"]) == (0, 1)
        # Invisible to others while unacked.
        status, body = await http(hb, "GET", "/queues/gw-out/messages")
        assert (status, body) == (200, {"messages": []})
        status, _ = await http(hb, "DELETE", f"/queues/gw-out/messages/{m['receipt_handle']}")
        assert status == 204
        info = await queue_info(conn, "gw-out")
        assert info is not None and (info["messages"], info["unacked"], info["acked"]) == (0, 0, 1)
        status, body = await http(hb, "DELETE", f"/queues/gw-out/messages/{m['receipt_handle']}")
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
    status, body = await http(
        hb, "GET", "/queues/gw-vis/messages", params={"visibility_timeout": 1}
    )
    [first] = body["messages"]
    assert first["delivery_count"] == 1
    status, body = await http(hb, "GET", "/queues/gw-vis/messages")
    assert body["messages"] == []
    await asyncio.sleep(1.5)
    status, body = await http(
        hb, "GET", "/queues/gw-vis/messages", params={"visibility_timeout": 30}
    )
    [second] = body["messages"]
    assert second["body"] == "again" and second["id"] == first["id"]
    assert second["delivery_count"] == 2 and second["redelivered"] is True
    # The first receipt expired with its visibility timeout.
    status, _ = await http(hb, "DELETE", f"/queues/gw-vis/messages/{first['receipt_handle']}")
    assert status == 404
    status, _ = await http(hb, "DELETE", f"/queues/gw-vis/messages/{second['receipt_handle']}")
    assert status == 204


async def test_non_utf8_bodies_travel_base64(hb: BrokerProcess) -> None:
    raw = bytes(range(256))
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("gw-bin")
        status, _ = await http(
            hb,
            "POST",
            "/queues/gw-bin/messages",
            json={"message": base64.b64encode(raw).decode(), "encoding": "base64"},
        )
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
        status, body = await http(
            hb, "POST", "/queues/gw-bin/messages", json={"message": "%%%", "encoding": "base64"}
        )
        assert status == 400
    finally:
        await conn.close()


async def test_delay_and_batches(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    await conn.declare_queue("gw-batch")
    await conn.close()
    for i in range(5):
        status, _ = await http(hb, "POST", "/queues/gw-batch/messages", json={"message": f"m{i}"})
        assert status == 201
    status, _ = await http(
        hb, "POST", "/queues/gw-batch/messages", json={"message": "later", "delay": 3600}
    )
    assert status == 201
    status, body = await http(hb, "GET", "/queues/gw-batch/messages", params={"batch_size": 100})
    assert [m["body"] for m in body["messages"]] == [f"m{i}" for i in range(5)]
    status, body = await http(hb, "GET", "/queues/gw-batch/messages", params={"batch_size": 0})
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
        status, _ = await http(
            b, "POST", "/queues/gw-durable/messages", json={"message": "keep me"}
        )
        assert status == 201
        _s, body = await http(
            b, "GET", "/queues/gw-durable/messages", params={"visibility_timeout": 3600}
        )
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


# ---------------------------------------------------------------------- SQS-style features
async def test_long_poll_answers_when_a_message_arrives(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("gw-lp")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        poll = asyncio.ensure_future(
            http(hb, "GET", "/queues/gw-lp/messages", params={"wait_time_seconds": 12})
        )
        await asyncio.sleep(0.5)
        assert not poll.done()  # waiting, not answered empty at once
        await conn.publish("", "gw-lp", b"arrived")
        status, body = await asyncio.wait_for(poll, 10)
        assert status == 200, body
        assert [m["body"] for m in body["messages"]] == ["arrived"]
        assert loop.time() - t0 < 11  # answered on arrival, not at the end of the wait
        # Nothing arrives: an empty answer once the wait is over (not before).
        t0 = loop.time()
        status, body = await http(
            hb, "GET", "/queues/gw-lp/messages", params={"wait_time_seconds": 1}
        )
        assert (status, body) == (200, {"messages": []})
        assert loop.time() - t0 >= 0.9
        # Several pollers, one message each: every poller is answered, none twice.
        polls = [
            asyncio.ensure_future(
                http(hb, "GET", "/queues/gw-lp/messages", params={"wait_time_seconds": 12})
            )
            for _ in range(3)
        ]
        await asyncio.sleep(0.5)
        for i in range(3):
            await conn.publish("", "gw-lp", f"m{i}".encode())
        got = await asyncio.wait_for(asyncio.gather(*polls), 11)
        assert sorted(m["body"] for _s, b in got for m in b["messages"]) == ["m0", "m1", "m2"]
        # A queue deleted while a poll waits: 404, at once.
        poll = asyncio.ensure_future(
            http(hb, "GET", "/queues/gw-lp/messages", params={"wait_time_seconds": 12})
        )
        await asyncio.sleep(0.5)
        await conn.delete_queue("gw-lp")
        status, body = await asyncio.wait_for(poll, 10)
        assert status == 404 and body["error"]["name"] == "not-found"
        for bad in (21, -1, "x"):
            status, body = await http(
                hb, "GET", "/queues/gw-lp/messages", params={"wait_time_seconds": bad}
            )
            assert status == 400 and body["error"]["name"] == "invalid-argument", bad
    finally:
        await conn.close()


async def test_a_hung_up_long_poll_takes_nothing(hb: BrokerProcess) -> None:
    """A poller that disconnected while waiting must not take the message that wakes
    it (it would sit invisible, delivered to nobody, for its visibility timeout)."""
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("gw-lp-gone")
        url = f"http://127.0.0.1:{hb.http_port}/queues/gw-lp-gone/messages"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as s:
            with pytest.raises(asyncio.TimeoutError):
                async with s.get(url, params={"wait_time_seconds": 15}) as r:
                    await r.read()
        await asyncio.sleep(0.3)
        await conn.publish("", "gw-lp-gone", b"for a live caller")
        await asyncio.sleep(0.5)
        info = await queue_info(conn, "gw-lp-gone")
        assert info is not None and (info["messages"], info["unacked"]) == (1, 0), info
        status, body = await http(
            hb, "GET", "/queues/gw-lp-gone/messages", params={"visibility_timeout": 30}
        )
        assert status == 200 and [m["body"] for m in body["messages"]] == ["for a live caller"]
    finally:
        await conn.close()


async def test_long_poll_sees_a_delayed_message_become_ready(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("gw-lp-delay")
        await conn.publish("", "gw-lp-delay", b"later", delay=800)
        status, body = await http(
            hb, "GET", "/queues/gw-lp-delay/messages", params={"wait_time_seconds": 10}
        )
        assert status == 200 and [m["body"] for m in body["messages"]] == ["later"]
    finally:
        await conn.close()


async def test_a_waiting_poll_does_not_hold_up_shutdown(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    await conn.declare_queue("gw-lp-stop")
    await conn.close()
    poll = asyncio.ensure_future(
        http(hb, "GET", "/queues/gw-lp-stop/messages", params={"wait_time_seconds": 20})
    )
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.to_thread(hb.stop)
    assert loop.time() - t0 < 15  # SIGTERM: the poll is answered, the broker exits
    status, body = await asyncio.wait_for(poll, 5)
    assert (status, body) == (200, {"messages": []})


async def test_publish_to_an_exchange_with_a_routing_key(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_exchange("gw-logs", "topic")
        await conn.declare_queue("gw-errors")
        await conn.bind("gw-logs", "gw-errors", "app.error.*")
        status, body = await http(
            hb,
            "POST",
            "/exchanges/gw-logs/messages",
            json={"routing_key": "app.error.db", "message": "disk", "headers": {"h": 1}},
        )
        assert status == 201 and body["routed"] == 1, body
        status, got = await http(hb, "GET", "/queues/gw-errors/messages")
        [m] = got["messages"]
        assert (m["body"], m["exchange"], m["routing_key"], m["id"]) == (
            "disk",
            "gw-logs",
            "app.error.db",
            body["id"],
        )
        assert m["properties"]["headers"] == {"h": 1}
        # Not bound: stored nowhere (routed 0); with mandatory, 404 no-route.
        status, body = await http(
            hb,
            "POST",
            "/exchanges/gw-logs/messages",
            json={"routing_key": "app.info", "message": "x"},
        )
        assert (status, body["routed"]) == (201, 0)
        status, body = await http(
            hb,
            "POST",
            "/exchanges/gw-logs/messages",
            json={"routing_key": "app.info", "message": "x", "mandatory": True},
        )
        assert status == 404 and body["error"]["name"] == "no-route", body
        status, body = await http(
            hb, "POST", "/exchanges/no-such-x/messages", json={"routing_key": "k", "message": "x"}
        )
        assert status == 404 and body["error"]["name"] == "not-found"
        for bad in (
            {"routing_key": 5, "message": "x"},
            {"message": "x", "mandatory": "yes"},
            {"routing_key": "k"},
            {"routing_key": "k", "message": "x", "queue": "q"},
            {"routing_key": "k" * 300, "message": "x"},
        ):
            status, body = await http(hb, "POST", "/exchanges/gw-logs/messages", json=bad)
            assert status == 400 and body["error"]["name"] == "invalid-argument", bad
        status, body = await http(
            hb, "POST", f"/exchanges/{'x' * 256}/messages", json={"message": "x"}
        )
        assert status == 400 and "exchange name" in body["error"]["message"]
        info = await queue_info(conn, "gw-errors")
        assert info is not None and info["published"] == 1
    finally:
        await conn.close()


async def test_exchange_publish_needs_write_on_the_exchange(hb: BrokerProcess) -> None:
    p = await cli(
        "token",
        "create",
        "-s",
        "gw-pub",
        "--data-dir",
        str(hb.data_dir),
        "--write",
        "allowed-x",
        "--read",
        "*",
    )
    assert p.returncode == 0, p.stderr
    token = p.stdout.decode().strip()
    conn = await connect(hb.url)
    try:
        await conn.declare_exchange("allowed-x", "fanout")
        await conn.declare_exchange("denied-x", "fanout")
    finally:
        await conn.close()
    status, body = await http(
        hb, "POST", "/exchanges/denied-x/messages", token=token, json={"message": "x"}
    )
    assert status == 403 and body["error"]["name"] == "access-refused", body
    status, body = await http(
        hb, "POST", "/exchanges/allowed-x/messages", token=token, json={"message": "x"}
    )
    assert status == 201, body
    # Not for anonymous browsers either: the CSRF header guard covers /exchanges.
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{hb.http_port}/exchanges/allowed-x/messages", json={"message": "x"}
        ) as r,
    ):
        assert r.status == 403 and (await r.json())["error"]["details"]["reason"] == "csrf"


async def test_change_visibility(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("gw-vis")
        await conn.publish("", "gw-vis", b"one")
        _, body = await http(hb, "GET", "/queues/gw-vis/messages", params={"visibility_timeout": 1})
        [m] = body["messages"]
        handle = m["receipt_handle"]
        # Extended to 60 s: still invisible after its first second is over.
        status, _ = await http(
            hb,
            "PUT",
            f"/queues/gw-vis/messages/{handle}/visibility",
            json={"visibility_timeout": 60},
        )
        assert status == 204
        await asyncio.sleep(1.6)
        _, body = await http(hb, "GET", "/queues/gw-vis/messages")
        assert body == {"messages": []}
        # 0: visible again at once, redelivered.
        status, _ = await http(
            hb,
            "PUT",
            f"/queues/gw-vis/messages/{handle}/visibility",
            json={"visibility_timeout": 0},
        )
        assert status == 204
        _, body = await http(hb, "GET", "/queues/gw-vis/messages")
        [m2] = body["messages"]
        assert (m2["body"], m2["delivery_count"], m2["redelivered"]) == ("one", 2, True)
        # The old handle is gone; bad values are typed 400s.
        status, body = await http(
            hb,
            "PUT",
            f"/queues/gw-vis/messages/{handle}/visibility",
            json={"visibility_timeout": 5},
        )
        assert status == 404 and body["error"]["name"] == "not-found"
        h2 = m2["receipt_handle"]
        for bad in (
            {"visibility_timeout": -1},
            {"visibility_timeout": 43201},
            {"visibility_timeout": 1.5},
            {"visibility_timeout": "5"},
            {},
            {"visibility_timeout": 5, "x": 1},
        ):
            status, body = await http(
                hb, "PUT", f"/queues/gw-vis/messages/{h2}/visibility", json=bad
            )
            assert status == 400 and body["error"]["name"] == "invalid-argument", bad
        status, body = await http(
            hb, "PUT", f"/queues/nope/messages/{h2}/visibility", json={"visibility_timeout": 5}
        )
        assert status == 404
        status, _ = await http(hb, "DELETE", f"/queues/gw-vis/messages/{h2}")
        assert status == 204
    finally:
        await conn.close()


async def test_batch_send_and_batch_delete(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("gw-batch")
        status, body = await http(
            hb,
            "POST",
            "/queues/gw-batch/messages/batch",
            json={
                "entries": [
                    {"id": "a", "message": "first", "message_id": "m-a"},
                    {"id": "b", "message": "second", "priority": 12},
                    {"id": "c", "message": "/w==", "encoding": "base64"},
                    {"id": "d", "message": "x", "nope": 1},
                ]
            },
        )
        assert status == 200, body
        assert body["successful"] == [
            {"id": "a", "message_id": "m-a"},
            {"id": "c", "message_id": body["successful"][1]["message_id"]},
        ]
        assert [(f["id"], f["code"], f["name"]) for f in body["failed"]] == [
            ("b", 400, "invalid-argument"),
            ("d", 400, "invalid-argument"),
        ]
        info = await queue_info(conn, "gw-batch")
        assert info is not None and info["messages"] == 2
        for bad in (
            {"entries": []},
            {"entries": [{"message": "x"}]},
            {"entries": [{"id": "a", "message": "x"}, {"id": "a", "message": "y"}]},
            {"entries": [{"id": str(i), "message": "x"} for i in range(101)]},
            {"entries": "x"},
            {"entries": [1]},
            {"entries": [{"id": "a"}], "x": 1},
        ):
            status, body = await http(hb, "POST", "/queues/gw-batch/messages/batch", json=bad)
            assert status == 400 and body["error"]["name"] == "invalid-argument", bad
        status, _ = await http(
            hb,
            "POST",
            "/queues/nope/messages/batch",
            json={"entries": [{"id": "a", "message": "x"}]},
        )
        assert status == 404
        _, got = await http(hb, "GET", "/queues/gw-batch/messages", params={"batch_size": 10})
        msgs = got["messages"]
        assert [(m["body"], m["encoding"]) for m in msgs] == [
            ("first", "utf-8"),
            ("/w==", "base64"),
        ]
        status, body = await http(
            hb,
            "POST",
            "/queues/gw-batch/messages/batch-delete",
            json={
                "entries": [
                    {"id": "1", "receipt_handle": msgs[0]["receipt_handle"]},
                    {"id": "2", "receipt_handle": "99999.0000"},
                    {"id": "3", "receipt_handle": msgs[1]["receipt_handle"]},
                ]
            },
        )
        assert status == 200, body
        assert body["successful"] == [{"id": "1"}, {"id": "3"}]
        assert [(f["id"], f["code"], f["name"]) for f in body["failed"]] == [
            ("2", 404, "not-found")
        ]
        info = await queue_info(conn, "gw-batch")
        assert info is not None and (info["messages"], info["unacked"], info["acked"]) == (0, 0, 2)
        for bad in (
            {"entries": [{"id": "1"}]},
            {"entries": [{"id": "1", "receipt_handle": 5}]},
            {"entries": [{"id": "1", "receipt_handle": "x" * 101}]},
            {"entries": [{"id": "1", "receipt_handle": "1.a", "extra": 1}]},
        ):
            status, body = await http(
                hb, "POST", "/queues/gw-batch/messages/batch-delete", json=bad
            )
            assert status == 400 and body["error"]["name"] == "invalid-argument", bad
    finally:
        await conn.close()


async def test_message_attributes_in_and_out(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("gw-attr")
        await conn.declare_queue("gw-attr-bin")
        attrs = {
            "correlation_id": "c-1",
            "reply_to": "replies",
            "content_type": "application/json",
            "content_encoding": "identity",
            "type": "order.created",
            "app_id": "shop",
            "timestamp": 1700000000000,
            "headers": {"tenant": "t1"},
        }
        for q in ("gw-attr", "gw-attr-bin"):
            status, body = await http(
                hb, "POST", f"/queues/{q}/messages", json={"message": "{}", **attrs}
            )
            assert status == 201, body
        # Out over HTTP ...
        _, got = await http(hb, "GET", "/queues/gw-attr/messages")
        [m] = got["messages"]
        assert {k: m["properties"].get(k) for k in attrs} == attrs
        # ... and over the binary protocol.
        [bm] = await conn.get("gw-attr-bin", no_ack=True)
        assert {k: bm.properties.get(k) for k in attrs} == attrs
        # And a binary publisher's attributes come out over HTTP.
        await conn.publish("", "gw-attr", b"x", correlation_id="c-2", headers={"a": [1, 2]})
        _, got = await http(hb, "GET", "/queues/gw-attr/messages")
        [m] = got["messages"]
        assert m["properties"]["correlation_id"] == "c-2"
        assert m["properties"]["headers"] == {"a": [1, 2]}
        for bad in (
            {"correlation_id": 5},
            {"reply_to": ""},
            {"type": "t" * 256},
            {"timestamp": -1},
            {"timestamp": "now"},
            {"content_type": ["x"]},
        ):
            status, body = await http(
                hb, "POST", "/queues/gw-attr/messages", json={"message": "x", **bad}
            )
            assert status == 400 and body["error"]["name"] == "invalid-argument", bad
    finally:
        await conn.close()
