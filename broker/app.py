"""Process entry point: logging, uvloop, signals, data directory, serve until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from broker.config import Config
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
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before serving
    server = BrokerServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # non-main thread
            loop.add_signal_handler(sig, stop.set)
    # Machine-readable line so scripts and tests can find the port when --port 0 is used.
    print(f"conveyor listening on {config.host}:{server.port}", flush=True)
    if ready is not None and not ready.done():
        ready.set_result(server.port)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop()


def run(config: Config) -> None:
    setup_logging(config.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(serve(config))
        return
    uvloop.run(serve(config))
