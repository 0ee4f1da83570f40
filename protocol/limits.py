"""The protocol's public limits and field validators (spec/protocol.toml).

Broker, client and tools import limits from here, never from ``protocol._generated`` or
``protocol._checks``: those are this package's internals (the generator may reshape
them), and tests/unit/test_protocol_connection.py keeps it that way.

Validators raise the wire error ``MalformedFrame`` naming the field, as the decoder does;
``Connection.send`` turns that into ``LocalProtocolError`` for frames of our own.
"""

from __future__ import annotations

from conveyor.protocol._checks import (
    NAME_MAX,
    NESTING_MAX,
    STR_MAX,
    U16_MAX,
    U32_MAX,
    U64_MAX,
    check_bool,
    check_bytes,
    check_str,
    check_table,
    check_uint,
)
from conveyor.protocol._generated import (
    CONSUME_ARGUMENT_TYPES,
    HEARTBEAT_MS_DEFAULT,
    HEARTBEAT_MS_FLOOR,
    MAX_FRAME_SIZE_CEILING,
    MAX_FRAME_SIZE_DEFAULT,
    MAX_FRAME_SIZE_FLOOR,
    MAX_FRAME_SIZE_PREAUTH,
    MAX_NESTING_DEPTH,
    MESSAGE_FRAME_OVERHEAD,
    NAME_FAST,
    PROPERTY_TYPES,
    QUEUE_ARGUMENT_TYPES,
    REPLIES,
    REPLY_CLASSES,
    STR_FAST,
    VERSION_MAJOR,
    VERSION_MINOR,
    check_props,
)

__all__ = [
    "CONSUME_ARGUMENT_TYPES",
    "HEARTBEAT_MS_DEFAULT",
    "HEARTBEAT_MS_FLOOR",
    "MAX_FRAME_SIZE_CEILING",
    "MAX_FRAME_SIZE_DEFAULT",
    "MAX_FRAME_SIZE_FLOOR",
    "MAX_FRAME_SIZE_PREAUTH",
    "MAX_NESTING_DEPTH",
    "MESSAGE_FRAME_OVERHEAD",
    "NAME_FAST",
    "NAME_MAX",
    "NESTING_MAX",
    "PROPERTY_TYPES",
    "QUEUE_ARGUMENT_TYPES",
    "REPLIES",
    "REPLY_CLASSES",
    "STR_FAST",
    "STR_MAX",
    "U16_MAX",
    "U32_MAX",
    "U64_MAX",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "check_bool",
    "check_bytes",
    "check_props",
    "check_str",
    "check_table",
    "check_uint",
]
