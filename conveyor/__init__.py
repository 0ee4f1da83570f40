"""Conveyor: a message broker with exchanges, queues and streams, and its asyncio client.

The distribution installs this one top-level package; ``from conveyor import connect, Message``
is the client API (the same names as :mod:`conveyor.client`), and the parts live beside it:

- :mod:`conveyor.client`: the asyncio client library.
- :mod:`conveyor.protocol`: the sans-IO wire protocol (frames, codec, connection state).
- :mod:`conveyor.broker`: the broker (``mq-cli server`` or ``python -m conveyor.broker``).
- :mod:`conveyor.cli`: the ``mq-cli`` command line.

``spec/`` (protocol.toml, openapi.yaml, test vectors) and ``monitoring/`` (alert rules and
a dashboard) ship inside the package as data: :func:`data_path` finds them.
"""

from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names resolve lazily (below), so `import conveyor.broker` stays light
    from conveyor.client import (
        AccessRefused,
        Backpressure,
        BindingListing,
        ClientError,
        Connection,
        ConnectionClosed,
        ConnectionListing,
        Consumer,
        ConsumerCancelled,
        ConsumerListing,
        ConveyorError,
        Death,
        ExchangeListing,
        InvalidArgument,
        Message,
        MessageProperties,
        MessageTooLarge,
        NoRoute,
        NotFound,
        OutgoingMessage,
        PreconditionFailed,
        PublishInDoubt,
        PublishTimeout,
        QueueFull,
        QueueInfo,
        QueueListing,
        RequestError,
        RequestTimeout,
        ResourceLocked,
        StreamConsumer,
        connect,
    )

try:
    __version__ = version("conveyor-mq")
except PackageNotFoundError:  # a checkout on sys.path without an install
    __version__ = "0+unknown"


def data_path(*parts: str) -> Traversable:
    """A file shipped with the package, e.g. ``data_path("spec", "openapi.yaml")``.

    In a checkout ``conveyor/spec`` links to the repository's ``spec/``; in a wheel the
    files are package data. Either way the caller reads the same path.
    """
    return files(__name__).joinpath(*parts)


_CLIENT_NAMES = frozenset(
    {
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
    }
)


def __getattr__(name: str) -> Any:
    """Import the client only when one of its names is used (PEP 562)."""
    if name in _CLIENT_NAMES:
        from conveyor import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "__version__",
    "connect",
    "data_path",
]
