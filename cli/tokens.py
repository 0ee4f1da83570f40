"""``mq-cli token``: create, inspect and revoke access tokens.

Tokens are signed with the broker's Ed25519 key, ``<data-dir>/auth/signing.key`` (created
by the first broker start or the first ``token create``), so these commands take the
broker's ``--data-dir`` (or ``--config``), or ``--key PATH`` for a key kept elsewhere.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """ "90", "90s", "15m", "24h", "7d", "2w" -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise click.BadParameter(
            f"{text!r} is not a duration like 30s, 15m, 24h or 7d", param_hint="--ttl"
        )
    return float(m.group(1)) * _UNITS[m.group(2)]


def _fail(message: str, status: int = 1) -> NoReturn:
    click.echo(f"mq-cli: {message}", err=True)
    sys.exit(status)


def _data_dir(data_dir: str | None, config_path: str | None) -> Path:
    if config_path:
        from conveyor.broker import config as config_mod

        try:
            cfg = config_mod.load(config_path, data_dir=data_dir)
        except config_mod.ConfigError as exc:
            _fail(str(exc), 2)
        return Path(cfg.data_dir)
    return Path(data_dir or "./conveyor-data")


def _key_path(key: str | None, data_dir: str | None, config_path: str | None) -> Path:
    from conveyor.broker.auth import key_path

    return Path(key) if key else key_path(_data_dir(data_dir, config_path))


def _location(f: Any) -> Any:
    f = click.option(
        "--key",
        "key",
        default=None,
        type=click.Path(dir_okay=False),
        help="Ed25519 signing key (PEM) [DATA_DIR/auth/signing.key].",
    )(f)
    f = click.option(
        "--config",
        "config_path",
        default=None,
        type=click.Path(dir_okay=False),
        help="The broker's TOML config (for its data_dir).",
    )(f)
    return click.option(
        "--data-dir", default=None, help="The broker's data directory [./conveyor-data]."
    )(f)


@click.group("token")
def token() -> None:
    """Create, inspect and revoke access tokens (AUTH mechanism "token").

    Permissions are fnmatch-style globs over exchange and queue names: * matches any
    characters (dots included), ? one character, [abc] one of a set.
    """


@token.command("create")
@click.option("--subject", "-s", required=True, help="Who the token is for (logged).")
@click.option(
    "--configure",
    multiple=True,
    metavar="GLOB",
    help="Declare/delete/purge exchanges and queues matching GLOB (repeatable).",
)
@click.option(
    "--write",
    multiple=True,
    metavar="GLOB",
    help="Publish to exchanges (or default-exchange queues), bind queues "
    "matching GLOB (repeatable).",
)
@click.option(
    "--read",
    multiple=True,
    metavar="GLOB",
    help="Consume/get from queues, bind from exchanges matching GLOB (repeatable).",
)
@click.option(
    "--ttl", default="24h", show_default=True, help="Lifetime: seconds or 30s, 15m, 24h, 7d, 2w."
)
@click.option(
    "--rate-messages",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Publish rate limit for connections using it (messages per second).",
)
@click.option(
    "--rate-bytes",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Publish rate limit (body bytes per second).",
)
@click.option(
    "--burst",
    type=click.IntRange(1),
    default=None,
    help="Messages a publisher may send at once above its rate.",
)
@click.option(
    "--json", "as_json", is_flag=True, help='One JSON object: {"token", "subject", "jti", "exp"}.'
)
@_location
def create(
    subject: str,
    configure: tuple[str, ...],
    write: tuple[str, ...],
    read: tuple[str, ...],
    ttl: str,
    rate_messages: float | None,
    rate_bytes: float | None,
    burst: int | None,
    data_dir: str | None,
    config_path: str | None,
    key: str | None,
    as_json: bool,
) -> None:
    """Print a new signed token (creates the signing key if there is none).

    \b
    mq-cli token create -s admin --configure '*' --write '*' --read '*' --ttl 30d
    mq-cli token create -s shop --write 'orders.*' --read 'shop-*' --ttl 24h
    """
    from conveyor.broker.auth import load_or_create_key, new_claims, sign_token

    seconds = parse_duration(ttl)
    path = _key_path(key, data_dir, config_path)
    try:
        signing_key = load_or_create_key(path)
    except (OSError, ValueError) as exc:
        _fail(f"cannot use signing key {path}: {exc}")
    claims = new_claims(
        subject,
        seconds,
        configure=configure,
        write=write,
        read=read,
        rate_messages=rate_messages,
        rate_bytes=rate_bytes,
        burst=burst,
    )
    signed = sign_token(signing_key, claims)
    if as_json:
        click.echo(
            json.dumps({"token": signed, "subject": subject, "jti": claims.jti, "exp": claims.exp})
        )
    else:
        click.echo(signed)


def _iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@token.command("inspect")
@click.argument("token_text", metavar="TOKEN")
@_location
def inspect(
    token_text: str, data_dir: str | None, config_path: str | None, key: str | None
) -> None:
    """Print a token's claims and status as JSON; exit 0 only if it is valid.

    status: valid, expired, revoked, bad-signature, or unverified (no signing key found).
    """
    from conveyor.broker.auth import (
        RevocationList,
        TokenError,
        TokenVerifier,
        load_key,
        revoked_path,
        unverified_claims,
    )

    token_text = token_text.strip()
    path = _key_path(key, data_dir, config_path)
    revoked = (
        None
        if key and not data_dir and not config_path
        else RevocationList(revoked_path(_data_dir(data_dir, config_path)))
    )
    try:
        if path.exists():
            verifier = TokenVerifier(load_key(path).public_key(), revoked)
            info = verifier.inspect(token_text)
        else:
            claims = unverified_claims(token_text)
            is_revoked = revoked is not None and claims.jti in revoked
            info = {
                "claims": claims.to_json(),
                "signature": f"unknown (no key at {path})",
                "expired": time.time() >= claims.exp,
                "revoked": is_revoked,
                "status": "revoked" if is_revoked else "unverified",
            }
    except TokenError as exc:
        _fail(f"{exc.reason}: {exc.message}")
    except (OSError, ValueError) as exc:
        _fail(f"cannot use signing key {path}: {exc}")
    c = info["claims"]
    info["issued_at"] = _iso(c["iat"])
    info["expires_at"] = _iso(c["exp"])
    click.echo(json.dumps(info, indent=1))
    if info["status"] != "valid":
        sys.exit(1)


@token.command("revoke")
@click.argument("token_text", metavar="[TOKEN]", required=False)
@click.option("--jti", default=None, help="Revoke by token id instead of the token.")
@click.option("--data-dir", default=None, help="The broker's data directory [./conveyor-data].")
@click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="The broker's TOML config (for its data_dir).",
)
@click.option("--json", "as_json", is_flag=True, help='One JSON object: {"revoked": JTI}.')
def revoke(
    token_text: str | None,
    jti: str | None,
    data_dir: str | None,
    config_path: str | None,
    as_json: bool,
) -> None:
    """Add a token's id to DATA_DIR/auth/revoked: new connections with it are refused.

    The running broker also closes the connections already open with it within about a
    second (ERROR 401 authentication-failed, reason revoked).
    """
    from conveyor.broker.auth import TokenError, append_revoked, revoked_path, unverified_claims

    if (token_text is None) == (jti is None):
        raise click.UsageError("give either TOKEN or --jti")
    if token_text is not None:
        try:
            jti = unverified_claims(token_text.strip()).jti
        except TokenError as exc:
            _fail(f"{exc.reason}: {exc.message}")
    assert jti is not None
    path = revoked_path(_data_dir(data_dir, config_path))
    try:
        append_revoked(path, jti)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--jti") from None
    except OSError as exc:
        _fail(f"cannot write {path}: {exc}")
    click.echo(json.dumps({"revoked": jti}) if as_json else f"revoked {jti}")
