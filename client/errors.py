"""Client exceptions.

Every error the broker can send maps one-to-one to a class from the spec's error table
(re-exported here: ``NotFound``, ``PreconditionFailed``, ``NoRoute`` ...). The classes
below are the client's own conditions, which never travel on the wire.
"""

from __future__ import annotations

from conveyor.protocol import *  # noqa: F403  (the generated error classes)
from conveyor.protocol.errors import ConveyorError, FatalError, ProtocolError, RequestError


class ClientError(ConveyorError):
    """Base of client-side conditions (no wire code of their own)."""

    code = 0
    name = "client-error"


class ConnectionClosed(ClientError):
    """The connection is closed or was lost; the operation's outcome is unknown.

    A publish that raises this was *not* confirmed: it may or may not have been stored.
    Retry it (with a message_id, so deduplication can drop a copy).
    """

    name = "connection-closed"
    retriable = True


class PublishInDoubt(ConnectionClosed):
    """The connection closed (by :meth:`Connection.close` or a loss) before the broker
    confirmed this publish: it may or may not have been stored.

    ``close()`` first waits (bounded) for outstanding confirms, so after a deliberate close
    only publishes the broker did not confirm in time get this; ``details["in_doubt"]`` and
    ``Connection.in_doubt`` give the count. Futures failed with it are marked retrieved, so
    an unawaited ``publish_nowait`` future does not log "exception was never retrieved".
    """

    name = "publish-in-doubt"


class PublishTimeout(ClientError, TimeoutError):
    """No confirm arrived within the publish timeout (the broker may be blocked)."""

    name = "publish-timeout"
    retriable = True


class Backpressure(ClientError):
    """``publish_nowait`` could not queue: too many unconfirmed publishes, or the socket is
    backed up. Nothing was queued; ``await conn.wait_for_capacity()`` and retry."""

    name = "backpressure"
    retriable = True


class RequestTimeout(ClientError, TimeoutError):
    """No reply arrived within the request timeout."""

    name = "request-timeout"
    retriable = True


class ConsumerCancelled(ClientError):
    """The broker cancelled the consumer (for example its queue was deleted)."""

    name = "consumer-cancelled"


__all__ = [
    "Backpressure",
    "ClientError",
    "ConnectionClosed",
    "ConsumerCancelled",
    "ConveyorError",
    "FatalError",
    "ProtocolError",
    "PublishInDoubt",
    "PublishTimeout",
    "RequestError",
    "RequestTimeout",
]


def stale_delivery() -> ConnectionClosed:
    """What settling a message from a connection since lost raises: its tag means nothing
    to the broker now (it redelivers the message)."""
    return ConnectionClosed(
        "the connection this message came on is gone; the broker will redeliver it"
    )
