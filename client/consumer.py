"""Push consumer: an async iterator whose buffer is bounded by the credit it grants."""

from __future__ import annotations

import asyncio
import datetime
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any

from conveyor.client.errors import ConsumerCancelled, stale_delivery
from conveyor.client.message import Message
from conveyor.protocol import ConveyorError
from conveyor.protocol.limits import U64_MAX

if TYPE_CHECKING:
    from conveyor.client.connection import Connection


class Consumer:
    """Messages from one queue, in delivery order.

    ``prefetch`` is the credit window: the broker never has more than ``prefetch``
    deliveries outstanding to this consumer (unacked, or for no-ack consumers, not yet
    taken from the iterator). Credit is topped up in one CREDIT frame once half the
    window has been settled, so there is no per-message round trip.

    Use as ``async for msg in consumer`` and/or ``async with consumer``; leaving the
    ``async with`` block cancels it. ``async for batch in consumer.batches()`` yields
    lists of the messages buffered so far instead (cheaper per message), and
    :meth:`ack_all` settles such a list in one call.
    """

    def __init__(
        self,
        conn: Connection,
        queue: str,
        prefetch: int,
        no_ack: bool,
        exclusive: bool,
        tag: str,
        arguments: dict[str, Any],
    ) -> None:
        self._conn = conn
        self.queue = queue
        self.prefetch = prefetch
        self.no_ack = no_ack
        self.exclusive = exclusive
        self.tag = tag
        self.arguments = arguments
        self._buffer: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._to_grant = 0
        self._grant_at = (prefetch + 1) // 2  # to_grant * 2 >= prefetch
        self._error: BaseException | None = None
        self.active = False

    # ------------------------------------------------------------------ iteration
    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Message:
        buf = self._buffer
        if not buf:
            await self._wait()
        msg = buf.popleft()
        if self.no_ack:
            self.on_settled(1)
        return msg

    async def _wait(self) -> None:
        """Until a message is buffered; StopAsyncIteration once cancelled by the
        application, the consumer's error once it failed."""
        while not self._buffer:
            if self._error is not None:
                if isinstance(self._error, _Stop):
                    raise StopAsyncIteration
                raise self._error
            self._waiter = self._conn.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def _next_batch(self, max_messages: int | None) -> list[Message]:
        buf = self._buffer
        if not buf:
            await self._wait()
        if max_messages is None or len(buf) <= max_messages:
            msgs = list(buf)
            buf.clear()
        else:
            pop = buf.popleft
            msgs = [pop() for _ in range(max_messages)]
        if self.no_ack:
            self.on_settled(len(msgs))
        return msgs

    def batches(self, max_messages: int | None = None) -> AsyncIterator[list[Message]]:
        """Iterate over lists of messages: each ``async for`` step waits for at least one
        message and yields every message buffered by then (at most ``max_messages``),
        in delivery order. Ends and fails exactly like ``async for msg in consumer``;
        both forms may be mixed. Settle the messages as usual, or all at once with
        :meth:`ack_all`.
        """
        if max_messages is not None and max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        return _Batches(self._next_batch, max_messages)

    async def get(self, timeout: float | None = None) -> Message | None:
        """Next message, or None if none arrives within ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except TimeoutError:
            return None
        except StopAsyncIteration:
            return None

    async def get_batch(
        self, max_messages: int | None = None, timeout: float | None = None
    ) -> list[Message]:
        """The buffered messages (at least one, at most ``max_messages``), or an empty list
        if none arrives within ``timeout`` seconds or the consumer was cancelled."""
        if max_messages is not None and max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        try:
            return await asyncio.wait_for(self._next_batch(max_messages), timeout)
        except TimeoutError:
            return []
        except StopAsyncIteration:
            return []

    def ack_all(self, messages: Iterable[Message]) -> None:
        """Acknowledge every message of ``messages`` (for example a batch from
        :meth:`batches`) in one call; equivalent to ``msg.ack()`` for each, but all or
        nothing: if one of them is already settled or came on a lost connection, none
        is acked and the error of its ``ack()`` is raised."""
        self._conn.ack_all(messages)

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cancel()

    async def cancel(self) -> None:
        """Stop deliveries. Buffered, unsettled messages return to the queue when the
        connection closes, or can still be acked now."""
        if self.active:
            self.active = False
            await self._conn.cancel_consumer(self)
        self.finish(_Stop())

    # ------------------------------------------------------------------ connection side
    # Called by the connection, not the application.
    def on_messages(self, msgs: list[Message]) -> None:
        """Deliveries for this consumer, in order: buffered for the iterator."""
        self._buffer.extend(msgs)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def on_settled(self, n: int) -> None:
        """``n`` deliveries were settled (or, no-ack, taken): their credit can go back."""
        n += self._to_grant
        if n >= self._grant_at and self.active:
            self._to_grant = 0
            self._conn.grant(self, n)
        else:
            self._to_grant = n

    def on_connection_lost(self) -> None:
        """The connection is gone: buffered unsettled messages will be redelivered on the
        next one, and the credit they held starts again from the full window."""
        self._buffer.clear()
        self._to_grant = 0

    def finish(self, error: BaseException) -> None:
        """End iteration with ``error`` (the first one given wins)."""
        if self._error is None:
            self._error = error
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def on_cancelled(self, code: int, message: str) -> None:
        """The broker cancelled this consumer (CANCELLED): iteration raises
        ConsumerCancelled."""
        self.active = False
        self.finish(
            ConsumerCancelled(
                f"consumer {self.tag} cancelled by the broker: {message}",
                {"code": code, "queue": self.queue},
            )
        )

    def fail(self, error: ConveyorError) -> None:
        """The consumer cannot go on (not restored, or no reconnect): iteration raises."""
        self.active = False
        self.finish(error)


class _Batches:
    """``Consumer.batches()``: an async iterator without a generator frame."""

    __slots__ = ("_max", "_next")

    def __init__(
        self, next_batch: Callable[[int | None], Awaitable[list[Message]]], max_messages: int | None
    ) -> None:
        self._next = next_batch  # the consumer's _next_batch (StreamConsumer's own)
        self._max = max_messages

    def __aiter__(self) -> _Batches:
        return self

    def __anext__(self) -> Awaitable[list[Message]]:  # StopAsyncIteration ends it
        return self._next(self._max)


class _Stop(Exception):
    """Marks a consumer cancelled by the application: iteration simply ends."""


_FIRST_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
STREAM_OFFSETS = ("first", "last", "next")


def stream_arguments(
    offset: str | int = "next",
    timestamp: datetime.datetime | float | int | None = None,
    group: str | None = None,
) -> dict[str, Any]:
    """CONSUME arguments (spec [consume_arguments]) for reading a stream; checked here so
    a mistake fails before anything is sent. ``timestamp``: a ``datetime`` (naive = local
    time) or milliseconds since the epoch (the unit of :attr:`Message.timestamp`)."""
    args: dict[str, Any] = {}
    if isinstance(offset, str):
        if offset not in STREAM_OFFSETS:
            raise ValueError(
                f"offset must be 'first', 'last', 'next' or an int >= 0, not {offset!r}"
            )
        if offset != "next":
            args["offset"] = offset
    elif type(offset) is int and 0 <= offset <= U64_MAX:
        args["offset"] = offset
    else:
        raise ValueError(f"offset must be 'first', 'last', 'next' or an int >= 0, not {offset!r}")
    if timestamp is not None:
        args["timestamp"] = timestamp_ms(timestamp)
    if group is not None:
        if type(group) is not str or not group:
            raise ValueError(f"group must be a non-empty string, not {group!r}")
        args["group"] = group
    return args


def timestamp_ms(when: datetime.datetime | float | int) -> int:
    """``when`` as whole milliseconds since the epoch, rounded up (the stream starts at
    the first message at or after it). Naive datetimes are local time."""
    if isinstance(when, datetime.datetime):
        aware = when if when.tzinfo is not None else when.astimezone()
        us = (aware - _FIRST_EPOCH) // datetime.timedelta(microseconds=1)
        ms = -(-us // 1000)
    elif type(when) is int:
        ms = when
    elif type(when) is float and math.isfinite(when):
        ms = math.ceil(when)
    else:
        raise ValueError(f"timestamp must be a datetime or ms since the epoch, not {when!r}")
    if not 0 <= ms <= U64_MAX:
        raise ValueError(f"timestamp {when!r} is out of range")
    return ms


class StreamConsumer(Consumer):
    """Messages of a stream, in offset order (from :meth:`Connection.stream`).

    Use it directly as ``async for msg in conn.stream(...)`` (it subscribes on the first
    step), or ``async with conn.stream(...) as s`` / ``s = await conn.stream(...)`` to
    subscribe up front (and, with ``async with``, cancel at the end).

    Commits: in a consumer group, acking a message commits the group's offset up to it
    (the contiguous acked prefix). With ``auto_commit`` the iterator acks each message
    when the application asks for the next one (for :meth:`batches`, the previous
    batch), so what was handed out but not finished is redelivered after a crash; acks
    of one loop turn go out as one cumulative ACK. Without it, ack with ``msg.ack()``
    or :meth:`commit`. Without a group acks commit nothing but still return credit.
    """

    def __init__(
        self,
        conn: Connection,
        queue: str,
        prefetch: int,
        auto_commit: bool,
        tag: str,
        arguments: dict[str, Any],
    ) -> None:
        super().__init__(conn, queue, prefetch, False, False, tag, arguments)
        self.group: str | None = arguments.get("group")
        self.auto_commit = auto_commit
        self._started = False
        self._prev: Message | None = None  # auto_commit: handed out, acked on the next step
        self._prev_batch: list[Message] = []
        self._held: deque[Message] = deque()  # manual: handed out, maybe unsettled
        self._last: Message | None = None  # the newest message handed out

    # ------------------------------------------------------------------ arguments
    @property
    def arguments(self) -> dict[str, Any]:
        """The CONSUME arguments; after messages were handed out, a consumer without a
        group resubscribes (after a reconnect) at the oldest one not acked, else right
        after the newest, rather than at its original offset/timestamp."""
        if self.group is not None or self._last is None:
            return self._arguments
        epoch = self._conn.epoch
        for m in self._outstanding():
            if not m.settled or m.origin.epoch != epoch:
                off = m.offset
                if off is not None:
                    return {"offset": off}
        off = self._last.offset
        return self._arguments if off is None else {"offset": off + 1}

    @arguments.setter
    def arguments(self, value: dict[str, Any]) -> None:
        self._arguments = value

    def _outstanding(self) -> list[Message]:
        if self._prev is not None:
            return [self._prev]
        if self._prev_batch:
            return self._prev_batch
        return list(self._held)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> StreamConsumer:
        """Subscribe (once; later calls return at once)."""
        if not self._started:
            self._started = True
            try:
                await self._conn.start_consumer(self)
            except BaseException:
                self._started = False
                raise
        return self

    def __await__(self) -> Generator[Any, None, StreamConsumer]:
        return self.start().__await__()

    async def __aenter__(self) -> StreamConsumer:
        return await self.start()

    # ------------------------------------------------------------------ iteration
    def __aiter__(self) -> StreamConsumer:
        return self

    async def __anext__(self) -> Message:
        await self._before_next()
        buf = self._buffer
        if not buf:
            await self._wait()
        msg = buf.popleft()
        if self.auto_commit:
            self._prev = msg
        else:
            self._held.append(msg)
        self._last = msg
        return msg

    async def _next_batch(self, max_messages: int | None) -> list[Message]:
        await self._before_next()
        msgs = await super()._next_batch(max_messages)
        if self.auto_commit:
            self._prev_batch = msgs
        else:
            self._held.extend(msgs)
        if msgs:
            self._last = msgs[-1]
        return msgs

    async def _before_next(self) -> None:
        """Start on first use; commit (auto_commit) or forget (manual) what the
        application was handed before, since it asks for more."""
        if not self._started:
            await self.start()
        if self.auto_commit:
            self._commit_previous()
        elif self._held:
            self._trim_held()

    # ------------------------------------------------------------------ commits
    def _commit_previous(self) -> None:
        """auto_commit: ack what was handed out before (skipping what the application
        settled itself, or what came on a connection since lost: that is redelivered)."""
        epoch = self._conn.epoch
        prev = self._prev
        if prev is not None:
            self._prev = None
            if not prev.settled and prev.origin.epoch == epoch:
                prev.ack()
        batch = self._prev_batch
        if batch:
            self._prev_batch = []
            todo = [m for m in batch if not m.settled and m.origin.epoch == epoch]
            if todo:
                self._conn.ack_all(todo)

    def _trim_held(self) -> None:
        held = self._held
        epoch = self._conn.epoch
        while held and (held[0].settled or held[0].origin.epoch != epoch):
            held.popleft()

    def commit(self, msg: Message) -> None:
        """Ack ``msg`` and every message handed out before it that is not settled yet: in
        a group, the committed offset moves up to ``msg``. Raises ``ConnectionClosed`` if
        ``msg`` came on a connection that is gone (it will be redelivered)."""
        conn = self._conn
        epoch = conn.epoch
        if msg.origin.epoch != epoch:
            raise stale_delivery()
        tag = msg.delivery_tag
        todo: list[Message] = []
        for m in self._outstanding():
            if m.origin.epoch == epoch and m.delivery_tag <= tag and not m.settled:
                todo.append(m)
        if not msg.settled and msg not in todo:
            todo.append(msg)
        held = self._held
        while held and (
            held[0].settled or held[0].origin.epoch != epoch or held[0].delivery_tag <= tag
        ):
            held.popleft()
        if todo:
            todo.sort(key=lambda m: m.delivery_tag)
            conn.ack_all(todo)
