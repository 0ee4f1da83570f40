"""Push consumer: an async iterator whose buffer is bounded by the credit it grants."""

from __future__ import annotations

import asyncio
from collections import deque
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
    ``async with`` block cancels it.
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
        self._error: BaseException | None = None
        self.active = False

    # ------------------------------------------------------------------ iteration
    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Message:
        while not self._buffer:
            if self._error is not None:
                if isinstance(self._error, _Stop):
                    raise StopAsyncIteration
                raise self._error
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        msg = self._buffer.popleft()
        if self.no_ack:
            self._settled_one()
        return msg

    async def get(self, timeout: float | None = None) -> Message | None:
        """Next message, or None if none arrives within ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except TimeoutError:
            return None
        except StopAsyncIteration:
            return None

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

    def _settled_one(self) -> None:
        self._to_grant += 1
        if self._to_grant * 2 >= self.prefetch and self.active:
            n = self._to_grant
            self._to_grant = 0
            self._conn._grant(self, n)

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


class _Stop(Exception):
    """Marks a consumer cancelled by the application: iteration simply ends."""
