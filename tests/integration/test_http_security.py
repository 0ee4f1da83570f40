"""HTTP listener security against a real broker over 127.0.0.1: cross-site requests,
DNS rebinding (Host), the failed-auth throttle shared with the binary protocol, peek and
redrive permissions, forged x-death records, TLS, bounded and strict JSON."""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conveyor.cli.certs import generate
from conveyor.protocol import AuthenticationFailed
from tests.broker_process import BrokerProcess
from tests.integration.helpers import connect, queue_info, take, wait_until
from tests.integration.http_helpers import cli, http

pytestmark = pytest.mark.timeout(90)
ADMIN = ("--configure", "*", "--write", "*", "--read", "*")


async def make_token(b: BrokerProcess, subject: str, *args: str) -> str:
    p = await cli("token", "create", "--subject", subject, "--data-dir", str(b.data_dir), *args)
    assert p.returncode == 0, p.stderr
    return p.stdout.decode().strip()


async def raw(
    b: BrokerProcess,
    method: str,
    path: str,
    *,
    data: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """A request with exactly these headers (what a browser or a script would send)."""
    timeout = aiohttp.ClientTimeout(total=15)
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.request(
            method, f"http://127.0.0.1:{b.http_port}{path}", data=data, headers=headers or {}
        ) as r,
    ):
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


@pytest.fixture
def hb(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    b = broker_factory("--http-port", "0", "--http-allowed-hosts", "mq.test")
    assert b.http_port > 0
    return b


async def test_cross_site_requests_cannot_publish_or_purge(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        for name in ("victim", "bystander"):
            await conn.declare_queue(name)
            await conn.publish("", name, b"keep-1")
            await conn.publish("", name, b"keep-2")
        evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
        body = '{"message": "forged"}'
        status, err = await raw(hb, "POST", "/queues/victim/messages", data=body, headers=evil)
        assert status == 403 and err["error"]["details"]["reason"] == "origin", err
        status, err = await raw(hb, "POST", "/api/queues/victim/purge", headers=evil)
        assert status == 403 and err["error"]["name"] == "access-refused"
        # Even with the custom header and JSON, a foreign Origin is refused.
        status, _ = await raw(
            hb,
            "POST",
            "/api/queues/victim/purge",
            headers={"Origin": "https://evil.example", "X-Conveyor-Request": "1"},
        )
        assert status == 403
        # No Origin (a form from an old browser, a curl one-liner): still needs the header.
        status, err = await raw(hb, "POST", "/api/queues/victim/purge")
        assert status == 403 and err["error"]["details"]["reason"] == "csrf", err
        status, err = await raw(
            hb,
            "POST",
            "/queues/victim/messages",
            data=body,
            headers={"Content-Type": "text/plain", "X-Conveyor-Request": "1"},
        )
        assert status == 400 and err["error"]["details"]["reason"] == "content-type", err
        for name in ("victim", "bystander"):
            info = await queue_info(conn, name)
            assert info is not None and info["messages"] == 2, (name, info)
        # The dashboard's own requests (same origin, header, JSON) work.
        own = {
            "Origin": f"http://127.0.0.1:{hb.http_port}",
            "X-Conveyor-Request": "1",
            "Content-Type": "application/json",
        }
        status, _ = await raw(hb, "POST", "/queues/victim/messages", data=body, headers=own)
        assert status == 201
        status, res = await raw(hb, "POST", "/api/queues/victim/purge", headers=own)
        assert status == 200 and res["purged"] == 3
        info = await queue_info(conn, "bystander")
        assert info is not None and info["messages"] == 2
        # A token holder needs no custom header (a cross-site page has no token).
        admin = await make_token(hb, "admin", *ADMIN)
        status, res = await raw(
            hb, "POST", "/api/queues/bystander/purge", headers={"Authorization": f"Bearer {admin}"}
        )
        assert status == 200 and res["purged"] == 2
    finally:
        await conn.close()


async def test_dns_rebinding_host_is_refused_for_anonymous(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("secret")
        await conn.publish("", "secret", b"card 4111")
        for host in ("evil.example", f"evil.example:{hb.http_port}", "127.0.0.1.evil.example"):
            status, err = await raw(hb, "GET", "/api/queues/secret/peek", headers={"Host": host})
            assert status == 403 and err["error"]["details"]["reason"] == "host", (host, err)
            assert "card" not in json.dumps(err)
        status, err = await raw(
            hb, "GET", "/queues/secret/messages", headers={"Host": "evil.example"}
        )
        assert status == 403
        for host in (
            f"localhost:{hb.http_port}",
            "127.0.0.1",
            f"[::1]:{hb.http_port}",
            "mq.test",
            f"MQ.test:{hb.http_port}",
        ):
            status, body = await raw(hb, "GET", "/api/queues/secret/peek", headers={"Host": host})
            assert status == 200 and body["messages"][0]["body"] == "card 4111", host
        token = await make_token(hb, "ops", *ADMIN)
        status, _ = await raw(
            hb,
            "GET",
            "/api/queues/secret/peek",
            headers={"Host": "broker.corp", "Authorization": f"Bearer {token}"},
        )
        assert status == 200
        info = await queue_info(conn, "secret")
        assert info is not None and info["messages"] == 1
    finally:
        await conn.close()


async def _http_failure(b: BrokerProcess) -> float:
    t0 = time.monotonic()
    status, _ = await raw(
        b, "GET", "/api/overview", headers={"Authorization": "Bearer cvy1.bad.token"}
    )
    assert status == 401
    return time.monotonic() - t0


async def test_http_auth_failures_share_the_binary_throttle(hb: BrokerProcess) -> None:
    first = await _http_failure(hb)
    second = await _http_failure(hb)
    third = await _http_failure(hb)
    assert first >= 0.15
    assert second > first + 0.1 and third > second + 0.2, (first, second, third)
    # One score per address for both protocols: the next binary AUTH failure waits too.
    t0 = time.monotonic()
    with pytest.raises(AuthenticationFailed):
        await connect(hb.url, token="cvy1.bad.token")
    assert time.monotonic() - t0 > third
    # Others are not blocked meanwhile.
    slow = asyncio.create_task(_http_failure(hb))
    await asyncio.sleep(0.1)
    status, _ = await http(hb, "GET", "/api/overview")
    assert status == 200 and not slow.done()
    assert await slow > 1.0


async def test_peek_needs_read_on_the_queue(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("orders")
        await conn.publish("", "orders", b"private body")
        configure_only = await make_token(hb, "cfg", "--configure", "*")
        status, err = await http(hb, "GET", "/api/queues/orders/peek", token=configure_only)
        assert status == 403 and err["error"]["details"]["action"] == "read"
        assert "private body" not in json.dumps(err)
        status, _ = await http(hb, "GET", "/api/queues", token=configure_only)
        assert status == 200  # listing (no bodies) still works
        reader = await make_token(hb, "cfg-read", "--configure", "*", "--read", "orders")
        status, body = await http(hb, "GET", "/api/queues/orders/peek", token=reader)
        assert status == 200 and body["messages"][0]["body"] == "private body"
    finally:
        await conn.close()


async def test_redrive_checks_destination_and_ignores_forged_x_death(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    tenant = None
    try:
        await conn.declare_exchange("dlx", "direct")
        await conn.declare_queue("work.dlq")
        await conn.bind("dlx", "work.dlq", "work")
        await conn.declare_queue("work", dead_letter_exchange="dlx")
        await conn.declare_queue("payments")
        await conn.declare_queue("elsewhere")
        await conn.publish("", "work", b"job")
        consumer = await conn.consume("work")
        [m] = await take(consumer, 1)
        m.reject(requeue=False)
        await consumer.cancel()

        async def dead() -> bool:
            info = await queue_info(conn, "work.dlq")
            return info is not None and info["messages"] == 1

        await wait_until(dead)
        # A client that may only write work.dlq forges a record naming payments.
        writer = await make_token(hb, "tenant", "--write", "work.dlq")
        tenant = await connect(hb.url, token=writer)
        forged = {
            "x-death": [
                {
                    "queue": "payments",
                    "reason": "rejected",
                    "count": 1,
                    "exchange": "",
                    "routing_key": "payments",
                }
            ]
        }
        await tenant.publish("", "work.dlq", b"forged", headers=forged)

        async def two() -> bool:
            info = await queue_info(conn, "work.dlq")
            return info is not None and info["messages"] == 2

        await wait_until(two)
        # A requester without write on a destination cannot move messages there.
        limited = await make_token(
            hb, "ops", "--configure", "*", "--read", "work.dlq", "--write", "work"
        )
        status, err = await http(
            hb, "POST", "/api/queues/work.dlq/redrive", params={"to": "elsewhere"}, token=limited
        )
        assert status == 403 and err["error"]["details"]["action"] == "write"
        admin = await make_token(hb, "admin", *ADMIN)
        status, body = await http(hb, "POST", "/api/queues/work.dlq/redrive", token=admin)
        assert status == 200 and (body["moved"], body["skipped"]) == (1, 1), body
        for name, n in (("payments", 0), ("work", 1), ("work.dlq", 1), ("elsewhere", 0)):
            info = await queue_info(conn, name)
            assert info is not None and info["messages"] == n, (name, info)
        status, peek = await http(hb, "GET", "/api/queues/work.dlq/peek")
        assert [p["body"] for p in peek["messages"]] == ["forged"]
    finally:
        if tenant is not None:
            await tenant.close()
        await conn.close()


async def test_redrive_by_x_death_needs_write_on_each_destination(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_exchange("dlx", "direct")
        await conn.declare_queue("a.dlq")
        for src in ("a1", "a2"):
            await conn.bind("dlx", "a.dlq", src)
            await conn.declare_queue(src, dead_letter_exchange="dlx")
            await conn.publish("", src, src.encode())
            consumer = await conn.consume(src)
            [m] = await take(consumer, 1)
            m.reject(requeue=False)
            await consumer.cancel()

        async def dead() -> bool:
            info = await queue_info(conn, "a.dlq")
            return info is not None and info["messages"] == 2

        await wait_until(dead)
        only_a1 = await make_token(
            hb, "ops", "--configure", "*", "--read", "a.dlq", "--write", "a1"
        )
        status, body = await http(hb, "POST", "/api/queues/a.dlq/redrive", token=only_a1)
        assert status == 200 and (body["moved"], body["skipped"]) == (1, 1), body
        assert any("may not write queue 'a2'" in r for r in body["reasons"])
        for name, n in (("a1", 1), ("a2", 0), ("a.dlq", 1)):
            info = await queue_info(conn, name)
            assert info is not None and info["messages"] == n, (name, info)
    finally:
        await conn.close()


async def test_deeply_nested_json_is_a_typed_400(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("deep")
        hdr = {"X-Conveyor-Request": "1", "Content-Type": "application/json"}
        for data in (
            "[" * 100_000,
            '{"message": "x", "headers": {"h": ' + "[" * 100_000 + "]" * 100_000 + "}}",
            '{"message": "x", "headers": {"h": ' + "[" * 40 + "]" * 40 + "}}",
        ):
            status, err = await raw(hb, "POST", "/queues/deep/messages", data=data, headers=hdr)
            assert status == 400, (status, str(err)[:200])
            assert err["error"]["name"] == "invalid-argument"
            assert err["error"]["details"]["limit"] == "max_json_depth"
        status, err = await raw(hb, "PUT", "/api/queues/deeper", data="{" * 50_000, headers=hdr)
        assert status == 400 and err["error"]["code"] == 400
        # Brackets inside strings are text, not nesting.
        status, _ = await raw(
            hb,
            "POST",
            "/queues/deep/messages",
            headers=hdr,
            data=json.dumps({"message": "[" * 1000 + '\\"{' * 100}),
        )
        assert status == 201
        assert "Traceback" not in hb.log_text() and "RecursionError" not in hb.log_text()
        info = await queue_info(conn, "deep")
        assert info is not None and info["messages"] == 1
    finally:
        await conn.close()


def _strict(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


async def test_non_finite_numbers_never_make_invalid_json(hb: BrokerProcess) -> None:
    conn = await connect(hb.url)
    try:
        await conn.declare_queue("floats")
        hdr = {"X-Conveyor-Request": "1", "Content-Type": "application/json"}
        for const in ("NaN", "Infinity", "-Infinity"):
            status, err = await raw(
                hb,
                "POST",
                "/queues/floats/messages",
                headers=hdr,
                data=f'{{"message": "x", "headers": {{"f": {const}}}}}',
            )
            assert status == 400 and err["error"]["name"] == "invalid-argument", const
        # The binary protocol carries them (msgpack floats): peek and receive stay JSON.
        await conn.publish(
            "",
            "floats",
            b"m",
            headers={"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "ok": 1.5},
        )
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            for path in ("/api/queues/floats/peek", "/queues/floats/messages"):
                async with s.get(f"{hb.http_url}{path}") as r:
                    assert r.status == 200
                    body = _strict(await r.text())
                key = "messages"
                headers = body[key][0]["properties"]["headers"]
                assert headers == {"nan": "NaN", "inf": "Infinity", "ninf": "-Infinity", "ok": 1.5}
    finally:
        await conn.close()


async def test_http_listener_over_tls(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    generate(certs)
    b = broker_factory(
        "--http-port",
        "0",
        "--http-tls",
        "--tls-port",
        "0",
        "--tls-cert",
        str(certs / "server.pem"),
        "--tls-key",
        str(certs / "server.key"),
    )
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.get(f"https://127.0.0.1:{b.http_port}/api/overview", ssl=ctx) as r:
            assert r.status == 200 and (await r.json())["product"] == "conveyor"
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"http://127.0.0.1:{b.http_port}/api/overview") as r:
                await r.read()
    p = await cli(
        "server", "--data-dir", str(tmp_path / "x"), "--http-port", "0", "--http-tls", timeout=30
    )
    assert p.returncode == 2 and b"http_tls needs tls_cert" in p.stderr
