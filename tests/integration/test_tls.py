"""TLS end to end: mq-cli gen-certs, the broker's TLS listener (openssl s_client and the
Python client), mutual TLS, --no-plain, the client-side flags of mq-cli."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from conveyor import client
from conveyor.protocol._generated import PREAMBLE
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect, take

pytestmark = pytest.mark.timeout(90)

CLI = [sys.executable, "-m", "conveyor.cli.main"]
OPENSSL = shutil.which("openssl")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    for k in (
        "CONVEYOR_URL",
        "CONVEYOR_TLS_CA",
        "CONVEYOR_TLS_CERT",
        "CONVEYOR_TLS_KEY",
        "CONVEYOR_TOKEN",
        "MQ_TLS_CA",
        "MQ_TLS_CERT",
        "MQ_TLS_KEY",
        "MQ_TOKEN",
    ):
        if k not in extra:
            env.pop(k, None)
    return env


def cli(*args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, timeout=timeout, env=_env(**env), check=False
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    p = cli("gen-certs", "--out", str(out))
    assert p.returncode == 0, p.stderr
    return out


def tls_flags(certs: Path, *, mtls: bool = False) -> list[str]:
    flags = [
        "--tls-cert",
        str(certs / "server.pem"),
        "--tls-key",
        str(certs / "server.key"),
        "--tls-port",
        "0",
    ]
    return [*flags, "--tls-ca", str(certs / "ca.pem")] if mtls else flags


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-verify_return_error", *args],
        input=b"",
        capture_output=True,
        timeout=20,
        check=False,
    )


def test_gen_certs_writes_a_ca_and_certificates(certs: Path) -> None:
    for name in ("ca.pem", "server.pem", "client.pem"):
        assert (certs / name).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    for name in ("ca.key", "server.key", "client.key"):
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    assert server.issuer == ca.subject
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert 30 <= days <= 825
    # An existing set is not overwritten by accident.
    p = cli("gen-certs", "--out", str(certs))
    assert p.returncode == 1 and b"--force" in p.stderr


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
def test_openssl_handshake_verifies_against_the_generated_ca(
    certs: Path, broker_factory: Callable[..., BrokerProcess]
) -> None:
    b = broker_factory(*tls_flags(certs))
    assert b.tls_port and b.port and b.tls_port != b.port
    p = s_client(b.tls_port, "-CAfile", str(certs / "ca.pem"), "-verify_ip", "127.0.0.1")
    out = p.stdout.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in out, out + p.stderr.decode(errors="replace")
    p = s_client(b.tls_port, "-CAfile", str(certs / "ca.pem"), "-tls1_2")  # 1.2 is the floor
    assert "Verify return code: 0 (ok)" in p.stdout.decode(errors="replace")
    # Without the CA the chain does not verify.
    p = s_client(b.tls_port)
    assert "Verify return code: 0 (ok)" not in p.stdout.decode(errors="replace")


async def test_python_client_over_mqs(
    certs: Path, broker_factory: Callable[..., BrokerProcess]
) -> None:
    b = broker_factory(*tls_flags(certs))
    ca = str(certs / "ca.pem")
    conn = await connect(b.tls_url, ca=ca)
    try:
        await conn.declare_queue("tls-q")
        await conn.publish("", "tls-q", b"over tls")
        consumer = await conn.consume("tls-q")
        [msg] = await take(consumer, 1)
        assert msg.body == b"over tls"
        msg.ack()
        # The plain listener serves the same broker.
        plain = await connect(b.url)
        try:
            assert (await plain.declare_queue("tls-q", passive=True)).name == "tls-q"
        finally:
            await asyncio.wait_for(plain.close(), WAIT)
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
    # "localhost" matches the certificate's DNS name; a ready SSLContext works too.
    ctx = ssl.create_default_context(cafile=ca)
    conn = await connect(f"mqs://localhost:{b.tls_port}", ssl_context=ctx)
    await asyncio.wait_for(conn.close(), WAIT)
    # Without the CA the broker's certificate is not trusted.
    with pytest.raises(client.ConnectionClosed, match="CERTIFICATE_VERIFY_FAILED"):
        await connect(b.tls_url)
    # TLS options with a plain URL are refused rather than ignored.
    with pytest.raises(ValueError, match="mqs://"):
        await connect(b.url, ca=ca)


def _raw_tls_hello(port: int, ctx: ssl.SSLContext) -> bytes:
    """Handshake, send the preamble, return what the broker answers (b"" = closed)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.sendall(PREAMBLE)
        return s.recv(1024)


async def test_mutual_tls_requires_a_client_certificate(
    certs: Path, broker_factory: Callable[..., BrokerProcess]
) -> None:
    b = broker_factory(*tls_flags(certs, mtls=True))
    ca = str(certs / "ca.pem")
    with pytest.raises(client.ConnectionClosed):
        await connect(b.tls_url, ca=ca)
    # A certificate from another CA is refused too.
    other = certs.parent / "other-certs"
    assert cli("gen-certs", "--out", str(other)).returncode == 0
    with pytest.raises(client.ConnectionClosed):
        await connect(
            b.tls_url, ca=ca, cert=str(other / "client.pem"), key=str(other / "client.key")
        )
    # Raw: no certificate, no HELLO.
    ctx = ssl.create_default_context(cafile=ca)
    try:
        answer = await asyncio.to_thread(_raw_tls_hello, b.tls_port, ctx)
    except (ssl.SSLError, OSError):
        answer = b""
    assert b"conveyor" not in answer
    ctx.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    answer = await asyncio.to_thread(_raw_tls_hello, b.tls_port, ctx)
    assert b"conveyor" in answer  # HELLO's server_properties
    conn = await connect(
        b.tls_url, ca=ca, cert=str(certs / "client.pem"), key=str(certs / "client.key")
    )
    try:
        await conn.declare_queue("mtls-q")
    finally:
        await asyncio.wait_for(conn.close(), WAIT)
    if OPENSSL is not None:
        p = s_client(
            b.tls_port,
            "-CAfile",
            ca,
            "-cert",
            str(certs / "client.pem"),
            "-key",
            str(certs / "client.key"),
        )
        assert "Verify return code: 0 (ok)" in p.stdout.decode(errors="replace")


async def test_no_plain_leaves_only_tls(
    certs: Path, broker_factory: Callable[..., BrokerProcess]
) -> None:
    b = broker_factory(*tls_flags(certs), "--no-plain")
    assert b.tls_port and not b.port
    conn = await connect(b.tls_url, ca=str(certs / "ca.pem"))
    await asyncio.wait_for(conn.close(), WAIT)
    log = b.log_text()
    assert "listening for TLS" in log and "listening on" not in log  # no plain listener


def test_server_refuses_impossible_tls_settings(certs: Path, tmp_path: Path) -> None:
    for args, why in (
        (["--no-plain"], b"no listener"),
        (["--tls-cert", str(certs / "server.pem")], b"together"),
        (["--tls-ca", str(certs / "ca.pem")], b"tls_ca"),
        (["--allow-anonymous", "--require-auth"], b"contradict"),
    ):
        p = subprocess.run(
            [*CLI, "server", "--port", "0", "--data-dir", str(tmp_path / "d"), *args],
            capture_output=True,
            timeout=30,
            env=_env(),
            check=False,
        )
        assert p.returncode == 2, (args, p.stderr)
        assert why in p.stderr and p.stderr.count(b"\n") == 1, p.stderr
    # A key that does not belong to the certificate: one line, status 1.
    p = subprocess.run(
        [
            *CLI,
            "server",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "d"),
            *tls_flags(certs)[:2],
            "--tls-key",
            str(certs / "client.key"),
        ],
        capture_output=True,
        timeout=30,
        env=_env(),
        check=False,
    )
    assert p.returncode == 1 and b"cannot start the broker" in p.stderr
    assert b"Traceback" not in p.stderr


def test_cli_client_commands_take_tls_flags(
    certs: Path, broker_factory: Callable[..., BrokerProcess]
) -> None:
    b = broker_factory(*tls_flags(certs, mtls=True))
    ca, cert, key = (str(certs / n) for n in ("ca.pem", "client.pem", "client.key"))
    mtls = ["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key]
    p = cli("declare-queue", "cli-tls", "--url", b.tls_url, *mtls)
    assert p.returncode == 0 and p.stdout.startswith(b"cli-tls\t"), p.stderr
    p = cli("publish", "hello", "-k", "cli-tls", "--url", b.tls_url, *mtls)
    assert p.returncode == 0, p.stderr
    # From the environment.
    p = cli(
        "consume",
        "-q",
        "cli-tls",
        "-n",
        "1",
        "--timeout",
        "5",
        "--url",
        b.tls_url,
        CONVEYOR_TLS_CA=ca,
        CONVEYOR_TLS_CERT=cert,
        CONVEYOR_TLS_KEY=key,
    )
    assert (p.returncode, p.stdout) == (0, b"hello\n"), p.stderr
    # Environment TLS settings do not get in the way of a plain URL ...
    p = cli("queues", "--url", b.url, CONVEYOR_TLS_CA=ca)
    assert p.returncode == 0, p.stderr
    # ... but flags with a plain URL are a usage error, and no client certificate = refused.
    p = cli("queues", "--url", b.url, "--tls-ca", ca)
    assert p.returncode == 2 and b"mqs://" in p.stderr
    p = cli("queues", "--url", b.tls_url, "--tls-ca", ca)
    assert p.returncode == 3 and b"Traceback" not in p.stderr
    p = cli("queues", "--url", b.tls_url, "--tls-ca", str(certs / "nope.pem"))
    assert p.returncode == 2 and b"nope.pem" in p.stderr
