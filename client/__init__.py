"""Conveyor's asyncio client.

    import client
    async with await client.connect("mq://127.0.0.1:5680") as conn:
        await conn.declare_queue("tasks")
        await conn.publish("", "tasks", b"hello")          # returns once confirmed
        async with await conn.consume("tasks", prefetch=100) as consumer:
            async for msg in consumer:
                msg.ack()
"""

from client.connection import Connection, OutgoingMessage, QueueInfo, connect
from client.consumer import Consumer
from client.errors import (
    Backpressure,
    ClientError,
    ConnectionClosed,
    ConsumerCancelled,
    PublishTimeout,
    RequestTimeout,
)
from client.message import Message
from protocol import (
    AccessRefused,
    ConveyorError,
    InvalidArgument,
    MessageTooLarge,
    NoRoute,
    NotFound,
    PreconditionFailed,
    ResourceLocked,
)

__all__ = [
    "AccessRefused",
    "Backpressure",
    "ClientError",
    "Connection",
    "ConnectionClosed",
    "Consumer",
    "ConsumerCancelled",
    "ConveyorError",
    "InvalidArgument",
    "Message",
    "MessageTooLarge",
    "NoRoute",
    "NotFound",
    "OutgoingMessage",
    "PreconditionFailed",
    "PublishTimeout",
    "QueueInfo",
    "RequestTimeout",
    "ResourceLocked",
    "connect",
]
