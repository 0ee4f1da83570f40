"""asyncio client connection.

The protocol layer (``_Protocol``) only moves bytes: it feeds the sans-IO
``protocol.connection.Connection`` and hands frames to :class:`Connection`, which keeps
every pending future (requests by request id, publishes by sequence number) so that a
lost connection fails all of them at once with :class:`ConnectionClosed`: a publish
never reports success unless the broker confirmed it.

Outgoing frames are coalesced: they are appended to a buffer that is written once per
event-loop turn. The buffer is bounded: when the transport is paused (the broker is not
reading) or ``max_unconfirmed`` publishes are in flight, publishers wait, up to their
timeout.

The connection is split by concern: ``client._protocol`` (bytes to frames, the handshake,
the fast decoding of deliveries and confirms), ``client.publishing`` (publishes, confirms,
publish credit), ``client.consuming`` (consumers, GET, settlement) and ``client.topology``
(declares and their restore on reconnect). :class:`Connection` combines them as mixins,
one object whose state the hot paths read directly, and keeps the lifecycle, reconnects,
frame dispatch, the output buffer, requests and RPC here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from conveyor.client._protocol import _Confirmed, _Deliveries, _Protocol
from conveyor.client.consumer import Consumer
from conveyor.client.consuming import _ConsumingMixin
from conveyor.client.errors import ConnectionClosed, PublishInDoubt, RequestTimeout
from conveyor.client.message import Message
from conveyor.client.publishing import Body as Body
from conveyor.client.publishing import Entry as Entry
from conveyor.client.publishing import OutgoingMessage as OutgoingMessage
from conveyor.client.publishing import _Pending, _props, _PublishingMixin
from conveyor.client.tls import tls_context
from conveyor.client.topology import QueueInfo as QueueInfo
from conveyor.client.topology import _TopologyMixin
from conveyor.client.url import URL, parse_url
from conveyor.protocol import (
    Cancelled,
    Close,
    CloseOk,
    Confirm,
    ConsumeOk,
    ConveyorError,
    Deliver,
    DeliverBatch,
    DeliverRun,
    Error,
    Frame,
    PublishCredit,
    Return,
    UnexpectedFrame,
    encode,
    error_for_code,
)
from conveyor.protocol import Heartbeat as HeartbeatFrame
from conveyor.protocol.connection import check_fields
from conveyor.protocol.limits import REPLY_CLASSES

# (Body, Entry, OutgoingMessage and QueueInfo are imported "as" themselves: re-exported
# for importers of this module, where they were defined before the split.)

log = logging.getLogger("conveyor.client")

# The reply each request frame gets besides ERROR ([replies] in spec/protocol.toml): a reply
# is matched by request id *and* type, so a stray frame cannot complete the wrong request.
_REPLIES: dict[type[Frame], type[Frame]] = REPLY_CLASSES


def _no_loop() -> asyncio.Future[Any]:
    raise ConnectionClosed("not connected")


class Connection(_TopologyMixin, _PublishingMixin, _ConsumingMixin):
    """A connection to a Conveyor broker. Create with :func:`connect`.

    Declares and consumers are remembered: after an unexpected disconnect the connection
    reconnects (when ``reconnect=True``), re-declares exchanges, queues and bindings in
    the order they were first declared, and restarts consumers; ``reconnects`` counts
    successful reconnects and ``restore_errors`` lists what could not be restored.
    Operations issued while disconnected wait for the reconnect up to their timeout.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "",
        reconnect: bool = True,
        reconnect_max_delay: float = 5.0,
        heartbeat_ms: int = 0,
        max_frame_size: int = 0,
        max_unconfirmed: int = 65536,
        timeout: float = 30.0,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        compression: str | None = None,
    ) -> None:
        if compression not in (None, "zstd"):
            raise ValueError(f"compression must be None or 'zstd', got {compression!r}")
        self.url: URL = parse_url(url)
        # Ask for zstd-compressed batches in AUTH; negotiated_compression is the answer.
        self.compression = compression
        self.negotiated_compression = ""
        # AUTH: mechanism "token" with this token (else from the URL), else "anonymous".
        self.token = token if token is not None else self.url.token
        self._ssl = tls_context(self.url.tls, ssl_context, ca, cert, key)  # mqs:// only
        self.name = name
        self.reconnect = reconnect
        self.reconnect_max_delay = reconnect_max_delay
        self.heartbeat_ms = heartbeat_ms
        self.max_frame_size = max_frame_size
        self.max_unconfirmed = max_unconfirmed
        self.timeout = timeout
        self.connection_id = ""
        self.server_heartbeat_ms = 0
        self.reconnects = 0
        self.restore_errors: list[str] = []
        self._proto: _Protocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._new_future: Callable[[], asyncio.Future[Any]] = _no_loop
        self._epoch = 0
        self._rids = itertools.count(1)
        # rid -> (the request's future, the reply type it expects)
        self._requests: dict[int, tuple[asyncio.Future[Frame], type[Frame]]] = {}
        self._seq = 0
        # seq -> the future of a one-message publish, or the _Pending of a larger call.
        self._unconfirmed: dict[int, asyncio.Future[None] | _Pending] = {}
        # close() waits on this for _unconfirmed to empty (set by _on_confirm/_fail_all).
        self._drain_waiter: asyncio.Future[None] | None = None
        # Publishes failed unconfirmed by a close or a lost connection (PublishInDoubt).
        self.in_doubt = 0
        self._slots = asyncio.Event()
        self._slots.set()
        self._consumers: dict[str, Consumer] = {}
        self._pending_consumers: dict[int, Consumer] = {}
        self._topology: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
        self._wbuf: list[bytes] = []
        self._flush_scheduled = False
        # Publishes queued this loop turn; sent as one PUBLISH_BATCH. Their seqs are
        # contiguous and the last one is ``_seq``; ``_pub_size`` is their weight.
        self._pub: list[tuple[str, str, dict[str, Any], bytes, bool]] = []
        self._pub_size = 0
        # (exchange, routing key, properties, mandatory) while every queued publish shares
        # them (the properties dict by identity): they then go out as a PUBLISH_RUN.
        self._pub_key: tuple[str, str, dict[str, Any], bool] | None = None
        # Settlement: tags delivered and not yet settled, in order; settled tags -> whether
        # the broker already knows (NACK/REJECT/individual ACK sent). The settled prefix of
        # ``_unsettled`` goes out as one cumulative ACK per loop turn. Fast path: an ack of
        # the oldest unsettled tag while nothing is settled out of order (``_done`` empty)
        # leaves ``_unsettled`` at once and only raises ``_ack_hi``, the cumulative ACK due.
        self._unsettled: deque[int] = deque()
        self._done: dict[int, bool] = {}
        self._ack_pending: list[int] = []
        self._ack_hi = 0
        self._connected = asyncio.Event()
        self._accepting = False  # _connected is set and not _closing: publish_nowait's test
        self._closing = False
        self._closed_error: ConveyorError | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._hb_task: asyncio.Task[None] | None = None
        self._rpc_queue: str | None = None
        self._rpc_consumer: Consumer | None = None
        self._rpc_waiters: dict[str, asyncio.Future[Message]] = {}
        self._rpc_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def _open(self, timeout: float, announce: bool = True) -> None:
        """Connect and handshake. ``announce=False`` (reconnects) leaves the connection
        closed to applications until the topology has been restored."""
        loop = self._loop = asyncio.get_running_loop()
        self._new_future = loop.create_future
        try:
            _t, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Protocol(self),
                    self.url.host,
                    self.url.port,
                    ssl=self._ssl,
                    ssl_handshake_timeout=timeout if self._ssl is not None else None,
                ),
                timeout,
            )
            ok = await asyncio.wait_for(proto.handshake, timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionClosed(f"cannot connect to {self.url}: {exc or 'timed out'}") from None
        self._proto = proto
        self._epoch += 1
        self.connection_id = ok.connection_id
        self.server_heartbeat_ms = ok.heartbeat_ms
        self.negotiated_compression = ok.compression
        if announce:
            self._connected.set()
            self._accepting = not self._closing
        if ok.heartbeat_ms and (self._hb_task is None or self._hb_task.done()):
            self._hb_task = asyncio.create_task(self._heartbeat(ok.heartbeat_ms / 1000))

    async def close(self, timeout: float = 5.0) -> None:
        """Close cleanly, like a graceful flush: stop taking publishes, send what is
        queued, wait up to ``timeout`` seconds for the confirms still outstanding, then
        CLOSE / CLOSE_OK.

        Publishes still unconfirmed after that fail with :class:`PublishInDoubt` (counted
        in :attr:`in_doubt`, logged once, never as "exception was never retrieved");
        pending requests and RPCs fail with ``ConnectionClosed``.
        """
        if self._closing:
            return
        self._closing = True
        self._accepting = False
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        deadline = time.monotonic() + timeout
        proto = self._proto
        if proto is not None and proto.transport is not None and not proto.transport.is_closing():
            self._flush()
            await self._wait_confirmed(proto, deadline)
        if proto is not None and proto.transport is not None and not proto.transport.is_closing():
            self._flush()
            try:
                proto.transport.write(proto.wire.send(Close(200, "client closing")))
                await asyncio.wait_for(
                    asyncio.shield(proto.closed), max(deadline - time.monotonic(), 1.0)
                )
            except (TimeoutError, ConveyorError):
                pass
            finally:
                if proto.transport is not None:
                    proto.transport.close()
        self._fail_all(ConnectionClosed("connection closed by the application"))
        for c in list(self._consumers.values()):
            c.finish(ConnectionClosed("connection closed"))
        for t in (self._hb_task, self._rpc_task):
            if t is not None:
                t.cancel()

    async def _wait_confirmed(self, proto: _Protocol, deadline: float) -> None:
        """Until every publish and request sent on ``proto`` is answered, it is lost, or
        ``deadline``."""
        loop = asyncio.get_running_loop()
        while (self._unconfirmed or self._requests) and self._proto is proto:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            waiter = self._drain_waiter = loop.create_future()
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return
            finally:
                self._drain_waiter = None

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self, timeout: float | None = None) -> Connection:
        """Connect and handshake (what :func:`connect` does after creating it)."""
        if self._closing or self._proto is not None:
            raise ConnectionClosed("connection is closed" if self._closing else "already open")
        await self._open(self.timeout if timeout is None else timeout)
        return self

    @property
    def epoch(self) -> int:
        """Counts connects and losses: a message remembers the epoch it came on, and one
        from an earlier epoch cannot be settled (the broker has reassigned its tag)."""
        return self._epoch

    def create_future(self) -> asyncio.Future[Any]:
        """A future of the connection's event loop (ConnectionClosed if never opened)."""
        return self._new_future()

    @property
    def is_open(self) -> bool:
        return self._connected.is_set() and not self._closing

    @property
    def max_message_size(self) -> int:
        """The broker's maximum message size (body plus encoded headers) on this
        connection, from OPEN_OK; 0 = not stated (a broker before protocol 1.2) or not
        connected. Larger publishes fail locally with MessageTooLarge (413)."""
        proto = self._proto
        return proto.max_message_size if proto is not None else 0

    # ------------------------------------------------------------------ frame input
    def on_frames(self, proto: _Protocol, frames: list[Any]) -> None:
        """Frames ``proto`` decoded (called by the protocol, not the application)."""
        if proto is not self._proto:
            # The initial PUBLISH_CREDIT may come before _open() has made proto current.
            for f in frames:
                if type(f) is PublishCredit:
                    proto.add_credit(f)
            return
        for f in frames:
            t = type(f)
            if t is _Deliveries:
                self._on_messages(f)
            elif t is _Confirmed or t is Confirm:
                self._on_confirm(f)
            elif t is DeliverBatch:
                self._on_deliveries(f.consumer_tag, f.entries)
            elif t is DeliverRun:
                self._on_deliveries(
                    f.consumer_tag,
                    [
                        (tag, False, f.exchange, f.routing_key, dict(f.properties), body, 1)
                        for tag, body in zip(
                            range(f.first_tag, f.first_tag + len(f.bodies)), f.bodies, strict=True
                        )
                    ],
                )
            elif t is Deliver:
                self._on_deliveries(
                    f.consumer_tag,
                    [
                        (
                            f.delivery_tag,
                            f.redelivered,
                            f.exchange,
                            f.routing_key,
                            f.properties,
                            f.body,
                            f.delivery_count,
                        )
                    ],
                )
            elif t is Error:
                self._on_error(f)
            elif t is Return:
                self._on_return(f.seq)
            elif t is Cancelled:
                c = self._consumers.pop(f.consumer_tag, None)
                if c is not None:
                    c.on_cancelled(f.code, f.message)
            elif t is Close:
                assert proto.transport is not None
                proto.transport.write(proto.wire.send(CloseOk()))
                self._closed_error = error_for_code(f.code, f.message)
                proto.transport.close()
            elif t is CloseOk:
                if proto.transport is not None:
                    proto.transport.close()
            elif t is HeartbeatFrame:
                pass
            elif t is PublishCredit:
                proto.add_credit(f)
            else:
                rid = getattr(f, "rid", None)
                if t is ConsumeOk:
                    # Register before anything else in this batch: deliveries may follow
                    # CONSUME_OK in the same read, before the awaiting task resumes.
                    c = self._pending_consumers.pop(f.rid, None)
                    if c is not None:
                        c.tag = f.consumer_tag
                        c.active = True
                        self._consumers[c.tag] = c
                req = self._requests.pop(rid, None) if rid is not None else None
                if req is None:
                    log.debug("ignored %s for no pending request (rid %s)", f.NAME, rid)
                    continue
                fut, expected = req
                if fut.done():
                    continue
                if t is expected:
                    fut.set_result(f)
                else:
                    fut.set_exception(
                        UnexpectedFrame(
                            f"{f.NAME} in reply to request {rid}, which expects {expected.NAME}",
                            {"rid": rid, "frame": f.NAME},
                        )
                    )
                if not self._requests:
                    self._wake_drain()

    def _on_error(self, f: Error) -> None:
        exc = error_for_code(f.code, f.message, f.details)
        if f.rid:
            req = self._requests.pop(f.rid, None)
            if req is not None and not req[0].done():
                req[0].set_exception(exc)
                if not self._requests:
                    self._wake_drain()
                return
        if exc.fatal:
            self._closed_error = exc
            log.warning("broker closed the connection: %s", exc)
        else:
            log.warning("broker reported: %s", exc)

    def on_lost(self, proto: _Protocol, exc: Exception | None) -> None:
        """``proto``'s transport is gone (called by the protocol, not the application)."""
        if proto is not self._proto:
            return
        self._proto = None
        self._epoch += 1  # messages delivered on it can no longer be settled
        self._connected.clear()
        self._accepting = False
        self._wbuf.clear()
        self._pub.clear()
        self._pub_size = 0
        self._pub_key = None
        self._unsettled.clear()
        self._done.clear()
        self._ack_pending.clear()
        self._ack_hi = 0
        reason = self._closed_error or (
            ConnectionClosed("connection closed by the application")
            if self._closing
            else ConnectionClosed(f"connection to {self.url} lost" + (f": {exc}" if exc else ""))
        )
        self._closed_error = None
        err = (
            reason
            if isinstance(reason, ConnectionClosed)
            else ConnectionClosed(
                f"connection closed by the broker: {reason}", {"code": reason.code}
            )
        )
        self._fail_all(err)
        for c in self._consumers.values():
            # Unsettled buffered messages will be redelivered on the next connection.
            c.on_connection_lost()
        if self._closing:
            return
        if self.reconnect:
            log.warning("%s; reconnecting", err.message)
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect_loop())
        else:
            self._closing = True
            for c in self._consumers.values():
                c.fail(err)

    def _fail_all(self, err: ConveyorError) -> None:
        """Settle every pending future: requests and RPCs with ``err``, unconfirmed
        publishes with one :class:`PublishInDoubt` (marked retrieved: an application that
        dropped a ``publish_nowait`` future gets one log line with the count, not one
        traceback per message)."""
        requests, self._requests = self._requests, {}
        for fut, _ in requests.values():
            if not fut.done():
                fut.set_exception(err)
        waiters, self._rpc_waiters = self._rpc_waiters, {}
        for w in waiters.values():
            if not w.done():
                w.set_exception(err)
                w.exception()
        unconfirmed, self._unconfirmed = self._unconfirmed, {}
        if unconfirmed:
            n = len(unconfirmed)
            doubt = PublishInDoubt(
                f"{err.message}: {n} publish(es) not confirmed, may or may not be stored",
                {**err.details, "in_doubt": n},
            )
            for p in {id(p): p for p in unconfirmed.values()}.values():
                pf = p.future if type(p) is _Pending else cast("asyncio.Future[None]", p)
                if not pf.done():
                    pf.set_exception(doubt)
                    pf.exception()  # retrieved: whoever awaits it still gets it raised
            self.in_doubt += n
            log.warning("%s; %d publish(es) in doubt (not confirmed)", err.message, n)
        self._wake_drain()
        self._slots.set()

    def _wake_drain(self) -> None:
        """close() waits for the last confirm or reply: look again."""
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _reconnect_loop(self) -> None:
        delay = 0.05
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self._open(self.timeout, announce=False)
                restored = await self._restore()
            except ConveyorError as exc:
                log.info("reconnect to %s failed: %s", self.url, exc)
                delay = min(delay * 2, self.reconnect_max_delay)
                continue
            if not restored:
                return  # lost again while restoring: that loss started a new loop
            self.reconnects += 1
            self._connected.set()
            self._accepting = not self._closing
            return

    async def _heartbeat(self, interval: float) -> None:
        while not self._closing:
            await asyncio.sleep(interval / 2)
            proto = self._proto
            if proto is None or proto.transport is None:
                continue
            if time.monotonic() - proto.last_recv > 2 * interval:
                log.warning("no data from broker for %.1fs; dropping connection", 2 * interval)
                proto.transport.abort()
                continue
            self._send(encode(HeartbeatFrame()))

    # ------------------------------------------------------------------ output
    def _send(self, data: bytes) -> None:
        # Queued publishes and acks precede any later frame, so causality holds on the wire.
        if self._pub:
            self._emit_publishes()
        if self._ack_hi or self._ack_pending:
            self._emit_acks()
        self._wbuf.append(data)
        if not self._flush_scheduled:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write everything queued this loop turn in one transport call."""
        self._flush_scheduled = False
        if self._pub:
            self._emit_publishes()
        if self._ack_hi or self._ack_pending:
            self._emit_acks()
        proto = self._proto
        if not self._wbuf:
            return
        if proto is None or proto.transport is None or proto.transport.is_closing():
            self._wbuf.clear()
            return
        data = b"".join(self._wbuf)
        self._wbuf.clear()
        proto.transport.write(data)

    def _write_out(self) -> None:
        """Write what is queued now, in the middle of a loop turn: a burst of publishes
        reaches the broker in pieces it can work on while the rest is being produced
        (and what one turn accumulates stays bounded). Same order as :meth:`_flush`."""
        if self._pub:
            self._emit_publishes()
        if self._ack_hi or self._ack_pending:
            self._emit_acks()
        proto = self._proto
        if (
            self._wbuf
            and proto is not None
            and proto.transport is not None
            and not proto.transport.is_closing()
        ):
            data = b"".join(self._wbuf)
            self._wbuf.clear()
            proto.transport.write(data)

    # ------------------------------------------------------------------ requests
    async def _ready(self, deadline: float, internal: bool = False) -> _Protocol:
        """The live protocol, waiting for a reconnect (until ``deadline``) if needed."""
        while True:
            if self._closing:
                raise ConnectionClosed("connection is closed")
            proto = self._proto
            if proto is not None and (internal or self._connected.is_set()):
                return proto
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.reconnect:
                raise ConnectionClosed(f"not connected to {self.url}")
            try:
                await asyncio.wait_for(self._connected.wait(), remaining)
            except TimeoutError:
                raise ConnectionClosed(f"not connected to {self.url}") from None

    async def _request(
        self, frame: Frame, timeout: float | None = None, internal: bool = False
    ) -> Frame:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        await self._ready(deadline, internal)
        rid: int = frame.rid  # type: ignore[attr-defined]
        # A field the broker's decoder would refuse (a 1,000-byte queue name) fails here
        # with LocalProtocolError: sent, it would be a fatal 501 that closes the connection.
        check_fields(frame)
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._requests[rid] = (fut, _REPLIES[type(frame)])
        self._send(encode(frame))
        try:
            return await asyncio.wait_for(fut, max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            self._requests.pop(rid, None)
            raise RequestTimeout(f"no reply to {frame.NAME} within {timeout}s") from None

    # ------------------------------------------------------------------ request/reply
    async def rpc(
        self,
        exchange: str,
        routing_key: str,
        body: Body,
        *,
        timeout: float | None = None,
        properties: dict[str, Any] | None = None,
        mandatory: bool = True,
        **props: Any,
    ) -> Message:
        """Send a request and wait for its reply (reply_to + correlation_id).

        Replies arrive on one server-named exclusive queue per connection, created on
        first use. The request is published ``mandatory`` (by default): one that no queue
        takes raises ``NoRoute`` at once instead of waiting out the timeout for a reply
        that cannot come. Raises ``RequestTimeout`` if no reply comes within ``timeout``.
        """
        timeout = self.timeout if timeout is None else timeout
        await self._ensure_rpc_queue()
        assert self._rpc_queue is not None
        corr = uuid.uuid4().hex
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._rpc_waiters[corr] = fut
        try:
            p = _props(properties, props)
            p = {**p, "reply_to": self._rpc_queue, "correlation_id": corr}
            await self.publish(
                exchange, routing_key, body, properties=p, mandatory=mandatory, timeout=timeout
            )
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise RequestTimeout(f"no reply from {routing_key!r} within {timeout}s") from None
        finally:
            self._rpc_waiters.pop(corr, None)

    async def _ensure_rpc_queue(self) -> None:
        if (
            self._rpc_queue is not None
            and self._rpc_consumer is not None
            and self._rpc_consumer.active
        ):
            return
        info = await self.declare_queue("", exclusive=True, auto_delete=True, durable=False)
        self._rpc_queue = info.name
        self._rpc_consumer = await self.consume(info.name, no_ack=True, prefetch=1024)
        if self._rpc_task is not None:
            self._rpc_task.cancel()
        self._rpc_task = asyncio.create_task(self._rpc_dispatch(self._rpc_consumer))

    async def _rpc_dispatch(self, consumer: Consumer) -> None:
        try:
            async for msg in consumer:
                fut = self._rpc_waiters.get(msg.correlation_id or "")
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except ConveyorError:
            pass
        finally:
            if self._rpc_consumer is consumer:
                self._rpc_queue = None
                self._rpc_consumer = None


async def connect(
    url: str = "mq://127.0.0.1:5680",
    *,
    name: str = "",
    reconnect: bool = True,
    timeout: float = 30.0,
    heartbeat_ms: int = 0,
    max_frame_size: int = 0,
    max_unconfirmed: int = 65536,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    compression: str | None = None,
) -> Connection:
    """Open a connection (``async with await connect(...) as conn`` closes it cleanly).

    ``timeout`` bounds connecting and is the default for requests and publishes.
    ``reconnect`` restores the connection, topology and consumers after a drop.
    ``token`` authenticates (AUTH mechanism "token"; also ``mq://TOKEN@host``), otherwise
    the connection is anonymous. ``mqs://`` URLs use TLS: ``ca`` is the CA file that signed
    the broker's certificate (default: the system's), ``cert``/``key`` this client's
    certificate for brokers that require one, or pass a ready ``ssl_context``.
    ``compression="zstd"`` asks the broker for zstd-compressed PUBLISH_BATCH/DELIVER_BATCH
    frames (off by default); ``conn.negotiated_compression`` says whether it agreed.
    """
    conn = Connection(
        url,
        name=name,
        reconnect=reconnect,
        heartbeat_ms=heartbeat_ms,
        max_frame_size=max_frame_size,
        max_unconfirmed=max_unconfirmed,
        timeout=timeout,
        token=token,
        ssl_context=ssl_context,
        ca=ca,
        cert=cert,
        key=key,
        compression=compression,
    )
    return await conn.open(timeout)
