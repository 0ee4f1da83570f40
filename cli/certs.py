"""``mq-cli gen-certs``: a development CA plus server and client certificates.

For trying TLS and mutual TLS locally; production brokers should use certificates from
the organisation's own CA. Keys are EC P-256, written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

import click

FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)  # O_CREAT's mode is masked by the umask
    os.replace(tmp, path)


def generate(
    out: Path,
    *,
    days: int = 825,
    ca_days: int = 3650,
    sans: tuple[str, ...] = DEFAULT_SANS,
    subject: str = "conveyor",
    client_name: str = "conveyor-client",
) -> list[Path]:
    """Write ca.pem/ca.key, server.pem/server.key and client.pem/client.key into ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew

    def key_pem(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, subject),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"{subject} development CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: Any, alt: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        k = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        if alt:
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(k)

    alt: list[x509.GeneralName] = []
    for s in sans:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            alt.append(x509.DNSName(s))
    server_pem, server_key = leaf(
        sans[0] if sans else subject, ExtendedKeyUsageOID.SERVER_AUTH, alt
    )
    client_pem, client_key = leaf(client_name, ExtendedKeyUsageOID.CLIENT_AUTH, [])

    out.mkdir(parents=True, exist_ok=True)
    contents = {
        "ca.pem": (ca_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        "ca.key": (key_pem(ca_key), 0o600),
        "server.pem": (server_pem, 0o644),
        "server.key": (server_key, 0o600),
        "client.pem": (client_pem, 0o644),
        "client.key": (client_key, 0o600),
    }
    written = []
    for fname in FILES:
        data, mode = contents[fname]
        _write(out / fname, data, mode)
        written.append(out / fname)
    return written


@click.command("gen-certs")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for ca.pem, ca.key, server.pem, server.key, client.pem, client.key.",
)
@click.option(
    "--days",
    type=click.IntRange(1, 3650),
    default=825,
    show_default=True,
    help="Validity of the server and client certificates.",
)
@click.option(
    "--san",
    "sans",
    multiple=True,
    help="Server name or IP address (repeatable) "
    "[localhost, 127.0.0.1, ::1]; replaces the defaults.",
)
@click.option(
    "--client-name",
    default="conveyor-client",
    show_default=True,
    help="Common name of the client certificate.",
)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--json", "as_json", is_flag=True, help='One JSON object: {"files": [...]}.')
def gen_certs(
    out: str, days: int, sans: tuple[str, ...], client_name: str, force: bool, as_json: bool
) -> None:
    """Write a development CA and server + client certificates signed by it.

    \b
    mq-cli gen-certs --out certs
    mq-cli server --tls-cert certs/server.pem --tls-key certs/server.key [--tls-ca certs/ca.pem]
    mq-cli queues --url mqs://127.0.0.1:5681 --tls-ca certs/ca.pem \\
        [--tls-cert certs/client.pem --tls-key certs/client.key]
    """
    target = Path(out)
    existing = [f for f in FILES if (target / f).exists()]
    if existing and not force:
        click.echo(
            f"mq-cli: {target} already has {', '.join(existing)}; use --force to overwrite",
            err=True,
        )
        sys.exit(1)
    try:
        written = generate(target, days=days, sans=sans or DEFAULT_SANS, client_name=client_name)
    except OSError as exc:
        click.echo(f"mq-cli: cannot write certificates: {exc}", err=True)
        sys.exit(1)
    if as_json:
        import json

        click.echo(json.dumps({"files": [str(p) for p in written]}))
        return
    for p in written:
        click.echo(str(p))
