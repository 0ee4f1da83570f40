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
import resource
import socket
import time
from collections import OrderedDict
from typing import Any, cast

from conveyor.broker.auth import TOKEN_RECHECK_S, Authenticator, certificate_name, is_loopback
from conveyor.broker.config import Config
from conveyor.broker.core import Broker
from conveyor.broker.flow import FlowControl
from conveyor.broker.limits import (
    FD_RESERVE,
    ConnectionCounter,
    Limits,
    connection_subject,
    raise_fd_limit,
)
from conveyor.broker.peeruid import peer_uid
from conveyor.broker.session import Session, connection_name
from conveyor.broker.tls import server_context
from conveyor.broker.wal import WalStore
from conveyor.protocol import (
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
    ResourceError,
    UnexpectedFrame,
    encode_many,
)
from conveyor.protocol import Heartbeat as HeartbeatFrame
from conveyor.protocol.connection import Connection, Role, State
from conveyor.protocol.limits import (
    HEARTBEAT_MS_FLOOR,
    MAX_FRAME_SIZE_FLOOR,
    MAX_FRAME_SIZE_PREAUTH,
    VERSION_MAJOR,
    VERSION_MINOR,
)

log = logging.getLogger("conveyor.server")
VERSION = "0.1.0"


class BrokerProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: BrokerServer) -> None:
        self.server = server
        self.broker = server.broker
        self.config = server.config
        # Until OPEN_OK only small frames (spec: max_frame_size_preauth): a connection that
        # has not authenticated cannot make the broker buffer a large frame.
        self.conn = Connection(Role.SERVER, min(self.config.max_frame_size, MAX_FRAME_SIZE_PREAUTH))
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.peer = "?"
        self.peer_ip = ""  # for the loopback rule and the failed-AUTH throttle
        self.cert_name = ""  # client certificate common name (tls_client_subject_identity)
        self.heartbeat_ms = 0
        self._last_recv = time.monotonic()
        self._last_send = self._last_recv
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._close_ok = asyncio.get_running_loop().create_future()
        # Reading stops while the peer does not read (pause_writing) or has published
        # beyond its credit (broker.flow); it resumes when neither holds.
        self._write_paused = False
        self._credit_held = False
        # For the connection open/close log lines.
        self._opened_at = 0.0
        self._close_reason = ""

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.peer_ip = str(peer[0]) if isinstance(peer, tuple) else ""
        if self.server.auth.cert_identity:  # mTLS: the verified certificate's name
            self.cert_name = certificate_name(transport.get_extra_info("peercert"))
        self.server.protocols.add(self)
        if not self.server.handshakes.admit(self):
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(
            self.config.handshake_timeout_ms / 1000, self._handshake_expired
        )

    def data_received(self, data: bytes) -> None:
        self._last_recv = time.monotonic()
        try:
            if self.conn.state is State.AWAIT_PREAMBLE:
                # HELLO answers the preamble before anything after it in the same read
                # (a pipelining client sends preamble + AUTH in one write) is decoded.
                need = self.conn.preamble_needed
                self.conn.receive_data(data[:need])
                if not self.conn.preamble_needed:  # a valid preamble (a bad one raised)
                    self._send_hello()
                data = data[need:]
            frames = self.conn.receive_data(data) if data else []
            if frames:
                self._handle(frames)
        except FatalError as exc:
            self._fatal(exc)
        except ConveyorError as exc:  # a request error escaped a handler: still not a crash
            self._fatal(InternalError(exc.message))
        except Exception:
            log.exception("bug while serving %s", self.peer)
            self._fatal(InternalError("internal error; connection closed"))
        try:  # the pump serves every connection: its failure is not this peer's doing
            self.broker.pump_input()
        except Exception:
            log.exception("bug in the broker pump (input from %s)", self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.protocols.discard(self)
        self.server.handshakes.done(self)
        self.server.connections.release(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.session is not None:
            self._log_close(self.session, exc)
            self.session.close()
            self.session = None
            self.broker.pump()
        if not self._close_ok.done():
            self._close_ok.set_result(None)
        self.conn.fail()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.session is not None:
            self.session.pause_writing(True)  # no dispatch to a peer that does not read
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.session is not None:
            self.session.pause_writing(False)
        if self.transport is not None and not self._closing and not self._credit_held:
            self.transport.resume_reading()

    def _hold_reading(self, hold: bool) -> None:
        """conveyor.broker.flow: stop reading from a client that published beyond its credit, until
        the broker grants credit again (never a disconnect)."""
        self._credit_held = hold
        t = self.transport
        if t is None or self._closing or t.is_closing():
            return
        if hold:
            t.pause_reading()
        elif not self._write_paused:
            self._last_recv = time.monotonic()  # unread input waited for us, not the peer
            t.resume_reading()

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
                self._close_reason = self._close_reason or (
                    f"closed by the client ({f.code} {f.message})".replace(" )", ")")
                )
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
        hello = Hello(  # the lower of the two minor versions (spec/PROTOCOL.md, 18.)
            f"{VERSION_MAJOR}.{min(self.conn.peer_minor, VERSION_MINOR)}",
            self.config.max_frame_size,
            self.config.heartbeat_ms,
            {
                "product": "conveyor",
                "version": VERSION,
                "platform": platform.python_implementation(),
            },
            self._mechanisms(),
            self.broker.max_message_size,
        )
        self._write_since(hello)

    def _write_since(self, frame: Hello | OpenOk) -> None:
        """HELLO / OPEN_OK without their 1.2 trailing field to a client older than 1.2
        (strict receivers refuse extra fields: spec/PROTOCOL.md section 18). Through the
        state machine's send, so they are checked (state, fields) and OPEN_OK opens it."""
        self._write_chunks([self.conn.send(frame, trim=1 if self.conn.peer_minor < 2 else 0)])

    def _mechanisms(self) -> list[str]:
        """HELLO's list: a certificate identity AUTHs with mechanism "anonymous" (the
        certificate, not a token, is its credential)."""
        mechs = self.server.auth.mechanisms(self.peer_ip)
        return mechs if not self.cert_name or "anonymous" in mechs else [*mechs, "anonymous"]

    def _on_auth(self, f: Auth) -> None:
        try:  # broker.auth: token signature/expiry/revocation, the loopback rule
            if self.cert_name and f.mechanism == "anonymous":
                principal = self.server.auth.certificate_principal(self.cert_name)
            else:
                principal = self.server.auth.authenticate(f.mechanism, f.token, self.peer_ip)
        except AuthenticationFailed as exc:
            self._auth_failed(exc)
            return
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
        self.session.principal = principal
        self.session.name = connection_name(f.client_properties)
        self.session.on_failure = self._session_failed
        self.session.runs = self.conn.peer_minor >= 1  # DELIVER_RUN is 1.1
        try:  # max_connections, max_connections_per_subject: ERROR 506 instead of OPEN_OK
            self.server.connections.admit(
                self.broker.limits,
                self,
                connection_subject(
                    principal.subject, principal.anonymous, self.peer_ip, self._local_uid()
                ),
            )
        except ConveyorError as exc:
            self.session.close()
            self.session = None
            self._fatal(exc)
            return
        compression = ""
        if cfg.wire_compression:
            # AUTH.compression since 1.2; before, the list rode in client_properties
            # (still accepted there, spec/PROTOCOL.md section 4).
            wanted: Any = f.compression or f.client_properties.get("compression")
            if type(wanted) is list and "zstd" in wanted:
                compression = "zstd"
        ok = OpenOk(sid, frame_max, hb, compression, self.session.max_message_size)
        self.server.handshakes.done(self)  # authenticated: no longer sheddable
        self._write_since(ok)  # advances the state machine to OPEN
        if compression:  # both directions: COMPRESSED frames after OPEN_OK
            self.conn.compression = True
            self.session.compress = True
        # The initial PUBLISH_CREDIT follows OPEN_OK (spec section 12).
        self.session.flow.open(asyncio.get_running_loop().call_later, self._hold_reading, self.peer)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if hb:
            self._timer = asyncio.get_running_loop().call_later(hb / 2000, self._heartbeat_tick)
        self._opened_at = time.monotonic()
        library = f.client_properties.get("library", "?")
        name = self.session.name
        log.info(
            "connection %s%s open from %s (subject %s, %s)",
            sid,
            f" ({name!r})" if name else "",
            self.peer,
            principal.subject,
            library,
            extra={
                "event": "connection.open",
                "peer": self.peer,
                "id": sid,
                "connection_name": name,
                "subject": principal.subject,
                "library": str(library),
            },
        )

    def _local_uid(self) -> int | None:
        """The local user owning an anonymous loopback client's socket (None otherwise):
        anonymous connections are counted per user, not only per address."""
        if self.session is None or not self.session.principal.anonymous:
            return None
        if self.transport is None or not is_loopback(self.peer_ip):
            return None
        peer = self.transport.get_extra_info("peername")
        local = self.transport.get_extra_info("sockname")
        if not (isinstance(peer, tuple) and isinstance(local, tuple)):
            return None
        return peer_uid((str(peer[0]), int(peer[1])), (str(local[0]), int(local[1])))

    def _log_close(self, session: Session, exc: Exception | None) -> None:
        reason = self._close_reason or (
            f"connection lost: {exc}" if exc is not None else "the client disconnected"
        )
        duration = round(time.monotonic() - self._opened_at, 3) if self._opened_at else 0.0
        log.info(
            "connection %s%s from %s closed after %.1fs: %s",
            session.id,
            f" ({session.name!r})" if session.name else "",
            self.peer,
            duration,
            reason,
            extra={
                "event": "connection.close",
                "peer": self.peer,
                "id": session.id,
                "connection_name": session.name,
                "subject": session.principal.subject,
                "duration": duration,
                "reason": reason,
            },
        )

    def _auth_failed(self, exc: AuthenticationFailed) -> None:
        """401 and close, answered only after a delay that grows with the failures from this
        address (broker.auth.FailureThrottle); reading stops meanwhile, so nothing the peer
        sends can get an earlier answer."""
        delay = self.server.auth.throttle.failure(self.peer_ip or self.peer)
        log.info(
            "authentication failed from %s (%s); answering in %.1fs",
            self.peer,
            exc.message,
            delay,
            extra={
                "event": "auth.failed",
                "peer": self.peer,
                "reason": exc.message,
                "delay": round(delay, 3),
            },
        )
        if self._timer is not None:  # the handshake timeout: the delay is bounded anyway
            self._timer.cancel()
        if self.transport is not None:
            self.transport.pause_reading()
        self._timer = asyncio.get_running_loop().call_later(delay, self._fatal, exc)

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
        self._close_reason = self._close_reason or str(exc)
        self.broker.count_error(exc.code)
        self.conn.fail()
        self._flush_session()  # replies to earlier requests go first: nothing after ERROR
        self._write([Error(0, exc.code, exc.message, exc.details)])
        self._shutdown_transport()

    @property
    def closing(self) -> bool:
        """ERROR or CLOSE sent, or the transport is going: nothing more is read from it."""
        return self._closing

    @property
    def close_ok(self) -> asyncio.Future[None]:
        """Done when the peer answered this side's CLOSE (or the connection is gone)."""
        return self._close_ok

    def fatal(self, exc: ConveyorError, reason: str = "") -> None:
        """Close this connection with ERROR ``exc``, for the server's own checks (handshake
        admission, token recheck); ``reason``, if given, is what the close log line says."""
        if reason:
            self._close_reason = reason
        self._fatal(exc)

    def _session_failed(self, exc: BaseException) -> None:
        """Broker.pump could not flush this connection's output: close it (541), or drop
        it if even the ERROR cannot be written."""
        try:
            self._fatal(InternalError("internal error writing to this connection; closed"))
        except Exception:
            log.exception("closing %s after a failed flush failed; dropping it", self.peer)
            if self.transport is not None:
                self.transport.abort()

    def _shutdown_transport(self) -> None:
        self._closing = True
        self.conn.fail()
        self._flush_session()
        if self.transport is not None:
            self.transport.close()

    def _flush_session(self) -> None:
        if self.session is not None:
            try:
                self.session.flush()
            except Exception:  # the failure that closes it; already logged by the pump
                log.debug("flush while closing %s failed", self.peer, exc_info=True)

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
        if now - self._last_recv > 2 * hb and not self._credit_held:
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
        self._close_reason = self._close_reason or f"closed by the broker: {message}"
        if self.conn.state is State.OPEN:
            if self.session is not None:
                self.session.flush()
            if not self.transport.is_closing():
                self.transport.write(self.conn.send(Close(code, message)))
            self._closing = True
        else:
            self._shutdown_transport()


class Handshakes:
    """Connections that have not authenticated yet, oldest first, in total and per IP.

    A new connection over ``max_unauthenticated_per_ip`` (from its address) or
    ``max_unauthenticated`` (in total), or one that would bring the broker's sockets near
    its open-file limit, makes the oldest unauthenticated connection go (ERROR 506, closed)
    so that new clients, and authenticated ones, keep being served; only if every
    connection is authenticated and the file limit is near is the new one refused. Each
    such connection buffers at most one MAX_FRAME_SIZE_PREAUTH frame, so their memory
    is bounded by the limits times 64 KiB.
    """

    LOG_INTERVAL = 5.0  # seconds between two "shedding" warnings (with counts)

    def __init__(self, server: BrokerServer) -> None:
        self.server = server
        self.all: OrderedDict[BrokerProtocol, None] = OrderedDict()
        self.by_ip: dict[str, OrderedDict[BrokerProtocol, None]] = {}
        self.shed = 0  # counters for the log line (and tests)
        self.refused = 0
        self._logged = 0.0
        self._unlogged = 0

    def admit(self, p: BrokerProtocol) -> bool:
        """Count ``p`` (just connected); False if it was refused and is being closed."""
        limits = self.server.broker.limits
        ip = p.peer_ip or p.peer
        mine = self.by_ip.get(ip)
        if mine is None:
            mine = self.by_ip[ip] = OrderedDict()
        if len(mine) >= limits.max_unauthenticated_per_ip:
            self._shed(
                next(iter(mine)),
                ResourceError(
                    f"{ip} has {len(mine)} connections in the handshake; the maximum is "
                    f"{limits.max_unauthenticated_per_ip} (max_unauthenticated_per_ip): "
                    "the oldest are closed",
                    {
                        "limit": "max_unauthenticated_per_ip",
                        "max_unauthenticated_per_ip": limits.max_unauthenticated_per_ip,
                    },
                ),
            )
        if len(self.all) >= limits.max_unauthenticated:
            self._shed(
                next(iter(self.all)),
                ResourceError(
                    f"the broker has {len(self.all)} connections in the handshake; the maximum "
                    f"is {limits.max_unauthenticated} (max_unauthenticated): the oldest are "
                    "closed",
                    {
                        "limit": "max_unauthenticated",
                        "max_unauthenticated": limits.max_unauthenticated,
                    },
                ),
            )
        room = self.server.socket_room()
        if len(self.server.protocols) > room:
            err = ResourceError(
                f"the broker is near its open-file limit ({len(self.server.protocols)} "
                "connections): connections in the handshake are closed, oldest first",
                {"limit": "open_files", "connections": room},
            )
            if not self.all:
                self.refused += 1
                self._warn()
                p.fatal(err)
                return False
            self._shed(next(iter(self.all)), err)
        self.all[p] = None
        mine[p] = None
        return True

    def done(self, p: BrokerProtocol) -> None:
        """``p`` authenticated or closed."""
        if p in self.all:
            del self.all[p]
            ip = p.peer_ip or p.peer
            mine = self.by_ip.get(ip)
            if mine is not None:
                mine.pop(p, None)
                if not mine:
                    del self.by_ip[ip]

    def _shed(self, victim: BrokerProtocol, err: ResourceError) -> None:
        self.done(victim)
        self.shed += 1
        self._warn()
        victim.fatal(err)

    def _warn(self) -> None:
        """One warning per LOG_INTERVAL with what was shed or refused since the last."""
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged < self.LOG_INTERVAL:
            return
        self._logged = now
        log.warning(
            "too many connections in the handshake or near the open-file limit "
            "(%d open, %d unauthenticated): closed %d unauthenticated (oldest "
            "first) and refused %d since the last warning; %d/%d in total",
            len(self.server.protocols),
            len(self.all),
            self._unlogged,
            self.refused,
            self.shed,
            self.refused,
            extra={"event": "connections.shed", "shed": self.shed, "refused": self.refused},
        )
        self._unlogged = 0


class BrokerServer:
    """Owns the listener, the broker model and every connection."""

    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        self.config = config
        self.broker = broker or Broker(max_message_size=config.effective_max_message_size())
        self.broker.limits = Limits.from_config(config)
        self.broker.flow = FlowControl.from_config(config)
        self._guard_writes()
        self.connections = ConnectionCounter()  # open connections, total and per subject
        self.protocols: set[BrokerProtocol] = set()
        self.handshakes = Handshakes(self)  # unauthenticated connections, oldest first
        self.auth = Authenticator(config)  # AUTH policy; its key is loaded by start()
        self._server: asyncio.Server | None = None  # plain TCP (config.plain)
        self._tls_server: asyncio.Server | None = None  # config.tls_cert + tls_key
        self._timer: asyncio.TimerHandle | None = None
        self._recheck: asyncio.TimerHandle | None = None  # tokens of open connections

    def _guard_writes(self) -> None:
        """Let the disk-free guard count every batch the log and the streams write."""
        wm = self.broker.flow.watermarks
        if wm is None or not wm.disk_free_limit:
            return
        self.broker.streams.wrote = wm.debit
        store = self.broker.store
        if isinstance(store, WalStore):
            store.wrote = wm.debit

    @property
    def port(self) -> int:
        """The plain listener's port (the TLS one's if there is no plain listener)."""
        server = self._server or self._tls_server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])

    @property
    def tls_port(self) -> int:
        """The TLS listener's port, 0 if there is none."""
        s = self._tls_server
        return int(s.sockets[0].getsockname()[1]) if s is not None else 0

    def socket_room(self) -> int:
        """How many client connections fit under the open-file limit, leaving room for the
        broker's own files (log segments, page files, streams, HTTP)."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return 1 << 30
        # a tenth of the limit, at least FD_RESERVE, but never more than a quarter of a
        # small limit (a broker started under `ulimit -n 64` still serves a few clients)
        return soft - max(soft // 10, min(FD_RESERVE, soft // 4))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        self.auth.open()  # signing key (created on first start), revocation list
        _fds, fd_warning = raise_fd_limit(self.broker.limits)
        if fd_warning:
            log.warning("%s", fd_warning)
        tls = server_context(cfg)
        if cfg.plain:
            self._server = await loop.create_server(
                lambda: BrokerProtocol(self),
                cfg.host,
                cfg.port,
                reuse_address=True,
                backlog=1024,
            )
            log.info("conveyor %s listening on %s:%d", VERSION, cfg.host, self.port)
        if tls is not None:
            self._tls_server = await loop.create_server(
                lambda: BrokerProtocol(self),
                cfg.host,
                cfg.tls_port,
                reuse_address=True,
                backlog=1024,
                ssl=tls,
                ssl_handshake_timeout=cfg.handshake_timeout_ms / 1000,
            )
            log.info(
                "conveyor %s listening for TLS on %s:%d%s",
                VERSION,
                cfg.host,
                self.tls_port,
                " (client certificates required)" if cfg.tls_ca else "",
            )
        self.broker.timer_hook = self._arm_timer
        self.broker.start_timers()
        self._recheck = loop.call_later(TOKEN_RECHECK_S, self._recheck_tokens)

    def _recheck_tokens(self) -> None:
        """Close every open connection whose token expired or was revoked since AUTH
        (ERROR 401 authentication-failed), at most ``TOKEN_RECHECK_S`` late. One stat of
        the revocation list per round, one comparison per token connection."""
        now = time.time()
        closed = False
        for p in list(self.protocols):
            s = p.session
            if s is None or not s.principal.token_id or p.closing:
                continue
            err = self.auth.still_valid(s.principal, now)
            if err is not None:
                p.fatal(err, f"closed by the broker: {err.message}")
                closed = True
        if closed:
            self.broker.pump()
        self._recheck = asyncio.get_running_loop().call_later(TOKEN_RECHECK_S, self._recheck_tokens)

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
        for srv in (self._server, self._tls_server):
            if srv is not None:
                srv.close()
        self.broker.timer_hook = None
        if self._timer is not None:
            self._timer.cancel()
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        protos = list(self.protocols)
        err = ConnectionForced("server shutting down")
        for p in protos:
            p.begin_close(err.code, err.message)
        waiters: list[Any] = [p.close_ok for p in protos]
        if waiters:
            await asyncio.wait(waiters, timeout=self.config.shutdown_grace_ms / 1000)
            for p in protos:
                if p.transport is not None and not p.close_ok.done():
                    p.transport.abort()
        for srv in (self._server, self._tls_server):
            if srv is not None:
                await srv.wait_closed()
        self.broker.flush_journal()  # e.g. requeues of the connections just closed
        self.broker.store.close()
        log.info("conveyor stopped")
