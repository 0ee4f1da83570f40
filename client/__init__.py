"""Conveyor's asyncio client.

    from conveyor import client
    async with await client.connect("mq://127.0.0.1:5680") as conn:
        await conn.declare_queue("tasks")
        await conn.publish("", "tasks", b"hello")          # returns once confirmed
        async with await conn.consume("tasks", prefetch=100) as consumer:
            async for msg in consumer:
                msg.ack()

Queue features are declare_queue keywords, e.g. ``declare_queue("work", delivery_limit=5,
dead_letter_exchange="dlx")``; ``msg.extend()`` holds a slow delivery past its ack timeout,
``msg.deaths`` is its dead-letter history, and a publish to a full reject-publish queue
raises ``QueueFull``.

Streams are queues declared with ``queue_type="stream"``: an append-only log read by
offset, e.g. ``async for msg in conn.stream("events", offset="first", group="billing")``
(``msg.offset``, ``msg.timestamp``; acks commit the group's offset).
"""

from conveyor.client.connection import Connection, OutgoingMessage, QueueInfo, connect
from conveyor.client.consumer import Consumer, StreamConsumer
from conveyor.client.errors import (
    Backpressure,
    ClientError,
    ConnectionClosed,
    ConsumerCancelled,
    PublishInDoubt,
    PublishTimeout,
    RequestTimeout,
)
from conveyor.client.message import Death, Message, MessageProperties
from conveyor.client.topology import (
    BindingListing,
    ConnectionListing,
    ConsumerListing,
    ExchangeListing,
    QueueListing,
)
from conveyor.protocol import (
    AccessRefused,
    ConveyorError,
    InvalidArgument,
    MessageTooLarge,
    NoRoute,
    NotFound,
    PreconditionFailed,
    QueueFull,
    RequestError,
    ResourceLocked,
)

__all__ = [
    "AccessRefused",
    "Backpressure",
    "BindingListing",
    "ClientError",
    "Connection",
    "ConnectionClosed",
    "ConnectionListing",
    "Consumer",
    "ConsumerCancelled",
    "ConsumerListing",
    "ConveyorError",
    "Death",
    "ExchangeListing",
    "InvalidArgument",
    "Message",
    "MessageProperties",
    "MessageTooLarge",
    "NoRoute",
    "NotFound",
    "OutgoingMessage",
    "PreconditionFailed",
    "PublishInDoubt",
    "PublishTimeout",
    "QueueFull",
    "QueueInfo",
    "QueueListing",
    "RequestError",
    "RequestTimeout",
    "ResourceLocked",
    "StreamConsumer",
    "connect",
]
