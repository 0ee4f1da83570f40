"""Consuming: push consumers, GET, settlement (acks, nacks, rejects, extends) and
consumer credit.

Settlement is synchronous and coalesced: delivered tags wait in ``_unsettled`` in order,
and the settled prefix goes out as one cumulative ACK per loop turn (see
:meth:`_ConsumingMixin._emit_acks`); :meth:`client.message.Message.ack` inlines the
in-order case. A message carries the connection epoch it came on, so settling one whose
connection is gone fails instead of acking a tag the broker has since reassigned.
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import datetime
from itertools import islice, repeat
from operator import attrgetter
from typing import TYPE_CHECKING, Any, cast

from conveyor.client._protocol import _Deliveries, _Protocol
from conveyor.client.consumer import Consumer, StreamConsumer, stream_arguments
from conveyor.client.errors import stale_delivery
from conveyor.client.message import Message, Origin
from conveyor.protocol import Ack as AckFrame
from conveyor.protocol import (
    Cancel,
    Consume,
    ConsumeOk,
    ConveyorError,
    Credit,
    Extend,
    Frame,
    Get,
    GetOk,
    encode_fields,
)
from conveyor.protocol import Nack as NackFrame
from conveyor.protocol import Reject as RejectFrame
from conveyor.protocol.limits import U64_MAX

if TYPE_CHECKING:
    from conveyor.client.connection import Connection

_ACK = AckFrame.TYPE
_NACK = NackFrame.TYPE
_REJECT = RejectFrame.TYPE
_CREDIT = Credit.TYPE
_EXTEND = Extend.TYPE
_settled_of = attrgetter("settled")
_origin_of = attrgetter("origin")
_tag_of = attrgetter("delivery_tag")


class _ConsumingMixin:
    """The consuming part of :class:`client.connection.Connection` (a mixin, so the hot
    paths keep plain attribute access on the connection)."""

    # Connection state this concern shares (set in Connection.__init__).
    _proto: _Protocol | None
    _epoch: int
    _rids: itertools.count[int]
    _consumers: dict[str, Consumer]
    _pending_consumers: dict[int, Consumer]
    _wbuf: list[bytes]
    _flush_scheduled: bool
    _unsettled: deque[int]
    _done: dict[int, bool]
    _ack_pending: list[int]
    _ack_hi: int

    if TYPE_CHECKING:  # defined by the connection

        async def _request(
            self, frame: Frame, timeout: float | None = None, internal: bool = False
        ) -> Frame: ...
        def _send(self, data: bytes) -> None: ...
        def _schedule_flush(self) -> None: ...

    async def consume(
        self,
        queue: str,
        *,
        prefetch: int = 256,
        no_ack: bool = False,
        exclusive: bool = False,
        consumer_tag: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> Consumer:
        """Start a push consumer; iterate it with ``async for``.

        ``prefetch`` (>= 1) bounds unacked deliveries; ``no_ack=True`` is at-most-once.
        ``arguments`` are the CONSUME arguments (spec [consume_arguments]); for streams
        :meth:`stream` builds and checks them.
        """
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        c = Consumer(
            cast("Connection", self),
            queue,
            prefetch,
            no_ack,
            exclusive,
            consumer_tag,
            arguments or {},
        )
        await self.start_consumer(c)
        return c

    def stream(
        self,
        queue: str,
        *,
        offset: str | int = "next",
        timestamp: datetime | float | int | None = None,
        group: str | None = None,
        prefetch: int = 1000,
        auto_commit: bool = True,
        consumer_tag: str = "",
    ) -> StreamConsumer:
        """Read a stream (a queue declared with ``queue_type="stream"``) in offset order:
        ``async for msg in conn.stream("events", offset="first")``; ``msg.offset`` and
        ``msg.timestamp`` say where each message sits. Reading removes nothing.

        - ``offset``: where to start: ``"first"``, ``"last"`` (the newest message),
          ``"next"`` (only messages appended from now on; the default) or an offset
        - ``timestamp``: start at the first message appended at or after it (a
          ``datetime``, naive = local time, or ms since the epoch); overrides ``offset``
        - ``group``: a consumer group: its members share the messages (each goes to one
          of them), acks commit the group's offset durably, and a group that comes back
          resumes after its committed offset (``offset``/``timestamp`` then do not apply)
        - ``prefetch``: the credit window, as for :meth:`consume`
        - ``auto_commit``: ack each message once the next one is asked for (one batch of
          :meth:`StreamConsumer.batches` once the next batch is); False: the application
          acks, with ``msg.ack()`` or ``consumer.commit(msg)`` (everything up to ``msg``)

        The consumer subscribes on its first step, or up front with ``await`` /
        ``async with``. Bad arguments raise ``ValueError`` here.
        """
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        args = stream_arguments(offset, timestamp, group)
        return StreamConsumer(
            cast("Connection", self), queue, prefetch, auto_commit, consumer_tag, args
        )

    async def start_consumer(self, c: Consumer, internal: bool = False) -> None:
        """Subscribe ``c`` (CONSUME); ``internal``: while restoring after a reconnect."""
        rid = next(self._rids)
        self._pending_consumers[rid] = c
        try:
            ok = await self._request(
                Consume(rid, c.queue, c.tag, c.no_ack, c.exclusive, c.prefetch, c.arguments),
                internal=internal,
            )
        finally:
            self._pending_consumers.pop(rid, None)
        assert isinstance(ok, ConsumeOk) and c.active

    async def cancel_consumer(self, c: Consumer) -> None:
        """Unsubscribe ``c`` (CANCEL; nothing to send if the connection is gone)."""
        self._consumers.pop(c.tag, None)
        if self._proto is None:
            return
        with contextlib.suppress(ConveyorError):
            await self._request(Cancel(next(self._rids), c.tag))

    def grant(self, c: Consumer, n: int) -> None:
        """Give ``c`` ``n`` more deliveries of credit (CREDIT), if it is still subscribed."""
        if self._proto is not None and c.tag in self._consumers:
            self._send(encode_fields(_CREDIT, [c.tag, n]))  # after the acks that freed it

    def ack_delivery(self, tag: int, origin: Origin) -> None:
        """:meth:`Message.ack`'s work: queue the ack of ``tag`` (coalesced into one
        cumulative ACK per loop turn, see :meth:`_emit_acks`) and return the credit to
        ``origin.consumer``. Runs once per message: the in-order case is inline."""
        if origin.epoch != self._epoch:  # the epoch moves on when the connection is lost
            raise stale_delivery()
        unsettled = self._unsettled
        if not self._done and unsettled and unsettled[0] == tag:
            unsettled.popleft()  # in order: extends the cumulative ACK
            self._ack_hi = tag
        else:
            self._done[tag] = False
            self._ack_pending.append(tag)
        if not self._flush_scheduled:
            self._schedule_flush()
        c = origin.consumer
        if c is not None:
            c.on_settled(1)

    def refuse_delivery(self, tag: int, epoch: int, how: str, requeue: bool) -> None:
        """NACK (``how == "nack"``) or REJECT ``tag``, delivered in connection ``epoch``."""
        if epoch != self._epoch or self._proto is None:
            raise stale_delivery()
        # The frame first: _send emits the pending acks ahead of it, and their cumulative
        # ACK must stop short of this tag (were it already in _done, the ACK would cover
        # it and the broker would take the refused message as acked).
        if how == "nack":
            self._send(encode_fields(_NACK, [tag, False, requeue]))
        else:
            self._send(encode_fields(_REJECT, [tag, requeue]))
        self._done[tag] = True

    def extend_delivery(self, tag: int, epoch: int, timeout_ms: int) -> None:
        """EXTEND ``tag``'s ack deadline by ``timeout_ms`` (0 = the queue's)."""
        if type(timeout_ms) is not int or not 0 <= timeout_ms <= U64_MAX:
            # Checked here: an out-of-range integer would make the frame malformed, which
            # the broker answers by closing the connection.
            raise ValueError(f"timeout_ms must be an int in 0..{U64_MAX}, not {timeout_ms!r}")
        if epoch != self._epoch or self._proto is None:
            raise stale_delivery()
        self._send(encode_fields(_EXTEND, [tag, timeout_ms]))

    def ack_all(self, messages: Iterable[Message]) -> None:
        """Acknowledge every message of ``messages`` in one call: like ``msg.ack()`` for
        each, but all or nothing. Raises (acking none) ``RuntimeError`` if one is already
        settled or listed twice, ``ConnectionClosed`` if one came on a connection that is
        gone (the broker redelivers those), ``ValueError`` if one came on another
        connection."""
        msgs = messages if isinstance(messages, (builtins.list, tuple)) else builtins.list(messages)
        if not msgs:
            return
        if self._ack_run(msgs):
            return
        epoch = self._epoch
        live = self._proto is not None
        tags: builtins.list[int] = []
        append = tags.append
        first_origin = msgs[0].origin
        same_origin = True
        for m in msgs:
            o = m.origin
            if o is not first_origin or o.conn is not self:
                if o.conn is not self:
                    raise ValueError(f"message {m.delivery_tag} came on another connection")
                same_origin = False
            if m.settled:
                raise RuntimeError(f"message {m.delivery_tag} already settled")
            if o.epoch != epoch or not live:
                raise stale_delivery()
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
                first_origin.consumer.on_settled(n)
        else:
            counts: dict[Consumer, int] = {}
            for m in msgs:
                c = m.origin.consumer
                if c is not None:
                    counts[c] = counts.get(c, 0) + 1
            for c, k in counts.items():
                c.on_settled(k)
        if not self._flush_scheduled:
            self._schedule_flush()

    def _ack_run(self, msgs: Sequence[Message]) -> bool:
        """``ack_all``'s usual case in C-level passes: unsettled messages of one delivery
        on the live connection, exactly the oldest unsettled tags. False: not that case
        (nothing done; ``ack_all`` then checks message by message)."""
        if self._proto is None or self._done or any(map(_settled_of, msgs)):
            return False
        origins = set(map(_origin_of, msgs))  # one per delivery frame
        epoch = self._epoch
        consumer = msgs[0].origin.consumer
        for o in origins:
            if o.conn is not self or o.epoch != epoch or o.consumer is not consumer:
                return False
        tags = builtins.list(map(_tag_of, msgs))
        unsettled = self._unsettled
        n = len(tags)
        if n == len(unsettled):
            if builtins.list(unsettled) != tags:
                return False
            unsettled.clear()
        elif builtins.list(islice(unsettled, n)) == tags:
            pop = unsettled.popleft
            for _ in repeat(None, n):
                pop()
        else:
            return False
        self._ack_hi = tags[-1]
        for m in msgs:
            m.settled = True
        if consumer is not None:
            consumer.on_settled(n)
        if not self._flush_scheduled:
            self._schedule_flush()
        return True

    async def get(
        self,
        queue: str,
        max_messages: int = 1,
        *,
        no_ack: bool = False,
        timeout: float | None = None,
    ) -> builtins.list[Message]:
        """Pull up to ``max_messages`` ready messages (an empty list if none)."""
        ok = await self._request(Get(next(self._rids), queue, max_messages, no_ack), timeout)
        assert isinstance(ok, GetOk)
        if not no_ack:
            self._unsettled.extend([e[0] for e in ok.entries])
        origin = Origin(cast("Connection", self), None, self._epoch)
        msgs = [Message(origin, e) for e in ok.entries]
        if no_ack:
            for m in msgs:
                m.settled = True
        return msgs

    def _on_deliveries(self, consumer_tag: str, entries: Sequence[Sequence[Any]]) -> None:
        """Messages for a consumer; ``entries`` are validated 7-item delivery records."""
        origin = Origin(cast("Connection", self), None, self._epoch)
        self._on_messages(
            _Deliveries(
                consumer_tag, origin, [Message(origin, e) for e in entries], [e[0] for e in entries]
            )
        )

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
        c.on_messages(d.messages)

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
