"""Messages as the application sees them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client.connection import Connection
    from client.consumer import Consumer

PROPERTY_NAMES = (
    "message_id", "correlation_id", "reply_to", "content_type", "content_encoding", "type",
    "app_id", "headers", "timestamp", "ttl", "priority", "persistent", "delay",
)


class Message:
    """A delivered message. Settle it exactly once with :meth:`ack`, :meth:`nack` or
    :meth:`reject` (unless it came from a no-ack consumer or get).

    Settling is synchronous and cheap: the frame is queued and written with others in
    the same event-loop turn, so acking in a tight loop costs no await per message.
    """

    __slots__ = (
        "_conn", "_consumer", "_epoch", "body", "delivery_count", "delivery_tag", "exchange",
        "properties", "redelivered", "routing_key", "settled",
    )

    def __init__(
        self,
        conn: Connection,
        consumer: Consumer | None,
        epoch: int,
        delivery_tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
        properties: dict[str, Any],
        body: bytes,
        delivery_count: int,
        settled: bool = False,
    ) -> None:
        self._conn = conn
        self._consumer = consumer
        self._epoch = epoch
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties = properties
        self.body = body
        self.delivery_count = delivery_count
        self.settled = settled

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

    def ack(self) -> None:
        """Acknowledge: the broker forgets the message."""
        self._settle("ack", False)

    def nack(self, requeue: bool = True) -> None:
        """Refuse; by default the message goes back to its original place in the queue."""
        self._settle("nack", requeue)

    def reject(self, requeue: bool = False) -> None:
        """Refuse; by default the message is discarded."""
        self._settle("reject", requeue)

    def _settle(self, how: str, requeue: bool) -> None:
        if self.settled:
            raise RuntimeError(f"message {self.delivery_tag} already settled")
        self._conn._settle(self, how, requeue)
        self.settled = True
        if self._consumer is not None:
            self._consumer._settled_one()

    def __repr__(self) -> str:
        return (f"Message(tag={self.delivery_tag}, exchange={self.exchange!r}, "
                f"routing_key={self.routing_key!r}, body={self.body[:40]!r})")
