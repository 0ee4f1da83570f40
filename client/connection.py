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
import ssl
import time
import uuid
from asyncio import InvalidStateError
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice, repeat
from typing import Any, Literal, cast

import msgpack

from client.consumer import Consumer
from client.errors import Backpressure, ConnectionClosed, PublishTimeout, RequestTimeout
from client.message import PROPERTY_NAMES, Message, Origin
from client.tls import tls_context
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
    Extend,
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
    PublishCredit,
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
from protocol._checks import U16_MAX, U32_MAX, U64_MAX
from protocol._generated import NAME_FAST, STR_FAST, check_props
from protocol.codec import HEADER, _unpack_body
from protocol.connection import Connection as WireConnection
from protocol.connection import Role, State

log = logging.getLogger("conveyor.client")
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack

Body = bytes | str
_PUBLISH = Publish.TYPE
_PUBLISH_BATCH = PublishBatch.TYPE
_ACK = AckFrame.TYPE
_NACK = NackFrame.TYPE
_REJECT = RejectFrame.TYPE
_CREDIT = Credit.TYPE
_EXTEND = Extend.TYPE
_OPEN = State.OPEN
_unpack_header = HEADER.unpack_from
Entry = tuple[str, str, dict[str, Any], bytes, bool]
_NO_PROPS: dict[str, Any] = {}  # shared by publishes without properties; never mutated
# Publishes queued in one loop turn are written as soon as they weigh this much (see
# _enqueue): large enough to keep frames and writes few, small enough that the broker
# starts on a burst while the client is still producing it.
_WRITE_AHEAD = 32 << 10


def _no_loop() -> asyncio.Future[Any]:
    raise ConnectionClosed("not connected")


def _entry_size(e: Entry) -> int:
    """Upper estimate of an entry's encoded size (headers are the only unbounded
    property)."""
    props = e[2]
    extra = 0
    if props:
        extra = 64 * len(props) + (len(_packb(props["headers"])) if "headers" in props else 0)
    return len(e[3]) + len(e[0]) + len(e[1]) + 32 + extra


# What a queued publish counts towards _WRITE_AHEAD: its body, its headers and a flat
# allowance for the rest (only a pacing weight; frame limits are measured, not estimated).
_ENTRY_WEIGHT = 128


def _entry_weight(e: Entry) -> int:
    props = e[2]
    return len(e[3]) + _ENTRY_WEIGHT + (
        len(_packb(props["headers"])) if props and "headers" in props else 0)


_U64_MAX = U64_MAX


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


class _Sized(list[Entry]):
    """Entries that share exchange, routing key and properties, with their total weight
    (see ``_ENTRY_WEIGHT``), the size of the largest body plus headers and the total of
    their body lengths (what they cost in publish credit)."""

    __slots__ = ("bodies", "largest", "size")
    size: int
    largest: int
    bodies: int


def _body_bytes(entries: Sequence[Entry]) -> int:
    """Publish credit in bytes that ``entries`` use: the sum of their body lengths."""
    if type(entries) is _Sized:
        return entries.bodies
    return sum([len(e[3]) for e in entries])


def _credit_fit(entries: Sequence[Entry], start: int, messages: int,
                nbytes: int) -> tuple[int, int]:
    """How many of ``entries[start:]`` the credit allows (each needs a message and byte
    credit > 0 before it; the last may overdraw the bytes), and their body bytes."""
    k = used = 0
    for i in range(start, min(len(entries), start + messages)):
        if nbytes - used <= 0:
            break
        used += len(entries[i][3])
        k += 1
    return k, used


class _Pending:
    """Confirm tracking for one publish call of many messages, or of one message that
    came back in a RETURN. (A lone message is tracked by its bare future.)"""

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


def _queue_arguments(arguments: dict[str, Any] | None,
                     typed: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` with the typed declare_queue parameters that were given merged in."""
    args = dict(arguments or {})
    for k, v in typed.items():
        if v is None:
            continue
        if k in args and args[k] != v:
            raise ValueError(f"queue argument {k!r} given twice: {args[k]!r} and {v!r}")
        args[k] = v
    return args


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
        if not max_frame:
            continue
        size = len(body) + (len(_packb(props["headers"])) if props and "headers" in props
                            else 0)
        if size + 4096 <= max_frame:
            continue  # names and properties other than headers are small
        # Measure exactly, as sent (alone in a PUBLISH or PUBLISH_BATCH, worst-case seq).
        entry = [ex, rk, props, body, mandatory]
        frame = (encode_fields(_PUBLISH, [_U64_MAX, *entry]) if len(entries) == 1
                 else encode_fields(_PUBLISH_BATCH, [_U64_MAX, [entry]]))
        if len(frame) - 4 > max_frame:
            raise error_for_code(413, f"message of {len(body)} bytes does not fit the negotiated "
                                 f"maximum frame size of {max_frame} bytes",
                                 {"max_frame_size": max_frame})


class _Deliveries:
    """A DELIVER_BATCH decoded on the client's fast path, straight into messages (no
    frame or record objects). ``origin.consumer`` is filled in when it is dispatched."""

    __slots__ = ("consumer_tag", "messages", "origin", "tags")

    def __init__(self, consumer_tag: str, origin: Origin, messages: list[Message],
                 tags: list[int]) -> None:
        self.consumer_tag = consumer_tag
        self.origin = origin
        self.messages = messages
        self.tags = tags


class _PropsCheck:
    """``check_props`` with a one-entry memo: a delivery's properties that equal the last
    validated ones *and* have the same value types (``==`` alone would let ``1`` pass for
    ``True``) are valid too. Properties with headers (nested, so mutable through a
    message the application holds) are always checked in full.

    ``key``/``kind``: when at most one value is not a string (``simple``), that key and
    its type, so the common case is checked inline by :func:`_messages`."""

    __slots__ = ("key", "kind", "last", "simple", "typed")

    def __init__(self) -> None:
        self.last: dict[str, Any] | None = None
        self.typed: tuple[tuple[str, type], ...] = ()
        self.simple = False
        self.key: str | None = None
        self.kind: type = type(None)

    def ok(self, p: dict[str, Any]) -> bool:
        if p == self.last:
            for k, t in self.typed:
                if type(p[k]) is not t:
                    break
            else:
                return True
        try:
            check_props(p, "deliver_batch.entries.properties")
        except ConveyorError:
            return False
        if "headers" not in p:
            self.last = dict(p)  # a copy: p itself is handed to the application
            self.typed = tuple((k, type(v)) for k, v in p.items() if type(v) is not str)
            self.simple = len(self.typed) <= 1
            self.key, self.kind = self.typed[0] if self.typed else (None, type(None))
        return True


_new = object.__new__


def _messages(entries: list[Any], origin: Origin,
              memo: _PropsCheck) -> tuple[list[Message], list[int]] | None:
    """Messages (and their tags) for DELIVER_BATCH entries that are all full 7-item
    records the generated ``DeliveryEntry`` checks accept on their fast path; None means
    "not sure": the caller then runs the generated decoder, which raises the precise
    error (or accepts what this stricter check left out, such as omitted trailing
    fields). Validation and construction share one loop: this runs once per message."""
    msgs: list[Message] = []
    tags: list[int] = []
    append = msgs.append
    append_tag = tags.append
    last, simple, key, kind = memo.last, memo.simple, memo.key, memo.kind
    for f in entries:
        if type(f) is not list or len(f) != 7:
            return None
        a0, a1, a2, a3, a4, a5, a6 = f
        if (type(a0) is not int or a0 < 0 or a0 > _U64_MAX
                or (a1 is not True and a1 is not False)
                or type(a2) is not str or len(a2) > NAME_FAST
                or type(a3) is not str or len(a3) > NAME_FAST
                or type(a4) is not dict or type(a5) is not bytes
                or type(a6) is not int or a6 < 0 or a6 > U32_MAX):
            return None
        if a4 and not (a4 == last and simple and (key is None or type(a4[key]) is kind)):
            if not memo.ok(a4):
                return None
            last, simple, key, kind = memo.last, memo.simple, memo.key, memo.kind
        m = _new(Message)  # Message.__init__, inlined
        m._origin = origin
        m.delivery_tag = a0
        m.redelivered = a1
        m.exchange = a2
        m.routing_key = a3
        m.properties = a4
        m.body = a5
        m.delivery_count = a6
        m.settled = False
        append(m)
        append_tag(a0)
    return msgs, tags


class _Confirmed:
    """A CONFIRM decoded on the fast path (the fields of :class:`Confirm`)."""

    __slots__ = ("ack", "code", "first_seq", "last_seq", "message")

    def __init__(self, first_seq: int, last_seq: int, ack: bool, code: int,
                 message: str) -> None:
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.ack = ack
        self.code = code
        self.message = message


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: Connection) -> None:
        self.owner = owner
        self.wire = WireConnection(Role.CLIENT, 1 << 30)
        self._cap = self.wire.max_frame_size
        self._rbuf = bytearray()  # an incomplete frame
        self._props = _PropsCheck()
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[OpenOk] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.paused = False
        self.drained = asyncio.Event()
        self.drained.set()
        self.last_recv = time.monotonic()
        self.max_frame_size = 0
        self.fit_limit = 1 << 62  # estimated sizes above this are measured by _check_fits
        # Publish credit of this connection (PUBLISH_CREDIT adds, each publish uses one
        # message and len(body) bytes) and the broker's reason for withholding it.
        self.credit_messages = 0
        self.credit_bytes = 0
        self.blocked = ""
        self.credited = asyncio.Event()
        self.open_ok: OpenOk | None = None

    def add_credit(self, f: PublishCredit) -> None:
        self.credit_messages += f.messages
        self.credit_bytes += f.bytes
        self.blocked = f.blocked
        if self.credit_messages > 0 and self.credit_bytes > 0:
            self.credited.set()

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
            frames = self._decode(data)
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

    def _decode(self, data: bytes) -> list[Any]:
        """Split the stream into frames; every frame of this read is decoded (and any
        protocol error raised) before any is acted on.

        The frames of the hot path in the OPEN state (DELIVER_BATCH, DELIVER, CONFIRM)
        are decoded here, straight into messages (:class:`_Deliveries`) or a
        :class:`_Confirmed`; whatever the fast checks do not accept outright goes to the
        generated decoder. Every other frame goes to the sans-IO connection one whole
        frame at a time, so its checks, errors and state machine apply unchanged; a
        header it must refuse (size) goes to it at once. (In OPEN, that state machine
        passes these three frame types through untouched.)
        """
        rbuf = self._rbuf
        buf: bytes | bytearray
        if rbuf:
            rbuf += data
            buf = rbuf
        else:
            buf = data
        out: list[Any] = []
        pos = 0
        end = len(buf)
        wire = self.wire
        try:
            while end - pos >= 5:
                length, ftype = _unpack_header(buf, pos)
                if length > self._cap or not length:
                    out.extend(wire.receive_data(buf[pos:]))  # raises, unless CLOSED
                    pos = end
                    break
                stop = pos + 4 + length
                if stop > end:
                    break
                if ftype in _FAST and wire.state is _OPEN:
                    out.append(_FAST[ftype](self, buf[pos + 5:stop]))
                else:
                    out.extend(wire.receive_data(buf[pos:stop]))
                pos = stop
        finally:
            if buf is rbuf:
                del rbuf[:pos]
            elif pos < end:
                rbuf += buf[pos:]
        return out

    def _fast_deliveries(self, tag: Any, entries: list[Any]) -> _Deliveries | None:
        """Messages straight from delivery entries, or None to take the checked path."""
        if type(tag) is str and len(tag) <= NAME_FAST:
            origin = Origin(self.owner, None, self.owner._epoch)
            decoded = _messages(entries, origin, self._props)
            if decoded is not None:
                return _Deliveries(tag, origin, *decoded)
        return None

    def _deliver_batch(self, body: bytes | bytearray) -> _Deliveries | DeliverBatch:
        f = _unpack_body(body, DeliverBatch.NAME)
        if type(f) is list and len(f) == 2 and type(f[1]) is list:
            fast = self._fast_deliveries(f[0], f[1])
            if fast is not None:
                return fast
        return DeliverBatch.from_wire(f)

    def _deliver(self, body: bytes | bytearray) -> _Deliveries | Deliver:
        f = _unpack_body(body, Deliver.NAME)
        if type(f) is list and len(f) == 8:
            fast = self._fast_deliveries(f[0], [f[1:]])
            if fast is not None:
                return fast
        return Deliver.from_wire(f)

    def _confirm(self, body: bytes | bytearray) -> _Confirmed | Confirm:
        f = _unpack_body(body, Confirm.NAME)
        if type(f) is list and len(f) == 5:
            a0, a1, a2, a3, a4 = f
            if (type(a0) is int and 0 <= a0 <= U64_MAX and type(a1) is int
                    and 0 <= a1 <= U64_MAX and (a2 is True or a2 is False)
                    and type(a3) is int and 0 <= a3 <= U16_MAX
                    and type(a4) is str and len(a4) <= STR_FAST):
                return _Confirmed(a0, a1, a2, a3, a4)
        return Confirm.from_wire(f)

    def _handshake(self, frames: list[Frame]) -> list[Frame]:
        rest: list[Frame] = []
        for i, f in enumerate(frames):
            if isinstance(f, Hello):
                o = self.owner
                auth = Auth("token" if o.token else "anonymous", o.token,
                            {"library": "conveyor-py", "version": "0.1.0",
                             "connection_name": o.name}, o.max_frame_size, o.heartbeat_ms)
                assert self.transport is not None
                self.transport.write(self.wire.send(auth))
            elif isinstance(f, OpenOk):
                self.max_frame_size = f.max_frame_size
                if f.max_frame_size:
                    self.fit_limit = f.max_frame_size - 4096
                self.open_ok = f  # open once the initial PUBLISH_CREDIT (next) is in
            elif self.open_ok is not None and not isinstance(f, HeartbeatFrame):
                if isinstance(f, PublishCredit):
                    self.add_credit(f)
                    i += 1
                if not self.handshake.done():
                    self.handshake.set_result(self.open_ok)
                rest = frames[i:]
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
        self.credited.set()  # publishers waiting for credit go on to wait for a reconnect
        self.owner._on_lost(self, exc)

    def pause_writing(self) -> None:
        self.paused = True
        self.drained.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self.drained.set()


# Frame types _Protocol._decode decodes itself in the OPEN state.
_FAST: dict[int, Callable[[_Protocol, bytes | bytearray], Any]] = {
    DeliverBatch.TYPE: _Protocol._deliver_batch,
    Deliver.TYPE: _Protocol._deliver,
    Confirm.TYPE: _Protocol._confirm,
}


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
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        self.url: URL = parse_url(url)
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
        self._requests: dict[int, asyncio.Future[Frame]] = {}
        self._seq = 0
        # seq -> the future of a one-message publish, or the _Pending of a larger call.
        self._unconfirmed: dict[int, asyncio.Future[None] | _Pending] = {}
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
                    lambda: _Protocol(self), self.url.host, self.url.port, ssl=self._ssl,
                    ssl_handshake_timeout=timeout if self._ssl is not None else None),
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
            self._accepting = not self._closing
        if ok.heartbeat_ms and (self._hb_task is None or self._hb_task.done()):
            self._hb_task = asyncio.create_task(self._heartbeat(ok.heartbeat_ms / 1000))

    async def close(self) -> None:
        """Close cleanly: CLOSE / CLOSE_OK, then fail anything still pending."""
        if self._closing:
            return
        self._closing = True
        self._accepting = False
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
    def _on_frames(self, proto: _Protocol, frames: list[Any]) -> None:
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
            elif t is Deliver:
                self._on_deliveries(f.consumer_tag, [(
                    f.delivery_tag, f.redelivered, f.exchange, f.routing_key, f.properties,
                    f.body, f.delivery_count)])
            elif t is Error:
                self._on_error(f)
            elif t is Return:
                self._on_return(f.seq)
            elif t is Cancelled:
                c = self._consumers.pop(f.consumer_tag, None)
                if c is not None:
                    c._cancelled_by_server(f.code, f.message)
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
                fut = self._requests.pop(rid, None) if rid is not None else None
                if fut is not None and not fut.done():
                    fut.set_result(f)

    def _on_return(self, seq: int) -> None:
        p = self._unconfirmed.get(seq)
        if p is None:
            return
        if type(p) is not _Pending:  # a lone publish: track it in full from now on
            p = self._unconfirmed[seq] = _Pending(cast("asyncio.Future[None]", p), 1)
        p.returned.append(seq)

    def _on_confirm(self, f: Confirm | _Confirmed) -> None:
        unconfirmed = self._unconfirmed
        pop = unconfirmed.pop
        exc: ConveyorError | None = None
        if not f.ack:
            exc = error_for_code(f.code, f.message or "publish refused")
        for seq in range(f.first_seq, f.last_seq + 1):
            p = pop(seq, None)
            if p is None:
                continue
            if type(p) is not _Pending:  # a lone publish's future
                try:
                    if exc is None:
                        p.set_result(None)  # type: ignore[union-attr]
                    else:
                        p.set_exception(exc)  # type: ignore[union-attr]
                except InvalidStateError:  # cancelled by the application
                    pass
                continue
            if exc is not None and p.nacked is None:
                p.nacked = exc
            p.remaining -= 1
            if p.remaining == 0 and not p.future.done():
                self._settle_pending(p)
        if len(unconfirmed) < self.max_unconfirmed:
            self._slots.set()

    @staticmethod
    def _settle_pending(p: _Pending) -> None:
        if p.nacked is not None:
            p.future.set_exception(p.nacked)
        elif p.returned:
            p.future.set_exception(NoRoute(
                f"{len(p.returned)} mandatory message(s) matched no queue",
                {"returned_seqs": p.returned}))
        else:
            p.future.set_result(None)

    def _on_deliveries(self, consumer_tag: str, entries: Sequence[Sequence[Any]]) -> None:
        """Messages for a consumer; ``entries`` are validated 7-item delivery records."""
        origin = Origin(self, None, self._epoch)
        self._on_messages(_Deliveries(consumer_tag, origin,
                                      [Message(origin, e) for e in entries],
                                      [e[0] for e in entries]))

    def _on_messages(self, d: _Deliveries) -> None:
        c = self._consumers.get(d.consumer_tag)
        if c is None:
            return
        d.origin.consumer = c
        if c.no_ack:
            for m in d.messages:
                m.settled = True
        else:
            self._unsettled.extend(d.tags)
        c._push(d.messages)

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
        self._epoch += 1  # messages delivered on it can no longer be settled
        self._connected.clear()
        self._accepting = False
        self._wbuf.clear()
        self._pub.clear()
        self._pub_size = 0
        self._unsettled.clear()
        self._done.clear()
        self._ack_pending.clear()
        self._ack_hi = 0
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
            pf = p.future if type(p) is _Pending else cast("asyncio.Future[None]", p)
            if not pf.done():
                pf.set_exception(err)
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
            self._accepting = not self._closing
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
        if self._wbuf and proto is not None and proto.transport is not None \
                and not proto.transport.is_closing():
            data = b"".join(self._wbuf)
            self._wbuf.clear()
            proto.transport.write(data)

    def _emit_publishes(self) -> None:
        # The queued publishes hold the last len(pub) sequence numbers: call this only
        # while that is so (never between assigning a seq and queueing its entry).
        pub = self._pub
        self._pub = []
        self._pub_size = 0
        first = self._seq - len(pub) + 1
        if len(pub) == 1:
            self._wbuf.append(encode_fields(_PUBLISH, [first, *pub[0]]))
            return
        frame = encode_fields(_PUBLISH_BATCH, [first, pub])
        proto = self._proto
        limit = proto.max_frame_size if proto is not None else 1 << 20
        if len(frame) - 4 <= limit:  # measured: fits the negotiated frame size
            self._wbuf.append(frame)
            return
        # Too large for one frame: split by upper estimates of each entry's size.
        budget = limit - 4096
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
        hi = self._ack_hi
        self._ack_hi = 0
        need = hi != 0
        wbuf = self._wbuf
        if not self._ack_pending:
            if need:
                wbuf.append(encode_fields(_ACK, [hi, True]))
            return
        pending = self._ack_pending
        self._ack_pending = []
        done = self._done
        unsettled = self._unsettled
        while unsettled and unsettled[0] in done:
            hi = unsettled.popleft()
            if not done.pop(hi):
                need = True
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

    async def declare_queue(
        self, name: str = "", *, durable: bool = True, exclusive: bool = False,
        auto_delete: bool = False, passive: bool = False,
        arguments: dict[str, Any] | None = None,
        ack_timeout_ms: int | None = None, delivery_limit: int | None = None,
        dead_letter_exchange: str | None = None, dead_letter_routing_key: str | None = None,
        message_ttl_ms: int | None = None, expires_ms: int | None = None,
        max_priority: int | None = None, max_length: int | None = None,
        max_length_bytes: int | None = None,
        overflow: Literal["drop-head", "reject-publish"] | None = None,
        dedup_window_ms: int | None = None, single_active_consumer: bool | None = None,
    ) -> QueueInfo:
        """Declare a queue; an empty name asks the broker to pick a unique one.

        The queue arguments (see the spec's table) are keyword parameters, so a misspelt
        one fails here rather than at the broker; those left None are not sent (the
        broker's default applies). ``arguments`` still takes them as a map; naming one
        both ways with different values is a ``ValueError``. Redeclaring with different
        arguments fails with ``PreconditionFailed``.

        - ``ack_timeout_ms``: unacked this long, a delivery returns to the queue (0 = never)
        - ``delivery_limit``: dead-letter a message after this many deliveries
        - ``dead_letter_exchange`` / ``dead_letter_routing_key``: where dead letters go
        - ``message_ttl_ms``: messages expire this long after enqueue
        - ``expires_ms``: delete the queue after this long unused
        - ``max_priority``: 1..9 enables priority order (0 = FIFO)
        - ``max_length`` / ``max_length_bytes``: bound the ready messages
        - ``overflow``: at the bound, dead-letter the oldest ("drop-head") or nack the
          publish with ``QueueFull`` ("reject-publish")
        - ``dedup_window_ms``: drop a message_id seen within this window
        - ``single_active_consumer``: deliver to one consumer at a time
        """
        args = _queue_arguments(arguments, {
            "ack_timeout_ms": ack_timeout_ms, "delivery_limit": delivery_limit,
            "dead_letter_exchange": dead_letter_exchange,
            "dead_letter_routing_key": dead_letter_routing_key,
            "message_ttl_ms": message_ttl_ms, "expires_ms": expires_ms,
            "max_priority": max_priority, "max_length": max_length,
            "max_length_bytes": max_length_bytes, "overflow": overflow,
            "dedup_window_ms": dedup_window_ms,
            "single_active_consumer": single_active_consumer})
        kw: dict[str, Any] = {"queue": name, "durable": durable, "exclusive": exclusive,
              "auto_delete": auto_delete, "passive": passive, "arguments": args}
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
        base = properties or _NO_PROPS
        entries: list[tuple[str, str, dict[str, Any], bytes, bool]]
        if type(messages) is list and set(map(type, messages)) == {bytes}:
            # The common shape, all bodies with the shared settings: no Python-level loop.
            n = len(messages)
            entries = _Sized(zip(repeat(exchange, n), repeat(routing_key, n), repeat(base, n),
                                 messages, repeat(mandatory, n), strict=True))
            headers = len(_packb(base["headers"])) if "headers" in base else 0
            entries.bodies = sum(map(len, messages))
            entries.size = entries.bodies + n * (_ENTRY_WEIGHT + headers)
            entries.largest = max(map(len, messages), default=0) + headers
        else:
            entries = []
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
        # ``fut`` belongs to this call alone, so it is awaited directly (one wakeup, no
        # shield): if the timeout or the caller cancels it, the confirm that may still
        # come finds it done and is ignored.
        timeout = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise PublishTimeout(f"no confirm within {timeout}s") from None

    async def wait_for_capacity(self, timeout: float | None = None) -> None:
        """Wait until a publish can be queued: connected, publish credit from the broker
        (see :attr:`blocked`), fewer than ``max_unconfirmed`` publishes in flight, and the
        socket not backed up. Raises PublishTimeout."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        proto = await self._ready(deadline)
        while (len(self._unconfirmed) >= self.max_unconfirmed or proto.paused
               or proto.credit_messages <= 0 or proto.credit_bytes <= 0):
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                waiter: Any
                if len(self._unconfirmed) >= self.max_unconfirmed:
                    self._slots.clear()
                    waiter = self._slots.wait()
                elif proto.paused:
                    waiter = proto.drained.wait()
                else:
                    proto.credited.clear()
                    waiter = proto.credited.wait()
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                why = f" (publish credit withheld: {proto.blocked})" if proto.blocked else \
                    " (flow control)"
                raise PublishTimeout(f"broker is not accepting publishes{why}") from None
            proto = await self._ready(deadline)

    @property
    def blocked(self) -> str | None:
        """Why the broker withholds publish credit ("rate", "memory", "disk",
        "queue-full"), or None while it does not."""
        proto = self._proto
        return proto.blocked or None if proto is not None else None

    @property
    def publish_credit(self) -> tuple[int, int]:
        """(messages, bytes) this connection may still publish before the broker grants
        more; (0, 0) while disconnected."""
        proto = self._proto
        return (proto.credit_messages, proto.credit_bytes) if proto is not None else (0, 0)

    def publish_nowait(self, exchange: str, routing_key: str, body: Body, *,
                       properties: dict[str, Any] | None = None, mandatory: bool = False,
                       **props: Any) -> asyncio.Future[None]:
        """Queue one message without waiting; the returned future resolves on its confirm.

        This is the pipelined form of :meth:`publish`: frames queued in one loop turn go
        out as one PUBLISH_BATCH. The future fails like :meth:`publish` does. Raises
        ``Backpressure`` (nothing queued) when the broker's publish credit is used up
        (:attr:`blocked` says why it is withheld), ``max_unconfirmed`` publishes are in
        flight or the socket is backed up: ``await conn.wait_for_capacity()`` and retry.
        """
        proto = self._proto
        if proto is None or not self._accepting:
            raise ConnectionClosed(f"not connected to {self.url}")
        unconfirmed = self._unconfirmed
        if (len(unconfirmed) >= self.max_unconfirmed or proto.paused
                or proto.credit_messages <= 0 or proto.credit_bytes <= 0):
            if proto.credit_messages <= 0 or proto.credit_bytes <= 0:
                raise Backpressure("no publish credit" + (
                    f" (withheld: {proto.blocked})" if proto.blocked else ""))
            raise Backpressure("too many unconfirmed publishes or socket backed up")
        if props:
            properties = _props(properties, props)
        if type(body) is not bytes:
            body = _body(body)
        size = len(body)
        if properties:
            if "headers" in properties:  # the only property of unbounded size
                size += len(_packb(properties["headers"]))
        else:
            properties = _NO_PROPS
        entry = (exchange, routing_key, properties, body, mandatory)
        if size > proto.fit_limit:
            _check_fits([entry], proto.max_frame_size)  # only large messages are measured
        proto.credit_messages -= 1
        proto.credit_bytes -= len(body)
        size += _ENTRY_WEIGHT
        # _enqueue inlined for one message: its bare future is its confirm tracking.
        if self._ack_hi or self._ack_pending:
            # Acks issued before this publish must reach the broker before it (see
            # _enqueue).
            if self._pub:
                self._emit_publishes()
            self._emit_acks()
        fut: asyncio.Future[None] = self._new_future()
        idle = not unconfirmed
        self._seq = seq = self._seq + 1
        unconfirmed[seq] = fut
        self._pub.append(entry)
        size += self._pub_size
        self._pub_size = size
        if size > _WRITE_AHEAD or idle:
            self._write_out()  # see _enqueue
        elif not self._flush_scheduled:
            self._schedule_flush()
        return fut

    async def _publish_many(self, entries: Sequence[Entry],
                            timeout: float | None) -> asyncio.Future[None]:
        proto = self._proto
        n = len(entries)
        if (proto is None or not self._accepting or proto.paused
                or len(self._unconfirmed) >= self.max_unconfirmed
                or proto.credit_messages < n or proto.credit_bytes <= 0):
            return await self._publish_paced(entries, timeout)
        nbytes = _body_bytes(entries)
        if nbytes - len(entries[-1][3]) >= proto.credit_bytes:
            return await self._publish_paced(entries, timeout)
        proto.credit_messages -= n
        proto.credit_bytes -= nbytes
        return self._enqueue(entries, proto.max_frame_size)

    async def _publish_paced(self, entries: Sequence[Entry],
                             timeout: float | None) -> asyncio.Future[None]:
        """Queue ``entries`` as publish credit and capacity allow, waiting (up to
        ``timeout`` in all) in between; one future settles with the last confirm."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        n = len(entries)
        pending: _Pending | None = None
        checked = False
        i = 0
        while True:
            await self.wait_for_capacity(max(0.0, deadline - time.monotonic()))
            if pending is not None and pending.future.done():
                return pending.future  # failed meanwhile (connection lost): send no more
            proto = self._proto
            assert proto is not None
            if not checked:  # refuse an oversized message before any part is sent
                if type(entries) is not _Sized or entries.largest + 4096 > proto.max_frame_size:
                    _check_fits(entries, proto.max_frame_size)
                checked = True
            k, nbytes = _credit_fit(entries, i, proto.credit_messages, proto.credit_bytes)
            proto.credit_messages -= k
            proto.credit_bytes -= nbytes
            if pending is None and k == n:
                return self._enqueue(entries, proto.max_frame_size)
            if pending is None:
                loop = self._loop or asyncio.get_running_loop()
                pending = _Pending(loop.create_future(), n)
            self._enqueue(entries[i:i + k], proto.max_frame_size, pending)
            i += k
            if i >= n:
                return pending.future

    def _enqueue(self, entries: Sequence[Entry], max_frame: int,
                 pending: _Pending | None = None) -> asyncio.Future[None]:
        """Assign sequence numbers, register the confirm future, queue the frames.
        ``pending``: these entries are part of a larger call tracked by it."""
        if pending is None and (type(entries) is not _Sized
                                or entries.largest + 4096 > max_frame):
            _check_fits(entries, max_frame)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future() if pending is None else pending.future
        if self._ack_hi or self._ack_pending:
            # Acks issued before this publish must reach the broker before it: a confirm
            # then also vouches for the acks (the broker logs in arrival order).
            if self._pub:
                self._emit_publishes()  # (before _seq moves on: see _emit_publishes)
            self._emit_acks()
        n = len(entries)
        first = self._seq + 1
        self._seq += n
        unconfirmed = self._unconfirmed
        idle = not unconfirmed
        if pending is not None:
            unconfirmed.update(zip(range(first, first + n), repeat(pending)))
        elif n == 1:
            unconfirmed[first] = fut
        else:
            unconfirmed.update(zip(range(first, first + n), repeat(_Pending(fut, n))))
        self._pub.extend(entries)
        self._pub_size += entries.size if type(entries) is _Sized else \
            sum(map(_entry_weight, entries))
        if self._pub_size > _WRITE_AHEAD or idle:
            # Written now rather than at the end of the loop turn: a burst goes out in
            # pieces the broker can start on while the rest is produced, and a publish
            # with nothing else in flight (a latency-bound caller) does not wait a turn.
            self._write_out()
        elif not self._flush_scheduled:
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
            self._send(encode_fields(_CREDIT, [c.tag, n]))  # after the acks that freed it

    def _stale(self) -> ConnectionClosed:
        return ConnectionClosed(
            "the connection this message came on is gone; the broker will redeliver it")

    def _refuse(self, tag: int, epoch: int, how: str, requeue: bool) -> None:
        if epoch != self._epoch or self._proto is None:
            raise self._stale()
        self._done[tag] = True
        if how == "nack":
            self._send(encode_fields(_NACK, [tag, False, requeue]))
        else:
            self._send(encode_fields(_REJECT, [tag, requeue]))

    def _extend(self, tag: int, epoch: int, timeout_ms: int) -> None:
        if type(timeout_ms) is not int or not 0 <= timeout_ms <= U64_MAX:
            # Checked here: an out-of-range integer would make the frame malformed, which
            # the broker answers by closing the connection.
            raise ValueError(f"timeout_ms must be an int in 0..{U64_MAX}, not {timeout_ms!r}")
        if epoch != self._epoch or self._proto is None:
            raise self._stale()
        self._send(encode_fields(_EXTEND, [tag, timeout_ms]))

    def ack_all(self, messages: Iterable[Message]) -> None:
        """Acknowledge every message of ``messages`` in one call: like ``msg.ack()`` for
        each, but all or nothing. Raises (acking none) ``RuntimeError`` if one is already
        settled or listed twice, ``ConnectionClosed`` if one came on a connection that is
        gone (the broker redelivers those), ``ValueError`` if one came on another
        connection."""
        msgs = messages if isinstance(messages, (builtins.list, tuple)) else \
            builtins.list(messages)
        if not msgs:
            return
        epoch = self._epoch
        live = self._proto is not None
        tags: builtins.list[int] = []
        append = tags.append
        first_origin = msgs[0]._origin
        same_origin = True
        for m in msgs:
            o = m._origin
            if o is not first_origin or o.conn is not self:
                if o.conn is not self:
                    raise ValueError(f"message {m.delivery_tag} came on another connection")
                same_origin = False
            if m.settled:
                raise RuntimeError(f"message {m.delivery_tag} already settled")
            if o.epoch != epoch or not live:
                raise self._stale()
            append(m.delivery_tag)
        n = len(tags)
        if len(set(tags)) != n:
            raise RuntimeError("a message is listed twice")
        unsettled = self._unsettled
        if not self._done and builtins.list(islice(unsettled, n)) == tags:
            pop = unsettled.popleft
            for _ in repeat(None, n):
                pop()
            self._ack_hi = tags[-1]
        else:
            done = self._done
            pending = self._ack_pending
            for tag in tags:
                done[tag] = False
                pending.append(tag)
        for m in msgs:
            m.settled = True
        if same_origin:
            if first_origin.consumer is not None:
                first_origin.consumer._settled(n)
        else:
            counts: dict[Consumer, int] = {}
            for m in msgs:
                c = m._origin.consumer
                if c is not None:
                    counts[c] = counts.get(c, 0) + 1
            for c, k in counts.items():
                c._settled(k)
        if not self._flush_scheduled:
            self._schedule_flush()

    async def get(self, queue: str, max_messages: int = 1, *, no_ack: bool = False,
                  timeout: float | None = None) -> builtins.list[Message]:
        """Pull up to ``max_messages`` ready messages (an empty list if none)."""
        ok = await self._request(Get(next(self._rids), queue, max_messages, no_ack), timeout)
        assert isinstance(ok, GetOk)
        if not no_ack:
            self._unsettled.extend([e[0] for e in ok.entries])
        origin = Origin(self, None, self._epoch)
        msgs = [Message(origin, e) for e in ok.entries]
        if no_ack:
            for m in msgs:
                m.settled = True
        return msgs

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
                  max_unconfirmed: int = 65536, token: str | None = None,
                  ssl_context: ssl.SSLContext | None = None, ca: str | None = None,
                  cert: str | None = None, key: str | None = None) -> Connection:
    """Open a connection (``async with await connect(...) as conn`` closes it cleanly).

    ``timeout`` bounds connecting and is the default for requests and publishes.
    ``reconnect`` restores the connection, topology and consumers after a drop.
    ``token`` authenticates (AUTH mechanism "token"; also ``mq://TOKEN@host``), otherwise
    the connection is anonymous. ``mqs://`` URLs use TLS: ``ca`` is the CA file that signed
    the broker's certificate (default: the system's), ``cert``/``key`` this client's
    certificate for brokers that require one, or pass a ready ``ssl_context``.
    """
    conn = Connection(url, name=name, reconnect=reconnect, heartbeat_ms=heartbeat_ms,
                      max_frame_size=max_frame_size, max_unconfirmed=max_unconfirmed,
                      timeout=timeout, token=token, ssl_context=ssl_context, ca=ca, cert=cert,
                      key=key)
    await conn._open(timeout)
    return conn
