"""Token authentication and permissions end to end: mq-cli token create/inspect/revoke, the
broker's AUTH (signature, expiry, revocation, the loopback rule, --require-auth), the
failed-AUTH slowdown and per-resource permission checks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conveyor import client
from conveyor.broker.auth import key_path, load_key, load_or_create_key, new_claims, sign_token
from conveyor.protocol import AccessRefused, AuthenticationFailed
from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.integration.helpers import WAIT, connect, non_loopback_ip, take, wait_until

pytestmark = pytest.mark.timeout(90)

CLI = [sys.executable, "-m", "conveyor.cli.main"]


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in ("CONVEYOR_URL", "CONVEYOR_TOKEN", "MQ_TOKEN"):
        env.pop(k, None)
    return subprocess.run([*CLI, *args], capture_output=True, timeout=timeout, env=env, check=False)


def make_token(b: BrokerProcess, subject: str, *args: str) -> str:
    p = cli("token", "create", "--subject", subject, "--data-dir", str(b.data_dir), *args)
    assert p.returncode == 0, p.stderr
    token = p.stdout.decode().strip()
    assert token.startswith("cvy1.") and token.count(".") == 2
    return token


ADMIN = ("--configure", "*", "--write", "*", "--read", "*")


async def closing(conn: client.Connection) -> None:
    await asyncio.wait_for(conn.close(), WAIT)


async def test_anonymous_from_loopback_by_default(broker: BrokerProcess) -> None:
    conn = await connect(broker.url)
    try:
        await conn.declare_queue("anon-q")
        await conn.publish("", "anon-q", b"x")
    finally:
        await closing(conn)
    assert "loopback peers only" in broker.log_text()
    assert key_path(broker.data_dir).exists()  # created on first start


async def test_permissions_follow_the_token(broker: BrokerProcess) -> None:
    admin_token = make_token(broker, "admin", *ADMIN)
    admin = await connect(f"mq://{admin_token}@127.0.0.1:{broker.port}")  # token in the URL
    shop = await connect(
        broker.url,
        token=make_token(
            broker,
            "shop",
            "--write",
            "orders.*",
            "--write",
            "shop-*",
            "--read",
            "shop-*",
            "--configure",
            "shop-*",
        ),
    )
    try:
        for ex in ("orders.eu", "billing"):
            await admin.declare_exchange(ex, "fanout")
        await admin.declare_queue("orders-all")
        await admin.bind("orders.eu", "orders-all")
        await admin.declare_queue("secret")

        await shop.publish("orders.eu", "", b"order 1")  # write on orders.*
        with pytest.raises(AccessRefused) as info:
            await shop.publish("billing", "", b"invoice")
        assert info.value.code == 403
        assert "billing" in info.value.message and "write" in info.value.message
        # The refusal failed one publish, not the connection; decisions are cached per
        # exchange, so asking again gives the same answers.
        await shop.publish("orders.eu", "", b"order 2")
        with pytest.raises(AccessRefused):
            await shop.publish("billing", "", b"invoice")
        # Default exchange: write on the queue the routing key names.
        with pytest.raises(AccessRefused, match="queue 'orders-all'"):
            await shop.publish("", "orders-all", b"direct")
        # configure / read / bind.
        with pytest.raises(AccessRefused, match=r"configure exchange 'orders\.us'"):
            await shop.declare_exchange("orders.us")
        with pytest.raises(AccessRefused, match="read queue 'orders-all'"):
            await shop.consume("orders-all")
        with pytest.raises(AccessRefused):
            await shop.get("secret")
        with pytest.raises(AccessRefused):
            await shop.purge("secret")
        with pytest.raises(AccessRefused):
            await shop.delete_queue("secret")
        await shop.declare_queue("shop-inbox")  # configure on shop-*
        with pytest.raises(AccessRefused, match=r"read exchange 'orders\.eu'"):
            await shop.bind("orders.eu", "shop-inbox")  # write on shop-inbox, no read on it
        await admin.bind("orders.eu", "shop-inbox")
        with pytest.raises(AccessRefused, match=r"read exchange 'orders\.eu'"):
            await shop.unbind("orders.eu", "shop-inbox")
        consumer = await shop.consume("shop-inbox")  # read on shop-*
        await admin.publish("", "shop-inbox", b"for the shop")
        [msg] = await take(consumer, 1)
        assert msg.body == b"for the shop"
        msg.ack()
        # Listings show only what the token may touch.
        assert {q["name"] for q in await shop.list("queues")} == {"shop-inbox"}
        assert {q["name"] for q in await admin.list("queues")} >= {"orders-all", "secret"}

        got = await admin.get("orders-all", 10)
        assert [m.body for m in got] == [b"order 1", b"order 2"]
        for m in got:
            m.ack()
    finally:
        await closing(shop)
        await closing(admin)


async def test_expired_and_revoked_tokens_cannot_connect(broker: BrokerProcess) -> None:
    key = load_key(key_path(broker.data_dir))
    expired = sign_token(key, new_claims("old", 60, write=("*",), now=time.time() - 3600))
    with pytest.raises(AuthenticationFailed) as info:
        await connect(broker.url, token=expired)
    assert info.value.code == 401 and "expired" in info.value.message

    token = make_token(broker, "soon-revoked", *ADMIN)
    conn = await connect(broker.url, token=token)
    p = cli("token", "revoke", token, "--data-dir", str(broker.data_dir))
    assert p.returncode == 0 and p.stdout.startswith(b"revoked "), p.stderr
    with pytest.raises(AuthenticationFailed) as info:
        await connect(broker.url, token=token)
    assert info.value.code == 401 and "revoked" in info.value.message
    try:  # revocation also closes the connection already open (within about a second)
        await wait_until(lambda: not conn.is_open, timeout=5, interval=0.1)
        with pytest.raises(client.ConnectionClosed):
            await conn.declare_queue("closed-by-revocation")
    finally:
        await closing(conn)

    forged_key = load_or_create_key(broker.data_dir.parent / "forger.key")  # not the broker's
    with pytest.raises(AuthenticationFailed, match="signature"):
        await connect(broker.url, token=sign_token(forged_key, new_claims("x", 60, read=("*",))))
    with pytest.raises(AuthenticationFailed, match="malformed"):
        await connect(broker.url, token="not-a-token")


async def test_require_auth_refuses_anonymous(broker_factory: Callable[..., BrokerProcess]) -> None:
    b = broker_factory("--require-auth")
    with pytest.raises(AuthenticationFailed) as info:
        await connect(b.url)
    assert info.value.code == 401 and "requires a token" in info.value.message
    conn = await connect(b.url, token=make_token(b, "svc", *ADMIN))
    await closing(conn)
    # mq-cli: the same refusal as one line, status 1; --token fixes it.
    p = cli("queues", "--url", b.url)
    assert p.returncode == 1 and b"authentication-failed (401)" in p.stderr
    p = cli("queues", "--url", b.url, "--token", make_token(b, "cli", "--read", "*"))
    assert p.returncode == 0, p.stderr


async def _attempt(url: str, token: str) -> float:
    t0 = time.monotonic()
    with pytest.raises(AuthenticationFailed):
        await connect(url, token=token)
    return time.monotonic() - t0


async def test_repeated_failures_are_slowed_down(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory()
    good = make_token(b, "svc", *ADMIN)
    first = await _attempt(b.url, "cvy1.bad.token")
    second = await _attempt(b.url, "cvy1.bad.token")
    third = await _attempt(b.url, "cvy1.bad.token")
    assert first >= 0.15
    assert second > first + 0.1 and third > second + 0.2, (first, second, third)

    # The delay does not block the broker: others connect at once meanwhile.
    slow = asyncio.create_task(_attempt(b.url, "cvy1.bad.token"))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    conn = await connect(b.url, token=good)
    assert time.monotonic() - t0 < 0.5
    await closing(conn)
    assert await slow > 1.0


async def test_non_loopback_listener_requires_tokens_from_other_hosts(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory("--host", "0.0.0.0")
    assert "non-loopback" in b.log_text()
    conn = await connect(b.url)  # loopback peer: still anonymous
    await closing(conn)
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("no non-loopback address to connect from")
    with pytest.raises(AuthenticationFailed, match="loopback"):
        await connect(f"mq://{ip}:{b.port}")
    conn = await connect(f"mq://{ip}:{b.port}", token=make_token(b, "remote", *ADMIN))
    await closing(conn)


async def test_allow_anonymous_is_loud(broker_factory: Callable[..., BrokerProcess]) -> None:
    b = broker_factory("--host", "0.0.0.0", "--allow-anonymous")
    assert "ANONYMOUS ACCESS FROM ANY ADDRESS" in b.log_text()
    ip = non_loopback_ip()
    if ip is not None:
        conn = await connect(f"mq://{ip}:{b.port}")
        await closing(conn)


def test_token_cli(tmp_path: Path) -> None:
    data = tmp_path / "data"
    p = cli(
        "token",
        "create",
        "-s",
        "ci",
        "--write",
        "a.*",
        "--read",
        "q1",
        "--read",
        "q2",
        "--ttl",
        "2h",
        "--rate-messages",
        "100",
        "--burst",
        "10",
        "--data-dir",
        str(data),
    )
    assert p.returncode == 0 and p.stderr == b"", p.stderr
    token = p.stdout.decode().strip()
    key = data / "auth" / "signing.key"
    assert key.exists() and (key.stat().st_mode & 0o077) == 0

    p = cli("token", "inspect", token, "--data-dir", str(data))
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["status"] == "valid" and info["signature"] == "valid"
    assert not info["expired"] and not info["revoked"]
    c = info["claims"]
    assert c["sub"] == "ci" and c["exp"] - c["iat"] == 7200
    assert c["perms"] == {"configure": [], "write": ["a.*"], "read": ["q1", "q2"]}
    assert c["rate"] == {"messages": 100.0, "burst": 10}

    # --key: the same key by path; another key says the signature is invalid.
    assert cli("token", "inspect", token, "--key", str(key)).returncode == 0
    other = tmp_path / "other.key"
    assert cli("token", "create", "-s", "x", "--key", str(other)).returncode == 0
    p = cli("token", "inspect", token, "--key", str(other))
    assert p.returncode == 1 and json.loads(p.stdout)["status"] == "bad-signature"

    p = cli("token", "revoke", "--jti", c["jti"], "--data-dir", str(data))
    assert p.returncode == 0
    assert (data / "auth" / "revoked").read_text().split() == [c["jti"]]
    p = cli("token", "inspect", token, "--data-dir", str(data))
    assert p.returncode == 1 and json.loads(p.stdout)["status"] == "revoked"

    for args in (["inspect", "garbage"], ["revoke", "garbage"]):
        p = cli("token", *args, "--data-dir", str(data))
        assert p.returncode == 1 and b"malformed" in p.stderr and b"Traceback" not in p.stderr
    p = cli("token", "create", "-s", "x", "--ttl", "soon", "--data-dir", str(data))
    assert p.returncode == 2 and b"duration" in p.stderr
    p = cli("token", "revoke", "--data-dir", str(data))
    assert p.returncode == 2


def test_wire_level_hello_and_publish_refusals(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """Raw frames: HELLO offers only "token" under --require-auth; a refused publish is a
    403 nack when confirmed (seq > 0) and ERROR(rid 0, 403) when not."""
    b = broker_factory("--require-auth")
    admin = make_token(b, "admin", *ADMIN)
    with wire.Conn(b.port) as c:
        c.handshake("token", admin, {"library": "raw"}, 0, 0)
        assert c.hello["auth_mechanisms"] == ["token"]
        assert c.request("exchange_declare", 1, "billing", "fanout").kind == "ok"
    shop = make_token(b, "shop", "--write", "orders.*")
    with wire.Conn(b.port) as c:
        c.handshake("token", shop, {"library": "raw"}, 0, 0)
        c.send_frame("publish", 7, "billing", "", {}, b"x")
        f = c.expect("confirm", first_seq=7, last_seq=7, ack=False, code=403)
        assert "billing" in f["message"]
        c.send_frame("publish", 0, "billing", "", {}, b"x")
        err = c.expect_error(403, rid=0)
        assert err["details"] == {"exchange": "billing", "action": "write"}
        reply = c.request("queue_declare", 2, "mine", False, False, True)
        assert (reply.kind, reply["code"]) == ("error", 403)  # still open: a request error
    with wire.Conn(b.port) as c:
        c.send(wire.PREAMBLE)
        c.expect("hello")
        c.send_frame("auth", "anonymous", "", {}, 0, 0)
        err = c.expect_fatal(wire.code("authentication-failed"))
        assert err["details"]["reason"] == "anonymous-refused"
