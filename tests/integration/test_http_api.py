"""Management API (/api) against a real broker: overview and listings, peek, purge,
delete, declare, redrive of dead letters, closing connections; and the HTTP listener's
authentication (bearer tokens, the loopback rule, --require-auth, permissions)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.broker_process import BrokerProcess
from tests.integration.helpers import connect, non_loopback_ip, queue_info, take, wait_until
from tests.integration.http_helpers import cli, http

pytestmark = pytest.mark.timeout(90)
ADMIN = ("--configure", "*", "--write", "*", "--read", "*")


@pytest.fixture
def hb(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    b = broker_factory("--http-port", "0")
    assert b.http_port > 0
    return b


async def make_token(b: BrokerProcess, subject: str, *args: str) -> str:
    p = await cli("token", "create", "--subject", subject, "--data-dir", str(b.data_dir), *args)
    assert p.returncode == 0, p.stderr
    return p.stdout.decode().strip()


async def test_overview_and_listings(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_exchange("api-x", "fanout")
        await conn.declare_queue("api-q", ack_timeout_ms=60000)
        await conn.bind("api-x", "api-q")
        consumer = await conn.consume("api-q", prefetch=1)
        for i in range(3):
            await conn.publish("api-x", "", f"m{i}".encode())
        await take(consumer, 1)

        async def rates_seen() -> bool:
            _s, o = await http(hb, "GET", "/api/overview")
            return bool(o["rates"]["publish"] > 0)

        await wait_until(rates_seen, timeout=5, interval=0.3)
        status, o = await http(hb, "GET", "/api/overview")
        assert status == 200
        assert o["messages"] == {"ready": 2, "unacked": 1, "total": 3, "dead_lettered": 0}
        assert o["connections"] == 1 and o["consumers"] == 1 and o["queues"] == 1
        assert o["memory"]["rss"] > 0 and o["disk"]["free"] > 0 and o["uptime_s"] >= 0
        status, queues = await http(hb, "GET", "/api/queues")
        [q] = queues
        assert (q["name"], q["ready"], q["unacked"], q["consumers"]) == ("api-q", 2, 1, 1)
        assert q["settings"]["ack_timeout_ms"] == 60000
        assert q["arguments"] == {"ack_timeout_ms": 60000}
        assert set(q["rates"]) == {"publish", "deliver", "ack"}
        status, one = await http(hb, "GET", "/api/queues/api-q")
        assert status == 200 and one["name"] == "api-q"
        status, err = await http(hb, "GET", "/api/queues/nope")
        assert status == 404 and err["error"]["name"] == "not-found"
        _s, exchanges = await http(hb, "GET", "/api/exchanges")
        assert {
            "name": "api-x",
            "type": "fanout",
            "durable": True,
            "auto_delete": False,
            "bindings": 1,
        } in exchanges
        _s, bindings = await http(hb, "GET", "/api/bindings")
        assert bindings == [{"exchange": "api-x", "queue": "api-q", "routing_key": ""}]
        _s, consumers = await http(hb, "GET", "/api/consumers")
        assert [c["queue"] for c in consumers] == ["api-q"]
        _s, conns = await http(hb, "GET", "/api/connections")
        assert len(conns) == 1 and conns[0]["consumers"] == 1
        status, text = await http(hb, "GET", "/metrics")
        assert status == 200 and "conveyor" in text
    finally:
        await conn.close()


async def test_peek_does_not_consume(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("peek-q")
        for body in (b"a", b"\xff\x00", b"c"):
            await conn.publish("", "peek-q", body, properties={"message_id": body.hex()})
        status, body = await http(hb, "GET", "/api/queues/peek-q/peek", params={"count": 2})
        assert status == 200
        assert [(m["body"], m["encoding"]) for m in body["messages"]] == [
            ("a", "utf-8"),
            ("/wA=", "base64"),
        ]
        assert body["messages"][0]["delivery_count"] == 0
        assert body["messages"][0]["redelivered"] is False
        info = await queue_info(conn, "peek-q")
        assert info is not None and (info["messages"], info["unacked"]) == (3, 0)
        consumer = await conn.consume("peek-q")
        msgs = await take(consumer, 3, ack=True)
        assert [m.body for m in msgs] == [b"a", b"\xff\x00", b"c"]
        assert all(m.delivery_count == 1 and not m.redelivered for m in msgs)
    finally:
        await conn.close()


async def test_declare_purge_delete(hb: BrokerProcess) -> None:
    status, q = await http(hb, "PUT", "/api/queues/decl-q", json={"arguments": {"max_length": 10}})
    assert status == 201 and q["arguments"] == {"max_length": 10}
    status, _ = await http(hb, "PUT", "/api/queues/decl-q", json={"arguments": {"max_length": 10}})
    assert status == 200
    status, err = await http(hb, "PUT", "/api/queues/decl-q", json={"durable": False})
    assert status == 409 and err["error"]["name"] == "precondition-failed"
    status, err = await http(hb, "PUT", "/api/queues/bad-q", json={"arguments": {"nonsense": 1}})
    assert status == 400 and err["error"]["code"] == 400
    for i in range(4):
        await http(hb, "POST", "/queues/decl-q/messages", json={"message": str(i)})
    status, body = await http(hb, "POST", "/api/queues/decl-q/purge")
    assert (status, body) == (200, {"queue": "decl-q", "purged": 4})
    status, body = await http(hb, "DELETE", "/api/queues/decl-q")
    assert (status, body) == (200, {"queue": "decl-q", "messages": 0})
    status, _ = await http(hb, "DELETE", "/api/queues/decl-q")
    assert status == 404


async def test_redrive_moves_dead_letters_back(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_exchange("dlx", "direct")
        await conn.declare_queue("work.dlq")
        await conn.bind("dlx", "work.dlq", "work")
        await conn.declare_queue("work", dead_letter_exchange="dlx")
        await conn.declare_queue("elsewhere")
        for i in range(3):
            await conn.publish("", "work", f"job{i}".encode())
        consumer = await conn.consume("work")
        for m in await take(consumer, 3):
            m.reject(requeue=False)
        await consumer.cancel()

        async def dead() -> bool:
            info = await queue_info(conn, "work.dlq")
            return info is not None and info["messages"] == 3

        await wait_until(dead)
        status, peek = await http(hb, "GET", "/api/queues/work.dlq/peek")
        headers = peek["messages"][0]["properties"]["headers"]
        assert headers["x-death"][0]["queue"] == "work"
        # One to an explicit target, the rest to the queue they died in.
        status, body = await http(
            hb, "POST", "/api/queues/work.dlq/redrive", params={"to": "elsewhere", "count": 1}
        )
        assert status == 200 and (body["moved"], body["skipped"]) == (1, 0)
        status, body = await http(hb, "POST", "/api/queues/work.dlq/redrive")
        assert status == 200 and (body["moved"], body["skipped"]) == (2, 0)
        for name, n in (("work.dlq", 0), ("work", 2), ("elsewhere", 1)):
            info = await queue_info(conn, name)
            assert info is not None and info["messages"] == n, (name, info)
        consumer = await conn.consume("work")
        got = await take(consumer, 2, ack=True)
        assert sorted(m.body for m in got) == [b"job1", b"job2"]
        # Without x-death (and no ?to) a message stays where it is.
        await conn.publish("", "work.dlq", b"orphan")
        status, body = await http(hb, "POST", "/api/queues/work.dlq/redrive")
        assert (body["moved"], body["skipped"]) == (0, 1)
        status, _ = await http(hb, "POST", "/api/queues/work.dlq/redrive", params={"to": "missing"})
        assert status == 404
    finally:
        await conn.close()


async def test_closing_a_connection_via_the_api(hb: BrokerProcess) -> None:
    victim = await connect(hb.url)
    other = await connect(hb.url)
    try:
        _s, conns = await http(hb, "GET", "/api/connections")
        assert len(conns) == 2
        ids = [c["id"] for c in conns]
        # Find the victim's id: the one that disappears is the one we close.
        status, _ = await http(hb, "DELETE", f"/api/connections/{ids[0]}")
        assert status == 204
        await wait_until(lambda: not victim.is_open or not other.is_open)
        assert victim.is_open != other.is_open  # exactly one was closed
        _s, conns = await http(hb, "GET", "/api/connections")
        assert [c["id"] for c in conns] == ids[1:]
        status, err = await http(hb, "DELETE", "/api/connections/c-999")
        assert status == 404 and err["error"]["name"] == "not-found"
    finally:
        for c in (victim, other):
            await asyncio.wait_for(c.close(), 10)


async def test_require_auth_and_permissions(broker_factory: Callable[..., BrokerProcess]) -> None:
    b = broker_factory("--http-port", "0", "--require-auth")
    status, err = await http(b, "GET", "/api/overview")
    assert status == 401
    assert err["error"] == {
        "code": 401,
        "name": "authentication-failed",
        "message": err["error"]["message"],
        "details": {"reason": "anonymous-refused"},
    }
    admin = await make_token(b, "admin", *ADMIN)
    status, _ = await http(b, "GET", "/api/overview", token=admin)
    assert status == 200
    status, err = await http(b, "GET", "/api/overview", token=admin[:-4] + "AAAA")
    assert status == 401 and err["error"]["name"] == "authentication-failed"
    status, _ = await http(b, "PUT", "/api/queues/orders", token=admin)
    assert status == 201
    writer = await make_token(b, "shop", "--write", "orders")
    status, err = await http(b, "GET", "/api/queues", token=writer)
    assert status == 403 and err["error"]["name"] == "access-refused"
    status, _ = await http(
        b, "POST", "/queues/orders/messages", json={"message": "x"}, token=writer
    )
    assert status == 201
    status, err = await http(b, "GET", "/queues/orders/messages", token=writer)
    assert status == 403 and err["error"]["code"] == 403
    reader = await make_token(b, "worker", "--read", "orders")
    status, body = await http(b, "GET", "/queues/orders/messages", token=reader)
    assert status == 200 and [m["body"] for m in body["messages"]] == ["x"]
    status, _ = await http(
        b,
        "DELETE",
        f"/queues/orders/messages/{body['messages'][0]['receipt_handle']}",
        token=reader,
    )
    assert status == 204
    status, _ = await http(
        b, "POST", "/queues/orders/messages", json={"message": "y"}, token=reader
    )
    assert status == 403


async def test_token_required_from_non_loopback_peers(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory("--host", "0.0.0.0", "--http-port", "0")
    status, _ = await http(b, "GET", "/api/overview")  # loopback: anonymous is fine
    assert status == 200
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("no non-loopback address to connect from")
    status, err = await http(b, "GET", "/api/overview", host=ip)
    assert status == 401 and "loopback" in err["error"]["message"]
    token = await make_token(b, "admin", *ADMIN)
    status, _ = await http(b, "GET", "/api/overview", host=ip, token=token)
    assert status == 200


async def test_exchanges_and_bindings_managed_over_http(hb: BrokerProcess) -> None:
    """PUT/DELETE /api/exchanges/{x}, POST/DELETE /api/bindings: the broker routes by
    them (a binary client sees the effect), durable ones are logged, bad input is 4xx."""
    status, ex = await http(
        hb, "PUT", "/api/exchanges/h-x", json={"type": "topic", "durable": True}
    )
    assert (status, ex) == (
        201,
        {"name": "h-x", "type": "topic", "durable": True, "auto_delete": False, "bindings": 0},
    )
    assert (await http(hb, "PUT", "/api/exchanges/h-x", json={"type": "topic"}))[0] == 200
    status, err = await http(hb, "PUT", "/api/exchanges/h-x", json={"type": "fanout"})
    assert status == 409 and err["error"]["name"] == "precondition-failed"
    assert (await http(hb, "PUT", "/api/queues/h-q"))[0] == 201
    status, b = await http(
        hb, "POST", "/api/bindings", json={"exchange": "h-x", "queue": "h-q", "routing_key": "a.*"}
    )
    assert (status, b) == (201, {"exchange": "h-x", "queue": "h-q", "routing_key": "a.*"})
    assert (
        await http(
            hb,
            "POST",
            "/api/bindings",
            json={"exchange": "h-x", "queue": "h-q", "routing_key": "a.*"},
        )
    )[0] == 200
    assert (await http(hb, "POST", "/api/bindings", json={"exchange": "h-x", "queue": "h-q"}))[
        0
    ] == 201  # key ""
    _s, listed = await http(hb, "GET", "/api/bindings")
    assert {"exchange": "h-x", "queue": "h-q", "routing_key": "a.*"} in listed
    conn = await connect(hb.url)
    try:
        await conn.publish("h-x", "a.b", b"routed")
        info = await queue_info(conn, "h-q")
        assert info is not None and info["messages"] == 1
    finally:
        await conn.close()
    # Bad inputs: typed 4xx, never 500.
    for method, path, body, want in [
        ("PUT", "/api/exchanges/h-y", {"type": "nope"}, 400),
        ("PUT", "/api/exchanges/h-y", {"durable": "yes"}, 400),
        ("PUT", "/api/exchanges/h-y", {"type": 3}, 400),
        ("PUT", "/api/exchanges/h-y", {"what": 1}, 400),
        ("PUT", "/api/exchanges/h-y", {"arguments": {"x": 1}}, 400),
        ("PUT", "/api/exchanges/amq.mine", {}, 403),
        ("PUT", "/api/exchanges/" + "x" * 256, {}, 400),
        ("DELETE", "/api/exchanges/amq.topic", None, 403),
        ("DELETE", "/api/exchanges/h-missing", None, 404),
        ("DELETE", "/api/exchanges/h-x?if_unused=maybe", None, 400),
        ("DELETE", "/api/exchanges/h-x?if_unused=true", None, 409),
        ("POST", "/api/bindings", {"exchange": "h-x"}, 400),
        ("POST", "/api/bindings", {"exchange": "h-x", "queue": 1}, 400),
        ("POST", "/api/bindings", {"exchange": "h-x", "queue": "h-q", "routing_key": None}, 400),
        ("POST", "/api/bindings", {"exchange": "h-x", "queue": "h-q", "x": 1}, 400),
        ("POST", "/api/bindings", {"exchange": "h-x", "queue": "nope"}, 404),
        ("POST", "/api/bindings", {"exchange": "nope", "queue": "h-q"}, 404),
        ("POST", "/api/bindings", {"exchange": "", "queue": "h-q"}, 400),
        ("POST", "/api/bindings", None, 400),
        ("DELETE", "/api/bindings", {"exchange": "h-x", "queue": "h-q", "routing_key": "zz"}, 404),
        ("DELETE", "/api/bindings/nope/h-q/k", None, 404),
    ]:
        status, err = await http(hb, method, path, json=body)
        assert status == want, (method, path, body, status, err)
        assert isinstance(err, dict) and err["error"]["code"] >= 400, err
    # Unbind both ways: the body form and the path form (empty key: trailing slash).
    status, b = await http(
        hb,
        "DELETE",
        "/api/bindings",
        json={"exchange": "h-x", "queue": "h-q", "routing_key": "a.*"},
    )
    assert (status, b["routing_key"]) == (200, "a.*")
    assert (await http(hb, "DELETE", "/api/bindings/h-x/h-q/"))[0] == 200
    _s, listed = await http(hb, "GET", "/api/bindings")
    assert [x for x in listed if x["exchange"] == "h-x"] == []
    status, body = await http(hb, "DELETE", "/api/exchanges/h-x?if_unused=true")
    assert (status, body) == (200, {"exchange": "h-x"})
    _s, exchanges = await http(hb, "GET", "/api/exchanges")
    assert "h-x" not in [e["name"] for e in exchanges]


async def test_durable_exchange_and_binding_from_http_survive_a_restart(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory("--http-port", "0")
    assert (await http(b, "PUT", "/api/exchanges/d-x", json={"type": "fanout"}))[0] == 201
    assert (await http(b, "PUT", "/api/queues/d-q"))[0] == 201
    assert (await http(b, "POST", "/api/bindings", json={"exchange": "d-x", "queue": "d-q"}))[
        0
    ] == 201
    b.kill()  # kill -9: the answers above waited for the log
    b.start()
    _s, exchanges = await http(b, "GET", "/api/exchanges")
    assert {
        "name": "d-x",
        "type": "fanout",
        "durable": True,
        "auto_delete": False,
        "bindings": 1,
    } in exchanges
    _s, bindings = await http(b, "GET", "/api/bindings")
    assert {"exchange": "d-x", "queue": "d-q", "routing_key": ""} in bindings


async def test_queue_arguments_on_create_and_messages_is_the_ready_count(hb: BrokerProcess) -> None:
    args = {
        "max_length": 5,
        "overflow": "reject-publish",
        "message_ttl_ms": 60000,
        "dead_letter_exchange": "amq.fanout",
        "max_priority": 4,
        "single_active_consumer": True,
        "delivery_limit": 3,
    }
    status, q = await http(hb, "PUT", "/api/queues/a-q", json={"arguments": args})
    assert status == 201 and q["arguments"] == args
    assert q["settings"]["max_length"] == 5 and q["settings"]["overflow"] == "reject-publish"
    status, err = await http(
        hb, "PUT", "/api/queues/a-bad", json={"arguments": {"max_priority": "high"}}
    )
    assert status == 400, err
    status, err = await http(hb, "PUT", "/api/queues/a-bad2", json={"arguments": {"zz": 1}})
    assert status == 400, err
    conn = await connect(hb.url)
    try:
        for i in range(3):
            await conn.publish("", "a-q", f"m{i}".encode())
        consumer = await conn.consume("a-q", prefetch=1)
        await take(consumer, 1)
        _s, q = await http(hb, "GET", "/api/queues/a-q")
        # One name for depth: messages is the ready count (as in LIST and mq-cli).
        assert (q["messages"], q["ready"], q["unacked"]) == (2, 2, 1)
    finally:
        await conn.close()


async def test_connections_blocked_is_a_boolean_with_a_reason(hb: BrokerProcess) -> None:
    conn = await connect(hb.url, name="flag")
    try:
        _s, [c] = await http(hb, "GET", "/api/connections")
        assert c["blocked"] is False and c["blocked_reason"] == ""
    finally:
        await conn.close()


async def test_queue_history_from_the_broker(hb: BrokerProcess) -> None:
    """The broker keeps depth samples: a queue that existed before the page opened has
    points at once, the newest being now."""
    from conveyor.broker.http.stats import HISTORY_INTERVAL

    conn = await connect(hb.url)
    try:
        await conn.declare_queue("h-depth")
        for i in range(4):
            await conn.publish("", "h-depth", f"m{i}".encode())

        async def two_points() -> bool:
            _s, h = await http(hb, "GET", "/api/queues/h-depth/history")
            return len(h["samples"]) >= 2

        await wait_until(two_points, timeout=5, interval=0.3)
        status, h = await http(hb, "GET", "/api/queues/h-depth/history")
        assert status == 200 and h["queue"] == "h-depth"
        assert h["interval_s"] == HISTORY_INTERVAL and h["max_samples"] >= 720
        t = [s["t"] for s in h["samples"]]
        assert t == sorted(t)
        assert h["samples"][-1]["messages"] == 4 and h["samples"][-1]["unacked"] == 0
        assert set(h["samples"][0]) == {"t", "messages", "unacked", "publish", "deliver", "ack"}
        status, err = await http(hb, "GET", "/api/queues/nope/history")
        assert status == 404 and err["error"]["name"] == "not-found"
    finally:
        await conn.close()


async def test_whoami(hb: BrokerProcess) -> None:
    status, me = await http(hb, "GET", "/api/whoami")
    assert (status, me) == (
        200,
        {
            "subject": "anonymous",
            "anonymous": True,
            "management": True,
            "expires_at": 0,
            "permissions": {"configure": ["*"], "write": ["*"], "read": ["*"]},
        },
    )
    token = await make_token(hb, "reader", "--read", "logs.*", "--write", "logs.in")
    status, me = await http(hb, "GET", "/api/whoami", token=token)
    assert status == 200 and me["subject"] == "reader" and me["anonymous"] is False
    assert me["management"] is False
    assert me["permissions"] == {"configure": [], "write": ["logs.in"], "read": ["logs.*"]}
    assert isinstance(me["expires_at"], int) and me["expires_at"] >= 0
    status, _err = await http(hb, "PUT", "/api/exchanges/logs.x", token=token)
    assert status == 403
