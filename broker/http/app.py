"""The aiohttp application and its listener, started and stopped by ``broker.app.serve``.

Requests to ``/api``, ``/queues``, ``/exchanges`` and ``/metrics`` are authenticated like binary
connections (broker.http.common.authenticate); every failure is a JSON error with the
spec's error code and name: ``{"error": {"code": 404, "name": "not-found", ...}}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from conveyor import data_path
from conveyor.broker.http import gateway, management
from conveyor.broker.http.common import (
    CTX,
    PRINCIPAL,
    HttpContext,
    authenticate,
    check_anonymous,
    check_body_type,
    check_origin,
    ctx,
    error_body,
    error_response,
    json_response,
    require_admin,
)
from conveyor.broker.http.gateway import Gateway
from conveyor.broker.http.stats import Stats, basic_metrics
from conveyor.broker.tls import server_context
from conveyor.protocol import ERROR_CODES, AuthenticationFailed, ConveyorError

if TYPE_CHECKING:
    from conveyor.broker.server import BrokerServer

log = logging.getLogger("conveyor.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATIC_DIR = Path(__file__).with_name("static")
# Package data (conveyor/spec in a wheel; in a checkout, the symlink to the repository's spec/).
SPEC_PATH = data_path("spec", "openapi.yaml")
_GUARDED = ("/api/", "/api", "/queues/", "/exchanges/", "/metrics")
_NAMES = {code: name for name, code in ERROR_CODES.items()}
# HTTP statuses aiohttp raises itself (no route, wrong method, body too big ...).
_HTTP_NAMES = {
    400: "invalid-argument",
    404: "not-found",
    405: "not-implemented",
    413: "message-too-large",
}


@web.middleware
async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.path.startswith(_GUARDED):
            check_origin(request)
            p = request[PRINCIPAL] = authenticate(request)
            if p.anonymous:
                check_anonymous(request)
            check_body_type(request)
        return await handler(request)
    except AuthenticationFailed as exc:
        # The binary protocol's throttle, per address: the answer waits longer with each
        # recent failure, so guessing tokens over HTTP is as slow as over AUTH.
        delay = ctx(request).server.auth.throttle.failure(request.remote or "?")
        await asyncio.sleep(delay)
        return error_response(exc, {"WWW-Authenticate": 'Bearer realm="conveyor"'})
    except ConveyorError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        name = _HTTP_NAMES.get(exc.status) or _NAMES.get(exc.status, "invalid-argument")
        code = ERROR_CODES.get(name, exc.status)
        message = exc.reason if exc.text is None else exc.text
        resp = json_response(error_body(code, name, message), status=exc.status)
        if exc.status == 405:
            resp.headers["Allow"] = exc.headers.get("Allow", "")
        return resp
    except Exception:
        log.exception("bug handling %s %s", request.method, request.path)
        return json_response(error_body(541, "internal-error", "internal error"), status=500)


async def metrics(request: web.Request) -> web.Response:
    require_admin(request)
    c = ctx(request)
    if c.metrics is not None:
        text = c.metrics()
    else:
        try:  # broker.metrics (prometheus_client): the full set, OpenMetrics on request
            from conveyor.broker.metrics import render_metrics
        except ImportError:
            text = basic_metrics(
                c.broker, c.stats, sum(1 for p in c.server.protocols if p.session is not None)
            )
        else:
            body, ctype = render_metrics(c.broker, c.server, request.headers.get("Accept"))
            return web.Response(
                body=body, headers={"Content-Type": ctype, "X-Content-Type-Options": "nosniff"}
            )
    return web.Response(
        text=text,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


async def openapi(_request: web.Request) -> web.Response:
    try:
        text = SPEC_PATH.read_text()
    except OSError:
        raise web.HTTPNotFound(text="spec/openapi.yaml is not installed") from None
    return web.Response(text=text, content_type="application/yaml", charset="utf-8")


async def dashboard(_request: web.Request) -> web.StreamResponse:
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        raise web.HTTPNotFound(text="the dashboard is not installed")
    return web.FileResponse(index)


def create_app(
    server: BrokerServer, metrics_renderer: Callable[[], str] | None = None
) -> web.Application:
    """The application: management API, gateway, /metrics, /openapi.yaml, dashboard."""
    cfg = server.config
    broker = server.broker
    # A base64 body is 4/3 of the message, plus JSON and headers.
    app = web.Application(
        middlewares=[errors_and_auth],
        client_max_size=cfg.effective_max_message_size() * 4 // 3 + 65536,
    )
    gw = Gateway(broker, cfg.max_frame_size)
    stats = Stats(broker)
    stats.on_sample.append(gw.prune)
    app[CTX] = HttpContext(server, stats, gw, metrics_renderer)
    management.add_routes(app)
    gateway.add_routes(app)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.yaml", openapi)
    app.router.add_get("/", dashboard)
    if STATIC_DIR.is_dir():
        app.router.add_static("/static/", STATIC_DIR)
    return app


class HttpListener:
    """Runs :func:`create_app` on ``config.host``:``config.http_port`` (0 = any free)."""

    def __init__(
        self, server: BrokerServer, metrics_renderer: Callable[[], str] | None = None
    ) -> None:
        self.server = server
        self.app = create_app(server, metrics_renderer)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0

    @property
    def context(self) -> HttpContext:
        return self.app[CTX]

    async def start(self) -> None:
        cfg = self.server.config
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        # http_tls: the binary TLS listener's certificate, key and client-CA settings.
        tls = server_context(cfg) if cfg.http_tls else None
        self._site = web.TCPSite(
            self._runner, cfg.host, cfg.http_port, reuse_address=True, ssl_context=tls
        )
        await self._site.start()
        addresses = self._runner.addresses  # the bound (host, port, ...) of each socket
        self.port = int(addresses[0][1]) if addresses else cfg.http_port
        self.context.stats.start()
        log.info("conveyor http listening on %s:%d%s", cfg.host, self.port, " (TLS)" if tls else "")

    async def stop(self) -> None:
        """Stop accepting, finish requests briefly, requeue the gateway's deliveries."""
        await self.context.stats.stop()
        self.context.gateway.stop_waiting()  # long polls answer now, not in 20 s
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.context.gateway.close()
