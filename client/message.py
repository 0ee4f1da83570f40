"""Messages as the application sees them."""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict, cast

from conveyor.client.errors import ConnectionClosed

if TYPE_CHECKING:
    from conveyor.client.connection import Connection
    from conveyor.client.consumer import Consumer

PROPERTY_NAMES = (
    "message_id",
    "correlation_id",
    "reply_to",
    "content_type",
    "content_encoding",
    "type",
    "app_id",
    "headers",
    "timestamp",
    "ttl",
    "priority",
    "persistent",
    "delay",
)


class MessageProperties(TypedDict, total=False):
    """The message properties publish takes as keywords (spec/protocol.toml
    [properties]): a misspelt one is a type-checker error, not only a TypeError."""

    message_id: str
    correlation_id: str
    reply_to: str
    content_type: str
    content_encoding: str
    type: str
    app_id: str
    headers: dict[str, Any]
    timestamp: int
    ttl: int
    priority: int
    persistent: bool
    delay: int


class Settled:
    """What :meth:`Message.ack`, ``nack`` and ``reject`` return: the frame is already
    queued, so ``await msg.ack()`` (aio-pika's habit) and plain ``msg.ack()`` do the same
    and leaving it un-awaited warns about nothing."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return
        yield  # a generator that finishes at once

    def __repr__(self) -> str:
        return "Settled()"


SETTLED = Settled()


class Processing:
    """``async with message.process():`` - acks when the block ends normally; on an
    exception, rejects (``requeue`` chooses: back to the queue, or dead-lettered or
    dropped) and lets the exception propagate. A message the block settled itself, or
    a no-ack one, is left alone."""

    __slots__ = ("message", "reject_on_redelivered", "requeue")

    def __init__(self, message: Message, requeue: bool, reject_on_redelivered: bool) -> None:
        self.message = message
        self.requeue = requeue
        self.reject_on_redelivered = reject_on_redelivered

    async def __aenter__(self) -> Message:
        return self.message

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        m = self.message
        if m.settled:
            return
        if exc_type is None:
            m.ack()
            return
        requeue = self.requeue and not (self.reject_on_redelivered and m.redelivered)
        # A lost connection: the broker requeues what it held; keep the real error.
        with contextlib.suppress(ConnectionClosed):
            m.reject(requeue=requeue)


class Death(TypedDict):
    """One dead-lettering of a message, as the broker records it in the ``x-death`` header
    (newest first): why, from which queue, where it had been published, how many times
    this has happened for that (queue, reason), and when last (ms since the epoch)."""

    reason: str  # "rejected", "expired", "max-length" or "delivery-limit"
    queue: str
    exchange: str
    routing_key: str
    count: int
    time: int


class Origin:
    """Where a group of messages came from: shared by every message of one delivery
    (one object per frame instead of three attributes per message)."""

    __slots__ = ("conn", "consumer", "epoch")

    def __init__(self, conn: Connection, consumer: Consumer | None, epoch: int) -> None:
        self.conn = conn
        self.consumer = consumer
        self.epoch = epoch


class Message:
    """A delivered message. Settle it exactly once with :meth:`ack`, :meth:`nack` or
    :meth:`reject` (unless it came from a no-ack consumer or get).

    Settling is synchronous and cheap: the frame is queued and written with others in
    the same event-loop turn, so acking in a tight loop costs no await per message.
    """

    __slots__ = (
        "body",
        "delivery_count",
        "delivery_tag",
        "exchange",
        "origin",
        "properties",
        "redelivered",
        "routing_key",
        "settled",
    )

    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    properties: dict[str, Any]
    body: bytes
    delivery_count: int
    #: Where it came from (connection, consumer, connection epoch): what settling it needs.
    origin: Origin

    def __init__(self, origin: Origin, entry: Sequence[Any]) -> None:
        """``entry`` is a validated delivery record: (delivery_tag, redelivered, exchange,
        routing_key, properties, body, delivery_count)."""
        self.origin = origin
        (
            self.delivery_tag,
            self.redelivered,
            self.exchange,
            self.routing_key,
            self.properties,
            self.body,
            self.delivery_count,
        ) = entry
        self.settled = False

    # Convenience accessors for the common properties.
    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def message_id(self) -> str | None:
        return self.properties.get("message_id")

    @property
    def correlation_id(self) -> str | None:
        return self.properties.get("correlation_id")

    @property
    def reply_to(self) -> str | None:
        return self.properties.get("reply_to")

    @property
    def headers(self) -> dict[str, Any]:
        return self.properties.get("headers") or {}

    def _int_header(self, key: str) -> int | None:
        h = self.properties.get("headers")
        v = h.get(key) if h else None
        return v if type(v) is int else None

    @property
    def offset(self) -> int | None:
        """Streams: the message's offset in the stream (the ``x-stream-offset`` header the
        broker adds); None for a message from a classic queue."""
        return self._int_header("x-stream-offset")

    @property
    def timestamp(self) -> int | None:
        """Streams: when the broker appended the message, in ms since the epoch (the
        ``x-stream-timestamp`` header); None for a message from a classic queue. (The
        publisher's own ``timestamp`` property, if any, is ``properties["timestamp"]``.)"""
        return self._int_header("x-stream-timestamp")

    @property
    def deaths(self) -> list[Death]:
        """The message's dead-letter history (``x-death`` header), newest first; [] if it
        was never dead-lettered. Entries that are not maps are left out: headers are the
        publisher's to set, so the history is only as trustworthy as the publisher."""
        records = self.headers.get("x-death")
        if not isinstance(records, list):
            return []
        return [cast(Death, r) for r in records if isinstance(r, dict)]

    def extend(self, timeout_ms: int = 0) -> None:
        """Tell the broker the message is still being worked on: its ack deadline (the
        queue's ``ack_timeout_ms``) restarts now and runs ``timeout_ms`` (0 = the queue's
        ack_timeout_ms), so a slow but live consumer does not have it redelivered elsewhere.

        Like :meth:`ack`, it is queued, not awaited (EXTEND has no reply). Raises
        ``RuntimeError`` if the message is settled (no-ack deliveries always are) and
        ``ConnectionClosed`` if it came on a connection that is gone.
        """
        if self.settled:
            raise RuntimeError(f"message {self.delivery_tag} already settled")
        origin = self.origin
        origin.conn.extend_delivery(self.delivery_tag, origin.epoch, timeout_ms)

    def process(self, *, requeue: bool = False, reject_on_redelivered: bool = False) -> Processing:
        """``async with msg.process():`` acks on success, rejects on an exception (which
        propagates). ``requeue=True`` puts a failed message back in the queue (unless
        ``reject_on_redelivered`` and it was delivered before: a poison message then goes
        to the dead-letter exchange, if any, instead of looping)."""
        return Processing(self, requeue, reject_on_redelivered)

    def ack(self) -> Settled:
        """Acknowledge: the broker forgets the message. Queued at once; the result may
        be awaited (``await msg.ack()``) or ignored."""
        if self.settled:
            raise RuntimeError(f"message {self.delivery_tag} already settled")
        # The connection queues the ack (coalesced at flush time) and returns the
        # consumer's credit: one call, this runs once per message.
        origin = self.origin
        origin.conn.ack_delivery(self.delivery_tag, origin)
        self.settled = True
        return SETTLED

    def nack(self, requeue: bool = True) -> Settled:
        """Refuse; by default the message goes back to its original place in the queue."""
        self._refuse("nack", requeue)
        return SETTLED

    def reject(self, requeue: bool = False) -> Settled:
        """Refuse; by default the message is discarded."""
        self._refuse("reject", requeue)
        return SETTLED

    def _refuse(self, how: str, requeue: bool) -> None:
        if self.settled:
            raise RuntimeError(f"message {self.delivery_tag} already settled")
        origin = self.origin
        origin.conn.refuse_delivery(self.delivery_tag, origin.epoch, how, requeue)
        self.settled = True
        if origin.consumer is not None:
            origin.consumer.on_settled(1)

    def __repr__(self) -> str:
        return (
            f"Message(tag={self.delivery_tag}, exchange={self.exchange!r}, "
            f"routing_key={self.routing_key!r}, body={self.body[:40]!r})"
        )
