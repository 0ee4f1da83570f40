"""Tenancy against a real broker over 127.0.0.1: queue and connection quotas per subject,
a token's rate shared by all its connections, and tokens that expire or are revoked while
their connections are open."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conveyor import client
from conveyor.cli.certs import generate
from conveyor.protocol import AccessRefused, AuthenticationFailed, ResourceError
from tests.broker_process import LISTEN_RE, BrokerProcess
from tests.conformance import wire
from tests.integration.helpers import WAIT, connect, queue_info, take, wait_until
from tests.integration.http_helpers import cli, http

pytestmark = pytest.mark.timeout(90)
ADMIN = ("--configure", "*", "--write", "*", "--read", "*")


async def make_token(b: BrokerProcess, subject: str, *args: str) -> str:
    p = await cli("token", "create", "--subject", subject, "--data-dir", str(b.data_dir), *args)
    assert p.returncode == 0, p.stderr
    return p.stdout.decode().strip()


async def test_queue_quota_is_per_subject(broker_factory: Callable[..., BrokerProcess]) -> None:
    b = broker_factory("--max-queues-per-subject", "3")
    greedy = await connect(b.url, token=await make_token(b, "greedy", *ADMIN))
    other = await connect(b.url, token=await make_token(b, "other", *ADMIN))
    anon = await connect(b.url)
    try:
        for i in range(3):
            await greedy.declare_queue(f"g{i}")
        with pytest.raises(ResourceError) as info:
            await greedy.declare_queue("g3")
        assert info.value.details["limit"] == "max_queues_per_subject"
        assert info.value.details["subject"] == "greedy"
        # Another connection of the same subject shares the quota.
        again = await connect(b.url, token=await make_token(b, "greedy", *ADMIN))
        with pytest.raises(ResourceError):
            await again.declare_queue("g4")
        await again.close()
        # Bystanders are unaffected; redeclaring an existing queue is not a new one.
        for i in range(3):
            await other.declare_queue(f"o{i}")
        await anon.declare_queue("anon-q")
        await greedy.declare_queue("g0")
        # Deleting one frees a slot, whoever deletes it.
        await other.delete_queue("g1")
        await greedy.declare_queue("g3")
        assert await queue_info(anon, "g3") is not None
    finally:
        for c in (greedy, other, anon):
            await asyncio.wait_for(c.close(), WAIT)


def _anonymous_from(port: int, source_ip: str) -> wire.Frame:
    """Handshake from ``source_ip`` (a loopback address) with AUTH anonymous; the
    server's answer (OPEN_OK or ERROR)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source_ip, 0))
    try:
        dec = wire.Decoder(wire.MAX_FRAME_SIZE_CEILING, "server")
        sock.sendall(wire.PREAMBLE)
        frames: list[wire.Frame] = []
        deadline = time.monotonic() + 5
        sent_auth = False
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            frames.extend(dec.feed(data))
            kinds = [f.kind for f in frames]
            if "hello" in kinds and not sent_auth:
                sock.sendall(wire.encode("auth", "anonymous", "", {}, 0, 0))
                sent_auth = True
            for f in frames:
                if f.kind in ("open_ok", "error"):
                    return f
        raise AssertionError(f"no answer to AUTH: {frames}")
    finally:
        sock.close()


async def test_anonymous_connection_quota_is_per_address(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory("--max-connections-per-subject", "3")
    flood = [await connect(b.url) for _ in range(3)]
    token_conn = None
    try:
        f = await asyncio.to_thread(_anonymous_from, b.port, "127.0.0.1")
        assert f.kind == "error" and f["code"] == 506, f
        assert f["details"]["limit"] == "max_connections_per_subject"
        # Another loopback address and token holders are not locked out by the flood.
        f = await asyncio.to_thread(_anonymous_from, b.port, "127.0.0.2")
        assert f.kind == "open_ok", f
        token_conn = await connect(b.url, token=await make_token(b, "svc", *ADMIN))
        await token_conn.declare_queue("still-works")
        await flood[0].close()
        f = await asyncio.to_thread(_anonymous_from, b.port, "127.0.0.1")
        assert f.kind == "open_ok", f
    finally:
        for c in [*flood, *([token_conn] if token_conn else [])]:
            await asyncio.wait_for(c.close(), WAIT)


# Run by another local user with the system interpreter (no third-party modules): send
# the preamble, wait for HELLO, send AUTH, print what the broker answered (hex).
_CLIENT = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(bytes.fromhex(sys.argv[2]))
got = s.recv(65536)
s.sendall(bytes.fromhex(sys.argv[3]))
s.settimeout(1.0)
try:
    while True:
        more = s.recv(65536)
        if not more:
            break
        got += more
except OSError:
    pass
print(got.hex())
"""


def _anonymous_as(uid: int, port: int) -> list[str]:
    """The frame kinds the broker sends an anonymous client run as local user ``uid``."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 to run a client as another user")
    auth = wire.encode("auth", "anonymous", "", {}, 0, 0)
    cmd = [python, "-c", _CLIENT, str(port), wire.PREAMBLE.hex(), auth.hex()]
    p = subprocess.run(cmd, capture_output=True, timeout=20, user=uid, group=uid, check=False)
    if p.returncode != 0:
        pytest.skip(f"cannot run a client as uid {uid}: {p.stderr.decode()[-300:]}")
    dec = wire.Decoder(wire.MAX_FRAME_SIZE_CEILING, "server")
    return [f.kind for f in dec.feed(bytes.fromhex(p.stdout.decode().strip()))]


async def test_anonymous_connection_quota_is_per_local_user(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another user")
    nobody = 65534
    b = broker_factory("--max-connections-per-subject", "2")
    flood = [await connect(b.url) for _ in range(2)]  # this user's quota is full
    try:
        f = await asyncio.to_thread(_anonymous_from, b.port, "127.0.0.1")
        assert f.kind == "error" and f["code"] == 506, f
        assert f["details"]["subject"] == f"anonymous@127.0.0.1/uid:{os.getuid()}"
        # Another local user, same address: not locked out.
        kinds = await asyncio.to_thread(_anonymous_as, nobody, b.port)
        assert "open_ok" in kinds and "error" not in kinds, kinds
    finally:
        for c in flood:
            await asyncio.wait_for(c.close(), WAIT)


async def _publish_all(conn: client.Connection, queue: str, n: int) -> float:
    t0 = time.monotonic()
    assert (
        await conn.publish_batch([b"r%d" % i for i in range(n)], routing_key=queue, timeout=40) == n
    )
    return time.monotonic() - t0


async def test_token_rate_holds_across_its_connections(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory()
    rate = ("--write", "*", "--configure", "*", "--rate-messages", "500", "--burst", "100")
    tenant = await make_token(b, "tenant", *rate)
    other = await make_token(b, "other", *rate)
    admin = await connect(b.url)
    conns = [await connect(b.url, token=tenant, timeout=30) for _ in range(4)]
    bystander = await connect(b.url, token=other, timeout=30)
    try:
        await admin.declare_queue("rated", durable=False)
        await admin.declare_queue("other-q", durable=False)
        start = time.monotonic()
        tasks = [asyncio.create_task(_publish_all(c, "rated", 500)) for c in conns]
        by = await _publish_all(bystander, "other-q", 500)
        # The other subject has its own bucket: done while the tenant is still limited.
        assert not all(t.done() for t in tasks), by
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
        # 2,000 messages at 500/s with a burst of 100 need at least 3.8 s in total
        # (per-connection buckets finished in about 0.8 s).
        assert elapsed >= 3.0, f"4 connections of one token took {elapsed:.2f}s"
        info = await queue_info(admin, "rated")
        assert info is not None and info["messages"] == 2000
        # Once they close, the shared bucket goes; a new connection starts afresh.
        for c in conns:
            await c.close()
        conns = []
        again = await connect(b.url, token=tenant)
        assert await _publish_all(again, "rated", 50) < 5
        await again.close()
    finally:
        for c in (*conns, admin, bystander):
            await asyncio.wait_for(c.close(), WAIT)


async def _closed_for(consumer: client.Consumer, timeout: float) -> client.ConnectionClosed:
    """The error a consumer waiting on an empty queue gets when the broker closes its
    connection (fails if it is still open after ``timeout``)."""
    with pytest.raises(client.ConnectionClosed) as info:
        got = await consumer.get(timeout)
        raise AssertionError(f"connection still open after {timeout}s (got {got!r})")
    return info.value


async def test_expired_token_closes_its_open_connection(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory()
    short = await make_token(b, "short", *ADMIN, "--ttl", "3s")
    long_ = await make_token(b, "long", *ADMIN)
    conn = await connect(b.url, token=short)
    bystander = await connect(b.url, token=long_)
    anon = await connect(b.url)
    try:
        await anon.declare_queue("exp-q")
        await conn.publish("", "exp-q", b"before")
        consumer = await conn.consume("exp-q", prefetch=1)
        [m] = await take(consumer, 1)  # left unacked: must return to the queue
        assert m.body == b"before"
        exc = await _closed_for(consumer, timeout=8)
        assert exc.details.get("code") == 401 and "expired" in exc.message, exc
        await bystander.publish("", "exp-q", b"bystander")
        await anon.publish("", "exp-q", b"anon")

        async def back() -> bool:
            info = await queue_info(anon, "exp-q")
            return info is not None and info["messages"] == 3 and info["consumers"] == 0

        await wait_until(back)
        assert "expired" in b.log_text()
    finally:
        for c in (conn, bystander, anon):
            await asyncio.wait_for(c.close(), WAIT)


async def test_revoked_token_closes_its_open_connections(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory()
    bad = await make_token(b, "leaked", *ADMIN)
    good = await make_token(b, "fine", *ADMIN)
    victims = [await connect(b.url, token=bad) for _ in range(2)]
    bystander = await connect(b.url, token=good)
    try:
        await bystander.declare_queue("rev-q")
        await bystander.declare_queue("rev-idle")
        await victims[0].publish("", "rev-q", b"ok")
        consumers = [await v.consume("rev-idle") for v in victims]
        inspect = await cli("token", "inspect", bad, "--data-dir", str(b.data_dir))
        jti = json.loads(inspect.stdout)["claims"]["jti"]
        p = await cli("token", "revoke", "--jti", jti, "--data-dir", str(b.data_dir))
        assert p.returncode == 0, p.stderr
        for consumer in consumers:
            exc = await _closed_for(consumer, timeout=6)
            assert exc.details.get("code") == 401 and "revoked" in exc.message, exc
        await bystander.publish("", "rev-q", b"still fine")
        info = await queue_info(bystander, "rev-q")
        assert info is not None and info["messages"] >= 2
    finally:
        for c in (*victims, bystander):
            await asyncio.wait_for(c.close(), WAIT)


async def test_client_certificate_subject_is_the_identity(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    generate(certs, client_name="billing")
    tls = ["--tls-port", "0", "--tls-cert", str(certs / "server.pem"),
           "--tls-key", str(certs / "server.key"), "--tls-ca", str(certs / "ca.pem"),
           "--tls-client-subject-identity"]  # fmt: skip
    ids = tmp_path / "identities.toml"
    ids.write_text('[identities.billing]\nconfigure = ["billing.*"]\n'
                   'write = ["billing.*"]\nread = ["billing.*"]\n')  # fmt: skip
    b = broker_factory(*tls, "--tls-identities", str(ids), "--max-queues-per-subject", "2")
    files = {"ca": str(certs / "ca.pem"), "cert": str(certs / "client.pem"),
             "key": str(certs / "client.key")}  # fmt: skip
    conn = await connect(b.tls_url, **files)
    anon = await connect(b.url)
    try:
        await conn.declare_queue("billing.in")
        await conn.publish("", "billing.in", b"invoice")
        # The certificate's entry applies, not the anonymous loopback rights.
        with pytest.raises(AccessRefused):
            await conn.declare_queue("payments")
        with pytest.raises(AccessRefused):
            await conn.publish("", "payments", b"x")
        await conn.declare_queue("billing.out")
        with pytest.raises(ResourceError) as info:  # the per-subject quota counts it
            await conn.declare_queue("billing.more")
        assert info.value.details["subject"] == "billing"
        rows = await anon.list("connections")
        assert {r["subject"] for r in rows} >= {"billing", "anonymous"}
        await anon.declare_queue("payments")  # bystander: unaffected
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
        await asyncio.wait_for(anon.close(), WAIT)
    # A certificate the identities file does not list is refused (401).
    ids.write_text('[identities.someone-else]\nread = ["*"]\n')
    b2 = broker_factory(*tls, "--tls-identities", str(ids))
    with pytest.raises(AuthenticationFailed, match="not listed"):
        await connect(b2.tls_url, **files)
    # Without a file, the name is the identity with every permission.
    b3 = broker_factory(*tls)
    c3 = await connect(b3.tls_url, **files)
    try:
        await c3.declare_queue("anything")
        rows = await c3.list("connections")
        assert [r["subject"] for r in rows] == ["billing"]
    finally:
        await asyncio.wait_for(c3.close(), WAIT)


async def test_http_shares_the_subjects_rate_and_queue_quota(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory("--http-port", "0", "--max-queues-per-subject", "1")
    rated = await make_token(b, "tenant", *ADMIN, "--rate-messages", "2", "--burst", "3")
    other = await make_token(b, "other", *ADMIN, "--rate-messages", "2", "--burst", "3")
    status, _ = await http(b, "PUT", "/api/queues/t1", token=rated)
    assert status == 201
    status, err = await http(b, "PUT", "/api/queues/t2", token=rated)
    assert status == 503 and err["error"]["details"]["limit"] == "max_queues_per_subject"
    status, _ = await http(b, "PUT", "/api/queues/t1", token=rated)  # exists: fine
    assert status == 200
    # A binary connection of the subject counts against the same quota.
    conn = await connect(b.url, token=rated)
    try:
        with pytest.raises(ResourceError):
            await conn.declare_queue("t3")
        # The burst (3) is shared: the connection's initial credit took it, so HTTP
        # publishes of the subject are refused 429 at once; another subject's are not.
        codes = []
        for i in range(3):
            status, _ = await http(b, "POST", "/queues/t1/messages", json={"message": f"h{i}"},
                                      token=rated)  # fmt: skip
            codes.append(status)
        assert 429 in codes, codes
        status, _ = await http(b, "POST", "/queues/t1/messages", json={"message": "o"},
                               token=other)  # fmt: skip
        assert status == 201
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
    # Only HTTP left: a full bucket (the burst, 3), refilling at 2/s.
    codes = []
    for i in range(6):
        status, err = await http(b, "POST", "/queues/t1/messages", json={"message": f"x{i}"},
                                 token=rated)  # fmt: skip
        codes.append(status)
    assert codes.count(201) in (3, 4) and codes[-1] == 429, codes
    assert err["error"]["name"] == "rate-limited" and err["error"]["details"]["retry_after"] > 0


class LimitedBroker(BrokerProcess):
    """A broker started under ``prlimit --nofile=SOFT:HARD`` (prlimit execs it, so the
    process is the broker itself)."""

    def __init__(self, data_dir: Path, soft: int, hard: int, *extra: str) -> None:
        super().__init__(data_dir, *extra)
        self.nofile = (soft, hard)

    def start(self, port: int = 0) -> BrokerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process lifetime
        soft, hard = self.nofile
        cmd = ["prlimit", f"--nofile={soft}:{hard}", sys.executable, "-m", "conveyor.cli.main",
               "server", "--host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(self.data_dir), *self.extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = LISTEN_RE.search(line)
        if m is None:
            self.stop()
            raise RuntimeError(f"broker did not start: {line!r}: {self.log_text()[-1000:]}")
        self.port = int(m.group(2))
        return self


def _nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


async def test_open_file_limit_is_raised_and_exhaustion_is_survived(tmp_path: Path) -> None:
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit is not installed")
    b = LimitedBroker(tmp_path / "a", 128, 4096)
    try:
        b.start()
        assert b.proc is not None and _nofile(b.proc.pid) == 4096  # raised to the hard limit
        assert "open-file limit 4096 is below max_connections 10000" in b.log_text()
    finally:
        b.stop()
    b = LimitedBroker(tmp_path / "b", 64, 64, "--max-connections", "1000")
    socks: list[socket.socket] = []
    try:
        b.start()
        assert "open-file limit 64 is below max_connections 1000" in b.log_text()
        conn = await connect(b.url)
        await conn.declare_queue("fd-q")
        await conn.publish("", "fd-q", b"before")
        for _ in range(100):  # more than the broker can hold: accepting has to pause
            socks.append(socket.create_connection(("127.0.0.1", b.port), timeout=5))
        await conn.publish("", "fd-q", b"during")  # the open connection is still served
        for s in socks:
            s.close()
        socks.clear()
        assert b.alive()

        async def accepts() -> bool:
            try:
                c = await connect(b.url, timeout=2)
            except client.ConnectionClosed:
                return False
            await c.close()
            return True

        await wait_until(accepts, timeout=20, interval=0.5)
        info = await queue_info(conn, "fd-q")
        assert info is not None and info["messages"] == 2
        await conn.close()
    finally:
        for s in socks:
            s.close()
        b.stop()
