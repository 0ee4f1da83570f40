"""Publishing: the publish calls, their confirms, and publish credit and backpressure.

Every publish gets a sequence number and a confirm future in ``_unconfirmed`` (a lone
message its bare future, a larger call one :class:`_Pending` for all of its messages), so
that the connection can fail them all at once when it is lost: a publish never reports
success unless the broker confirmed it. Publishes queued in one loop turn go out as one
PUBLISH_BATCH (see :meth:`_PublishingMixin._emit_publishes`). A publish needs publish
credit from the broker, a slot under ``max_unconfirmed`` and a transport that is not
paused; the awaiting calls wait for these, ``publish_nowait`` raises ``Backpressure``.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import InvalidStateError
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Any, Unpack, cast

import msgpack

from conveyor.client._protocol import _Confirmed, _Protocol
from conveyor.client.errors import Backpressure, ConnectionClosed, PublishTimeout
from conveyor.client.message import PROPERTY_NAMES, MessageProperties
from conveyor.client.url import URL
from conveyor.protocol import (
    Confirm,
    ConveyorError,
    NoRoute,
    Publish,
    PublishBatch,
    PublishRun,
    compress_frame,
    encode_fields,
    encode_run,
    error_for_code,
)
from conveyor.protocol.limits import U64_MAX

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack

Body = bytes | str
_PUBLISH = Publish.TYPE
_PUBLISH_BATCH = PublishBatch.TYPE
_PUBLISH_RUN = PublishRun.TYPE
Entry = tuple[str, str, dict[str, Any], bytes, bool]
_NO_PROPS: dict[str, Any] = {}  # shared by publishes without properties; never mutated
# Publishes queued in one loop turn are written as soon as they weigh this much (see
# _enqueue): large enough to keep frames and writes few, small enough that the broker
# starts on a burst while the client is still producing it.
_WRITE_AHEAD = 32 << 10


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
    return (
        len(e[3])
        + _ENTRY_WEIGHT
        + (len(_packb(props["headers"])) if props and "headers" in props else 0)
    )


_U64_MAX = U64_MAX


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

    __slots__ = ("bodies", "key", "largest", "size")
    size: int
    largest: int
    bodies: int
    key: tuple[str, str, dict[str, Any], bool]  # what the entries share


def _body_bytes(entries: Sequence[Entry]) -> int:
    """Publish credit in bytes that ``entries`` use: the sum of their body lengths."""
    if type(entries) is _Sized:
        return entries.bodies
    return sum([len(e[3]) for e in entries])


def _credit_fit(
    entries: Sequence[Entry], start: int, messages: int, nbytes: int
) -> tuple[int, int]:
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
    came back in a RETURN. (A lone message is tracked by its bare future.) ``refused``
    counts nacks, so a failed call can say how many of its messages were stored."""

    __slots__ = ("count", "future", "nacked", "refused", "remaining", "returned")

    def __init__(self, future: asyncio.Future[None], count: int) -> None:
        self.future = future
        self.count = count
        self.remaining = count
        self.returned: list[int] = []
        self.nacked: ConveyorError | None = None
        self.refused = 0


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


def _check_fits(
    entries: Sequence[tuple[str, str, dict[str, Any], bytes, bool]],
    max_frame: int,
    max_message: int = 0,
) -> None:
    """Refuse (413) a message over the broker's announced maximum message size
    (OPEN_OK.max_message_size, 0 = not stated), or one that cannot fit in one frame: a
    sender must never exceed the negotiated max_frame_size, or the broker closes the
    connection (502)."""
    for ex, rk, props, body, mandatory in entries:
        size = len(body) + (len(_packb(props["headers"])) if props and "headers" in props else 0)
        if max_message and size > max_message:
            raise error_for_code(
                413,
                f"message of {size} bytes (body plus headers) exceeds the broker's "
                f"maximum message size of {max_message} bytes on this connection",
                {"limit": "max_message_size", "max_message_size": max_message},
            )
        if not max_frame:
            continue
        if size + 4096 <= max_frame:
            continue  # names and properties other than headers are small
        # Measure exactly, as sent (alone in a PUBLISH or PUBLISH_BATCH, worst-case seq).
        entry = [ex, rk, props, body, mandatory]
        frame = (
            encode_fields(_PUBLISH, [_U64_MAX, *entry])
            if len(entries) == 1
            else encode_fields(_PUBLISH_BATCH, [_U64_MAX, [entry]])
        )
        if len(frame) - 4 > max_frame:
            raise error_for_code(
                413,
                f"message of {len(body)} bytes does not fit the negotiated "
                f"maximum frame size of {max_frame} bytes",
                {"max_frame_size": max_frame},
            )


class _PublishingMixin:
    """The publishing part of :class:`client.connection.Connection` (a mixin, so the hot
    paths keep plain attribute access on the connection)."""

    # Connection state this concern shares (set in Connection.__init__).
    url: URL
    timeout: float
    max_unconfirmed: int
    _proto: _Protocol | None
    _loop: asyncio.AbstractEventLoop | None
    _new_future: Callable[[], asyncio.Future[Any]]
    _accepting: bool
    _seq: int
    _unconfirmed: dict[int, asyncio.Future[None] | _Pending]
    _slots: asyncio.Event
    _drain_waiter: asyncio.Future[None] | None
    _wbuf: list[bytes]
    _flush_scheduled: bool
    _pub: list[Entry]
    _pub_key: tuple[str, str, dict[str, Any], bool] | None
    _pub_size: int
    _ack_hi: int
    _ack_pending: list[int]

    if TYPE_CHECKING:  # defined by the connection and the consuming concern

        async def _ready(self, deadline: float, internal: bool = False) -> _Protocol: ...
        def _schedule_flush(self) -> None: ...
        def _write_out(self) -> None: ...
        def _emit_acks(self) -> None: ...

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: Body,
        *,
        properties: dict[str, Any] | None = None,
        mandatory: bool = False,
        timeout: float | None = None,
        **props: Unpack[MessageProperties],
    ) -> None:
        """Publish one message and wait until the broker confirms it.

        Raises the spec's error class on a nack (e.g. ``NotFound`` for a missing
        exchange), ``NoRoute`` if ``mandatory`` and no queue took it, ``PublishTimeout``
        if no confirm arrives in ``timeout`` seconds, ``ConnectionClosed`` if the
        connection drops first (the message may or may not have been stored).
        Keyword arguments are message properties (``message_id``, ``headers``, ``ttl``,
        ``priority``, ``persistent``, ``delay``, ``reply_to``, ``correlation_id`` ...),
        typed (:class:`client.message.MessageProperties`): a misspelt one is a type error.
        """
        kw = cast(dict[str, Any], props)
        fut = await self._publish_many(
            [(exchange, routing_key, _props(properties, kw), _body(body), mandatory)], timeout
        )
        await self._await_confirm(fut, timeout)

    async def publish_batch(
        self,
        messages: Iterable[OutgoingMessage | Body],
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: dict[str, Any] | None = None,
        mandatory: bool = False,
        timeout: float | None = None,
    ) -> int:
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
            entries = _Sized(
                zip(
                    repeat(exchange, n),
                    repeat(routing_key, n),
                    repeat(base, n),
                    messages,
                    repeat(mandatory, n),
                    strict=True,
                )
            )
            headers = len(_packb(base["headers"])) if "headers" in base else 0
            entries.bodies = sum(map(len, messages))
            entries.size = entries.bodies + n * (_ENTRY_WEIGHT + headers)
            entries.largest = max(map(len, messages), default=0) + headers
            entries.key = (exchange, routing_key, base, mandatory)
        else:
            entries = []
            for m in messages:
                if isinstance(m, OutgoingMessage):
                    entries.append(
                        (
                            exchange if m.exchange is None else m.exchange,
                            m.routing_key or routing_key,
                            m.properties if m.properties is not None else base,
                            _body(m.body),
                            m.mandatory or mandatory,
                        )
                    )
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
        while (
            len(self._unconfirmed) >= self.max_unconfirmed
            or proto.paused
            or proto.credit_messages <= 0
            or proto.credit_bytes <= 0
        ):
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
                why = (
                    f" (publish credit withheld: {proto.blocked})"
                    if proto.blocked
                    else " (flow control)"
                )
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

    def publish_nowait(
        self,
        exchange: str,
        routing_key: str,
        body: Body,
        *,
        properties: dict[str, Any] | None = None,
        mandatory: bool = False,
        **props: Unpack[MessageProperties],
    ) -> asyncio.Future[None]:
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
        if (
            len(unconfirmed) >= self.max_unconfirmed
            or proto.paused
            or proto.credit_messages <= 0
            or proto.credit_bytes <= 0
        ):
            if proto.credit_messages <= 0 or proto.credit_bytes <= 0:
                raise Backpressure(
                    "no publish credit" + (f" (withheld: {proto.blocked})" if proto.blocked else "")
                )
            raise Backpressure("too many unconfirmed publishes or socket backed up")
        if props:
            properties = _props(properties, cast(dict[str, Any], props))
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
            # only large messages are measured
            _check_fits([entry], proto.max_frame_size, proto.max_message_size)
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
        pub = self._pub
        if not pub:
            self._pub_key = (exchange, routing_key, properties, mandatory)
        else:
            k = self._pub_key
            if k is not None and (
                properties is not k[2]
                or routing_key != k[1]
                or exchange != k[0]
                or mandatory != k[3]
            ):
                self._pub_key = None
        pub.append(entry)
        size += self._pub_size
        self._pub_size = size
        if size > _WRITE_AHEAD or idle:
            self._write_out()  # see _enqueue
        elif not self._flush_scheduled:
            self._schedule_flush()
        return fut

    async def _publish_many(
        self, entries: Sequence[Entry], timeout: float | None
    ) -> asyncio.Future[None]:
        proto = self._proto
        n = len(entries)
        if (
            proto is None
            or not self._accepting
            or proto.paused
            or len(self._unconfirmed) >= self.max_unconfirmed
            or proto.credit_messages < n
            or proto.credit_bytes <= 0
        ):
            return await self._publish_paced(entries, timeout)
        nbytes = _body_bytes(entries)
        if nbytes - len(entries[-1][3]) >= proto.credit_bytes:
            return await self._publish_paced(entries, timeout)
        proto.credit_messages -= n
        proto.credit_bytes -= nbytes
        return self._enqueue(entries, proto.max_frame_size)

    async def _publish_paced(
        self, entries: Sequence[Entry], timeout: float | None
    ) -> asyncio.Future[None]:
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
                if type(entries) is not _Sized or entries.largest > proto.fit_limit:
                    _check_fits(entries, proto.max_frame_size, proto.max_message_size)
                checked = True
            k, nbytes = _credit_fit(entries, i, proto.credit_messages, proto.credit_bytes)
            proto.credit_messages -= k
            proto.credit_bytes -= nbytes
            if pending is None and k == n:
                return self._enqueue(entries, proto.max_frame_size)
            if pending is None:
                loop = self._loop or asyncio.get_running_loop()
                pending = _Pending(loop.create_future(), n)
            self._enqueue(entries[i : i + k], proto.max_frame_size, pending)
            i += k
            if i >= n:
                return pending.future

    def _enqueue(
        self, entries: Sequence[Entry], max_frame: int, pending: _Pending | None = None
    ) -> asyncio.Future[None]:
        """Assign sequence numbers, register the confirm future, queue the frames.
        ``pending``: these entries are part of a larger call tracked by it."""
        proto = self._proto
        if pending is None and (
            type(entries) is not _Sized or proto is None or entries.largest > proto.fit_limit
        ):
            _check_fits(entries, max_frame, proto.max_message_size if proto else 0)
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
        key = entries.key if type(entries) is _Sized else None
        if not self._pub:
            self._pub_key = key
        elif key is None or (k := self._pub_key) is None or key[2] is not k[2] or key != k:
            self._pub_key = None
        self._pub.extend(entries)
        self._pub_size += (
            entries.size if type(entries) is _Sized else sum(map(_entry_weight, entries))
        )
        if self._pub_size > _WRITE_AHEAD or idle:
            # Written now rather than at the end of the loop turn: a burst goes out in
            # pieces the broker can start on while the rest is produced, and a publish
            # with nothing else in flight (a latency-bound caller) does not wait a turn.
            self._write_out()
        elif not self._flush_scheduled:
            self._schedule_flush()
        return fut

    def _emit_publishes(self) -> None:
        # The queued publishes hold the last len(pub) sequence numbers: call this only
        # while that is so (never between assigning a seq and queueing its entry).
        pub = self._pub
        self._pub = []
        self._pub_size = 0
        key = self._pub_key
        self._pub_key = None
        first = self._seq - len(pub) + 1
        if len(pub) == 1:
            self._wbuf.append(encode_fields(_PUBLISH, [first, *pub[0]]))
            return
        proto = self._proto
        limit = proto.max_frame_size if proto is not None else 1 << 20
        if key is not None and proto is not None and proto.server_minor >= 1:
            self._emit_run(first, key, [e[3] for e in pub], limit, proto.compress)
            return
        frame = encode_fields(_PUBLISH_BATCH, [first, pub])
        if len(frame) - 4 <= limit:  # measured: fits the negotiated frame size
            self._wbuf.append(
                compress_frame(frame) if proto is not None and proto.compress else frame
            )
            return
        start = len(self._wbuf)
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
        if proto is not None and proto.compress:
            self._wbuf[start:] = [compress_frame(f) for f in self._wbuf[start:]]

    def _emit_run(
        self,
        first: int,
        key: tuple[str, str, dict[str, Any], bool],
        bodies: list[bytes],
        limit: int,
        compress: bool,
    ) -> None:
        """PUBLISH_RUN frames (1.1) for publishes that share exchange, routing key,
        properties and mandatory: the shared fields once, then the bodies."""
        ex, rk, props, mandatory = key
        headers = len(_packb(props["headers"])) if "headers" in props else 0
        frames = encode_run(
            _PUBLISH_RUN, [first, ex, rk, props, mandatory], 0, bodies, limit - 4096 - headers
        )
        self._wbuf.extend([compress_frame(f) for f in frames] if compress else frames)

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
            if exc is not None:
                p.refused += 1
                if p.nacked is None:
                    p.nacked = exc
            p.remaining -= 1
            if p.remaining == 0 and not p.future.done():
                self._settle_pending(p)
        if len(unconfirmed) < self.max_unconfirmed:
            self._slots.set()
            if not unconfirmed and (w := self._drain_waiter) is not None and not w.done():
                w.set_result(None)  # close() is waiting for the last confirm

    @staticmethod
    def _settle_pending(p: _Pending) -> None:
        """Resolve a call's future; a failure's details count its messages: ``stored``
        (confirmed and routed), ``refused`` (nacked) and ``returned`` (matched no queue)."""
        if p.nacked is None and not p.returned:
            p.future.set_result(None)
            return
        counts = {
            "stored": p.count - p.refused - len(p.returned),
            "refused": p.refused,
            "returned": len(p.returned),
        }
        if p.nacked is not None:  # the first refusal's class and message
            exc = type(p.nacked)(p.nacked.message, {**p.nacked.details, **counts})
            if type(p.nacked) is ConveyorError:  # a code without a class of its own
                exc.code = p.nacked.code  # type: ignore[misc]
            p.future.set_exception(exc)
        else:
            p.future.set_exception(
                NoRoute(
                    f"{len(p.returned)} mandatory message(s) matched no queue",
                    {"returned_seqs": p.returned, **counts},
                )
            )
