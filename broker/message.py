"""The broker's message record.

One ``Message`` object is shared by every queue a publish routed to; per-queue state
(redelivered flag, delivery count) lives in the ``QueuedMessage`` wrapper so fan-out does
not copy bodies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    from conveyor.broker.pager import PageFile

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def message_size(properties: dict[str, Any], body: bytes) -> int:
    """Size counted against max_message_size: body plus encoded headers (the unbounded part)."""
    headers = properties.get("headers")
    return len(body) + (len(_packb(headers)) if headers else 0)


class Message:
    """A published message (body and properties are never copied; the body may be paged)."""

    __slots__ = (
        "body",
        "exchange",
        "id",
        "page",
        "persistent",
        "properties",
        "routing_key",
        "size",
        "ts",
    )

    def __init__(
        self,
        exchange: str,
        routing_key: str,
        properties: dict[str, Any],
        body: bytes,
        size: int = -1,
        ts: int = 0,
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties = properties
        # None while the body lives only in a page file (broker.pager): read it back with
        # Pager.read / Pager.load (which also bring back paged headers: Pager.properties).
        self.body: bytes | None = body
        self.page: tuple[PageFile, int, int, int] | None = None
        # Computed once: frame-size budgets for every later delivery read it.
        self.size = size if size >= 0 else message_size(properties, body)
        self.persistent: bool = properties.get("persistent", True)
        self.id = 0  # broker-wide id, assigned when the message is logged
        self.ts = ts  # publish time, ms since the epoch (delay and TTL count from it)


READY, DELIVERED, GONE, DELAYED = 0, 1, 2, 3


class QueuedMessage:
    """A message's life inside one queue: its position, delivery count and flags.

    ``seq`` is the queue-local enqueue number: requeued messages are ordered by it so
    they return to their original place. ``state`` lets timers (TTL, delay, length
    limits) remove a message from the middle of a queue lazily: a GONE entry is skipped
    when it reaches the head. ``expires`` (TTL) and ``deadline`` (ack timeout) are ms
    since the epoch, 0 = none.
    """

    __slots__ = ("deadline", "delivery_count", "expires", "message", "redelivered", "seq", "state")

    def __init__(self, seq: int, message: Message) -> None:
        self.seq = seq
        self.message = message
        self.delivery_count = 0
        self.redelivered = False
        self.state = READY
        self.expires = 0
        self.deadline = 0

    def __lt__(self, other: QueuedMessage) -> bool:  # heap order for requeues
        return self.seq < other.seq


def death_records(raw: Any) -> list[dict[str, Any]]:
    """The x-death records of a message's headers, as dead-lettering may use them: a
    publisher can put anything under that key, so only maps whose queue and reason are
    strings count (a count that is not a non-negative integer counts as 0); anything else
    is dropped rather than breaking dead-lettering."""
    if type(raw) is not list:
        return []
    out: list[dict[str, Any]] = []
    for d in raw:
        if type(d) is dict and type(d.get("queue")) is str and type(d.get("reason")) is str:
            d = dict(d)
            count = d.get("count")
            d["count"] = count if type(count) is int and count >= 0 else 0
            out.append(d)
    return out
