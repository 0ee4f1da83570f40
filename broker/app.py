"""Process entry point: logging, uvloop, signals, data directory, serve until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

from conveyor.broker import logfmt
from conveyor.broker.config import Config
from conveyor.broker.durability import Durability
from conveyor.broker.server import BrokerServer
from conveyor.broker.slow import SlowConsumers

log = logging.getLogger("conveyor")


def setup_logging(level: str, fmt: str = "text") -> None:
    """Text lines or JSON lines (``log_format``) on stderr: broker.logfmt."""
    logfmt.setup_logging(level, fmt)


async def serve(config: Config, ready: asyncio.Future[int] | None = None) -> None:
    """Run a broker until SIGTERM/SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    # A file-size limit must surface as a write error (EFBIG), handled like a full disk,
    # not kill the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Messages and deliveries are short-lived acyclic objects: collect cycles less often.
    gc.set_threshold(50_000, 50, 100)
    durability = Durability(config)
    broker = durability.open()  # recovery runs before the listener opens
    broker.scheduler = loop.call_soon
    server = BrokerServer(config, broker)
    try:
        await server.start()
    except BaseException:
        durability.close()
        raise
    http = None
    if config.http_port >= 0:  # broker.http: management API, REST gateway, dashboard
        from conveyor.broker.http import HttpListener

        http = HttpListener(server)
        try:
            await http.start()
        except BaseException:
            await server.stop()
            durability.close()
            raise
    durability.start()
    slow_consumers = SlowConsumers(broker)  # rate-limited "slow consumer" log lines
    slow_consumers.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # non-main thread
            loop.add_signal_handler(sig, stop.set)
    # Machine-readable lines so scripts and tests can find the ports when --port 0 is used
    # (the TLS one first: a reader that stops at the plain line has seen both; the HTTP
    # one before them).
    if http is not None:
        print(f"conveyor http listening on {config.host}:{http.port}", flush=True)
    if server.tls_port:
        print(f"conveyor tls listening on {config.host}:{server.tls_port}", flush=True)
    if config.plain:
        print(f"conveyor listening on {config.host}:{server.port}", flush=True)
    if ready is not None and not ready.done():
        ready.set_result(server.port)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        slow_consumers.stop()
        if http is not None:
            await http.stop()  # requeues the gateway's unacked deliveries
        await server.stop()
        durability.close()


def run(config: Config) -> None:
    setup_logging(config.log_level, config.log_format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(serve(config))
        return
    uvloop.run(serve(config))
