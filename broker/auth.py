"""Who a connection is and what it may do.

``Principal`` is the interface the rest of the broker uses: sessions check permissions
through it and flow control reads its publish rate. An anonymous connection gets
``ANONYMOUS`` (may do everything); AUTH with mechanism ``token`` gets a principal built from
the token's claims.

Tokens are signed by the broker's Ed25519 key (``<data-dir>/auth/signing.key``) and are not
stored anywhere: the broker verifies the signature, the expiry and the revocation list
(``<data-dir>/auth/revoked``, one token id per line, re-read when it changes). Format::

    cvy1.<base64url(JSON claims)>.<base64url(Ed25519 signature of "cvy1.<claims part>")>

Claims: ``sub`` (subject), ``iat`` / ``exp`` (Unix seconds), ``jti`` (token id, what
revocation names), ``perms`` ``{"configure": [...], "write": [...], "read": [...]}`` of
fnmatch-style globs over exchange and queue names (``*`` any run of characters, dots
included; ``?`` one character; ``[abc]`` a set), and optionally ``rate``
``{"messages": per second, "bytes": per second, "burst": messages}``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.protocol import AccessRefused, AuthenticationFailed

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from conveyor.broker.config import Config

log = logging.getLogger("conveyor.auth")

TOKEN_PREFIX = "cvy1"  # noqa: S105 - a format tag, not a secret
ACTIONS = ("configure", "write", "read")
MAX_TOKEN_LENGTH = 16384
MAX_PATTERNS = 256
# Server-named queues get a random "amq.gen-..." name; a declare with an empty name is
# checked as "configure on amq.gen-" (grant "amq.gen-*" to allow them).
SERVER_NAMED_PREFIX = "amq.gen-"
_CACHE_MAX = 4096
# Open connections' tokens are re-checked (expiry, revocation list) this often, seconds.
TOKEN_RECHECK_S = 1.0


# ---------------------------------------------------------------------- permissions
def _compile(patterns: tuple[str, ...]) -> Callable[[str], Any] | None:
    if not patterns:
        return None
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)).match


@dataclass(frozen=True, slots=True)
class Permissions:
    """Glob patterns per action; a name is allowed if any pattern of the action matches."""

    configure: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    read: tuple[str, ...] = ()
    _match: dict[str, Callable[[str], Any] | None] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_match", {a: _compile(getattr(self, a)) for a in ACTIONS})

    def allows(self, action: str, name: str) -> bool:
        m = self._match.get(action)
        return m is not None and m(name) is not None

    def to_json(self) -> dict[str, list[str]]:
        return {a: list(getattr(self, a)) for a in ACTIONS}


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated subject. Rates of None mean the broker's per-connection default;
    ``permissions`` None means everything is allowed (the anonymous principal)."""

    subject: str
    anonymous: bool = False
    rate_messages: float | None = None  # publishes per second
    rate_bytes: float | None = None  # published body bytes per second
    burst_messages: int | None = None  # token-bucket depth (messages)
    permissions: Permissions | None = None
    token_id: str = ""
    expires_at: int = 0  # Unix seconds; 0 = never
    # Publish decisions already taken: exchange -> allowed, and for the default exchange
    # routing key (queue name) -> allowed. Checked once per name, not per message.
    _exchanges: dict[str, bool] = field(default_factory=dict, repr=False, compare=False)
    _queues: dict[str, bool] = field(default_factory=dict, repr=False, compare=False)

    def can(self, action: str, name: str) -> bool:
        """May this principal ``action`` ("configure", "write", "read") on ``name``?"""
        p = self.permissions
        return p is None or p.allows(action, name)

    def require(self, action: str, kind: str, name: str) -> None:
        """Raise 403 access-refused unless ``action`` on the ``kind`` (exchange/queue)
        ``name`` is allowed."""
        p = self.permissions
        if p is not None and not p.allows(action, name):
            raise self._refused(action, kind, name)

    def require_declare(self, kind: str, name: str, passive: bool) -> None:
        """Declare needs configure on the name; a passive declare (does it exist?) any
        permission on it. A server-named queue (empty name) is checked as
        ``SERVER_NAMED_PREFIX``."""
        p = self.permissions
        if p is None:
            return
        if kind == "queue" and not name and not passive:
            name = SERVER_NAMED_PREFIX
        if passive:
            if not any(p.allows(a, name) for a in ACTIONS):
                raise self._refused("access", kind, name)
        elif not p.allows("configure", name):
            raise self._refused("configure", kind, name)

    def require_bind(self, exchange: str, queue: str) -> None:
        """Bind/unbind: write on the queue, read on the exchange."""
        if self.permissions is not None:
            self.require("write", "queue", queue)
            self.require("read", "exchange", exchange)

    def check_publish(self, exchange: str, routing_key: str) -> None:
        """Publish needs write on the exchange; on the default exchange, write on the queue
        the routing key names. Cached per name for the hot path."""
        if self.permissions is None:
            return
        if exchange:
            cache, kind, name = self._exchanges, "exchange", exchange
        else:
            cache, kind, name = self._queues, "queue", routing_key
        ok = cache.get(name)
        if ok is None:
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            ok = cache[name] = self.permissions.allows("write", name)
        if not ok:
            raise self._refused("write", kind, name)

    def visible(self, kind: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The LIST rows this principal may see: names it has any permission on."""
        p = self.permissions
        if p is None:
            return items

        def any_perm(name: Any) -> bool:
            return isinstance(name, str) and any(p.allows(a, name) for a in ACTIONS)

        if kind == "bindings":
            return [it for it in items if any_perm(it.get("exchange")) or any_perm(it.get("queue"))]
        if kind in ("queues", "exchanges"):
            return [it for it in items if any_perm(it.get("name"))]
        if kind == "consumers":
            return [it for it in items if any_perm(it.get("queue"))]
        # Anything else (connections ...): only this subject's own rows.
        return [it for it in items if it.get("subject") == self.subject]

    def _refused(self, action: str, kind: str, name: str) -> AccessRefused:
        return AccessRefused(
            f"{self.subject!r} may not {action} {kind} {name!r}", {kind: name, "action": action}
        )


ANONYMOUS = Principal("anonymous", anonymous=True)


# ---------------------------------------------------------------------- token format
class TokenError(Exception):
    """A token was refused; ``reason`` is malformed, bad-signature, expired or revoked."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise TokenError("malformed", "malformed token (bad base64url)")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("malformed", "malformed token (bad base64url)") from None


@dataclass(frozen=True)
class Claims:
    sub: str
    iat: int
    exp: int
    jti: str
    permissions: Permissions
    rate_messages: float | None = None
    rate_bytes: float | None = None
    burst: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sub": self.sub,
            "iat": self.iat,
            "exp": self.exp,
            "jti": self.jti,
            "perms": self.permissions.to_json(),
        }
        rate = {
            k: v
            for k, v in (
                ("messages", self.rate_messages),
                ("bytes", self.rate_bytes),
                ("burst", self.burst),
            )
            if v is not None
        }
        if rate:
            out["rate"] = rate
        return out

    @classmethod
    def from_json(cls, raw: Any) -> Claims:
        def bad(why: str) -> TokenError:
            return TokenError("malformed", f"malformed token claims: {why}")

        if not isinstance(raw, dict):
            raise bad("not an object")
        sub, iat, exp, jti = raw.get("sub"), raw.get("iat"), raw.get("exp"), raw.get("jti")
        if not isinstance(sub, str) or not sub:
            raise bad("sub must be a non-empty string")
        if type(iat) is not int or type(exp) is not int or iat < 0 or exp < 0:
            raise bad("iat and exp must be non-negative integers")
        if not isinstance(jti, str) or not jti or any(c.isspace() for c in jti):
            raise bad("jti must be a non-empty string without spaces")
        perms = raw.get("perms", {})
        if not isinstance(perms, dict) or set(perms) - set(ACTIONS):
            raise bad("perms must map configure/write/read to lists of patterns")
        lists: dict[str, tuple[str, ...]] = {}
        for a in ACTIONS:
            pats = perms.get(a, [])
            if (
                not isinstance(pats, list)
                or len(pats) > MAX_PATTERNS
                or not all(isinstance(p, str) for p in pats)
            ):
                raise bad(f"perms.{a} must be a list of strings")
            lists[a] = tuple(pats)
        rate = raw.get("rate", {})
        if not isinstance(rate, dict) or set(rate) - {"messages", "bytes", "burst"}:
            raise bad("rate must be {messages, bytes, burst}")
        for k, v in rate.items():
            if (
                type(v) not in (int, float)
                or not math.isfinite(v)
                or v <= 0
                or (k == "burst" and type(v) is not int)
            ):
                raise bad(f"rate.{k} must be a positive number")
        return cls(
            sub,
            iat,
            exp,
            jti,
            Permissions(**lists),
            rate.get("messages"),
            rate.get("bytes"),
            rate.get("burst"),
        )

    def principal(self) -> Principal:
        return Principal(
            self.sub,
            rate_messages=self.rate_messages,
            rate_bytes=self.rate_bytes,
            burst_messages=self.burst,
            permissions=self.permissions,
            token_id=self.jti,
            expires_at=self.exp,
        )


def new_claims(
    subject: str,
    ttl: float,
    *,
    configure: Iterable[str] = (),
    write: Iterable[str] = (),
    read: Iterable[str] = (),
    rate_messages: float | None = None,
    rate_bytes: float | None = None,
    burst: int | None = None,
    now: float | None = None,
) -> Claims:
    iat = int(time.time() if now is None else now)
    return Claims(
        subject,
        iat,
        iat + math.ceil(ttl),
        secrets.token_urlsafe(12),
        Permissions(tuple(configure), tuple(write), tuple(read)),
        rate_messages,
        rate_bytes,
        burst,
    )


def sign_token(key: Ed25519PrivateKey, claims: Claims) -> str:
    body = json.dumps(claims.to_json(), separators=(",", ":"), sort_keys=True).encode()
    signed = f"{TOKEN_PREFIX}.{b64encode(body)}"
    return f"{signed}.{b64encode(key.sign(signed.encode('ascii')))}"


def split_token(token: str) -> tuple[bytes, bytes, bytes]:
    """(signed part, claims JSON, signature); raises TokenError("malformed")."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("malformed", "malformed token (too long)")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise TokenError("malformed", f"malformed token (expected {TOKEN_PREFIX}.<claims>.<sig>)")
    body, sig = b64decode(parts[1]), b64decode(parts[2])
    if len(sig) != 64:
        raise TokenError("malformed", "malformed token (bad signature length)")
    return f"{parts[0]}.{parts[1]}".encode("ascii"), body, sig


def parse_claims(body: bytes) -> Claims:
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise TokenError("malformed", "malformed token claims (not JSON)") from None
    return Claims.from_json(raw)


def unverified_claims(token: str) -> Claims:
    """The claims, without checking the signature (``mq-cli token revoke``/``inspect``)."""
    return parse_claims(split_token(token)[1])


# ---------------------------------------------------------------------- keys and files
def auth_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "auth"


def key_path(data_dir: str | Path) -> Path:
    return auth_dir(data_dir) / "signing.key"


def revoked_path(data_dir: str | Path) -> Path:
    return auth_dir(data_dir) / "revoked"


def load_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PEM); OSError or ValueError if it cannot."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_or_create_key(path: str | Path) -> Ed25519PrivateKey:
    """The signing key at ``path``, created (PEM, mode 0600) if there is none yet.

    Creation is atomic (a temporary file linked into place), so a broker starting while
    ``mq-cli token create`` runs ends up with the same key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if path.exists():
        return load_key(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return load_key(path)  # someone else created it first: theirs wins
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    log.info("created token signing key %s", path)
    return key


def append_revoked(path: str | Path, jti: str) -> None:
    """Append a token id to the revocation list (created if missing)."""
    if not jti or any(c.isspace() for c in jti):
        raise ValueError(f"bad token id {jti!r}")
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(jti + "\n")
        f.flush()
        os.fsync(f.fileno())


class RevocationList:
    """Token ids from a file, re-read whenever its mtime, size or inode changes (one
    ``stat`` per check)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._ids: frozenset[str] = frozenset()

    def __contains__(self, jti: object) -> bool:
        self.refresh()
        return jti in self._ids

    def refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._ids = None, frozenset()
            return
        except OSError as exc:  # keep the last list we could read
            log.warning("cannot stat revocation list %s: %s", self.path, exc)
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            text = self.path.read_text(errors="replace")
        except OSError as exc:
            log.warning("cannot read revocation list %s: %s", self.path, exc)
            return
        ids = set()
        for line in text.splitlines():
            word = line.split("#", 1)[0].strip()
            if word:
                ids.add(word.split()[0])
        self._stamp, self._ids = stamp, frozenset(ids)
        log.info("revocation list %s: %d token ids", self.path, len(ids))


class TokenVerifier:
    """Checks a token's signature, expiry and revocation; never stores tokens."""

    def __init__(
        self,
        public_key: Ed25519PublicKey,
        revoked: RevocationList | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.public_key = public_key
        self.revoked = revoked
        self.clock = clock

    def signature_ok(self, signed: bytes, sig: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self.public_key.verify(sig, signed)
        except InvalidSignature:
            return False
        return True

    def verify(self, token: str) -> Claims:
        """The token's claims, or TokenError naming why it is refused."""
        signed, body, sig = split_token(token)
        if not self.signature_ok(signed, sig):
            raise TokenError("bad-signature", "bad token signature (not issued by this broker)")
        claims = parse_claims(body)
        if self.revoked is not None and claims.jti in self.revoked:
            raise TokenError("revoked", f"token {claims.jti} has been revoked")
        if self.clock() >= claims.exp:
            raise TokenError(
                "expired",
                f"token {claims.jti} expired at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(claims.exp))}",
            )
        return claims

    def inspect(self, token: str) -> dict[str, Any]:
        """Everything about a token, for ``mq-cli token inspect`` (status "valid" or why not)."""
        signed, body, sig = split_token(token)
        claims = parse_claims(body)
        sig_ok = self.signature_ok(signed, sig)
        revoked = self.revoked is not None and claims.jti in self.revoked
        expired = self.clock() >= claims.exp
        status = (
            "bad-signature"
            if not sig_ok
            else "revoked"
            if revoked
            else "expired"
            if expired
            else "valid"
        )
        return {
            "claims": claims.to_json(),
            "signature": "valid" if sig_ok else "invalid",
            "expired": expired,
            "revoked": revoked,
            "status": status,
        }


# ---------------------------------------------------------------------- failed attempts
class FailureThrottle:
    """Slows down repeated authentication failures from one address.

    Each address has a failure score that halves every ``half_life`` seconds; a failure
    adds one and is answered after ``base * 2 ** (score - 1)`` seconds, at most ``cap``.
    """

    def __init__(
        self,
        base: float = 0.2,
        cap: float = 5.0,
        half_life: float = 60.0,
        max_entries: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = base
        self.cap = cap
        self.half_life = half_life
        self.max_entries = max_entries
        self.clock = clock
        self._scores: dict[str, tuple[float, float]] = {}  # address -> (score, when)

    def _decayed(self, addr: str, now: float) -> float:
        entry = self._scores.get(addr)
        if entry is None:
            return 0.0
        score, when = entry
        return score * math.pow(0.5, max(0.0, now - when) / self.half_life)

    def failure(self, addr: str) -> float:
        """Record a failure from ``addr``; the delay before answering it (seconds)."""
        now = self.clock()
        score = self._decayed(addr, now) + 1.0
        if addr not in self._scores and len(self._scores) >= self.max_entries:
            self._prune(now)
        self._scores[addr] = (score, now)
        return min(self.cap, self.base * 2 ** (score - 1))

    def score(self, addr: str) -> float:
        return self._decayed(addr, self.clock())

    def _prune(self, now: float) -> None:
        for a in [a for a in self._scores if self._decayed(a, now) < 0.5]:
            del self._scores[a]
        while len(self._scores) >= self.max_entries:  # all recent: drop the oldest
            del self._scores[min(self._scores, key=lambda a: self._scores[a][1])]


# ---------------------------------------------------------------------- the broker's side
def is_loopback(host: str) -> bool:
    """True for loopback addresses (127.0.0.0/8, ::1, IPv4-mapped loopback) and
    "localhost"."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def certificate_name(peercert: Any) -> str:
    """The common name of a verified client certificate (``ssl`` ``getpeercert()``
    form), "" if there is none."""
    if not isinstance(peercert, dict):
        return ""
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str):
                return value
    return ""


def load_identities(path: str | Path) -> dict[str, Principal]:
    """Certificate common name -> principal, from a TOML file::

        [identities."billing-service"]
        configure = []
        write = ["billing.*"]
        read = ["billing.*"]
        rate_messages = 500   # optional, like a token's rate
        rate_bytes = 1048576  # optional
        burst = 100           # optional

    Raises ValueError (or OSError) naming what is wrong."""
    import tomllib

    raw = tomllib.loads(Path(path).read_text())
    table = raw.get("identities")
    if not isinstance(table, dict):
        raise ValueError(f'{path}: expected an [identities."NAME"] table per certificate')
    out: dict[str, Principal] = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: identities.{name} must be a table")
        rate = {k: entry.pop(k) for k in ("rate_messages", "rate_bytes", "burst") if k in entry}
        claims = {
            "sub": name,
            "iat": 0,
            "exp": 0,
            "jti": "certificate",
            "perms": entry,
            "rate": {
                {"rate_messages": "messages", "rate_bytes": "bytes"}.get(k, k): v
                for k, v in rate.items()
            },
        }
        try:
            c = Claims.from_json(claims)
        except TokenError as exc:
            raise ValueError(f"{path}: identities.{name}: {exc.message}") from None
        out[name] = Principal(
            name,
            rate_messages=c.rate_messages,
            rate_bytes=c.rate_bytes,
            burst_messages=c.burst,
            permissions=c.permissions,
        )
    return out


# Every permission: a certificate identity without an --tls-identities entry (so it is a
# restricted principal for the per-subject quotas, yet may do anything).
ALL_PERMISSIONS = Permissions(("*",), ("*",), ("*",))


class Authenticator:
    """The broker's AUTH policy: mechanisms per peer, token verification, the loopback
    rule for anonymous connections, certificate identities and the failure throttle."""

    def __init__(self, config: Config) -> None:
        self.host = config.host
        self.data_dir = Path(config.data_dir)
        self.allow_anonymous = config.allow_anonymous
        self.require_auth = config.require_auth
        self.verifier: TokenVerifier | None = None
        self.throttle = FailureThrottle()
        # mTLS: the client certificate's common name as the identity (tls_ca required).
        self.cert_identity = config.tls_client_subject_identity
        self.identities_path = config.tls_identities
        self.identities: dict[str, Principal] | None = None  # None: any name, all rights

    def open(self) -> None:
        """Load (or create) the signing key and announce the anonymous-access rule."""
        path = key_path(self.data_dir)
        try:
            key = load_or_create_key(path)
        except ValueError as exc:  # reported like the other start-up I/O problems
            raise OSError(f"cannot use token signing key {path}: {exc}") from None
        self.verifier = TokenVerifier(key.public_key(), RevocationList(revoked_path(self.data_dir)))
        if self.identities_path:
            try:
                self.identities = load_identities(self.identities_path)
            except (ValueError, UnicodeDecodeError) as exc:
                raise OSError(f"cannot use certificate identities: {exc}") from None
        if self.cert_identity:
            log.info(
                "client certificates identify TLS connections (common name%s)",
                f"; {len(self.identities)} known" if self.identities is not None else "",
            )
        if self.require_auth:
            log.info("authentication required: every connection needs a token")
        elif self.allow_anonymous:
            if is_loopback(self.host):
                log.warning("anonymous connections allowed (--allow-anonymous)")
            else:
                log.warning(
                    "!!! ANONYMOUS ACCESS FROM ANY ADDRESS (--allow-anonymous) on %s: anyone "
                    "who can reach this broker may do anything. Use tokens instead. !!!",
                    self.host,
                )
        elif is_loopback(self.host):
            log.info(
                "anonymous connections are accepted from loopback peers only; "
                "--require-auth refuses them"
            )
        else:
            log.info(
                "listening on non-loopback %s: other hosts must authenticate with a "
                "token; anonymous connections only from loopback peers",
                self.host,
            )

    def still_valid(
        self, principal: Principal, now: float | None = None
    ) -> AuthenticationFailed | None:
        """Why an open connection's token no longer holds (expired, revoked), or None.
        The transport asks every ``TOKEN_RECHECK_S`` and closes the connection with the
        error (401 authentication-failed)."""
        if not principal.token_id:
            return None
        t = time.time() if now is None else now
        if principal.expires_at and t >= principal.expires_at:
            return AuthenticationFailed(
                f"token {principal.token_id} expired at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(principal.expires_at))}",
                {"reason": "expired"},
            )
        v = self.verifier
        if v is not None and v.revoked is not None and principal.token_id in v.revoked:
            return AuthenticationFailed(
                f"token {principal.token_id} has been revoked", {"reason": "revoked"}
            )
        return None

    def certificate_principal(self, name: str) -> Principal:
        """The principal of a verified client certificate named ``name`` (common name):
        its entry in ``tls_identities``, or every permission if there is no such file.
        401 if the file does not list it."""
        if self.identities is None:
            return Principal(name, permissions=ALL_PERMISSIONS)
        p = self.identities.get(name)
        if p is None:
            raise AuthenticationFailed(
                f"client certificate {name!r} is not listed in the broker's identities",
                {"reason": "certificate-unknown"},
            )
        return p

    def anonymous_ok(self, peer_ip: str) -> bool:
        if self.require_auth:
            return False
        return self.allow_anonymous or is_loopback(peer_ip)

    def mechanisms(self, peer_ip: str) -> list[str]:
        """What HELLO offers this peer."""
        return ["token", "anonymous"] if self.anonymous_ok(peer_ip) else ["token"]

    def authenticate(self, mechanism: str, token: str, peer_ip: str) -> Principal:
        """The principal for an AUTH, or AuthenticationFailed (401) saying why."""
        if mechanism == "token":
            if self.verifier is None:
                raise AuthenticationFailed(
                    "token authentication is not available", {"reason": "unavailable"}
                )
            try:
                return self.verifier.verify(token).principal()
            except TokenError as exc:
                raise AuthenticationFailed(exc.message, {"reason": exc.reason}) from None
        if mechanism == "anonymous":
            if self.anonymous_ok(peer_ip):
                return ANONYMOUS
            why = (
                "this broker requires a token (--require-auth)"
                if self.require_auth
                else "anonymous connections are only accepted from loopback addresses; "
                "authenticate with a token"
            )
            raise AuthenticationFailed(why, {"reason": "anonymous-refused"})
        raise AuthenticationFailed(
            f"mechanism {mechanism!r} not offered; use one of {self.mechanisms(peer_ip)}",
            {"mechanism": mechanism, "reason": "mechanism"},
        )
