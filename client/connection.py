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
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import logging
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgpack

from client.consumer import Consumer
from client.errors import Backpressure, ConnectionClosed, PublishTimeout, RequestTimeout
from client.message import PROPERTY_NAMES, Message
from client.url import URL, parse_url
from protocol import Ack as AckFrame
from protocol import (
    Auth,
    Bind,
    Cancel,
    Cancelled,
    Close,
    CloseOk,
    Confirm,
    Consume,
    ConsumeOk,
    ConveyorError,
    Credit,
    Deliver,
    DeliverBatch,
    Error,
    ExchangeDeclare,
    ExchangeDelete,
    Frame,
    Get,
    GetOk,
    Hello,
    List,
    ListOk,
    MessageCountOk,
    NoRoute,
    OpenOk,
    Publish,
    PublishBatch,
    QueueDeclare,
    QueueDeclareOk,
    QueueDelete,
    QueuePurge,
    Return,
    Unbind,
    encode,
    encode_fields,
    error_for_code,
)
from protocol import Heartbeat as HeartbeatFrame
from protocol import Nack as NackFrame
from protocol import Reject as RejectFrame
from protocol.connection import Connection as WireConnection
from protocol.connection import Role

log = logging.getLogger("conveyor.client")
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack

Body = bytes | str
_PUBLISH = Publish.TYPE
_PUBLISH_BATCH = PublishBatch.TYPE
_ACK = AckFrame.TYPE
_NACK = NackFrame.TYPE
_REJECT = RejectFrame.TYPE
Entry = tuple[str, str, dict[str, Any], bytes, bool]


def _entry_size(e: Entry) -> int:
    """Upper estimate of an entry's encoded size (headers are the only unbounded property)."""
    props = e[2]
    extra = 0
    if props:
        extra = 64 * len(props) + (len(_packb(props["headers"])) if "headers" in props else 0)
    return len(e[3]) + len(e[0]) + len(e[1]) + 32 + extra
_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class QueueInfo:
    """Reply to a queue declare."""

    name: str
    message_count: int
    consumer_count: int


@dataclass(frozen=True)
class OutgoingMessage:
    """One message for :meth:`Connection.publish_batch`."""

    body: Body
    routing_key: str = ""
    exchange: str | None = None
    properties: dict[str, Any] | None = None
    mandatory: bool = False


class _Pending:
    """Confirm tracking for one publish call (one or many sequence numbers)."""

    __slots__ = ("future", "nacked", "remaining", "returned")

    def __init__(self, future: asyncio.Future[None], count: int) -> None:
        self.future = future
        self.remaining = count
        self.returned: list[int] = []
        self.nacked: ConveyorError | None = None


def _props(properties: dict[str, Any] | None, kw: dict[str, Any]) -> dict[str, Any]:
    if not kw:
        return properties or {}
    props = dict(properties or {})
    for k, v in kw.items():
        if k not in PROPERTY_NAMES:
            raise TypeError(f"unknown message property {k!r}")
        if v is not None:
            props[k] = v
    return props


def _body(body: Body) -> bytes:
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, bytes):
        return body
    return bytes(body)


def _check_fits(entries: Sequence[tuple[str, str, dict[str, Any], bytes, bool]],
                max_frame: int) -> None:
    """Refuse (413) a message that cannot fit in one frame: a sender must never exceed the
    negotiated max_frame_size, or the broker closes the connection (502)."""
    for ex, rk, props, body, mandatory in entries:
        if not max_frame or len(body) + 4096 <= max_frame:
            continue  # names and properties other than headers are small
        # Measure exactly, as sent (alone in a PUBLISH or PUBLISH_BATCH, worst-case seq).
        entry = [ex, rk, props, body, mandatory]
        frame = (encode_fields(_PUBLISH, [_U64_MAX, *entry]) if len(entries) == 1
                 else encode_fields(_PUBLISH_BATCH, [_U64_MAX, [entry]]))
        if len(frame) - 4 > max_frame:
            raise error_for_code(413, f"message of {len(body)} bytes does not fit the negotiated "
                                 f"maximum frame size of {max_frame} bytes",
                                 {"max_frame_size": max_frame})


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: Connection) -> None:
        self.owner = owner
        self.wire = WireConnection(Role.CLIENT, 1 << 30)
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[OpenOk] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.paused = False
        self.drained = asyncio.Event()
        self.drained.set()
        self.last_recv = time.monotonic()
        self.max_frame_size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(self.wire.preamble())

    def data_received(self, data: bytes) -> None:
        self.last_recv = time.monotonic()
        try:
            frames = self.wire.receive_data(data)
        except ConveyorError as exc:
            log.warning("protocol error from broker: %s", exc)
            self._abort(exc)
            return
        if not frames:
            return
        if not self.handshake.done():
            frames = self._handshake(frames)
        if frames:
            self.owner._on_frames(self, frames)

    def _handshake(self, frames: list[Frame]) -> list[Frame]:
        rest: list[Frame] = []
        for i, f in enumerate(frames):
            if isinstance(f, Hello):
                o = self.owner
                auth = Auth("token" if o.url.token else "anonymous", o.url.token,
                            {"library": "conveyor-py", "version": "0.1.0",
                             "connection_name": o.name}, o.max_frame_size, o.heartbeat_ms)
                assert self.transport is not None
                self.transport.write(self.wire.send(auth))
            elif isinstance(f, OpenOk):
                self.max_frame_size = f.max_frame_size
                if not self.handshake.done():
                    self.handshake.set_result(f)
                rest = frames[i + 1:]
                break
            elif isinstance(f, Error):
                exc = error_for_code(f.code, f.message, f.details)
                if not self.handshake.done():
                    self.handshake.set_exception(exc)
                self._abort(exc)
                return []
            elif isinstance(f, Close):
                self._abort(error_for_code(f.code, f.message))
                return []
        return rest

    def _abort(self, exc: BaseException) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(
                ConnectionClosed(f"connection lost during handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.drained.set()
        self.owner._on_lost(self, exc)

    def pause_writing(self) -> None:
        self.paused = True
        self.drained.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self.drained.set()


class Connection:
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
    ) -> None:
        self.url: URL = parse_url(url)
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
        self._epoch = 0
        self._rids = itertools.count(1)
        self._requests: dict[int, asyncio.Future[Frame]] = {}
        self._seq = 0
        self._unconfirmed: dict[int, _Pending] = {}
        self._slots = asyncio.Event()
        self._slots.set()
        self._consumers: dict[str, Consumer] = {}
        self._pending_consumers: dict[int, Consumer] = {}
        self._topology: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
        self._wbuf: list[bytes] = []
        self._flush_scheduled = False
        # Publishes queued this loop turn; sent as one PUBLISH_BATCH (seqs are contiguous).
        self._pub: list[tuple[str, str, dict[str, Any], bytes, bool]] = []
        self._pub_first = 0
        self._pub_size = 0
        # Settlement: tags delivered and not yet settled, in order; settled tags -> whether
        # the broker already knows (NACK/REJECT/individual ACK sent). The settled prefix of
        # ``_unsettled`` goes out as one cumulative ACK per loop turn.
        self._unsettled: deque[int] = deque()
        self._done: dict[int, bool] = {}
        self._ack_pending: list[int] = []
        self._connected = asyncio.Event()
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
        loop = asyncio.get_running_loop()
        try:
            _t, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self.url.host, self.url.port),
                timeout)
            ok = await asyncio.wait_for(proto.handshake, timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionClosed(f"cannot connect to {self.url}: {exc or 'timed out'}") from None
        self._proto = proto
        self._epoch += 1
        self.connection_id = ok.connection_id
        self.server_heartbeat_ms = ok.heartbeat_ms
        if announce:
            self._connected.set()
        if ok.heartbeat_ms and (self._hb_task is None or self._hb_task.done()):
            self._hb_task = asyncio.create_task(self._heartbeat(ok.heartbeat_ms / 1000))

    async def close(self) -> None:
        """Close cleanly: CLOSE / CLOSE_OK, then fail anything still pending."""
        if self._closing:
            return
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        proto = self._proto
        if proto is not None and proto.transport is not None and not proto.transport.is_closing():
            self._flush()
            try:
                proto.transport.write(proto.wire.send(Close(200, "client closing")))
                await asyncio.wait_for(asyncio.shield(proto.closed), 5)
            except (TimeoutError, ConveyorError):
                pass
            finally:
                if proto.transport is not None:
                    proto.transport.close()
        self._fail_all(ConnectionClosed("connection closed by the application"))
        for c in list(self._consumers.values()):
            c._finish(ConnectionClosed("connection closed"))
        for t in (self._hb_task, self._rpc_task):
            if t is not None:
                t.cancel()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def is_open(self) -> bool:
        return self._connected.is_set() and not self._closing

    # ------------------------------------------------------------------ frame input
    def _on_frames(self, proto: _Protocol, frames: list[Frame]) -> None:
        if proto is not self._proto:
            return
        for f in frames:
            t = type(f)
            if t is Confirm:
                self._on_confirm(f)  # type: ignore[arg-type]
            elif t is Deliver:
                self._on_deliver(f)  # type: ignore[arg-type]
            elif t is DeliverBatch:
                self._on_deliver_batch(f)  # type: ignore[arg-type]
            elif t is Error:
                self._on_error(f)  # type: ignore[arg-type]
            elif t is Return:
                p = self._unconfirmed.get(f.seq)  # type: ignore[attr-defined]
                if p is not None:
                    p.returned.append(f.seq)  # type: ignore[attr-defined]
            elif t is Cancelled:
                c = self._consumers.pop(f.consumer_tag, None)  # type: ignore[attr-defined]
                if c is not None:
                    c._cancelled_by_server(f.code, f.message)  # type: ignore[attr-defined]
            elif t is Close:
                assert proto.transport is not None
                proto.transport.write(proto.wire.send(CloseOk()))
                self._closed_error = error_for_code(f.code, f.message)  # type: ignore[attr-defined]
                proto.transport.close()
            elif t is CloseOk:
                if proto.transport is not None:
                    proto.transport.close()
            elif t is HeartbeatFrame:
                pass
            else:
                rid = getattr(f, "rid", None)
                if t is ConsumeOk:
                    # Register before anything else in this batch: deliveries may follow
                    # CONSUME_OK in the same read, before the awaiting task resumes.
                    c = self._pending_consumers.pop(f.rid, None)  # type: ignore[attr-defined]
                    if c is not None:
                        c.tag = f.consumer_tag  # type: ignore[attr-defined]
                        c.active = True
                        self._consumers[c.tag] = c
                fut = self._requests.pop(rid, None) if rid is not None else None
                if fut is not None and not fut.done():
                    fut.set_result(f)

    def _on_confirm(self, f: Confirm) -> None:
        unconfirmed = self._unconfirmed
        exc: ConveyorError | None = None
        if not f.ack:
            exc = error_for_code(f.code, f.message or "publish refused")
        for seq in range(f.first_seq, f.last_seq + 1):
            p = unconfirmed.pop(seq, None)
            if p is None:
                continue
            if exc is not None and p.nacked is None:
                p.nacked = exc
            p.remaining -= 1
            if p.remaining == 0 and not p.future.done():
                if p.nacked is not None:
                    p.future.set_exception(p.nacked)
                elif p.returned:
                    p.future.set_exception(NoRoute(
                        f"{len(p.returned)} mandatory message(s) matched no queue",
                        {"returned_seqs": p.returned}))
                else:
                    p.future.set_result(None)
        if len(unconfirmed) < self.max_unconfirmed:
            self._slots.set()

    def _on_deliver(self, f: Deliver) -> None:
        c = self._consumers.get(f.consumer_tag)
        if c is None:
            return
        if not c.no_ack:
            self._unsettled.append(f.delivery_tag)
        c._push([Message(self, c, self._epoch, f.delivery_tag, f.redelivered, f.exchange,
                         f.routing_key, f.properties, f.body, f.delivery_count, c.no_ack)])

    def _on_deliver_batch(self, f: DeliverBatch) -> None:
        c = self._consumers.get(f.consumer_tag)
        if c is None:
            return
        no_ack = c.no_ack
        epoch = self._epoch
        msgs = [Message(self, c, epoch, e[0], e[1], e[2], e[3], e[4], e[5], e[6], no_ack)
                for e in f.entries]
        if not no_ack:
            self._unsettled.extend([e[0] for e in f.entries])
        c._push(msgs)

    def _on_error(self, f: Error) -> None:
        exc = error_for_code(f.code, f.message, f.details)
        if f.rid:
            fut = self._requests.pop(f.rid, None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                return
        if exc.fatal:
            self._closed_error = exc
            log.warning("broker closed the connection: %s", exc)
        else:
            log.warning("broker reported: %s", exc)

    def _on_lost(self, proto: _Protocol, exc: Exception | None) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        self._connected.clear()
        self._wbuf.clear()
        self._pub.clear()
        self._pub_size = 0
        self._unsettled.clear()
        self._done.clear()
        self._ack_pending.clear()
        reason = self._closed_error or ConnectionClosed(
            f"connection to {self.url} lost" + (f": {exc}" if exc else ""))
        self._closed_error = None
        err = reason if isinstance(reason, ConnectionClosed) else ConnectionClosed(
            f"connection closed by the broker: {reason}", {"code": reason.code})
        self._fail_all(err)
        for c in self._consumers.values():
            # Unsettled buffered messages will be redelivered on the next connection.
            c._buffer.clear()
            c._to_grant = 0
        if self._closing:
            return
        if self.reconnect:
            log.warning("%s; reconnecting", err.message)
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect_loop())
        else:
            self._closing = True
            for c in self._consumers.values():
                c._fail(err)

    def _fail_all(self, err: ConveyorError) -> None:
        requests, self._requests = self._requests, {}
        for fut in requests.values():
            if not fut.done():
                fut.set_exception(err)
        unconfirmed, self._unconfirmed = self._unconfirmed, {}
        for p in unconfirmed.values():
            if not p.future.done():
                p.future.set_exception(err)
        self._slots.set()

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
            return

    async def _restore(self) -> bool:
        """Re-declare remembered topology, then restart consumers, before applications
        see the connection again (so nothing is published into a half-restored broker).
        Returns False if the connection was lost again meanwhile."""
        self.restore_errors = []
        proto = self._proto
        try:
            for kind, kwargs in list(self._topology.values()):
                try:
                    frame = _TOPOLOGY_FRAMES[kind](next(self._rids), **kwargs)
                    await self._request(frame, self.timeout, internal=True)
                except (ConnectionClosed, RequestTimeout):
                    raise
                except ConveyorError as exc:
                    self.restore_errors.append(f"{kind} {kwargs}: {exc}")
                    log.warning("could not restore %s %s: %s", kind, kwargs, exc)
            for c in list(self._consumers.values()):
                try:
                    await self._start_consumer(c, internal=True)
                except (ConnectionClosed, RequestTimeout):
                    raise
                except ConveyorError as exc:
                    self._consumers.pop(c.tag, None)
                    self.restore_errors.append(f"consumer {c.tag} on {c.queue}: {exc}")
                    c._fail(exc)
        except (ConnectionClosed, RequestTimeout):
            if self._proto is proto and proto is not None and proto.transport is not None:
                proto.transport.abort()  # a timeout: start over from a fresh connection
            return False
        return self._proto is proto

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
        if self._ack_pending:
            self._emit_acks()
        self._wbuf.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Write everything queued this loop turn in one transport call."""
        self._flush_scheduled = False
        if self._pub:
            self._emit_publishes()
        if self._ack_pending:
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

    def _emit_publishes(self) -> None:
        pub = self._pub
        self._pub = []
        self._pub_size = 0
        first = self._pub_first
        if len(pub) == 1:
            self._wbuf.append(encode_fields(_PUBLISH, [first, *pub[0]]))
            return
        proto = self._proto
        budget = (proto.max_frame_size if proto is not None else 1 << 20) - 4096
        chunk: list[Any] = []
        size = 0
        for e in pub:
            esize = _entry_size(e)
            if chunk and size + esize > budget:
                self._wbuf.append(encode_fields(_PUBLISH_BATCH, [first, chunk]))
                first += len(chunk)
                chunk, size = [], 0
            chunk.append(e)
            size += esize
        self._wbuf.append(encode_fields(_PUBLISH_BATCH, [first, chunk]))

    def _emit_acks(self) -> None:
        """One cumulative ACK for the settled prefix; single ACKs for acks past a gap."""
        pending = self._ack_pending
        self._ack_pending = []
        done = self._done
        unsettled = self._unsettled
        hi = 0
        need = False
        while unsettled and unsettled[0] in done:
            hi = unsettled.popleft()
            if not done.pop(hi):
                need = True
        wbuf = self._wbuf
        if need:
            wbuf.append(encode_fields(_ACK, [hi, True]))
        for tag in pending:
            if done.get(tag) is False:
                wbuf.append(encode_fields(_ACK, [tag, False]))
                done[tag] = True

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

    async def _request(self, frame: Frame, timeout: float | None = None,
                       internal: bool = False) -> Frame:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        await self._ready(deadline, internal)
        rid: int = frame.rid  # type: ignore[attr-defined]
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._requests[rid] = fut
        self._send(encode(frame))
        try:
            return await asyncio.wait_for(fut, max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            self._requests.pop(rid, None)
            raise RequestTimeout(f"no reply to {frame.NAME} within {timeout}s") from None

    # ------------------------------------------------------------------ topology
    async def declare_exchange(self, name: str, type: str = "direct", *, durable: bool = True,
                               auto_delete: bool = False, passive: bool = False,
                               arguments: dict[str, Any] | None = None) -> None:
        """Declare an exchange (direct, topic or fanout); idempotent for equal settings."""
        kw: dict[str, Any] = {
            "exchange": name, "type": type, "durable": durable, "auto_delete": auto_delete,
            "passive": passive, "arguments": arguments or {}}
        await self._request(ExchangeDeclare(next(self._rids), **kw))
        if not passive:
            self._topology[("exchange", name)] = ("exchange", kw)

    async def delete_exchange(self, name: str, *, if_unused: bool = False) -> None:
        await self._request(ExchangeDelete(next(self._rids), name, if_unused))
        self._topology.pop(("exchange", name), None)
        for key in [k for k in self._topology if k[0] == "bind" and k[1] == name]:
            del self._topology[key]

    async def declare_queue(self, name: str = "", *, durable: bool = True,
                            exclusive: bool = False, auto_delete: bool = False,
                            passive: bool = False,
                            arguments: dict[str, Any] | None = None) -> QueueInfo:
        """Declare a queue; an empty name asks the broker to pick a unique one."""
        kw: dict[str, Any] = {"queue": name, "durable": durable, "exclusive": exclusive,
              "auto_delete": auto_delete, "passive": passive, "arguments": arguments or {}}
        ok = await self._request(QueueDeclare(next(self._rids), **kw))
        assert isinstance(ok, QueueDeclareOk)
        if not passive and name:
            self._topology[("queue", name)] = ("queue", kw)
        return QueueInfo(ok.queue, ok.message_count, ok.consumer_count)

    async def delete_queue(self, name: str, *, if_unused: bool = False,
                           if_empty: bool = False) -> int:
        """Delete a queue; returns how many ready messages it held."""
        ok = await self._request(QueueDelete(next(self._rids), name, if_unused, if_empty))
        assert isinstance(ok, MessageCountOk)
        self._topology.pop(("queue", name), None)
        for key in [k for k in self._topology if k[0] == "bind" and k[2] == name]:
            del self._topology[key]
        return ok.message_count

    async def purge(self, name: str) -> int:
        """Remove every ready message; returns how many."""
        ok = await self._request(QueuePurge(next(self._rids), name))
        assert isinstance(ok, MessageCountOk)
        return ok.message_count

    async def bind(self, exchange: str, queue: str, routing_key: str = "",
                   arguments: dict[str, Any] | None = None) -> None:
        kw: dict[str, Any] = {"exchange": exchange, "queue": queue, "routing_key": routing_key,
              "arguments": arguments or {}}
        await self._request(Bind(next(self._rids), **kw))
        self._topology[("bind", exchange, queue, routing_key)] = ("bind", kw)

    async def unbind(self, exchange: str, queue: str, routing_key: str = "") -> None:
        await self._request(Unbind(next(self._rids), exchange, queue, routing_key))
        self._topology.pop(("bind", exchange, queue, routing_key), None)

    async def list(self, kind: str) -> builtins.list[dict[str, Any]]:
        """``queues``, ``exchanges``, ``bindings`` or ``consumers`` as dicts."""
        ok = await self._request(List(next(self._rids), kind))
        assert isinstance(ok, ListOk)
        return ok.items

    # ------------------------------------------------------------------ publish
    async def publish(self, exchange: str, routing_key: str, body: Body, *,
                      properties: dict[str, Any] | None = None, mandatory: bool = False,
                      timeout: float | None = None, **props: Any) -> None:
        """Publish one message and wait until the broker confirms it.

        Raises the spec's error class on a nack (e.g. ``NotFound`` for a missing
        exchange), ``NoRoute`` if ``mandatory`` and no queue took it, ``PublishTimeout``
        if no confirm arrives in ``timeout`` seconds, ``ConnectionClosed`` if the
        connection drops first (the message may or may not have been stored).
        Keyword arguments are message properties (``message_id``, ``headers``, ``ttl``,
        ``priority``, ``persistent``, ``delay``, ``reply_to``, ``correlation_id`` ...).
        """
        fut = await self._publish_many(
            [(exchange, routing_key, _props(properties, props), _body(body), mandatory)], timeout)
        await self._await_confirm(fut, timeout)

    async def publish_batch(self, messages: Iterable[OutgoingMessage | Body], *,
                            exchange: str = "", routing_key: str = "",
                            properties: dict[str, Any] | None = None, mandatory: bool = False,
                            timeout: float | None = None) -> int:
        """Publish many messages pipelined in PUBLISH_BATCH frames; wait for every confirm.

        Items are :class:`OutgoingMessage` or plain bodies (which use the ``exchange``,
        ``routing_key``, ``properties`` and ``mandatory`` given here). Returns the count.
        Raises like :meth:`publish` if any message was refused or returned.
        """
        base = properties or {}
        entries: list[tuple[str, str, dict[str, Any], bytes, bool]] = []
        for m in messages:
            if isinstance(m, OutgoingMessage):
                entries.append((exchange if m.exchange is None else m.exchange,
                                m.routing_key or routing_key,
                                m.properties if m.properties is not None else base,
                                _body(m.body), m.mandatory or mandatory))
            else:
                entries.append((exchange, routing_key, base, _body(m), mandatory))
        if not entries:
            return 0
        fut = await self._publish_many(entries, timeout)
        await self._await_confirm(fut, timeout)
        return len(entries)

    async def _await_confirm(self, fut: asyncio.Future[None], timeout: float | None) -> None:
        timeout = self.timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise PublishTimeout(f"no confirm within {timeout}s") from None

    async def wait_for_capacity(self, timeout: float | None = None) -> None:
        """Wait until a publish can be queued: connected, fewer than ``max_unconfirmed``
        publishes in flight, and the socket not backed up. Raises PublishTimeout."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        proto = await self._ready(deadline)
        while len(self._unconfirmed) >= self.max_unconfirmed or proto.paused:
            if len(self._unconfirmed) >= self.max_unconfirmed:
                self._slots.clear()
                waiter = self._slots.wait()
            else:
                waiter = proto.drained.wait()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishTimeout("broker is not accepting publishes (flow control)")
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                raise PublishTimeout("broker is not accepting publishes (flow control)") from None
            proto = await self._ready(deadline)

    def publish_nowait(self, exchange: str, routing_key: str, body: Body, *,
                       properties: dict[str, Any] | None = None, mandatory: bool = False,
                       **props: Any) -> asyncio.Future[None]:
        """Queue one message without waiting; the returned future resolves on its confirm.

        This is the pipelined form of :meth:`publish`: frames queued in one loop turn go
        out as one PUBLISH_BATCH. The future fails like :meth:`publish` does. Raises
        ``Backpressure`` (nothing queued) when ``max_unconfirmed`` publishes are in flight
        or the socket is backed up: ``await conn.wait_for_capacity()`` and retry.
        """
        proto = self._proto
        if proto is None or self._closing or not self._connected.is_set():
            raise ConnectionClosed(f"not connected to {self.url}")
        if len(self._unconfirmed) >= self.max_unconfirmed or proto.paused:
            raise Backpressure("too many unconfirmed publishes or socket backed up")
        p = _props(properties, props) if props or properties else {}
        return self._enqueue([(exchange, routing_key, p,
                               body if type(body) is bytes else _body(body), mandatory)],
                             proto.max_frame_size)

    async def _publish_many(self, entries: Sequence[Entry],
                            timeout: float | None) -> asyncio.Future[None]:
        await self.wait_for_capacity(timeout)
        assert self._proto is not None
        return self._enqueue(entries, self._proto.max_frame_size)

    def _enqueue(self, entries: Sequence[Entry], max_frame: int) -> asyncio.Future[None]:
        """Assign sequence numbers, register the confirm future, queue the frames."""
        _check_fits(entries, max_frame)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        n = len(entries)
        pending = _Pending(fut, n)
        first = self._seq + 1
        self._seq += n
        unconfirmed = self._unconfirmed
        if n == 1:
            unconfirmed[first] = pending
        else:
            for seq in range(first, first + n):
                unconfirmed[seq] = pending
        if not self._pub:
            self._pub_first = first
        self._pub.extend(entries)
        if n == 1:
            self._pub_size += _entry_size(entries[0])
        else:
            self._pub_size += sum(_entry_size(e) for e in entries)
        if self._pub_size > (1 << 20):
            self._emit_publishes()  # bound what one loop turn can accumulate
        self._schedule_flush()
        return fut

    # ------------------------------------------------------------------ consume
    async def consume(self, queue: str, *, prefetch: int = 256, no_ack: bool = False,
                      exclusive: bool = False, consumer_tag: str = "",
                      arguments: dict[str, Any] | None = None) -> Consumer:
        """Start a push consumer; iterate it with ``async for``.

        ``prefetch`` (>= 1) bounds unacked deliveries; ``no_ack=True`` is at-most-once.
        """
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        c = Consumer(self, queue, prefetch, no_ack, exclusive, consumer_tag, arguments or {})
        await self._start_consumer(c)
        return c

    async def _start_consumer(self, c: Consumer, internal: bool = False) -> None:
        rid = next(self._rids)
        self._pending_consumers[rid] = c
        try:
            ok = await self._request(Consume(rid, c.queue, c.tag, c.no_ack, c.exclusive,
                                             c.prefetch, c.arguments), internal=internal)
        finally:
            self._pending_consumers.pop(rid, None)
        assert isinstance(ok, ConsumeOk) and c.active

    async def _cancel_consumer(self, c: Consumer) -> None:
        self._consumers.pop(c.tag, None)
        if self._proto is None:
            return
        with contextlib.suppress(ConveyorError):
            await self._request(Cancel(next(self._rids), c.tag))

    def _grant(self, c: Consumer, n: int) -> None:
        if self._proto is not None and c.tag in self._consumers:
            self._send(encode(Credit(c.tag, n)))  # after the acks that freed it

    def _settle(self, msg: Message, how: str, requeue: bool) -> None:
        if msg._epoch != self._epoch or self._proto is None:
            raise ConnectionClosed(
                "the connection this message came on is gone; the broker will redeliver it")
        tag = msg.delivery_tag
        if how == "ack":
            self._done[tag] = False  # acks are coalesced at flush time
            self._ack_pending.append(tag)
            self._schedule_flush()
            return
        self._done[tag] = True
        if how == "nack":
            self._send(encode_fields(_NACK, [tag, False, requeue]))
        else:
            self._send(encode_fields(_REJECT, [tag, requeue]))

    async def get(self, queue: str, max_messages: int = 1, *, no_ack: bool = False,
                  timeout: float | None = None) -> builtins.list[Message]:
        """Pull up to ``max_messages`` ready messages (an empty list if none)."""
        ok = await self._request(Get(next(self._rids), queue, max_messages, no_ack), timeout)
        assert isinstance(ok, GetOk)
        if not no_ack:
            self._unsettled.extend([e[0] for e in ok.entries])
        return [Message(self, None, self._epoch, *e, settled=no_ack) for e in ok.entries]

    # ------------------------------------------------------------------ request/reply
    async def rpc(self, exchange: str, routing_key: str, body: Body, *,
                  timeout: float | None = None, properties: dict[str, Any] | None = None,
                  **props: Any) -> Message:
        """Send a request and wait for its reply (reply_to + correlation_id).

        Replies arrive on one server-named exclusive queue per connection, created on
        first use. Raises ``RequestTimeout`` if no reply comes within ``timeout``.
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
            await self.publish(exchange, routing_key, body, properties=p, timeout=timeout)
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise RequestTimeout(f"no reply from {routing_key!r} within {timeout}s") from None
        finally:
            self._rpc_waiters.pop(corr, None)

    async def _ensure_rpc_queue(self) -> None:
        if self._rpc_queue is not None and self._rpc_consumer is not None \
                and self._rpc_consumer.active:
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


_TOPOLOGY_FRAMES: dict[str, Any] = {"exchange": ExchangeDeclare, "queue": QueueDeclare,
                                     "bind": Bind}


async def connect(url: str = "mq://127.0.0.1:5680", *, name: str = "", reconnect: bool = True,
                  timeout: float = 30.0, heartbeat_ms: int = 0, max_frame_size: int = 0,
                  max_unconfirmed: int = 65536) -> Connection:
    """Open a connection (``async with await connect(...) as conn`` closes it cleanly).

    ``timeout`` bounds connecting and is the default for requests and publishes.
    ``reconnect`` restores the connection, topology and consumers after a drop.
    """
    conn = Connection(url, name=name, reconnect=reconnect, heartbeat_ms=heartbeat_ms,
                      max_frame_size=max_frame_size, max_unconfirmed=max_unconfirmed,
                      timeout=timeout)
    await conn._open(timeout)
    return conn
