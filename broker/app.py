"""Process entry point: logging, uvloop, signals, data directory, serve until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys

from broker.config import Config
from broker.durability import Durability
from broker.server import BrokerServer

log = logging.getLogger("conveyor")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
    durability.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # non-main thread
            loop.add_signal_handler(sig, stop.set)
    # Machine-readable lines so scripts and tests can find the ports when --port 0 is used
    # (the TLS one first: a reader that stops at the plain line has seen both).
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
        await server.stop()
        durability.close()


def run(config: Config) -> None:
    setup_logging(config.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(serve(config))
        return
    uvloop.run(serve(config))
