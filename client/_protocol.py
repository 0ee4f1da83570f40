"""The asyncio Protocol of a client connection: bytes in, frames out.

It feeds the sans-IO ``protocol.connection.Connection`` and hands whole frames to the
owning :class:`client.connection.Connection`. The frames of the hot path in the OPEN state
(DELIVER_BATCH, DELIVER, CONFIRM) are decoded here straight into messages and confirm
records, because the generic decoder's frame objects cost more than the work the
application does per message. It also runs the handshake (HELLO / AUTH / OPEN_OK and the
initial PUBLISH_CREDIT) and tracks what the connection may send: publish credit and
whether the transport is paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from conveyor.client.errors import ConnectionClosed
from conveyor.client.message import Message, Origin
from conveyor.protocol import (
    Auth,
    Close,
    Compressed,
    Confirm,
    ConveyorError,
    Deliver,
    DeliverBatch,
    DeliverRun,
    Error,
    Frame,
    Hello,
    OpenOk,
    PublishCredit,
    UnexpectedFrame,
    error_for_code,
)
from conveyor.protocol import Heartbeat as HeartbeatFrame
from conveyor.protocol.codec import HEADER, inflate, unpack_body
from conveyor.protocol.connection import Connection as WireConnection
from conveyor.protocol.connection import Role, State
from conveyor.protocol.limits import NAME_FAST, STR_FAST, U16_MAX, U32_MAX, U64_MAX, check_props

if TYPE_CHECKING:
    from conveyor.client.connection import Connection

log = logging.getLogger("conveyor.client")

_OPEN = State.OPEN
_unpack_header = HEADER.unpack_from
_U64_MAX = U64_MAX


class _Deliveries:
    """A DELIVER_BATCH decoded on the client's fast path, straight into messages (no
    frame or record objects). ``origin.consumer`` is filled in when it is dispatched."""

    __slots__ = ("consumer_tag", "messages", "origin", "tags")

    def __init__(
        self, consumer_tag: str, origin: Origin, messages: list[Message], tags: list[int]
    ) -> None:
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


def _messages(
    entries: list[Any], origin: Origin, memo: _PropsCheck
) -> tuple[list[Message], list[int]] | None:
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
        if (
            type(a0) is not int
            or a0 < 0
            or a0 > _U64_MAX
            or (a1 is not True and a1 is not False)
            or type(a2) is not str
            or len(a2) > NAME_FAST
            or type(a3) is not str
            or len(a3) > NAME_FAST
            or type(a4) is not dict
            or type(a5) is not bytes
            or type(a6) is not int
            or a6 < 0
            or a6 > U32_MAX
        ):
            return None
        if a4 and not (a4 == last and simple and (key is None or type(a4[key]) is kind)):
            if not memo.ok(a4):
                return None
            last, simple, key, kind = memo.last, memo.simple, memo.key, memo.kind
        m = _new(Message)  # Message.__init__, inlined
        m.origin = origin
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


def _run_messages(
    origin: Origin,
    tags: range,
    exchange: str,
    routing_key: str,
    props: dict[str, Any],
    bodies: list[bytes],
) -> list[Message]:
    """Messages of a DELIVER_RUN: first deliveries, each with its own properties dict."""
    msgs: list[Message] = []
    append = msgs.append
    for tag, body in zip(tags, bodies, strict=True):
        m = _new(Message)  # Message.__init__, inlined
        m.origin = origin
        m.delivery_tag = tag
        m.redelivered = False
        m.exchange = exchange
        m.routing_key = routing_key
        m.properties = props.copy() if props else {}
        m.body = body
        m.delivery_count = 1
        m.settled = False
        append(m)
    return msgs


class _Confirmed:
    """A CONFIRM decoded on the fast path (the fields of :class:`Confirm`)."""

    __slots__ = ("ack", "code", "first_seq", "last_seq", "message")

    def __init__(self, first_seq: int, last_seq: int, ack: bool, code: int, message: str) -> None:
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.ack = ack
        self.code = code
        self.message = message


class _Protocol(asyncio.Protocol):
    """One transport's protocol. A reconnect makes a new one, so state that must not
    outlive a connection (credit, partial frames, the handshake) lives here."""

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
        # The broker's maximum message size (body + encoded headers) on this connection:
        # OPEN_OK's (1.2), HELLO's until then; 0 = not stated. Larger publishes are refused
        # here.
        self.max_message_size = 0
        self.fit_limit = 1 << 62  # estimated sizes above this are measured by _check_fits
        # Publish credit of this connection (PUBLISH_CREDIT adds, each publish uses one
        # message and len(body) bytes) and the broker's reason for withholding it.
        self.credit_messages = 0
        self.credit_bytes = 0
        self.blocked = ""
        self.credited = asyncio.Event()
        self.open_ok: OpenOk | None = None
        self.compress = False  # OPEN_OK negotiated zstd (PUBLISH_BATCH out, COMPRESSED in)
        # The minor version HELLO says the broker speaks: PUBLISH_RUN needs 1.1.
        self.server_minor = 0

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
            self.owner.on_frames(self, frames)

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
                    out.append(_FAST[ftype](self, buf[pos + 5 : stop]))
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
            origin = Origin(self.owner, None, self.owner.epoch)
            decoded = _messages(entries, origin, self._props)
            if decoded is not None:
                return _Deliveries(tag, origin, *decoded)
        return None

    def _deliver_batch(self, body: bytes | bytearray) -> _Deliveries | DeliverBatch:
        f = unpack_body(body, DeliverBatch.NAME)
        if type(f) is list and len(f) == 2 and type(f[1]) is list:
            fast = self._fast_deliveries(f[0], f[1])
            if fast is not None:
                return fast
        return DeliverBatch.from_wire(f)

    def _deliver(self, body: bytes | bytearray) -> _Deliveries | Deliver:
        f = unpack_body(body, Deliver.NAME)
        if type(f) is list and len(f) == 8:
            fast = self._fast_deliveries(f[0], [f[1:]])
            if fast is not None:
                return fast
        return Deliver.from_wire(f)

    def _deliver_run(self, body: bytes | bytearray) -> _Deliveries | DeliverRun:
        """DELIVER_RUN (1.1): first deliveries sharing exchange, routing key, properties.
        Each message gets its own copy of the properties, as a DELIVER_BATCH entry has."""
        f = unpack_body(body, DeliverRun.NAME)
        if type(f) is list and len(f) == 6:
            tag, first, ex, rk, props, bodies = f
            if (
                type(tag) is str
                and len(tag) <= NAME_FAST
                and type(first) is int
                and type(ex) is str
                and len(ex) <= NAME_FAST
                and type(rk) is str
                and len(rk) <= NAME_FAST
                and type(props) is dict
                and type(bodies) is list
                and bodies
                and first >= 0
                and first + len(bodies) - 1 <= U64_MAX
                and (not props or self._props.ok(props))
                and set(map(type, bodies)) == {bytes}
            ):
                origin = Origin(self.owner, None, self.owner.epoch)
                tags = range(first, first + len(bodies))
                return _Deliveries(
                    tag, origin, _run_messages(origin, tags, ex, rk, props, bodies), list(tags)
                )
        return DeliverRun.from_wire(f)

    def _compressed(self, body: bytes | bytearray) -> _Deliveries | DeliverBatch | DeliverRun:
        f = Compressed.from_wire(unpack_body(body, Compressed.NAME))
        if not self.compress:
            raise UnexpectedFrame("COMPRESSED frame but compression was not negotiated")
        data = (
            inflate(f.data, self.max_frame_size)
            if f.inner_type in (DeliverBatch.TYPE, DeliverRun.TYPE)
            else b""
        )
        if f.inner_type == DeliverBatch.TYPE:
            return self._deliver_batch(data)
        if f.inner_type == DeliverRun.TYPE:
            return self._deliver_run(data)
        raise UnexpectedFrame(f"COMPRESSED may not carry frame type {f.inner_type:#04x}")

    def _confirm(self, body: bytes | bytearray) -> _Confirmed | Confirm:
        f = unpack_body(body, Confirm.NAME)
        if type(f) is list and len(f) == 5:
            a0, a1, a2, a3, a4 = f
            if (
                type(a0) is int
                and 0 <= a0 <= U64_MAX
                and type(a1) is int
                and 0 <= a1 <= U64_MAX
                and (a2 is True or a2 is False)
                and type(a3) is int
                and 0 <= a3 <= U16_MAX
                and type(a4) is str
                and len(a4) <= STR_FAST
            ):
                return _Confirmed(a0, a1, a2, a3, a4)
        return Confirm.from_wire(f)

    def _handshake(self, frames: list[Frame]) -> list[Frame]:
        rest: list[Frame] = []
        for i, f in enumerate(frames):
            if isinstance(f, Hello):
                o = self.owner
                major, _, minor = f.version.partition(".")
                self.server_minor = int(minor) if minor.isdigit() and major == "1" else 0
                self.max_message_size = f.max_message_size
                props: dict[str, Any] = {
                    "library": "conveyor-py",
                    "version": "0.1.0",
                    "connection_name": o.name,
                }
                wanted = [o.compression] if o.compression else []
                if wanted and self.server_minor < 2:
                    props["compression"] = wanted  # where servers before 1.2 look
                auth = Auth(
                    "token" if o.token else "anonymous",
                    o.token,
                    props,
                    o.max_frame_size,
                    o.heartbeat_ms,
                    wanted,
                )
                assert self.transport is not None
                # AUTH.compression is 1.2: an older server would refuse the extra field.
                self.transport.write(self.wire.send(auth, trim=1 if self.server_minor < 2 else 0))
            elif isinstance(f, OpenOk):
                self.max_frame_size = f.max_frame_size
                if f.max_message_size:
                    self.max_message_size = f.max_message_size
                if f.max_frame_size:
                    self.fit_limit = f.max_frame_size - 4096
                if self.max_message_size:
                    self.fit_limit = min(self.fit_limit, self.max_message_size)
                if f.compression == "zstd" and self.owner.compression == "zstd":
                    self.compress = True
                    self.wire.compression = True
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
                ConnectionClosed(f"connection lost during handshake: {exc}")
            )
        if not self.closed.done():
            self.closed.set_result(None)
        self.drained.set()
        self.credited.set()  # publishers waiting for credit go on to wait for a reconnect
        self.owner.on_lost(self, exc)

    def pause_writing(self) -> None:
        self.paused = True
        self.drained.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self.drained.set()


# Frame types _Protocol._decode decodes itself in the OPEN state.
_FAST: dict[int, Callable[[_Protocol, bytes | bytearray], Any]] = {
    DeliverBatch.TYPE: _Protocol._deliver_batch,
    DeliverRun.TYPE: _Protocol._deliver_run,
    Deliver.TYPE: _Protocol._deliver,
    Confirm.TYPE: _Protocol._confirm,
    Compressed.TYPE: _Protocol._compressed,
}
