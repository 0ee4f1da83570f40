"""Resource limits: what one message, one connection and the whole broker may use.

Each limit is a ``Config`` setting (TOML or ``mq-cli server --flag``) and each refusal
is a typed error from the spec's error table (spec/PROTOCOL.md, "Limits"):

=============================  ========  ==========================================
setting                        default   refusal
=============================  ========  ==========================================
max_headers                    128       publish nacked, 400 invalid-argument
max_header_bytes               65536     publish nacked, 413 message-too-large
max_connections                10000     AUTH answered ERROR 506 resource-error, close
max_connections_per_subject    1000      AUTH answered ERROR 506 resource-error, close
max_queues                     10000     QUEUE_DECLARE fails with 506 resource-error
max_queues_per_subject         1000      QUEUE_DECLARE fails with 506 resource-error
max_consumers_per_connection   1000      CONSUME fails with 506 resource-error
max_bindings_per_exchange      10000     BIND fails with 506 resource-error
max_bindings_per_queue         1000      BIND fails with 506 resource-error
max_binding_words              16        BIND (topic) fails with 400 invalid-argument
max_binding_wildcards          8         BIND (topic) fails with 400 invalid-argument
max_unacked_bytes_per_consumer 16 MiB    no refusal: dispatch waits for acks
max_unauthenticated            1000      the oldest unauthenticated connection: 506, close
max_unauthenticated_per_ip     100       the oldest one from that address: 506, close
=============================  ========  ==========================================

The binding limits bound what one publish to a topic exchange costs: routing visits each
trie node at most once (broker.topic), and the trie has at most bindings x words nodes
(with the defaults, the worst key against the worst 10,000 patterns costs ~15 ms; a
topic exchange remembers the answer for its last 1,024 keys).

Every refusal names the limit in ``details["limit"]`` together with its value, so a
client can tell which limit it hit. Limits that existed before (frame size, message size,
name lengths, the handshake timeout, heartbeats) stay where they were; see the spec.

Nothing here touches sockets: the transport, the session and the broker model call the
checks below at the point where a resource would be taken.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgpack

from conveyor.protocol import InvalidArgument, MalformedFrame, MessageTooLarge, ResourceError

DEFAULT_MAX_HEADERS = 128
DEFAULT_MAX_HEADER_BYTES = 64 << 10
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_MAX_CONNECTIONS_PER_SUBJECT = 1_000
DEFAULT_MAX_QUEUES = 10_000
DEFAULT_MAX_QUEUES_PER_SUBJECT = 1_000
DEFAULT_MAX_CONSUMERS_PER_CONNECTION = 1_000
DEFAULT_MAX_BINDINGS_PER_EXCHANGE = 10_000
DEFAULT_MAX_BINDINGS_PER_QUEUE = 1_000
DEFAULT_MAX_BINDING_WORDS = 16
DEFAULT_MAX_BINDING_WILDCARDS = 8
DEFAULT_MAX_UNACKED_BYTES_PER_CONSUMER = 16 << 20
DEFAULT_MAX_UNAUTHENTICATED = 1_000
DEFAULT_MAX_UNAUTHENTICATED_PER_IP = 100

U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits in force; every value is >= 1 (``broker.config.Config.validate``)."""

    max_headers: int = DEFAULT_MAX_HEADERS
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_subject: int = DEFAULT_MAX_CONNECTIONS_PER_SUBJECT
    max_queues: int = DEFAULT_MAX_QUEUES
    max_queues_per_subject: int = DEFAULT_MAX_QUEUES_PER_SUBJECT
    max_consumers_per_connection: int = DEFAULT_MAX_CONSUMERS_PER_CONNECTION
    max_bindings_per_exchange: int = DEFAULT_MAX_BINDINGS_PER_EXCHANGE
    max_bindings_per_queue: int = DEFAULT_MAX_BINDINGS_PER_QUEUE
    max_binding_words: int = DEFAULT_MAX_BINDING_WORDS
    max_binding_wildcards: int = DEFAULT_MAX_BINDING_WILDCARDS
    max_unacked_bytes_per_consumer: int = DEFAULT_MAX_UNACKED_BYTES_PER_CONSUMER
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED
    max_unauthenticated_per_ip: int = DEFAULT_MAX_UNAUTHENTICATED_PER_IP

    @classmethod
    def from_config(cls, config: Any) -> Limits:
        """The limits named in a ``Config`` (fields of the same names)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


# (setting, help) for the CLI flags and the config validation, in documentation order.
SETTINGS: tuple[tuple[str, str], ...] = (
    ("max_headers", "Most application headers per message (publish nacked 400)"),
    ("max_header_bytes", "Largest encoded headers map per message (publish nacked 413)"),
    ("max_connections", "Most open connections in total (AUTH refused 506)"),
    (
        "max_connections_per_subject",
        "Most open connections per authenticated subject (AUTH refused 506)",
    ),
    ("max_queues", "Most queues in the broker (QUEUE_DECLARE refused 506)"),
    (
        "max_queues_per_subject",
        "Most queues one token subject may create (QUEUE_DECLARE refused 506)",
    ),
    ("max_consumers_per_connection", "Most consumers on one connection (CONSUME refused 506)"),
    ("max_bindings_per_exchange", "Most bindings of one exchange (BIND refused 506)"),
    ("max_bindings_per_queue", "Most bindings to one queue (BIND refused 506)"),
    ("max_binding_words", "Most words in a topic binding pattern (BIND refused 400)"),
    (
        "max_binding_wildcards",
        "Most '*' and '#' words in a topic binding pattern (BIND refused 400)",
    ),
    (
        "max_unacked_bytes_per_consumer",
        "Most bytes of unacked deliveries one consumer holds (more wait for its acks)",
    ),
    (
        "max_unauthenticated",
        "Most connections still in the handshake; beyond, the oldest is closed (506)",
    ),
    (
        "max_unauthenticated_per_ip",
        "Most connections in the handshake from one address; beyond, its oldest is closed",
    ),
)


def validate(config: Any) -> str | None:
    """A one-line complaint about the limit settings of ``config``, or None."""
    for name, _help in SETTINGS:
        if getattr(config, name) < 1:
            return f"{name} must be >= 1"
    return None


# ---------------------------------------------------------------------- per message
def strip_broker_headers(properties: dict[str, Any]) -> None:
    """Remove client-supplied ``x-`` headers from published ``properties`` (in place).

    Headers starting ``x-`` are the broker's (``x-death``, ``x-stream-offset`` ...), as
    in RabbitMQ: a publisher cannot forge a death history the broker would then read
    (a malformed ``x-death`` once broke dead-lettering for every message of the same
    connection). Every publish path (binary PUBLISH*, the HTTP gateway) goes through
    :func:`publish_size`, which calls this first.
    """
    headers = properties.get("headers")
    if not isinstance(headers, dict) or not any(
        type(k) is str and k[:2].lower() == "x-" for k in headers
    ):
        return
    kept = {k: v for k, v in headers.items() if not (type(k) is str and k[:2].lower() == "x-")}
    if kept:
        properties["headers"] = kept
    else:
        del properties["headers"]


def publish_size(limits: Limits, properties: dict[str, Any], body: bytes) -> int:
    """Check a published message's headers; return its size (as ``message_size``).

    Client-supplied ``x-`` headers are removed first (:func:`strip_broker_headers`).
    Raises InvalidArgument (400) for too many headers and MessageTooLarge (413) for an
    encoded headers map over ``max_header_bytes``.
    """
    strip_broker_headers(properties)
    headers = properties.get("headers")
    if not headers:
        return len(body)
    n = len(headers)
    if n > limits.max_headers:
        raise InvalidArgument(
            f"message has {n} headers; the maximum is {limits.max_headers} (max_headers)",
            {"limit": "max_headers", "max_headers": limits.max_headers, "headers": n},
        )
    try:
        size = len(_packb(headers))
    except (ValueError, OverflowError, TypeError) as exc:  # nesting beyond the packer's
        raise InvalidArgument(
            f"headers cannot be stored: {exc}", {"limit": "max_header_bytes"}
        ) from None
    if size > limits.max_header_bytes:
        raise MessageTooLarge(
            f"headers of {size} bytes exceed the maximum of {limits.max_header_bytes} "
            "(max_header_bytes)",
            {
                "limit": "max_header_bytes",
                "max_header_bytes": limits.max_header_bytes,
                "header_bytes": size,
            },
        )
    return len(body) + size


def check_seq_range(first_seq: int, entries: int, frame: str = "publish_batch") -> None:
    """PUBLISH_BATCH / PUBLISH_RUN entry i has seq first_seq + i: every one must fit a
    uint64 (else 501: the CONFIRM for it could not be encoded)."""
    if first_seq and first_seq + entries - 1 > U64_MAX:
        raise MalformedFrame(
            f"{frame}: sequence numbers {first_seq}.. of {entries} entries pass 2^64-1",
            {"first_seq": first_seq, "entries": entries},
        )


# ---------------------------------------------------------------------- broker model
def check_queue_count(limits: Limits, queues: int) -> None:
    """Before creating a queue while ``queues`` exist (506 at the limit)."""
    if queues >= limits.max_queues:
        raise ResourceError(
            f"the broker already has {queues} queues; the maximum is {limits.max_queues} "
            "(max_queues)",
            {"limit": "max_queues", "max_queues": limits.max_queues},
        )


def check_consumer_count(limits: Limits, consumers: int) -> None:
    """Before adding a consumer to a connection that has ``consumers`` (506 at the limit)."""
    if consumers >= limits.max_consumers_per_connection:
        raise ResourceError(
            f"this connection already has {consumers} consumers; the maximum is "
            f"{limits.max_consumers_per_connection} (max_consumers_per_connection)",
            {
                "limit": "max_consumers_per_connection",
                "max_consumers_per_connection": limits.max_consumers_per_connection,
            },
        )


class QueueOwners:
    """Which subject created each queue, so one tenant cannot take every queue slot.

    Only restricted principals (a token's or a certificate's subject) are counted: the
    anonymous principal may do anything anyway and stays bounded by ``max_queues``.
    Queues recovered from the log at start have no recorded owner and count for nobody.
    """

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}
        self.per_subject: dict[str, int] = {}

    def check(self, limits: Limits, subject: str) -> None:
        """Before ``subject`` creates a queue (506 at its limit)."""
        n = self.per_subject.get(subject, 0)
        if n >= limits.max_queues_per_subject:
            raise ResourceError(
                f"{subject!r} already created {n} queues; the maximum is "
                f"{limits.max_queues_per_subject} (max_queues_per_subject)",
                {
                    "limit": "max_queues_per_subject",
                    "subject": subject,
                    "max_queues_per_subject": limits.max_queues_per_subject,
                },
            )

    def add(self, queue: str, subject: str) -> None:
        if queue not in self.owner:
            self.owner[queue] = subject
            self.per_subject[subject] = self.per_subject.get(subject, 0) + 1

    def remove(self, queue: str) -> None:
        _uncount(self.per_subject, self.owner.pop(queue, None))


def connection_subject(subject: str, anonymous: bool, peer_ip: str, uid: int | None = None) -> str:
    """What ``max_connections_per_subject`` counts a connection under: its subject, but
    for anonymous connections the peer address and, on loopback, the local user owning
    the client socket ("anonymous@127.0.0.1/uid:1000"; broker.peeruid), so anonymous
    clients of one address or user cannot lock out the others."""
    if not anonymous:
        return subject
    where = f"{subject}@{peer_ip or '?'}"
    return where if uid is None else f"{where}/uid:{uid}"


# ---------------------------------------------------------------------- file descriptors
FD_RESERVE = 256  # descriptors kept for log segments, page files, streams, HTTP


def raise_fd_limit(limits: Limits) -> tuple[int, str]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (at least what ``max_connections``
    needs); returns (the soft limit now, a warning or ""). Running out of
    descriptors never crashes the broker (accepting pauses), but it should not happen
    below max_connections."""
    import resource

    want = limits.max_connections + FD_RESERVE
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # as far as allowed (the hard limit): connections, not the default 1024, are what
        # the broker runs out of last
        target = max(want, 1 << 20) if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (ValueError, OSError) as exc:
        return 0, f"cannot read or raise the open-file limit: {exc}"
    if soft != resource.RLIM_INFINITY and soft < want:
        return soft, (
            f"open-file limit {soft} is below max_connections {limits.max_connections}"
            f" + {FD_RESERVE}: raise `ulimit -n` (hard limit) or lower "
            "max_connections"
        )
    return soft, ""


def check_binding(
    limits: Limits, topic: bool, key: str, exchange_bindings: int, queue_bindings: int
) -> None:
    """Before adding a binding: the pattern's words and wildcards (topic exchanges, 400)
    and the exchange's and the queue's binding counts (506 at the limit)."""
    if topic and key:
        words = key.split(".")
        if len(words) > limits.max_binding_words:
            raise InvalidArgument(
                f"binding key has {len(words)} words; the maximum is "
                f"{limits.max_binding_words} (max_binding_words)",
                {
                    "limit": "max_binding_words",
                    "max_binding_words": limits.max_binding_words,
                    "words": len(words),
                },
            )
        wild = sum(1 for w in words if w == "*" or w == "#")
        if wild > limits.max_binding_wildcards:
            raise InvalidArgument(
                f"binding key has {wild} '*'/'#' words; the maximum is "
                f"{limits.max_binding_wildcards} (max_binding_wildcards)",
                {
                    "limit": "max_binding_wildcards",
                    "max_binding_wildcards": limits.max_binding_wildcards,
                    "wildcards": wild,
                },
            )
    if exchange_bindings >= limits.max_bindings_per_exchange:
        raise ResourceError(
            f"the exchange already has {exchange_bindings} bindings; the maximum is "
            f"{limits.max_bindings_per_exchange} (max_bindings_per_exchange)",
            {
                "limit": "max_bindings_per_exchange",
                "max_bindings_per_exchange": limits.max_bindings_per_exchange,
            },
        )
    if queue_bindings >= limits.max_bindings_per_queue:
        raise ResourceError(
            f"the queue already has {queue_bindings} bindings; the maximum is "
            f"{limits.max_bindings_per_queue} (max_bindings_per_queue)",
            {
                "limit": "max_bindings_per_queue",
                "max_bindings_per_queue": limits.max_bindings_per_queue,
            },
        )


# ---------------------------------------------------------------------- connections
class ConnectionCounter:
    """Open connections, in total and per subject, admitted at AUTH and released on close.

    ``key`` is whatever identifies a connection to the caller (the transport protocol
    object); releasing a key that was never admitted is a no-op, so the transport can
    release unconditionally when a connection goes.
    """

    def __init__(self) -> None:
        self._subjects: dict[object, str] = {}
        self.per_subject: dict[str, int] = {}

    @property
    def total(self) -> int:
        return len(self._subjects)

    def admit(self, limits: Limits, key: object, subject: str) -> None:
        """Count ``key`` as an open connection of ``subject``, or raise ResourceError."""
        if key in self._subjects:
            return
        if self.total >= limits.max_connections:
            raise ResourceError(
                f"the broker already has {self.total} open connections; the maximum is "
                f"{limits.max_connections} (max_connections)",
                {"limit": "max_connections", "max_connections": limits.max_connections},
            )
        n = self.per_subject.get(subject, 0)
        if n >= limits.max_connections_per_subject:
            raise ResourceError(
                f"{subject!r} already has {n} open connections; the maximum is "
                f"{limits.max_connections_per_subject} (max_connections_per_subject)",
                {
                    "limit": "max_connections_per_subject",
                    "subject": subject,
                    "max_connections_per_subject": limits.max_connections_per_subject,
                },
            )
        self._subjects[key] = subject
        self.per_subject[subject] = n + 1

    def release(self, key: object) -> None:
        _uncount(self.per_subject, self._subjects.pop(key, None))


def _uncount(per_subject: dict[str, int], subject: str | None) -> None:
    """One fewer for ``subject`` (None: it was never counted); zero counts are removed."""
    if subject is None:
        return
    n = per_subject[subject] - 1
    if n:
        per_subject[subject] = n
    else:
        del per_subject[subject]
