"""Topology: declares, deletes, bindings and listings, and their restore on reconnect.

Every declare and bind that succeeds is remembered (in first-declared order; deletes
forget it), so that after a reconnect :meth:`_TopologyMixin._restore` can rebuild what
the application relied on before anything else is sent on the new connection.
"""

from __future__ import annotations

import builtins
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from conveyor.client._protocol import _Protocol
from conveyor.client.consumer import Consumer
from conveyor.client.errors import ConnectionClosed, RequestTimeout
from conveyor.protocol import (
    Bind,
    ConveyorError,
    ExchangeDeclare,
    ExchangeDelete,
    Frame,
    List,
    ListOk,
    MessageCountOk,
    QueueDeclare,
    QueueDeclareOk,
    QueueDelete,
    QueuePurge,
    Unbind,
)

log = logging.getLogger("conveyor.client")


@dataclass(frozen=True)
class QueueInfo:
    """Reply to a queue declare. ``messages`` is the ready-message count, the name the
    listings, the CLI and the HTTP API use for depth; ``message_count`` is its older
    alias."""

    name: str
    messages: int
    consumer_count: int

    @property
    def message_count(self) -> int:
        """Alias of :attr:`messages` (kept for code written against it)."""
        return self.messages

    @property
    def consumers(self) -> int:
        """Alias of :attr:`consumer_count`, named as in :class:`QueueListing`."""
        return self.consumer_count


@dataclass(frozen=True)
class QueueListing:
    """One queue of :meth:`_TopologyMixin.queues`: ready (``messages``) and unacked
    counts, counters since the broker started. ``extra``: whatever else the broker
    reports (streams: first_offset, head_offset, bytes, groups)."""

    name: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    type: str = "classic"
    messages: int = 0
    unacked: int = 0
    consumers: int = 0
    delayed: int = 0
    paged: int = 0
    published: int = 0
    delivered: int = 0
    acked: int = 0
    dead_lettered: int = 0
    expired: int = 0
    arguments: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ExchangeListing:
    """One exchange of :meth:`_TopologyMixin.exchanges`."""

    name: str
    type: str = "direct"
    durable: bool = True
    auto_delete: bool = False
    bindings: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class BindingListing:
    """One binding of :meth:`_TopologyMixin.bindings`."""

    exchange: str
    queue: str
    routing_key: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ConsumerListing:
    """One consumer of :meth:`_TopologyMixin.consumers` (any connection's)."""

    queue: str
    consumer_tag: str
    connection: str = ""
    credit: int = 0
    unacked: int = 0
    no_ack: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ConnectionListing:
    """One open connection of :meth:`_TopologyMixin.connections`: its publish credit and
    whether (and how long) it has been blocked. ``extra``: the other fields the broker
    reports (a field the broker stops sending takes its default here)."""

    id: str = ""
    subject: str = ""
    peer: str = ""
    published: int = 0
    blocked: bool = False
    credit_messages: int = 0
    credit_bytes: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)


_L = TypeVar(
    "_L", QueueListing, ExchangeListing, BindingListing, ConsumerListing, ConnectionListing
)
_FIELDS: dict[type, frozenset[str]] = {}


def _listing(cls: type[_L], row: dict[str, Any]) -> _L:
    """``row`` as ``cls``: the fields it names, the rest in ``extra`` (a newer broker
    may report more without breaking older clients)."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in fields(cls)) - {"extra"}
    known = {k: v for k, v in row.items() if k in names}
    rest = {k: v for k, v in row.items() if k not in names}
    return cls(**known, extra=rest)


def _queue_arguments(arguments: dict[str, Any] | None, typed: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` with the typed declare_queue parameters that were given merged in."""
    args = dict(arguments or {})
    for k, v in typed.items():
        if v is None:
            continue
        if k in args and args[k] != v:
            raise ValueError(f"queue argument {k!r} given twice: {args[k]!r} and {v!r}")
        args[k] = v
    return args


# The frame that re-declares each kind of remembered topology (see _restore).
_TOPOLOGY_FRAMES: dict[str, Any] = {
    "exchange": ExchangeDeclare,
    "queue": QueueDeclare,
    "bind": Bind,
}


class _TopologyMixin:
    """The topology part of :class:`client.connection.Connection`."""

    # Connection state this concern shares (set in Connection.__init__).
    timeout: float
    restore_errors: builtins.list[str]
    _proto: _Protocol | None
    _rids: itertools.count[int]
    _consumers: dict[str, Consumer]
    _topology: dict[tuple[Any, ...], tuple[str, dict[str, Any]]]

    if TYPE_CHECKING:  # defined by the connection and the consuming concern

        async def _request(
            self, frame: Frame, timeout: float | None = None, internal: bool = False
        ) -> Frame: ...
        async def start_consumer(self, c: Consumer, internal: bool = False) -> None: ...

    async def declare_exchange(
        self,
        name: str,
        type: str = "direct",
        *,
        durable: bool = True,
        auto_delete: bool = False,
        passive: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        """Declare an exchange (direct, topic or fanout); idempotent for equal settings."""
        kw: dict[str, Any] = {
            "exchange": name,
            "type": type,
            "durable": durable,
            "auto_delete": auto_delete,
            "passive": passive,
            "arguments": arguments or {},
        }
        await self._request(ExchangeDeclare(next(self._rids), **kw))
        if not passive:
            self._topology[("exchange", name)] = ("exchange", kw)

    async def delete_exchange(self, name: str, *, if_unused: bool = False) -> None:
        await self._request(ExchangeDelete(next(self._rids), name, if_unused))
        self._topology.pop(("exchange", name), None)
        for key in [k for k in self._topology if k[0] == "bind" and k[1] == name]:
            del self._topology[key]

    async def declare_queue(
        self,
        name: str = "",
        *,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        passive: bool = False,
        arguments: dict[str, Any] | None = None,
        ack_timeout_ms: int | None = None,
        delivery_limit: int | None = None,
        dead_letter_exchange: str | None = None,
        dead_letter_routing_key: str | None = None,
        message_ttl_ms: int | None = None,
        expires_ms: int | None = None,
        max_priority: int | None = None,
        max_length: int | None = None,
        max_length_bytes: int | None = None,
        overflow: Literal["drop-head", "reject-publish"] | None = None,
        dedup_window_ms: int | None = None,
        single_active_consumer: bool | None = None,
        queue_type: Literal["classic", "stream"] | None = None,
        max_age_ms: int | None = None,
        stream_segment_bytes: int | None = None,
        stream_compression: Literal["none", "zstd"] | None = None,
    ) -> QueueInfo:
        """Declare a queue; an empty name asks the broker to pick a unique one.

        The queue arguments (see the spec's table) are keyword parameters, so a misspelt
        one fails here rather than at the broker; those left None are not sent (the
        broker's default applies). ``arguments`` still takes them as a map; naming one
        both ways with different values is a ``ValueError``. Redeclaring with different
        arguments fails with ``PreconditionFailed``.

        - ``ack_timeout_ms``: unacked this long, a delivery returns to the queue (0 = never)
        - ``delivery_limit``: dead-letter a message after this many deliveries
        - ``dead_letter_exchange`` / ``dead_letter_routing_key``: where dead letters go
        - ``message_ttl_ms``: messages expire this long after enqueue
        - ``expires_ms``: delete the queue after this long unused
        - ``max_priority``: 1..9 enables priority order (0 = FIFO)
        - ``max_length`` / ``max_length_bytes``: bound the ready messages
        - ``overflow``: at the bound, dead-letter the oldest ("drop-head") or nack the
          publish with ``QueueFull`` ("reject-publish")
        - ``dedup_window_ms``: drop a message_id seen within this window
        - ``single_active_consumer``: deliver to one consumer at a time
        - ``queue_type``: ``"stream"`` makes an append-only log read by offset (durable
          only; read it with :meth:`stream`); ``max_length_bytes`` then bounds its size
          on disk, ``max_age_ms`` its age (whole segments are deleted), and
          ``stream_segment_bytes`` sets the segment size; ``stream_compression="zstd"``
          stores its record batches zstd-compressed
        """
        args = _queue_arguments(
            arguments,
            {
                "ack_timeout_ms": ack_timeout_ms,
                "delivery_limit": delivery_limit,
                "dead_letter_exchange": dead_letter_exchange,
                "dead_letter_routing_key": dead_letter_routing_key,
                "message_ttl_ms": message_ttl_ms,
                "expires_ms": expires_ms,
                "max_priority": max_priority,
                "max_length": max_length,
                "max_length_bytes": max_length_bytes,
                "overflow": overflow,
                "dedup_window_ms": dedup_window_ms,
                "single_active_consumer": single_active_consumer,
                "queue_type": queue_type,
                "max_age_ms": max_age_ms,
                "stream_segment_bytes": stream_segment_bytes,
                "stream_compression": stream_compression,
            },
        )
        kw: dict[str, Any] = {
            "queue": name,
            "durable": durable,
            "exclusive": exclusive,
            "auto_delete": auto_delete,
            "passive": passive,
            "arguments": args,
        }
        ok = await self._request(QueueDeclare(next(self._rids), **kw))
        assert isinstance(ok, QueueDeclareOk)
        if not passive and name:
            self._topology[("queue", name)] = ("queue", kw)
        return QueueInfo(ok.queue, ok.message_count, ok.consumer_count)

    async def delete_queue(
        self, name: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> int:
        """Delete a queue; returns how many ready messages it held."""
        ok = await self._request(QueueDelete(next(self._rids), name, if_unused, if_empty))
        assert isinstance(ok, MessageCountOk)
        self._topology.pop(("queue", name), None)
        for key in [k for k in self._topology if k[0] == "bind" and k[2] == name]:
            del self._topology[key]
        return ok.message_count

    async def purge(self, name: str) -> int:
        """Remove every ready message; returns how many."""
        ok = await self._request(QueuePurge(next(self._rids), name))
        assert isinstance(ok, MessageCountOk)
        return ok.message_count

    async def bind(
        self,
        exchange: str,
        queue: str,
        routing_key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        kw: dict[str, Any] = {
            "exchange": exchange,
            "queue": queue,
            "routing_key": routing_key,
            "arguments": arguments or {},
        }
        await self._request(Bind(next(self._rids), **kw))
        self._topology[("bind", exchange, queue, routing_key)] = ("bind", kw)

    async def unbind(self, exchange: str, queue: str, routing_key: str = "") -> None:
        await self._request(Unbind(next(self._rids), exchange, queue, routing_key))
        self._topology.pop(("bind", exchange, queue, routing_key), None)

    async def list(self, kind: str) -> builtins.list[dict[str, Any]]:
        """``queues``, ``exchanges``, ``bindings``, ``consumers`` or ``connections`` as
        dicts (the typed methods below return the same as frozen dataclasses)."""
        ok = await self._request(List(next(self._rids), kind))
        assert isinstance(ok, ListOk)
        return ok.items

    async def queues(self) -> builtins.list[QueueListing]:
        """Every queue, by name."""
        return [_listing(QueueListing, r) for r in await self.list("queues")]

    async def exchanges(self) -> builtins.list[ExchangeListing]:
        """Every exchange (the built-in amq.* ones included), by name."""
        return [_listing(ExchangeListing, r) for r in await self.list("exchanges")]

    async def bindings(self) -> builtins.list[BindingListing]:
        return [_listing(BindingListing, r) for r in await self.list("bindings")]

    async def consumers(self) -> builtins.list[ConsumerListing]:
        """Every consumer on the broker, not only this connection's."""
        return [_listing(ConsumerListing, r) for r in await self.list("consumers")]

    async def connections(self) -> builtins.list[ConnectionListing]:
        """Every open connection (the HTTP gateway's included)."""
        return [_listing(ConnectionListing, r) for r in await self.list("connections")]

    async def _restore(self) -> bool:
        """Re-declare remembered topology, then restart consumers, before applications
        see the connection again (so nothing is published into a half-restored broker).
        Returns False if the connection was lost again meanwhile."""
        self.restore_errors = []
        proto = self._proto
        try:
            for kind, kwargs in list(self._topology.values()):
                try:
                    frame = _TOPOLOGY_FRAMES[kind](next(self._rids), **kwargs)
                    await self._request(frame, self.timeout, internal=True)
                except (ConnectionClosed, RequestTimeout):
                    raise
                except ConveyorError as exc:
                    self.restore_errors.append(f"{kind} {kwargs}: {exc}")
                    log.warning("could not restore %s %s: %s", kind, kwargs, exc)
            for c in list(self._consumers.values()):
                try:
                    await self.start_consumer(c, internal=True)
                except (ConnectionClosed, RequestTimeout):
                    raise
                except ConveyorError as exc:
                    self._consumers.pop(c.tag, None)
                    self.restore_errors.append(f"consumer {c.tag} on {c.queue}: {exc}")
                    c.fail(exc)
        except (ConnectionClosed, RequestTimeout):
            if self._proto is proto and proto is not None and proto.transport is not None:
                proto.transport.abort()  # a timeout: start over from a fresh connection
            return False
        return self._proto is proto
