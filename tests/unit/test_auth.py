"""conveyor.broker.auth: permissions, the token format, revocation, the failure throttle, the
loopback rule; broker.config's security settings."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conveyor.broker import auth
from conveyor.broker.auth import (
    ANONYMOUS,
    Authenticator,
    FailureThrottle,
    Permissions,
    Principal,
    RevocationList,
    TokenError,
    TokenVerifier,
    b64decode,
    b64encode,
    new_claims,
    sign_token,
)
from conveyor.broker.config import Config, ConfigError, load
from conveyor.protocol import AccessRefused, AuthenticationFailed


@pytest.fixture
def key(tmp_path: Path) -> Ed25519PrivateKey:
    return auth.load_or_create_key(tmp_path / "auth" / "signing.key")


def test_permissions_are_globs() -> None:
    p = Permissions(configure=("orders.*",), write=("orders.*", "audit"), read=("q-[ab]", "r?"))
    assert p.allows("configure", "orders.eu") and p.allows("configure", "orders.eu.west")
    assert not p.allows("configure", "orders") and not p.allows("configure", "billing")
    assert p.allows("write", "audit") and not p.allows("write", "audit2")
    assert p.allows("read", "q-a") and not p.allows("read", "q-c")
    assert p.allows("read", "r1") and not p.allows("read", "r12")
    assert not p.allows("delete", "orders.eu")  # unknown action: nothing
    assert not Permissions().allows("read", "")
    assert not Permissions(read=("Orders.*",)).allows("read", "orders.x")  # case-sensitive
    assert Permissions(read=("*",)).allows("read", "")


def test_anonymous_may_do_everything() -> None:
    assert ANONYMOUS.anonymous and ANONYMOUS.permissions is None
    for action in ("configure", "write", "read"):
        assert ANONYMOUS.can(action, "anything")
        ANONYMOUS.require(action, "queue", "anything")
    ANONYMOUS.check_publish("x", "y")
    assert ANONYMOUS.visible("queues", [{"name": "a"}]) == [{"name": "a"}]


def test_principal_checks_and_publish_cache() -> None:
    p = Principal("shop", permissions=Permissions(write=("orders.*", "tasks"), read=("tasks",)))
    assert p.can("write", "orders.eu") and not p.can("write", "billing")
    p.check_publish("orders.eu", "any.key")
    p.check_publish("", "tasks")  # default exchange: write on the queue named by the key
    with pytest.raises(AccessRefused) as info:
        p.check_publish("billing", "tasks")
    assert info.value.code == 403 and "billing" in info.value.message
    assert info.value.details == {"exchange": "billing", "action": "write"}
    with pytest.raises(AccessRefused) as info:
        p.check_publish("", "other")
    assert info.value.details == {"queue": "other", "action": "write"}
    assert p._exchanges == {"orders.eu": True, "billing": False}
    assert p._queues == {"tasks": True, "other": False}
    with pytest.raises(AccessRefused, match="may not configure queue 'tasks'"):
        p.require("configure", "queue", "tasks")
    rows = [{"name": "tasks"}, {"name": "secret"}]
    assert p.visible("queues", rows) == [{"name": "tasks"}]
    binds = [{"exchange": "orders.eu", "queue": "x"}, {"exchange": "hr", "queue": "y"}]
    assert p.visible("bindings", binds) == binds[:1]


def test_principal_cache_is_bounded() -> None:
    p = Principal("x", permissions=Permissions(write=("*",)))
    for i in range(auth._CACHE_MAX + 10):
        p.check_publish(f"ex{i}", "")
    assert len(p._exchanges) <= auth._CACHE_MAX


def test_token_round_trip(key: Ed25519PrivateKey) -> None:
    claims = new_claims(
        "svc",
        3600,
        configure=("a*",),
        write=("b",),
        read=("c", "d"),
        rate_messages=100.0,
        rate_bytes=1e6,
        burst=50,
    )
    token = sign_token(key, claims)
    prefix, body, sig = token.split(".")
    assert prefix == "cvy1" and len(b64decode(sig)) == 64
    raw = json.loads(b64decode(body))
    assert raw["sub"] == "svc" and raw["exp"] - raw["iat"] == 3600
    assert raw["perms"] == {"configure": ["a*"], "write": ["b"], "read": ["c", "d"]}
    assert raw["rate"] == {"messages": 100.0, "bytes": 1e6, "burst": 50}
    got = TokenVerifier(key.public_key()).verify(token)
    assert got == claims
    p = got.principal()
    assert (p.subject, p.anonymous, p.rate_messages, p.rate_bytes, p.burst_messages) == (
        "svc",
        False,
        100.0,
        1e6,
        50,
    )
    assert p.token_id == claims.jti and p.expires_at == claims.exp
    assert p.can("configure", "abc") and not p.can("configure", "b")


def test_token_refusals(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    other = auth.load_or_create_key(tmp_path / "other.key")
    verifier = TokenVerifier(key.public_key())
    good = sign_token(key, new_claims("a", 60))

    def reason(token: str) -> str:
        with pytest.raises(TokenError) as info:
            verifier.verify(token)
        return info.value.reason

    assert reason(sign_token(other, new_claims("a", 60))) == "bad-signature"
    prefix, body, sig = good.split(".")
    forged = json.loads(b64decode(body))
    forged["perms"] = {"configure": ["*"], "write": ["*"], "read": ["*"]}
    assert reason(f"{prefix}.{b64encode(json.dumps(forged).encode())}.{sig}") == "bad-signature"
    for bad in (
        "",
        "cvy1",
        "cvy1..",
        "cvy2." + good[5:],
        good + ".x",
        "cvy1.!!.!!",
        f"{prefix}.{body}.{sig[:-4]}",
        "x" * 20000,
    ):
        assert reason(bad) == "malformed", bad
    assert reason(sign_token(key, new_claims("a", 60, now=time.time() - 120))) == "expired"
    # Claims are only parsed once the signature holds: a signed but odd token is malformed.
    odd = f"cvy1.{b64encode(b'[1]')}"
    assert reason(f"{odd}.{b64encode(key.sign(odd.encode()))}") == "malformed"


def test_claims_validation() -> None:
    base = {"sub": "a", "iat": 1, "exp": 2, "jti": "j", "perms": {}}
    assert auth.Claims.from_json(base).permissions == Permissions()
    for bad in (
        {**base, "sub": ""},
        {**base, "exp": "2"},
        {**base, "jti": "a b"},
        {**base, "perms": {"delete": []}},
        {**base, "perms": {"read": "x"}},
        {**base, "rate": {"messages": -1}},
        {**base, "rate": {"burst": 1.5}},
        {**base, "rate": {"other": 1}},
        [1],
    ):
        with pytest.raises(TokenError):
            auth.Claims.from_json(bad)


def test_signing_key_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "d" / "auth" / "signing.key"
    k1 = auth.load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    k2 = auth.load_or_create_key(path)
    assert k1.public_key().public_bytes_raw() == k2.public_key().public_bytes_raw()
    assert [p.name for p in path.parent.iterdir()] == ["signing.key"]  # no temp left
    (tmp_path / "not-a-key").write_text("hello")
    with pytest.raises(ValueError):
        auth.load_key(tmp_path / "not-a-key")


def test_revocation_list_rereads_on_change(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "auth" / "revoked"
    revoked = RevocationList(path)
    verifier = TokenVerifier(key.public_key(), revoked)
    claims = new_claims("a", 60)
    token = sign_token(key, claims)
    assert verifier.verify(token) == claims  # no file yet
    auth.append_revoked(path, "someone-else")
    assert verifier.verify(token) == claims
    auth.append_revoked(path, claims.jti)
    with pytest.raises(TokenError) as info:
        verifier.verify(token)
    assert info.value.reason == "revoked" and claims.jti in info.value.message
    assert verifier.inspect(token)["status"] == "revoked"
    path.write_text("# comment\n\n")  # un-revoked by the operator
    assert verifier.verify(token) == claims
    path.unlink()
    assert claims.jti not in revoked
    with pytest.raises(ValueError):
        auth.append_revoked(path, "two words")


def test_inspect_reports_every_problem(key: Ed25519PrivateKey) -> None:
    verifier = TokenVerifier(key.public_key(), clock=lambda: 10**10)
    info = verifier.inspect(sign_token(key, new_claims("a", 60)))
    assert (info["signature"], info["expired"], info["revoked"], info["status"]) == (
        "valid",
        True,
        False,
        "expired",
    )
    assert info["claims"]["sub"] == "a"


def test_failure_throttle_grows_caps_and_decays() -> None:
    now = [1000.0]
    t = FailureThrottle(base=0.2, cap=5.0, half_life=60.0, clock=lambda: now[0])
    delays = [t.failure("1.2.3.4") for _ in range(8)]
    assert delays[:4] == pytest.approx([0.2, 0.4, 0.8, 1.6])
    assert delays == sorted(delays) and max(delays) == 5.0
    assert t.failure("5.6.7.8") == pytest.approx(0.2)  # per address
    now[0] += 3600  # an hour later the score has decayed
    assert t.failure("1.2.3.4") == pytest.approx(0.2, rel=0.01)


def test_failure_throttle_table_is_bounded() -> None:
    now = [0.0]
    t = FailureThrottle(max_entries=100, clock=lambda: now[0])
    for i in range(1000):
        now[0] += 0.001
        t.failure(f"10.0.{i // 256}.{i % 256}")
    assert len(t._scores) <= 100


@pytest.mark.parametrize(
    ("host", "loop"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("fe80::1%eth0", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loop: bool) -> None:
    assert auth.is_loopback(host) is loop


def _authenticator(tmp_path: Path, **kw: object) -> Authenticator:
    a = Authenticator(Config(data_dir=str(tmp_path), **kw))  # type: ignore[arg-type]
    a.open()
    return a


def test_loopback_rule(tmp_path: Path) -> None:
    a = _authenticator(tmp_path, host="0.0.0.0")
    assert a.mechanisms("127.0.0.1") == ["token", "anonymous"]
    assert a.mechanisms("10.0.0.5") == ["token"]
    assert a.authenticate("anonymous", "", "127.0.0.1") is ANONYMOUS
    with pytest.raises(AuthenticationFailed, match="loopback"):
        a.authenticate("anonymous", "", "10.0.0.5")

    a = _authenticator(tmp_path, host="0.0.0.0", allow_anonymous=True)
    assert a.authenticate("anonymous", "", "10.0.0.5") is ANONYMOUS

    a = _authenticator(tmp_path, require_auth=True)
    assert a.mechanisms("127.0.0.1") == ["token"]
    with pytest.raises(AuthenticationFailed, match="requires a token"):
        a.authenticate("anonymous", "", "127.0.0.1")


def test_authenticate_tokens(tmp_path: Path) -> None:
    a = _authenticator(tmp_path, require_auth=True)
    assert (tmp_path / "auth" / "signing.key").exists()
    key = auth.load_key(tmp_path / "auth" / "signing.key")
    p = a.authenticate("token", sign_token(key, new_claims("svc", 60, read=("q",))), "::1")
    assert p.subject == "svc" and p.can("read", "q") and not p.can("write", "q")
    for token, why in (
        (sign_token(key, new_claims("svc", 60, now=0)), "expired"),
        ("cvy1.e30.AAAA", "malformed"),
        ("nope", "malformed"),
    ):
        with pytest.raises(AuthenticationFailed) as info:
            a.authenticate("token", token, "127.0.0.1")
        assert info.value.code == 401 and info.value.details["reason"] == why
    with pytest.raises(AuthenticationFailed, match="not offered"):
        a.authenticate("plain", "x", "127.0.0.1")


def test_config_security_settings(tmp_path: Path) -> None:
    cfg = load(
        None,
        tls_cert="c.pem",
        tls_key="k.pem",
        tls_ca="ca.pem",
        tls_port=0,
        plain=False,
        require_auth=True,
    )
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca, cfg.tls_port, cfg.plain) == (
        "c.pem",
        "k.pem",
        "ca.pem",
        0,
        False,
    )
    assert Config().tls_port == 5681 and Config().plain and not Config().allow_anonymous
    for bad in (
        {"plain": False},
        {"tls_cert": "c.pem"},
        {"tls_key": "k.pem"},
        {"tls_ca": "ca.pem"},
        {"tls_port": 70000, "tls_cert": "c", "tls_key": "k"},
        {"allow_anonymous": True, "require_auth": True},
        {"port": 7000, "tls_port": 7000, "tls_cert": "c", "tls_key": "k"},
    ):
        with pytest.raises(ConfigError):
            load(None, **bad)
    toml = tmp_path / "c.toml"
    toml.write_text(
        'tls-cert = "s.pem"\ntls-key = "s.key"\nplain = false\nallow-anonymous = true\n'
    )
    cfg = load(str(toml))
    assert (cfg.tls_cert, cfg.plain, cfg.allow_anonymous) == ("s.pem", False, True)
    toml.write_text('plain = "no"\n')
    with pytest.raises(ConfigError):
        load(str(toml))


def test_key_file_is_not_world_readable_even_with_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        auth.load_or_create_key(tmp_path / "k" / "signing.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k" / "signing.key").stat().st_mode) == 0o600


def test_still_valid_reports_expiry_and_revocation(tmp_path: Path) -> None:
    a = _authenticator(tmp_path)
    key = auth.load_key(tmp_path / "auth" / "signing.key")
    claims = new_claims("svc", 60, write=("q",))
    p = a.authenticate("token", sign_token(key, claims), "127.0.0.1")
    assert a.still_valid(p) is None and a.still_valid(ANONYMOUS) is None
    err = a.still_valid(p, now=claims.exp)
    assert err is not None and err.code == 401 and err.details == {"reason": "expired"}
    auth.append_revoked(auth.revoked_path(tmp_path), claims.jti)
    err = a.still_valid(p)
    assert err is not None and err.details == {"reason": "revoked"}


def test_certificate_names_and_identities(tmp_path: Path) -> None:
    cert = {"subject": ((("countryName", "NL"),), (("commonName", "billing"),))}
    assert auth.certificate_name(cert) == "billing"
    assert auth.certificate_name(None) == "" and auth.certificate_name({}) == ""
    ids = tmp_path / "ids.toml"
    ids.write_text(
        '[identities.billing]\nwrite = ["billing.*"]\nrate_messages = 5\n'
        'burst = 2\n[identities."with space"]\nread = ["*"]\n'
    )
    found = auth.load_identities(ids)
    b = found["billing"]
    assert b.subject == "billing" and b.can("write", "billing.eu") and not b.can("read", "x")
    assert (b.rate_messages, b.burst_messages, b.token_id) == (5, 2, "")
    assert found["with space"].can("read", "anything")
    for bad in (
        "x = 1\n",
        '[identities.a]\nwrite = "billing"\n',
        "[identities.a]\nrate_messages = -1\n",
        "[identities.a]\nadmin = true\n",
    ):
        ids.write_text(bad)
        with pytest.raises(ValueError):
            auth.load_identities(ids)
    a = _authenticator(tmp_path)
    assert a.certificate_principal("svc").permissions == auth.ALL_PERMISSIONS
    a.identities = found
    assert a.certificate_principal("billing") is b
    with pytest.raises(AuthenticationFailed) as info:
        a.certificate_principal("stranger")
    assert info.value.details == {"reason": "certificate-unknown"}


def test_config_http_and_identity_settings() -> None:
    for bad in (
        {"http_tls": True},
        {"tls_client_subject_identity": True},
        {"tls_identities": "ids.toml", "tls_cert": "c", "tls_key": "k"},
    ):
        with pytest.raises(ConfigError):
            load(None, **bad)
    cfg = load(
        None,
        tls_cert="c",
        tls_key="k",
        tls_ca="ca",
        http_tls=True,
        tls_client_subject_identity=True,
        http_allowed_hosts="mq.example",
    )
    assert cfg.http_tls and cfg.tls_client_subject_identity and cfg.http_allowed_hosts
