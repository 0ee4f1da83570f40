"""What every HTTP handler shares: the per-application context, JSON errors with the
spec's error codes, bearer-token authentication and request parsing helpers."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from conveyor.broker.auth import ANONYMOUS, Principal
from conveyor.protocol import (
    AccessRefused,
    AuthenticationFailed,
    ConveyorError,
    InvalidArgument,
    ResourceError,
)
from conveyor.protocol.limits import NAME_MAX

if TYPE_CHECKING:
    from conveyor.broker.core import Broker
    from conveyor.broker.http.gateway import Gateway
    from conveyor.broker.http.stats import Stats
    from conveyor.broker.server import BrokerServer

JSON_TYPE = "application/json"
# Anonymous state changes must carry this header (any value): a cross-site form or a
# "simple" fetch cannot set it without a CORS preflight, which this listener never grants.
REQUEST_HEADER = "X-Conveyor-Request"
MAX_JSON_DEPTH = 32  # arrays/objects nested deeper in a request body: 400, before parsing
# Host names anonymous (loopback) callers may use; anything else is DNS rebinding or a
# misconfiguration (add names with --http-allowed-hosts).
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class HttpContext:
    """Everything handlers need, stored on the aiohttp application under ``CTX``."""

    server: BrokerServer
    stats: Stats
    gateway: Gateway
    # /metrics body (Prometheus text format); broker.http.stats.basic_metrics if unset.
    metrics: Callable[[], str] | None = None
    started: float = field(default_factory=time.time)

    @property
    def broker(self) -> Broker:
        return self.server.broker


CTX = web.AppKey("conveyor", HttpContext)
PRINCIPAL = "conveyor.principal"


def ctx(request: web.Request) -> HttpContext:
    return request.app[CTX]


# ---------------------------------------------------------------------- errors
# Spec error code -> HTTP status. Most spec codes are HTTP-like already; the others map
# to the closest HTTP meaning (the JSON body keeps the spec's code and name).
_STATUS = {
    312: 404,
    405: 409,
    406: 409,
    408: 408,
    501: 400,
    502: 413,
    503: 400,
    505: 400,
    506: 503,
    540: 501,
    541: 500,
}


def http_status(code: int) -> int:
    if code in _STATUS:
        return _STATUS[code]
    return code if 400 <= code < 600 else 500


def error_body(
    code: int, name: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "name": name, "message": message}
    if details:
        err["details"] = details
    return {"error": err}


def error_response(exc: ConveyorError, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(
        error_body(exc.code, exc.name, exc.message, exc.details),
        status=http_status(exc.code),
        headers=headers,
    )


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=json_text(data), status=status, content_type=JSON_TYPE, headers=headers
    )


def json_text(data: Any) -> str:
    """Strict JSON: a NaN or infinite float (e.g. in a header a binary client published)
    becomes the string "NaN", "Infinity" or "-Infinity" instead of invalid JSON."""
    try:
        return json.dumps(data, default=_json_default, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(data), default=_json_default, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return encode_body(bytes(value))[0]
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


# ---------------------------------------------------------------------- auth
def authenticate(request: web.Request) -> Principal:
    """The principal of a request: ``Authorization: Bearer <token>`` verified like a
    binary AUTH with mechanism token; without one, anonymous under the binary protocol's
    rule (loopback peers only, everywhere with --allow-anonymous, never with
    --require-auth). Raises AuthenticationFailed (401)."""
    auth = ctx(request).server.auth
    peer_ip = request.remote or ""
    header = request.headers.get("Authorization")
    if header is None:
        return auth.authenticate("anonymous", "", peer_ip)
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed(
            "expected 'Authorization: Bearer <token>'", {"reason": "malformed"}
        )
    return auth.authenticate("token", token.strip(), peer_ip)


def _hostname(netloc: str) -> str:
    """ "host", "host:port", "[::1]:port" -> the lower-case host name."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].partition("]")[0]
    if netloc.count(":") == 1:
        netloc = netloc.partition(":")[0]
    return netloc.rstrip(".")


def allowed_hosts(server: BrokerServer) -> frozenset[str]:
    """Loopback names plus ``http_allowed_hosts`` (comma-separated) and a specific
    (non-wildcard) listen address."""
    cfg = server.config
    names = {_hostname(n) for n in cfg.http_allowed_hosts.split(",") if n.strip()}
    if cfg.host not in ("", "0.0.0.0", "::"):
        names.add(_hostname(cfg.host))
    return LOOPBACK_NAMES | names


def check_origin(request: web.Request) -> None:
    """A browser's ``Origin`` must be this listener itself or an allowed host name:
    a page on another site (evil.example) gets 403, whatever it sends."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    own = f"{request.scheme}://{request.host}".lower()
    name = _hostname(urlsplit(origin).netloc) if "://" in origin else ""
    if origin.strip().lower() != own and name not in allowed_hosts(ctx(request).server):
        raise AccessRefused(
            f"cross-origin request from {origin!r} refused", {"reason": "origin", "origin": origin}
        )


def check_anonymous(request: web.Request) -> None:
    """Anonymous (loopback) callers: the ``Host`` must be an allowed name (DNS rebinding
    makes a browser send the attacker's name) and a state change must carry the
    ``X-Conveyor-Request`` header, which a cross-site page cannot add."""
    host = _hostname(request.host)
    if host not in allowed_hosts(ctx(request).server):
        raise AccessRefused(
            f"Host {request.host!r} is not an allowed name for anonymous access "
            "(use localhost/127.0.0.1, --http-allowed-hosts, or a token)",
            {"reason": "host", "host": request.host},
        )
    if request.method not in SAFE_METHODS and REQUEST_HEADER not in request.headers:
        raise AccessRefused(
            f"anonymous {request.method} needs the {REQUEST_HEADER} header (or a token)",
            {"reason": "csrf", "header": REQUEST_HEADER},
        )


def check_body_type(request: web.Request) -> None:
    """A state change with a body must say ``Content-Type: application/json`` (a
    cross-site form can only send text/plain, form or multipart bodies)."""
    if (
        request.method not in SAFE_METHODS
        and request.body_exists
        and request.content_type != JSON_TYPE
    ):
        raise InvalidArgument(
            f"request bodies must be {JSON_TYPE}, not {request.content_type!r}",
            {"reason": "content-type"},
        )


def principal(request: web.Request) -> Principal:
    p = request.get(PRINCIPAL)
    return p if isinstance(p, Principal) else ANONYMOUS


def require_admin(request: web.Request) -> Principal:
    """Management endpoints: the anonymous principal (where allowed) or a token whose
    configure permissions include the pattern "*"."""
    p = principal(request)
    perms = p.permissions
    if perms is not None and "*" not in perms.configure:
        raise AccessRefused(
            f"{p.subject!r} may not use the management API (needs configure '*')",
            {"action": "configure"},
        )
    return p


# ---------------------------------------------------------------------- parsing
def queue_name(request: web.Request, key: str = "name") -> str:
    name = request.match_info[key]
    if not name or len(name.encode("utf-8", "surrogatepass")) > NAME_MAX:
        raise InvalidArgument(f"queue name must be 1..{NAME_MAX} bytes", {"queue": name})
    return name


def int_query(request: web.Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise InvalidArgument(f"{key} must be an integer {lo}..{hi}", {key: raw})
    return value


async def json_object(request: web.Request, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object (400 invalid-argument otherwise)."""
    raw = await request.read()
    if not raw.strip():
        if required:
            raise InvalidArgument("a JSON object body is required")
        return {}
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise InvalidArgument(
            f"body nests arrays/objects more than {MAX_JSON_DEPTH} deep",
            {"limit": "max_json_depth", "max_json_depth": MAX_JSON_DEPTH},
        )
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("body must be a JSON object")
    return data


# A JSON string (escapes included) or one bracket; brackets inside strings do not count.
_JSON_NESTING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def json_depth(raw: bytes) -> int:
    """How deep arrays/objects nest in ``raw``, without parsing it (so a body of 100,000
    brackets costs one linear scan, not a recursion overflow)."""
    depth = deepest = 0
    for m in _JSON_NESTING.finditer(raw):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    break
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise InvalidArgument(f"{name} is not valid JSON (numbers must be finite)")


def encode_body(body: bytes) -> tuple[str, str]:
    """(text, encoding): UTF-8 text as is, anything else base64."""
    try:
        return body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), "base64"


def decode_body(text: Any, encoding: Any) -> bytes:
    if not isinstance(text, str):
        raise InvalidArgument("message must be a string", {"field": "message"})
    if encoding in (None, "utf-8"):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") from JSON
            raise InvalidArgument(
                "message is not valid Unicode text; send base64", {"field": "message"}
            ) from None
    if encoding == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument("message is not valid base64", {"field": "message"}) from None
    raise InvalidArgument("encoding must be 'utf-8' or 'base64'", {"field": "encoding"})


async def committed(broker: Broker) -> None:
    """Wait until everything logged so far is durable (like a publisher confirm):
    hand the journal to the store, then wait for its commit callback."""
    broker.flush_journal()
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[BaseException | None] = loop.create_future()

    def done(err: BaseException | None) -> None:
        def resolve() -> None:
            if not fut.done():
                fut.set_result(err)

        loop.call_soon_threadsafe(resolve)

    broker.commit(done)  # the log and any stream appended to (broker.stream)
    err = await fut
    if err is not None:
        raise ResourceError(f"could not store the change: {err}; retry")
