"""The asyncio/uvloop transport around the sans-IO protocol and the broker model.

Each TCP connection gets a ``BrokerProtocol``: ``data_received`` feeds the protocol state
machine, hands the decoded frames to the connection's Session in one batch, then calls
``Broker.pump`` so every queue that changed dispatches and every session writes once.
No task and no await per message. When a peer stops reading (``pause_writing``), we stop
reading from it too, so it cannot make us buffer its confirms without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import socket
import time
from typing import Any, cast

from broker.config import Config
from broker.core import Broker
from broker.session import Session
from protocol import (
    Auth,
    AuthenticationFailed,
    Close,
    CloseOk,
    ConnectionForced,
    ConveyorError,
    Error,
    FatalError,
    Frame,
    HeartbeatTimeout,
    Hello,
    InternalError,
    OpenOk,
    UnexpectedFrame,
    encode_many,
)
from protocol import Heartbeat as HeartbeatFrame
from protocol._generated import (
    HEARTBEAT_MS_FLOOR,
    MAX_FRAME_SIZE_FLOOR,
    VERSION_MAJOR,
    VERSION_MINOR,
)
from protocol.connection import Connection, Role, State

log = logging.getLogger("conveyor.server")
VERSION = "0.1.0"
AUTH_MECHANISMS = ("anonymous",)  # offered in HELLO; AUTH with any other is 401


class BrokerProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: BrokerServer) -> None:
        self.server = server
        self.broker = server.broker
        self.config = server.config
        self.conn = Connection(Role.SERVER, self.config.max_frame_size)
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.peer = "?"
        self.heartbeat_ms = 0
        self._last_recv = time.monotonic()
        self._last_send = self._last_recv
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._close_ok = asyncio.get_running_loop().create_future()

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.protocols.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(
            self.config.handshake_timeout_ms / 1000, self._handshake_expired
        )

    def data_received(self, data: bytes) -> None:
        self._last_recv = time.monotonic()
        was = self.conn.state
        try:
            frames = self.conn.receive_data(data)
            if was is State.AWAIT_PREAMBLE and self.conn.state is State.AWAIT_AUTH:
                self._send_hello()
            if frames:
                self._handle(frames)
        except FatalError as exc:
            self._fatal(exc)
        except ConveyorError as exc:  # a request error escaped a handler: still not a crash
            self._fatal(InternalError(exc.message))
        except Exception:
            log.exception("bug while serving %s", self.peer)
            self._fatal(InternalError("internal error; connection closed"))
        self.broker.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.protocols.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.session is not None:
            self.session.close()
            self.session = None
            self.broker.pump()
        if not self._close_ok.done():
            self._close_ok.set_result(None)
        self.conn.fail()

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self._closing:
            self.transport.resume_reading()

    # ------------------------------------------------------------------ frames
    def _handle(self, frames: list[Frame]) -> None:
        session = self.session
        if session is not None and self.conn.state is State.OPEN:
            # Fast path: only connection-control frames need looking at individually.
            for f in frames:
                if f.TYPE in (Close.TYPE, CloseOk.TYPE):
                    break
            else:
                session.handle(frames)
                return
        batch: list[Frame] = []
        for f in frames:
            if isinstance(f, Auth):
                self._on_auth(f)
            elif isinstance(f, Close):
                if self.session is not None:
                    if batch:
                        self.session.handle(batch)
                        batch = []
                    self.session.flush()  # replies to earlier requests go before CLOSE_OK
                self._write([CloseOk()])
                self._shutdown_transport()
                return
            elif isinstance(f, CloseOk):
                self._shutdown_transport()
                return
            elif self.session is not None:
                batch.append(f)
        if batch and self.session is not None:
            self.session.handle(batch)

    def _send_hello(self) -> None:
        self._write([Hello(
            f"{VERSION_MAJOR}.{VERSION_MINOR}",
            self.config.max_frame_size,
            self.config.heartbeat_ms,
            {"product": "conveyor", "version": VERSION,
             "platform": platform.python_implementation()},
            list(AUTH_MECHANISMS),
        )])

    def _on_auth(self, f: Auth) -> None:
        # Auth hook: token verification and permissions plug in here.
        if f.mechanism not in AUTH_MECHANISMS:
            raise AuthenticationFailed(
                f"mechanism {f.mechanism!r} not offered; use one of {list(AUTH_MECHANISMS)}",
                {"mechanism": f.mechanism})
        cfg = self.config
        frame_max = cfg.max_frame_size
        if f.max_frame_size:
            frame_max = max(MAX_FRAME_SIZE_FLOOR, min(frame_max, f.max_frame_size))
        hb = cfg.heartbeat_ms
        if f.heartbeat_ms and hb:
            hb = min(hb, f.heartbeat_ms)
        hb = max(hb, HEARTBEAT_MS_FLOOR) if hb else 0
        self.heartbeat_ms = hb
        self.conn.max_frame_size = frame_max
        sid = self.broker.new_session_id()
        self.session = Session(self.broker, sid, self._write_chunks, frame_max)
        ok = OpenOk(sid, frame_max, hb)
        self.conn.send(ok)  # advances the state machine to OPEN
        self._write([ok])
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if hb:
            self._timer = asyncio.get_running_loop().call_later(hb / 2000, self._heartbeat_tick)
        log.debug("open %s from %s (%s)", sid, self.peer, f.client_properties.get("library", "?"))

    # ------------------------------------------------------------------ output
    def _write(self, frames: list[Frame]) -> None:
        self._write_chunks([encode_many(frames)])

    def _write_chunks(self, chunks: list[bytes]) -> None:
        """One transport write for everything a flush produced."""
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])
        self._last_send = time.monotonic()

    def _fatal(self, exc: ConveyorError) -> None:
        """Send ERROR with the spec's code, close this connection only."""
        if self._closing:
            return
        log.info("closing %s: %s", self.peer, exc)
        self.conn.fail()
        self._write([Error(0, exc.code, exc.message, exc.details)])
        self._shutdown_transport()

    def _shutdown_transport(self) -> None:
        self._closing = True
        self.conn.fail()
        if self.session is not None:
            self.session.flush()
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ timers
    def _handshake_expired(self) -> None:
        self._timer = None
        if self.session is None and not self._closing:
            self._fatal(UnexpectedFrame("handshake not completed in time"))

    def _heartbeat_tick(self) -> None:
        self._timer = None
        if self._closing or self.transport is None:
            return
        now = time.monotonic()
        hb = self.heartbeat_ms / 1000
        if now - self._last_recv > 2 * hb:
            self._fatal(HeartbeatTimeout(f"no data from {self.peer} for {2 * hb:.1f}s"))
            self.broker.pump()
            return
        if now - self._last_send >= hb / 2:
            self._write([HeartbeatFrame()])
        self._timer = asyncio.get_running_loop().call_later(hb / 2, self._heartbeat_tick)

    # ------------------------------------------------------------------ shutdown
    def begin_close(self, code: int, message: str) -> None:
        """Send CLOSE and wait for CLOSE_OK (frames crossing it on the wire are dropped)."""
        if self._closing or self.transport is None:
            return
        if self.conn.state is State.OPEN:
            if self.session is not None:
                self.session.flush()
            if not self.transport.is_closing():
                self.transport.write(self.conn.send(Close(code, message)))
            self._closing = True
        else:
            self._shutdown_transport()


class BrokerServer:
    """Owns the listener, the broker model and every connection."""

    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        self.config = config
        self.broker = broker or Broker(max_message_size=config.effective_max_message_size())
        self.protocols: set[BrokerProtocol] = set()
        self._server: asyncio.Server | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: BrokerProtocol(self), self.config.host, self.config.port, reuse_address=True,
            backlog=1024,
        )
        log.info("conveyor %s listening on %s:%d", VERSION, self.config.host, self.port)
        self.broker.timer_hook = self._arm_timer
        self.broker.start_timers()

    def _arm_timer(self, delay: float) -> None:
        """The broker's earliest timer moved: one loop timer calls Broker.tick then."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire_timer)

    def _fire_timer(self) -> None:
        self._timer = None
        self.broker.tick()

    async def stop(self) -> None:
        """Graceful: stop accepting, CLOSE every connection, wait briefly, then drop them."""
        if self._server is not None:
            self._server.close()
        self.broker.timer_hook = None
        if self._timer is not None:
            self._timer.cancel()
        protos = list(self.protocols)
        err = ConnectionForced("server shutting down")
        for p in protos:
            p.begin_close(err.code, err.message)
        waiters: list[Any] = [p._close_ok for p in protos]
        if waiters:
            await asyncio.wait(waiters, timeout=self.config.shutdown_grace_ms / 1000)
            for p in protos:
                if p.transport is not None and not p._close_ok.done():
                    p.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        self.broker.store.close()
        log.info("conveyor stopped")
