"""Queue arguments (spec/protocol.toml [queue_arguments]) parsed into typed options.

The key names and wire types come from the generated table, so a key added to the spec
is accepted here only once this module knows what it means (unknown keys are 400).
"""

from __future__ import annotations

from typing import Any

from conveyor.protocol import InvalidArgument
from conveyor.protocol.limits import NAME_MAX, QUEUE_ARGUMENT_TYPES, U32_MAX, U64_MAX

ACK_TIMEOUT_DEFAULT_MS = 30 * 60 * 1000
OVERFLOW_MODES = ("drop-head", "reject-publish")
QUEUE_TYPES = ("classic", "stream")
STREAM_COMPRESSIONS = ("none", "zstd")
_LIMITS = {"u32": U32_MAX, "u64": U64_MAX, "priority": 9}


class QueueOptions:
    """What a queue's arguments ask for; defaults are what an absent key means."""

    __slots__ = (
        "ack_timeout_ms",
        "dead_letter_exchange",
        "dead_letter_routing_key",
        "dedup_window_ms",
        "delivery_limit",
        "expires_ms",
        "max_age_ms",
        "max_length",
        "max_length_bytes",
        "max_priority",
        "message_ttl_ms",
        "overflow",
        "queue_type",
        "single_active_consumer",
        "stream_compression",
        "stream_segment_bytes",
    )

    def __init__(self, arguments: dict[str, Any] | None = None) -> None:
        self.ack_timeout_ms = ACK_TIMEOUT_DEFAULT_MS
        self.delivery_limit = 0
        self.dead_letter_exchange: str | None = None
        self.dead_letter_routing_key: str | None = None
        self.message_ttl_ms = 0
        self.expires_ms = 0
        self.max_priority = 0
        self.max_length = 0
        self.max_length_bytes = 0
        self.overflow = "drop-head"
        self.dedup_window_ms = 0
        self.single_active_consumer = False
        self.queue_type = "classic"
        self.max_age_ms = 0
        self.stream_segment_bytes = 64 << 20
        self.stream_compression = "none"
        for key, value in (arguments or {}).items():
            setattr(self, key, _check(key, value))

    @property
    def rejects_publish(self) -> bool:
        return self.overflow == "reject-publish" and bool(self.max_length or self.max_length_bytes)


def _check(key: str, value: Any) -> Any:
    wire = QUEUE_ARGUMENT_TYPES.get(key)
    if wire is None:
        raise InvalidArgument(f"unknown queue argument {key!r}", {"argument": key})
    ok = False
    if wire in _LIMITS:
        ok = type(value) is int and 0 <= value <= _LIMITS[wire]
        want = f"an integer 0..{_LIMITS[wire]}"
    elif wire == "bool":
        ok = type(value) is bool
        want = "true or false"
    else:  # name
        ok = type(value) is str and len(value.encode()) <= NAME_MAX
        want = f"a string of at most {NAME_MAX} bytes"
        if ok and key == "overflow" and value not in OVERFLOW_MODES:
            ok, want = False, " or ".join(repr(m) for m in OVERFLOW_MODES)
        if ok and key == "queue_type" and value not in QUEUE_TYPES:
            ok, want = False, " or ".join(repr(m) for m in QUEUE_TYPES)
        if ok and key == "stream_compression" and value not in STREAM_COMPRESSIONS:
            ok, want = False, " or ".join(repr(m) for m in STREAM_COMPRESSIONS)
    if not ok:
        raise InvalidArgument(
            f"queue argument {key!r} must be {want}, got {value!r}", {"argument": key}
        )
    return value
