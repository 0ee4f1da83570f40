"""Push consumer: an async iterator whose buffer is bounded by the credit it grants."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import TYPE_CHECKING, Any

from client.errors import ConsumerCancelled
from client.message import Message
from protocol import ConveyorError

if TYPE_CHECKING:
    from client.connection import Connection


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

    def __init__(self, conn: Connection, queue: str, prefetch: int, no_ack: bool,
                 exclusive: bool, tag: str, arguments: dict[str, Any]) -> None:
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
            self._settled(1)
        return msg

    async def _wait(self) -> None:
        """Until a message is buffered; StopAsyncIteration once cancelled by the
        application, the consumer's error once it failed."""
        while not self._buffer:
            if self._error is not None:
                if isinstance(self._error, _Stop):
                    raise StopAsyncIteration
                raise self._error
            self._waiter = self._conn._new_future()
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
            self._settled(len(msgs))
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
        return _Batches(self, max_messages)

    async def get(self, timeout: float | None = None) -> Message | None:
        """Next message, or None if none arrives within ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except TimeoutError:
            return None
        except StopAsyncIteration:
            return None

    async def get_batch(self, max_messages: int | None = None,
                        timeout: float | None = None) -> list[Message]:
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
            await self._conn._cancel_consumer(self)
        self._finish(_Stop())

    # ------------------------------------------------------------------ connection side
    def _push(self, msgs: list[Message]) -> None:
        self._buffer.extend(msgs)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _settled(self, n: int) -> None:
        """``n`` deliveries were settled (or, no-ack, taken): their credit can go back."""
        n += self._to_grant
        if n >= self._grant_at and self.active:
            self._to_grant = 0
            self._conn._grant(self, n)
        else:
            self._to_grant = n

    def _finish(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _cancelled_by_server(self, code: int, message: str) -> None:
        self.active = False
        self._finish(ConsumerCancelled(f"consumer {self.tag} cancelled by the broker: {message}",
                                       {"code": code, "queue": self.queue}))

    def _fail(self, error: ConveyorError) -> None:
        self.active = False
        self._finish(error)


class _Batches:
    """``Consumer.batches()``: an async iterator without a generator frame."""

    __slots__ = ("_consumer", "_max")

    def __init__(self, consumer: Consumer, max_messages: int | None) -> None:
        self._consumer = consumer
        self._max = max_messages

    def __aiter__(self) -> _Batches:
        return self

    def __anext__(self) -> Awaitable[list[Message]]:  # StopAsyncIteration ends it
        return self._consumer._next_batch(self._max)


class _Stop(Exception):
    """Marks a consumer cancelled by the application: iteration simply ends."""
