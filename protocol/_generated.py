"""Frame classes, codecs and error classes generated from spec/protocol.toml.

DO NOT EDIT: run ``python tools/gen_protocol.py`` after changing the spec.
"""

# ruff: noqa
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from conveyor.protocol._checks import (
    NAME_MAX, STR_MAX, U16_MAX, U32_MAX, U64_MAX, check_arity, check_binlist, check_bool, check_bytes,
    check_list, check_str, check_strlist, check_table, check_tablelist, check_uint, fail,
)
from conveyor.protocol.errors import FatalError, RemoteProtocolError, RequestError

_tuple_new = tuple.__new__
NAME_FAST = NAME_MAX // 4  # strings this short cannot exceed the byte limit
STR_FAST = STR_MAX // 4

MAGIC = b'CNVYMQ'
VERSION_MAJOR = 1
VERSION_MINOR = 2
PREAMBLE = MAGIC + bytes([VERSION_MAJOR, VERSION_MINOR])
DEFAULT_PORT = 5680
MAX_FRAME_SIZE_DEFAULT = 1048576
MAX_FRAME_SIZE_FLOOR = 4096
MAX_FRAME_SIZE_CEILING = 134217728
MAX_FRAME_SIZE_PREAUTH = 65536
HEARTBEAT_MS_DEFAULT = 10000
HEARTBEAT_MS_FLOOR = 200
MAX_NESTING_DEPTH = 32
MESSAGE_FRAME_OVERHEAD = 3072


# ------------------------------------------------------------------ errors


class NoRoute(RequestError):
    """A mandatory message matched no queue (RETURN)."""

    code = 312
    name = 'no-route'
    fatal = False
    retriable = False
    origin = 'peer'


class ConnectionForced(FatalError):
    """The server is shutting down or an operator closed the connection."""

    code = 320
    name = 'connection-forced'
    fatal = True
    retriable = True
    origin = 'server'


class InvalidArgument(RequestError):
    """A field value is well-formed but not acceptable (unknown exchange type, bad argument)."""

    code = 400
    name = 'invalid-argument'
    fatal = False
    retriable = False
    origin = 'peer'


class AuthenticationFailed(FatalError):
    """AUTH was refused."""

    code = 401
    name = 'authentication-failed'
    fatal = True
    retriable = False
    origin = 'peer'


class AccessRefused(RequestError):
    """The connection may not use that resource (reserved name, missing permission)."""

    code = 403
    name = 'access-refused'
    fatal = False
    retriable = False
    origin = 'peer'


class NotFound(RequestError):
    """The named exchange, queue or consumer does not exist."""

    code = 404
    name = 'not-found'
    fatal = False
    retriable = False
    origin = 'peer'


class ResourceLocked(RequestError):
    """Exclusive use by another connection or consumer."""

    code = 405
    name = 'resource-locked'
    fatal = False
    retriable = True
    origin = 'peer'


class PreconditionFailed(RequestError):
    """Redeclare with different settings, if-unused/if-empty failed, unknown delivery tag."""

    code = 406
    name = 'precondition-failed'
    fatal = False
    retriable = False
    origin = 'peer'


class HeartbeatTimeout(FatalError):
    """Nothing was received for two heartbeat intervals."""

    code = 408
    name = 'heartbeat-timeout'
    fatal = True
    retriable = True
    origin = 'peer'


class QueueFull(RequestError):
    """A queue with overflow reject-publish is at max_length or max_length_bytes; the publish is nacked. Retry once consumers drain it."""

    code = 409
    name = 'queue-full'
    fatal = False
    retriable = True
    origin = 'server'


class MessageTooLarge(RequestError):
    """A message exceeds the broker's maximum message size."""

    code = 413
    name = 'message-too-large'
    fatal = False
    retriable = False
    origin = 'peer'


class RateLimited(RequestError):
    """The publisher exceeded its rate; retry after a pause."""

    code = 429
    name = 'rate-limited'
    fatal = False
    retriable = True
    origin = 'peer'


class MalformedFrame(RemoteProtocolError):
    """Bad preamble, bad msgpack, wrong field count or field type, unknown frame type."""

    code = 501
    name = 'malformed-frame'
    fatal = True
    retriable = False
    origin = 'peer'


class FrameTooLarge(RemoteProtocolError):
    """A frame's length field exceeds the negotiated maximum frame size."""

    code = 502
    name = 'frame-too-large'
    fatal = True
    retriable = False
    origin = 'peer'


class UnexpectedFrame(RemoteProtocolError):
    """A valid frame not allowed in the current connection state or direction."""

    code = 503
    name = 'unexpected-frame'
    fatal = True
    retriable = False
    origin = 'peer'


class UnsupportedVersion(RemoteProtocolError):
    """The preamble asks for a protocol version the server does not speak."""

    code = 505
    name = 'unsupported-version'
    fatal = True
    retriable = False
    origin = 'peer'


class ResourceError(RequestError):
    """The server lacks a resource (memory, disk, a limit was reached)."""

    code = 506
    name = 'resource-error'
    fatal = False
    retriable = True
    origin = 'server'


class NotImplementedByServer(RequestError):
    """The request is valid but this server does not support it."""

    code = 540
    name = 'not-implemented'
    fatal = False
    retriable = False
    origin = 'peer'


class InternalError(RequestError):
    """A bug in the server; the request failed, the connection stays open."""

    code = 541
    name = 'internal-error'
    fatal = False
    retriable = True
    origin = 'server'


ERROR_CODES: dict[str, int] = {
    'ok': 200,
    'no-route': 312,
    'connection-forced': 320,
    'invalid-argument': 400,
    'authentication-failed': 401,
    'access-refused': 403,
    'not-found': 404,
    'resource-locked': 405,
    'precondition-failed': 406,
    'heartbeat-timeout': 408,
    'queue-full': 409,
    'message-too-large': 413,
    'rate-limited': 429,
    'malformed-frame': 501,
    'frame-too-large': 502,
    'unexpected-frame': 503,
    'unsupported-version': 505,
    'resource-error': 506,
    'not-implemented': 540,
    'internal-error': 541,
}

FATAL_CODES: frozenset[int] = frozenset({320, 401, 408, 501, 502, 503, 505})


# ------------------------------------------------------------------ properties
PROPERTY_TYPES: dict[str, str] = {
    'message_id': 'name',
    'correlation_id': 'name',
    'reply_to': 'name',
    'content_type': 'name',
    'content_encoding': 'name',
    'type': 'name',
    'app_id': 'name',
    'headers': 'table',
    'timestamp': 'u64',
    'ttl': 'u64',
    'priority': 'priority',
    'persistent': 'bool',
    'delay': 'u64',
}


def _check_prop(k: Any, x: Any, where: str) -> None:
    """One property, checked precisely (raises MalformedFrame naming it)."""
    if type(k) is not str:
        raise fail(where, "map keys must be strings")
    if k == 'message_id':
        check_str(x, NAME_MAX, where + '.' + k)
    elif k == 'correlation_id':
        check_str(x, NAME_MAX, where + '.' + k)
    elif k == 'reply_to':
        check_str(x, NAME_MAX, where + '.' + k)
    elif k == 'content_type':
        check_str(x, NAME_MAX, where + '.' + k)
    elif k == 'content_encoding':
        check_str(x, NAME_MAX, where + '.' + k)
    elif k == 'type':
        check_str(x, NAME_MAX, where + '.' + k)
    elif k == 'app_id':
        check_str(x, NAME_MAX, where + '.' + k)
    elif k == 'headers':
        check_table(x, where + '.' + k)
    elif k == 'timestamp':
        check_uint(x, U64_MAX, where + '.' + k)
    elif k == 'ttl':
        check_uint(x, U64_MAX, where + '.' + k)
    elif k == 'priority':
        check_uint(x, 9, where + '.' + k)
    elif k == 'persistent':
        check_bool(x, where + '.' + k)
    elif k == 'delay':
        check_uint(x, U64_MAX, where + '.' + k)
    else:
        raise fail(where, f"unknown property {k!r}")


_PROP_KIND: dict[str, int] = {
    'message_id': 0,  # name
    'correlation_id': 0,  # name
    'reply_to': 0,  # name
    'content_type': 0,  # name
    'content_encoding': 0,  # name
    'type': 0,  # name
    'app_id': 0,  # name
    'headers': 9,  # table
    'timestamp': 2,  # u64
    'ttl': 2,  # u64
    'priority': 9,  # priority
    'persistent': 1,  # bool
    'delay': 2,  # u64
}


def check_props(v: Any, where: str) -> dict[str, Any]:
    """Validate a message properties map: known keys with their types only.

    Runs per published message: the common valid case is a dict lookup and one
    inline guard per key; anything else is checked (and reported) by _check_prop."""
    if type(v) is not dict:
        check_table(v, where)
    kinds = _PROP_KIND
    for k, x in v.items():
        kind = kinds.get(k, 9) if type(k) is str else 9
        if kind == 0:
            if type(x) is str and len(x) <= NAME_FAST:
                continue
        elif kind == 1:
            if x is True or x is False:
                continue
        elif kind == 2:
            if type(x) is int and 0 <= x <= U64_MAX:
                continue
        _check_prop(k, x, where)
    return v  # type: ignore[no-any-return]


# ------------------------------------------------------------------ queue arguments
QUEUE_ARGUMENT_TYPES: dict[str, str] = {
    'ack_timeout_ms': 'u64',
    'delivery_limit': 'u32',
    'dead_letter_exchange': 'name',
    'dead_letter_routing_key': 'name',
    'message_ttl_ms': 'u64',
    'expires_ms': 'u64',
    'max_priority': 'priority',
    'max_length': 'u64',
    'max_length_bytes': 'u64',
    'overflow': 'name',
    'dedup_window_ms': 'u64',
    'single_active_consumer': 'bool',
    'queue_type': 'name',
    'max_age_ms': 'u64',
    'stream_segment_bytes': 'u64',
    'stream_compression': 'name',
}

CONSUME_ARGUMENT_TYPES: dict[str, str] = {
    'offset': 'any',
    'timestamp': 'u64',
    'group': 'name',
}


# ------------------------------------------------------------------ records


class PublishEntry(NamedTuple):
    """One message of a PUBLISH_BATCH. (treat field values as read-only)"""

    exchange: str = ''
    routing_key: str = ''
    properties: dict[str, Any] = {}
    body: bytes = b''
    mandatory: bool = False

    def to_wire(self) -> list[Any]:
        return list(self)

    @classmethod
    def from_wire(cls, f: Any, where: str = 'publish_entry') -> PublishEntry:
        check_arity(f, 0, 5, where)
        n = len(f)
        if n > 0:
            a0 = f[0]
            if type(a0) is not str or len(a0) > NAME_FAST:
                check_str(a0, NAME_MAX, where + ".exchange")
        else:
            a0 = ''
        if n > 1:
            a1 = f[1]
            if type(a1) is not str or len(a1) > NAME_FAST:
                check_str(a1, NAME_MAX, where + ".routing_key")
        else:
            a1 = ''
        if n > 2:
            a2 = f[2]
            if type(a2) is not dict or a2:
                check_props(a2, where + ".properties")
        else:
            a2 = {}
        if n > 3:
            a3 = f[3]
            if type(a3) is not bytes:
                check_bytes(a3, where + ".body")
        else:
            a3 = b''
        if n > 4:
            a4 = f[4]
            if a4 is not True and a4 is not False:
                check_bool(a4, where + ".mandatory")
        else:
            a4 = False
        return _tuple_new(cls, (a0, a1, a2, a3, a4,))

    @classmethod
    def list_from_wire(cls, v: Any, where: str) -> list[PublishEntry]:
        if type(v) is not list:
            check_list(v, where)
        out: list[PublishEntry] = []
        append = out.append
        for f in v:
            if type(f) is not list or len(f) != 5:
                append(cls.from_wire(f, where))
                continue
            a0 = f[0]
            if type(a0) is not str or len(a0) > NAME_FAST:
                check_str(a0, NAME_MAX, where + ".exchange")
            a1 = f[1]
            if type(a1) is not str or len(a1) > NAME_FAST:
                check_str(a1, NAME_MAX, where + ".routing_key")
            a2 = f[2]
            if type(a2) is not dict or a2:
                check_props(a2, where + ".properties")
            a3 = f[3]
            if type(a3) is not bytes:
                check_bytes(a3, where + ".body")
            a4 = f[4]
            if a4 is not True and a4 is not False:
                check_bool(a4, where + ".mandatory")
            append(_tuple_new(cls, f))
        return out


class DeliveryEntry(NamedTuple):
    """One message of a DELIVER_BATCH or GET_OK. (treat field values as read-only)"""

    delivery_tag: int
    redelivered: bool = False
    exchange: str = ''
    routing_key: str = ''
    properties: dict[str, Any] = {}
    body: bytes = b''
    delivery_count: int = 1

    def to_wire(self) -> list[Any]:
        return list(self)

    @classmethod
    def from_wire(cls, f: Any, where: str = 'delivery_entry') -> DeliveryEntry:
        check_arity(f, 1, 7, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 <= a0 <= U64_MAX:
            check_uint(a0, U64_MAX, where + ".delivery_tag")
        if n > 1:
            a1 = f[1]
            if a1 is not True and a1 is not False:
                check_bool(a1, where + ".redelivered")
        else:
            a1 = False
        if n > 2:
            a2 = f[2]
            if type(a2) is not str or len(a2) > NAME_FAST:
                check_str(a2, NAME_MAX, where + ".exchange")
        else:
            a2 = ''
        if n > 3:
            a3 = f[3]
            if type(a3) is not str or len(a3) > NAME_FAST:
                check_str(a3, NAME_MAX, where + ".routing_key")
        else:
            a3 = ''
        if n > 4:
            a4 = f[4]
            if type(a4) is not dict or a4:
                check_props(a4, where + ".properties")
        else:
            a4 = {}
        if n > 5:
            a5 = f[5]
            if type(a5) is not bytes:
                check_bytes(a5, where + ".body")
        else:
            a5 = b''
        if n > 6:
            a6 = f[6]
            if type(a6) is not int or not 0 <= a6 <= U32_MAX:
                check_uint(a6, U32_MAX, where + ".delivery_count")
        else:
            a6 = 1
        return _tuple_new(cls, (a0, a1, a2, a3, a4, a5, a6,))

    @classmethod
    def list_from_wire(cls, v: Any, where: str) -> list[DeliveryEntry]:
        if type(v) is not list:
            check_list(v, where)
        out: list[DeliveryEntry] = []
        append = out.append
        for f in v:
            if type(f) is not list or len(f) != 7:
                append(cls.from_wire(f, where))
                continue
            a0 = f[0]
            if type(a0) is not int or not 0 <= a0 <= U64_MAX:
                check_uint(a0, U64_MAX, where + ".delivery_tag")
            a1 = f[1]
            if a1 is not True and a1 is not False:
                check_bool(a1, where + ".redelivered")
            a2 = f[2]
            if type(a2) is not str or len(a2) > NAME_FAST:
                check_str(a2, NAME_MAX, where + ".exchange")
            a3 = f[3]
            if type(a3) is not str or len(a3) > NAME_FAST:
                check_str(a3, NAME_MAX, where + ".routing_key")
            a4 = f[4]
            if type(a4) is not dict or a4:
                check_props(a4, where + ".properties")
            a5 = f[5]
            if type(a5) is not bytes:
                check_bytes(a5, where + ".body")
            a6 = f[6]
            if type(a6) is not int or not 0 <= a6 <= U32_MAX:
                check_uint(a6, U32_MAX, where + ".delivery_count")
            append(_tuple_new(cls, f))
        return out


# ------------------------------------------------------------------ frames


class Frame:
    """Base of every frame: TYPE is the wire type byte, NAME the spec name."""

    __slots__ = ()
    TYPE: ClassVar[int]
    NAME: ClassVar[str]
    DIRECTION: ClassVar[str]

    def to_wire(self) -> list[Any]:
        raise NotImplementedError

    @classmethod
    def from_wire(cls, f: Any, where: str = '') -> Frame:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Hello(Frame):
    """First frame from the server after a valid preamble: what it speaks and its limits."""

    TYPE: ClassVar[int] = 0x01
    NAME: ClassVar[str] = 'hello'
    DIRECTION: ClassVar[str] = 'server'
    version: str
    max_frame_size: int
    heartbeat_ms: int
    server_properties: dict[str, Any] = field(default_factory=dict)
    auth_mechanisms: list[str] = field(default_factory=list)
    max_message_size: int = 0

    def to_wire(self) -> list[Any]:
        return [self.version, self.max_frame_size, self.heartbeat_ms, self.server_properties, self.auth_mechanisms, self.max_message_size]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'hello') -> Hello:
        check_arity(f, 3, 6, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not str or len(a0) > NAME_FAST:
            check_str(a0, NAME_MAX, where + ".version")
        a1 = f[1]
        if type(a1) is not int or not 0 <= a1 <= U32_MAX:
            check_uint(a1, U32_MAX, where + ".max_frame_size")
        a2 = f[2]
        if type(a2) is not int or not 0 <= a2 <= U32_MAX:
            check_uint(a2, U32_MAX, where + ".heartbeat_ms")
        if n > 3:
            a3 = f[3]
            if type(a3) is not dict or a3:
                check_table(a3, where + ".server_properties")
        else:
            a3 = {}
        if n > 4:
            a4 = check_strlist(f[4], where + ".auth_mechanisms")
        else:
            a4 = []
        if n > 5:
            a5 = f[5]
            if type(a5) is not int or not 0 <= a5 <= U32_MAX:
                check_uint(a5, U32_MAX, where + ".max_message_size")
        else:
            a5 = 0
        return cls(a0, a1, a2, a3, a4, a5)


@dataclass(frozen=True, slots=True)
class Auth(Frame):
    """Client's answer to HELLO: credentials and its own limits. Must be the first client frame."""

    TYPE: ClassVar[int] = 0x02
    NAME: ClassVar[str] = 'auth'
    DIRECTION: ClassVar[str] = 'client'
    mechanism: str = 'anonymous'
    token: str = ''
    client_properties: dict[str, Any] = field(default_factory=dict)
    max_frame_size: int = 0
    heartbeat_ms: int = 0
    compression: list[str] = field(default_factory=list)

    def to_wire(self) -> list[Any]:
        return [self.mechanism, self.token, self.client_properties, self.max_frame_size, self.heartbeat_ms, self.compression]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'auth') -> Auth:
        check_arity(f, 0, 6, where)
        n = len(f)
        if n > 0:
            a0 = f[0]
            if type(a0) is not str or len(a0) > NAME_FAST:
                check_str(a0, NAME_MAX, where + ".mechanism")
        else:
            a0 = 'anonymous'
        if n > 1:
            a1 = f[1]
            if type(a1) is not str or len(a1) > STR_FAST:
                check_str(a1, STR_MAX, where + ".token")
        else:
            a1 = ''
        if n > 2:
            a2 = f[2]
            if type(a2) is not dict or a2:
                check_table(a2, where + ".client_properties")
        else:
            a2 = {}
        if n > 3:
            a3 = f[3]
            if type(a3) is not int or not 0 <= a3 <= U32_MAX:
                check_uint(a3, U32_MAX, where + ".max_frame_size")
        else:
            a3 = 0
        if n > 4:
            a4 = f[4]
            if type(a4) is not int or not 0 <= a4 <= U32_MAX:
                check_uint(a4, U32_MAX, where + ".heartbeat_ms")
        else:
            a4 = 0
        if n > 5:
            a5 = check_strlist(f[5], where + ".compression")
        else:
            a5 = []
        return cls(a0, a1, a2, a3, a4, a5)


@dataclass(frozen=True, slots=True)
class OpenOk(Frame):
    """Authentication succeeded; the connection is open with the negotiated limits."""

    TYPE: ClassVar[int] = 0x03
    NAME: ClassVar[str] = 'open_ok'
    DIRECTION: ClassVar[str] = 'server'
    connection_id: str
    max_frame_size: int
    heartbeat_ms: int
    compression: str = ''
    max_message_size: int = 0

    def to_wire(self) -> list[Any]:
        return [self.connection_id, self.max_frame_size, self.heartbeat_ms, self.compression, self.max_message_size]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'open_ok') -> OpenOk:
        check_arity(f, 3, 5, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not str or len(a0) > NAME_FAST:
            check_str(a0, NAME_MAX, where + ".connection_id")
        a1 = f[1]
        if type(a1) is not int or not 0 <= a1 <= U32_MAX:
            check_uint(a1, U32_MAX, where + ".max_frame_size")
        a2 = f[2]
        if type(a2) is not int or not 0 <= a2 <= U32_MAX:
            check_uint(a2, U32_MAX, where + ".heartbeat_ms")
        if n > 3:
            a3 = f[3]
            if type(a3) is not str or len(a3) > NAME_FAST:
                check_str(a3, NAME_MAX, where + ".compression")
        else:
            a3 = ''
        if n > 4:
            a4 = f[4]
            if type(a4) is not int or not 0 <= a4 <= U32_MAX:
                check_uint(a4, U32_MAX, where + ".max_message_size")
        else:
            a4 = 0
        return cls(a0, a1, a2, a3, a4)


@dataclass(frozen=True, slots=True)
class Heartbeat(Frame):
    """Keep-alive; sent when nothing else was sent for heartbeat_ms."""

    TYPE: ClassVar[int] = 0x04
    NAME: ClassVar[str] = 'heartbeat'
    DIRECTION: ClassVar[str] = 'both'

    def to_wire(self) -> list[Any]:
        return []

    @classmethod
    def from_wire(cls, f: Any, where: str = 'heartbeat') -> Heartbeat:
        check_arity(f, 0, 0, where)
        return cls()


@dataclass(frozen=True, slots=True)
class Close(Frame):
    """Orderly shutdown. The receiver answers CLOSE_OK and closes the transport."""

    TYPE: ClassVar[int] = 0x05
    NAME: ClassVar[str] = 'close'
    DIRECTION: ClassVar[str] = 'both'
    code: int = 200
    message: str = ''

    def to_wire(self) -> list[Any]:
        return [self.code, self.message]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'close') -> Close:
        check_arity(f, 0, 2, where)
        n = len(f)
        if n > 0:
            a0 = f[0]
            if type(a0) is not int or not 0 <= a0 <= U16_MAX:
                check_uint(a0, U16_MAX, where + ".code")
        else:
            a0 = 200
        if n > 1:
            a1 = f[1]
            if type(a1) is not str or len(a1) > STR_FAST:
                check_str(a1, STR_MAX, where + ".message")
        else:
            a1 = ''
        return cls(a0, a1)


@dataclass(frozen=True, slots=True)
class CloseOk(Frame):
    """Acknowledges CLOSE; the transport is closed after it."""

    TYPE: ClassVar[int] = 0x06
    NAME: ClassVar[str] = 'close_ok'
    DIRECTION: ClassVar[str] = 'both'

    def to_wire(self) -> list[Any]:
        return []

    @classmethod
    def from_wire(cls, f: Any, where: str = 'close_ok') -> CloseOk:
        check_arity(f, 0, 0, where)
        return cls()


@dataclass(frozen=True, slots=True)
class Error(Frame):
    """A request failed (rid of that request) or the connection failed (rid 0). If the code is fatal the server closes the transport after this frame."""

    TYPE: ClassVar[int] = 0x07
    NAME: ClassVar[str] = 'error'
    DIRECTION: ClassVar[str] = 'server'
    rid: int
    code: int
    message: str = ''
    details: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> list[Any]:
        return [self.rid, self.code, self.message, self.details]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'error') -> Error:
        check_arity(f, 2, 4, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 <= a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid")
        a1 = f[1]
        if type(a1) is not int or not 0 <= a1 <= U16_MAX:
            check_uint(a1, U16_MAX, where + ".code")
        if n > 2:
            a2 = f[2]
            if type(a2) is not str or len(a2) > STR_FAST:
                check_str(a2, STR_MAX, where + ".message")
        else:
            a2 = ''
        if n > 3:
            a3 = f[3]
            if type(a3) is not dict or a3:
                check_table(a3, where + ".details")
        else:
            a3 = {}
        return cls(a0, a1, a2, a3)


@dataclass(frozen=True, slots=True)
class Ok(Frame):
    """Generic success reply for requests that return nothing else."""

    TYPE: ClassVar[int] = 0x08
    NAME: ClassVar[str] = 'ok'
    DIRECTION: ClassVar[str] = 'server'
    rid: int

    def to_wire(self) -> list[Any]:
        return [self.rid]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'ok') -> Ok:
        check_arity(f, 1, 1, where)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        return cls(a0)


@dataclass(frozen=True, slots=True)
class Compressed(Frame):
    """Only after OPEN_OK.compression = "zstd": carries one PUBLISH_BATCH, PUBLISH_RUN, DELIVER_BATCH or DELIVER_RUN whose field list is msgpack-encoded then zstd-compressed. The receiver decodes it as the inner frame. Unnegotiated: 503 unexpected-frame."""

    TYPE: ClassVar[int] = 0x09
    NAME: ClassVar[str] = 'compressed'
    DIRECTION: ClassVar[str] = 'both'
    inner_type: int
    data: bytes

    def to_wire(self) -> list[Any]:
        return [self.inner_type, self.data]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'compressed') -> Compressed:
        check_arity(f, 2, 2, where)
        a0 = f[0]
        if type(a0) is not int or not 0 <= a0 <= U16_MAX:
            check_uint(a0, U16_MAX, where + ".inner_type")
        a1 = f[1]
        if type(a1) is not bytes:
            check_bytes(a1, where + ".data")
        return cls(a0, a1)


@dataclass(frozen=True, slots=True)
class ExchangeDeclare(Frame):
    """Create an exchange, or check an existing one matches. Reply: OK."""

    TYPE: ClassVar[int] = 0x10
    NAME: ClassVar[str] = 'exchange_declare'
    DIRECTION: ClassVar[str] = 'client'
    rid: int
    exchange: str
    type: str = 'direct'
    durable: bool = True
    auto_delete: bool = False
    passive: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> list[Any]:
        return [self.rid, self.exchange, self.type, self.durable, self.auto_delete, self.passive, self.arguments]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'exchange_declare') -> ExchangeDeclare:
        check_arity(f, 2, 7, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        a1 = f[1]
        if type(a1) is not str or len(a1) > NAME_FAST:
            check_str(a1, NAME_MAX, where + ".exchange")
        if n > 2:
            a2 = f[2]
            if type(a2) is not str or len(a2) > NAME_FAST:
                check_str(a2, NAME_MAX, where + ".type")
        else:
            a2 = 'direct'
        if n > 3:
            a3 = f[3]
            if a3 is not True and a3 is not False:
                check_bool(a3, where + ".durable")
        else:
            a3 = True
        if n > 4:
            a4 = f[4]
            if a4 is not True and a4 is not False:
                check_bool(a4, where + ".auto_delete")
        else:
            a4 = False
        if n > 5:
            a5 = f[5]
            if a5 is not True and a5 is not False:
                check_bool(a5, where + ".passive")
        else:
            a5 = False
        if n > 6:
            a6 = f[6]
            if type(a6) is not dict or a6:
                check_table(a6, where + ".arguments")
        else:
            a6 = {}
        return cls(a0, a1, a2, a3, a4, a5, a6)


@dataclass(frozen=True, slots=True)
class ExchangeDelete(Frame):
    """Delete an exchange and its bindings. Reply: OK."""

    TYPE: ClassVar[int] = 0x11
    NAME: ClassVar[str] = 'exchange_delete'
    DIRECTION: ClassVar[str] = 'client'
    rid: int
    exchange: str
    if_unused: bool = False

    def to_wire(self) -> list[Any]:
        return [self.rid, self.exchange, self.if_unused]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'exchange_delete') -> ExchangeDelete:
        check_arity(f, 2, 3, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        a1 = f[1]
        if type(a1) is not str or len(a1) > NAME_FAST:
            check_str(a1, NAME_MAX, where + ".exchange")
        if n > 2:
            a2 = f[2]
            if a2 is not True and a2 is not False:
                check_bool(a2, where + ".if_unused")
        else:
            a2 = False
        return cls(a0, a1, a2)


@dataclass(frozen=True, slots=True)
class QueueDeclare(Frame):
    """Create a queue, or check an existing one matches. Reply: QUEUE_DECLARE_OK."""

    TYPE: ClassVar[int] = 0x12
    NAME: ClassVar[str] = 'queue_declare'
    DIRECTION: ClassVar[str] = 'client'
    rid: int
    queue: str = ''
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    passive: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> list[Any]:
        return [self.rid, self.queue, self.durable, self.exclusive, self.auto_delete, self.passive, self.arguments]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'queue_declare') -> QueueDeclare:
        check_arity(f, 1, 7, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        if n > 1:
            a1 = f[1]
            if type(a1) is not str or len(a1) > NAME_FAST:
                check_str(a1, NAME_MAX, where + ".queue")
        else:
            a1 = ''
        if n > 2:
            a2 = f[2]
            if a2 is not True and a2 is not False:
                check_bool(a2, where + ".durable")
        else:
            a2 = True
        if n > 3:
            a3 = f[3]
            if a3 is not True and a3 is not False:
                check_bool(a3, where + ".exclusive")
        else:
            a3 = False
        if n > 4:
            a4 = f[4]
            if a4 is not True and a4 is not False:
                check_bool(a4, where + ".auto_delete")
        else:
            a4 = False
        if n > 5:
            a5 = f[5]
            if a5 is not True and a5 is not False:
                check_bool(a5, where + ".passive")
        else:
            a5 = False
        if n > 6:
            a6 = f[6]
            if type(a6) is not dict or a6:
                check_table(a6, where + ".arguments")
        else:
            a6 = {}
        return cls(a0, a1, a2, a3, a4, a5, a6)


@dataclass(frozen=True, slots=True)
class QueueDeclareOk(Frame):
    """Reply to QUEUE_DECLARE."""

    TYPE: ClassVar[int] = 0x13
    NAME: ClassVar[str] = 'queue_declare_ok'
    DIRECTION: ClassVar[str] = 'server'
    rid: int
    queue: str
    message_count: int = 0
    consumer_count: int = 0

    def to_wire(self) -> list[Any]:
        return [self.rid, self.queue, self.message_count, self.consumer_count]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'queue_declare_ok') -> QueueDeclareOk:
        check_arity(f, 2, 4, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        a1 = f[1]
        if type(a1) is not str or len(a1) > NAME_FAST:
            check_str(a1, NAME_MAX, where + ".queue")
        if n > 2:
            a2 = f[2]
            if type(a2) is not int or not 0 <= a2 <= U64_MAX:
                check_uint(a2, U64_MAX, where + ".message_count")
        else:
            a2 = 0
        if n > 3:
            a3 = f[3]
            if type(a3) is not int or not 0 <= a3 <= U32_MAX:
                check_uint(a3, U32_MAX, where + ".consumer_count")
        else:
            a3 = 0
        return cls(a0, a1, a2, a3)


@dataclass(frozen=True, slots=True)
class QueueDelete(Frame):
    """Delete a queue; its consumers are cancelled (CANCELLED). Reply: MESSAGE_COUNT_OK."""

    TYPE: ClassVar[int] = 0x14
    NAME: ClassVar[str] = 'queue_delete'
    DIRECTION: ClassVar[str] = 'client'
    rid: int
    queue: str
    if_unused: bool = False
    if_empty: bool = False

    def to_wire(self) -> list[Any]:
        return [self.rid, self.queue, self.if_unused, self.if_empty]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'queue_delete') -> QueueDelete:
        check_arity(f, 2, 4, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        a1 = f[1]
        if type(a1) is not str or len(a1) > NAME_FAST:
            check_str(a1, NAME_MAX, where + ".queue")
        if n > 2:
            a2 = f[2]
            if a2 is not True and a2 is not False:
                check_bool(a2, where + ".if_unused")
        else:
            a2 = False
        if n > 3:
            a3 = f[3]
            if a3 is not True and a3 is not False:
                check_bool(a3, where + ".if_empty")
        else:
            a3 = False
        return cls(a0, a1, a2, a3)


@dataclass(frozen=True, slots=True)
class QueuePurge(Frame):
    """Remove all ready messages (not unacked ones). Reply: MESSAGE_COUNT_OK."""

    TYPE: ClassVar[int] = 0x15
    NAME: ClassVar[str] = 'queue_purge'
    DIRECTION: ClassVar[str] = 'client'
    rid: int
    queue: str

    def to_wire(self) -> list[Any]:
        return [self.rid, self.queue]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'queue_purge') -> QueuePurge:
        check_arity(f, 2, 2, where)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        a1 = f[1]
        if type(a1) is not str or len(a1) > NAME_FAST:
            check_str(a1, NAME_MAX, where + ".queue")
        return cls(a0, a1)


@dataclass(frozen=True, slots=True)
class MessageCountOk(Frame):
    """Reply to QUEUE_DELETE and QUEUE_PURGE: how many messages were removed."""

    TYPE: ClassVar[int] = 0x16
    NAME: ClassVar[str] = 'message_count_ok'
    DIRECTION: ClassVar[str] = 'server'
    rid: int
    message_count: int = 0

    def to_wire(self) -> list[Any]:
        return [self.rid, self.message_count]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'message_count_ok') -> MessageCountOk:
        check_arity(f, 1, 2, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        if n > 1:
            a1 = f[1]
            if type(a1) is not int or not 0 <= a1 <= U64_MAX:
                check_uint(a1, U64_MAX, where + ".message_count")
        else:
            a1 = 0
        return cls(a0, a1)


@dataclass(frozen=True, slots=True)
class Bind(Frame):
    """Route messages from an exchange to a queue. Idempotent. Reply: OK."""

    TYPE: ClassVar[int] = 0x17
    NAME: ClassVar[str] = 'bind'
    DIRECTION: ClassVar[str] = 'client'
    rid: int
    exchange: str
    queue: str
    routing_key: str = ''
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> list[Any]:
        return [self.rid, self.exchange, self.queue, self.routing_key, self.arguments]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'bind') -> Bind:
        check_arity(f, 3, 5, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        a1 = f[1]
        if type(a1) is not str or len(a1) > NAME_FAST:
            check_str(a1, NAME_MAX, where + ".exchange")
        a2 = f[2]
        if type(a2) is not str or len(a2) > NAME_FAST:
            check_str(a2, NAME_MAX, where + ".queue")
        if n > 3:
            a3 = f[3]
            if type(a3) is not str or len(a3) > NAME_FAST:
                check_str(a3, NAME_MAX, where + ".routing_key")
        else:
            a3 = ''
        if n > 4:
            a4 = f[4]
            if type(a4) is not dict or a4:
                check_table(a4, where + ".arguments")
        else:
            a4 = {}
        return cls(a0, a1, a2, a3, a4)


@dataclass(frozen=True, slots=True)
class Unbind(Frame):
    """Remove a binding. Removing a binding that does not exist succeeds. Reply: OK."""

    TYPE: ClassVar[int] = 0x18
    NAME: ClassVar[str] = 'unbind'
    DIRECTION: ClassVar[str] = 'client'
    rid: int
    exchange: str
    queue: str
    routing_key: str = ''
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> list[Any]:
        return [self.rid, self.exchange, self.queue, self.routing_key, self.arguments]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'unbind') -> Unbind:
        check_arity(f, 3, 5, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        a1 = f[1]
        if type(a1) is not str or len(a1) > NAME_FAST:
            check_str(a1, NAME_MAX, where + ".exchange")
        a2 = f[2]
        if type(a2) is not str or len(a2) > NAME_FAST:
            check_str(a2, NAME_MAX, where + ".queue")
        if n > 3:
            a3 = f[3]
            if type(a3) is not str or len(a3) > NAME_FAST:
                check_str(a3, NAME_MAX, where + ".routing_key")
        else:
            a3 = ''
        if n > 4:
            a4 = f[4]
            if type(a4) is not dict or a4:
                check_table(a4, where + ".arguments")
        else:
            a4 = {}
        return cls(a0, a1, a2, a3, a4)


@dataclass(frozen=True, slots=True)
class List(Frame):
    """List broker objects for tools. Reply: LIST_OK."""

    TYPE: ClassVar[int] = 0x19
    NAME: ClassVar[str] = 'list'
    DIRECTION: ClassVar[str] = 'client'
    rid: int
    kind: str

    def to_wire(self) -> list[Any]:
        return [self.rid, self.kind]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'list') -> List:
        check_arity(f, 2, 2, where)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        a1 = f[1]
        if type(a1) is not str or len(a1) > NAME_FAST:
            check_str(a1, NAME_MAX, where + ".kind")
        return cls(a0, a1)


@dataclass(frozen=True, slots=True)
class ListOk(Frame):
    """Reply to LIST: one table per object (fields listed in PROTOCOL.md)."""

    TYPE: ClassVar[int] = 0x1a
    NAME: ClassVar[str] = 'list_ok'
    DIRECTION: ClassVar[str] = 'server'
    rid: int
    items: list[dict[str, Any]] = field(default_factory=list)

    def to_wire(self) -> list[Any]:
        return [self.rid, self.items]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'list_ok') -> ListOk:
        check_arity(f, 1, 2, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        if n > 1:
            a1 = check_tablelist(f[1], where + ".items")
        else:
            a1 = []
        return cls(a0, a1)


@dataclass(frozen=True, slots=True)
class Publish(Frame):
    """Publish one message. Confirmed with CONFIRM when seq > 0."""

    TYPE: ClassVar[int] = 0x20
    NAME: ClassVar[str] = 'publish'
    DIRECTION: ClassVar[str] = 'client'
    seq: int
    exchange: str = ''
    routing_key: str = ''
    properties: dict[str, Any] = field(default_factory=dict)
    body: bytes = b''
    mandatory: bool = False

    def to_wire(self) -> list[Any]:
        return [self.seq, self.exchange, self.routing_key, self.properties, self.body, self.mandatory]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'publish') -> Publish:
        check_arity(f, 1, 6, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 <= a0 <= U64_MAX:
            check_uint(a0, U64_MAX, where + ".seq")
        if n > 1:
            a1 = f[1]
            if type(a1) is not str or len(a1) > NAME_FAST:
                check_str(a1, NAME_MAX, where + ".exchange")
        else:
            a1 = ''
        if n > 2:
            a2 = f[2]
            if type(a2) is not str or len(a2) > NAME_FAST:
                check_str(a2, NAME_MAX, where + ".routing_key")
        else:
            a2 = ''
        if n > 3:
            a3 = f[3]
            if type(a3) is not dict or a3:
                check_props(a3, where + ".properties")
        else:
            a3 = {}
        if n > 4:
            a4 = f[4]
            if type(a4) is not bytes:
                check_bytes(a4, where + ".body")
        else:
            a4 = b''
        if n > 5:
            a5 = f[5]
            if a5 is not True and a5 is not False:
                check_bool(a5, where + ".mandatory")
        else:
            a5 = False
        return cls(a0, a1, a2, a3, a4, a5)


@dataclass(frozen=True, slots=True)
class PublishBatch(Frame):
    """Publish many messages in one frame; entry i has sequence number first_seq + i."""

    TYPE: ClassVar[int] = 0x21
    NAME: ClassVar[str] = 'publish_batch'
    DIRECTION: ClassVar[str] = 'client'
    first_seq: int
    entries: list[PublishEntry]

    def to_wire(self) -> list[Any]:
        return [self.first_seq, [list(e) for e in self.entries]]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'publish_batch') -> PublishBatch:
        check_arity(f, 2, 2, where)
        a0 = f[0]
        if type(a0) is not int or not 0 <= a0 <= U64_MAX:
            check_uint(a0, U64_MAX, where + ".first_seq")
        a1 = PublishEntry.list_from_wire(f[1], where + ".entries")
        return cls(a0, a1)


@dataclass(frozen=True, slots=True)
class PublishRun(Frame):
    """Since 1.1. Publish many messages that share exchange, routing key, properties and mandatory in one frame: PUBLISH_BATCH without repeating the shared fields. Body i has sequence number first_seq + i. Sent only if HELLO.version is 1.1 or later."""

    TYPE: ClassVar[int] = 0x25
    NAME: ClassVar[str] = 'publish_run'
    DIRECTION: ClassVar[str] = 'client'
    first_seq: int
    exchange: str
    routing_key: str
    properties: dict[str, Any]
    mandatory: bool
    bodies: list[bytes]

    def to_wire(self) -> list[Any]:
        return [self.first_seq, self.exchange, self.routing_key, self.properties, self.mandatory, self.bodies]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'publish_run') -> PublishRun:
        check_arity(f, 6, 6, where)
        a0 = f[0]
        if type(a0) is not int or not 0 <= a0 <= U64_MAX:
            check_uint(a0, U64_MAX, where + ".first_seq")
        a1 = f[1]
        if type(a1) is not str or len(a1) > NAME_FAST:
            check_str(a1, NAME_MAX, where + ".exchange")
        a2 = f[2]
        if type(a2) is not str or len(a2) > NAME_FAST:
            check_str(a2, NAME_MAX, where + ".routing_key")
        a3 = f[3]
        if type(a3) is not dict or a3:
            check_props(a3, where + ".properties")
        a4 = f[4]
        if a4 is not True and a4 is not False:
            check_bool(a4, where + ".mandatory")
        a5 = check_binlist(f[5], where + ".bodies")
        return cls(a0, a1, a2, a3, a4, a5)


@dataclass(frozen=True, slots=True)
class Confirm(Frame):
    """Confirms (ack = true) or refuses (ack = false) every publish with first_seq <= seq <= last_seq."""

    TYPE: ClassVar[int] = 0x22
    NAME: ClassVar[str] = 'confirm'
    DIRECTION: ClassVar[str] = 'server'
    first_seq: int
    last_seq: int
    ack: bool = True
    code: int = 0
    message: str = ''

    def to_wire(self) -> list[Any]:
        return [self.first_seq, self.last_seq, self.ack, self.code, self.message]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'confirm') -> Confirm:
        check_arity(f, 2, 5, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 <= a0 <= U64_MAX:
            check_uint(a0, U64_MAX, where + ".first_seq")
        a1 = f[1]
        if type(a1) is not int or not 0 <= a1 <= U64_MAX:
            check_uint(a1, U64_MAX, where + ".last_seq")
        if n > 2:
            a2 = f[2]
            if a2 is not True and a2 is not False:
                check_bool(a2, where + ".ack")
        else:
            a2 = True
        if n > 3:
            a3 = f[3]
            if type(a3) is not int or not 0 <= a3 <= U16_MAX:
                check_uint(a3, U16_MAX, where + ".code")
        else:
            a3 = 0
        if n > 4:
            a4 = f[4]
            if type(a4) is not str or len(a4) > STR_FAST:
                check_str(a4, STR_MAX, where + ".message")
        else:
            a4 = ''
        return cls(a0, a1, a2, a3, a4)


@dataclass(frozen=True, slots=True)
class Return(Frame):
    """A mandatory message no queue took. Sent before that message's CONFIRM."""

    TYPE: ClassVar[int] = 0x23
    NAME: ClassVar[str] = 'return'
    DIRECTION: ClassVar[str] = 'server'
    seq: int = 0
    code: int = 312
    message: str = ''
    exchange: str = ''
    routing_key: str = ''
    properties: dict[str, Any] = field(default_factory=dict)
    body: bytes = b''

    def to_wire(self) -> list[Any]:
        return [self.seq, self.code, self.message, self.exchange, self.routing_key, self.properties, self.body]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'return') -> Return:
        check_arity(f, 0, 7, where)
        n = len(f)
        if n > 0:
            a0 = f[0]
            if type(a0) is not int or not 0 <= a0 <= U64_MAX:
                check_uint(a0, U64_MAX, where + ".seq")
        else:
            a0 = 0
        if n > 1:
            a1 = f[1]
            if type(a1) is not int or not 0 <= a1 <= U16_MAX:
                check_uint(a1, U16_MAX, where + ".code")
        else:
            a1 = 312
        if n > 2:
            a2 = f[2]
            if type(a2) is not str or len(a2) > STR_FAST:
                check_str(a2, STR_MAX, where + ".message")
        else:
            a2 = ''
        if n > 3:
            a3 = f[3]
            if type(a3) is not str or len(a3) > NAME_FAST:
                check_str(a3, NAME_MAX, where + ".exchange")
        else:
            a3 = ''
        if n > 4:
            a4 = f[4]
            if type(a4) is not str or len(a4) > NAME_FAST:
                check_str(a4, NAME_MAX, where + ".routing_key")
        else:
            a4 = ''
        if n > 5:
            a5 = f[5]
            if type(a5) is not dict or a5:
                check_props(a5, where + ".properties")
        else:
            a5 = {}
        if n > 6:
            a6 = f[6]
            if type(a6) is not bytes:
                check_bytes(a6, where + ".body")
        else:
            a6 = b''
        return cls(a0, a1, a2, a3, a4, a5, a6)


@dataclass(frozen=True, slots=True)
class PublishCredit(Frame):
    """Publisher flow control: adds credit (messages and body bytes) the client may publish with. Sent right after OPEN_OK, then as credit frees up. No reply."""

    TYPE: ClassVar[int] = 0x24
    NAME: ClassVar[str] = 'publish_credit'
    DIRECTION: ClassVar[str] = 'server'
    messages: int = 0
    bytes: int = 0
    blocked: str = ''

    def to_wire(self) -> list[Any]:
        return [self.messages, self.bytes, self.blocked]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'publish_credit') -> PublishCredit:
        check_arity(f, 0, 3, where)
        n = len(f)
        if n > 0:
            a0 = f[0]
            if type(a0) is not int or not 0 <= a0 <= U32_MAX:
                check_uint(a0, U32_MAX, where + ".messages")
        else:
            a0 = 0
        if n > 1:
            a1 = f[1]
            if type(a1) is not int or not 0 <= a1 <= U64_MAX:
                check_uint(a1, U64_MAX, where + ".bytes")
        else:
            a1 = 0
        if n > 2:
            a2 = f[2]
            if type(a2) is not str or len(a2) > NAME_FAST:
                check_str(a2, NAME_MAX, where + ".blocked")
        else:
            a2 = ''
        return cls(a0, a1, a2)


@dataclass(frozen=True, slots=True)
class Consume(Frame):
    """Start a push consumer on a queue. Reply: CONSUME_OK. Deliveries need credit (CREDIT)."""

    TYPE: ClassVar[int] = 0x30
    NAME: ClassVar[str] = 'consume'
    DIRECTION: ClassVar[str] = 'client'
    rid: int
    queue: str
    consumer_tag: str = ''
    no_ack: bool = False
    exclusive: bool = False
    credit: int = 0
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> list[Any]:
        return [self.rid, self.queue, self.consumer_tag, self.no_ack, self.exclusive, self.credit, self.arguments]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'consume') -> Consume:
        check_arity(f, 2, 7, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        a1 = f[1]
        if type(a1) is not str or len(a1) > NAME_FAST:
            check_str(a1, NAME_MAX, where + ".queue")
        if n > 2:
            a2 = f[2]
            if type(a2) is not str or len(a2) > NAME_FAST:
                check_str(a2, NAME_MAX, where + ".consumer_tag")
        else:
            a2 = ''
        if n > 3:
            a3 = f[3]
            if a3 is not True and a3 is not False:
                check_bool(a3, where + ".no_ack")
        else:
            a3 = False
        if n > 4:
            a4 = f[4]
            if a4 is not True and a4 is not False:
                check_bool(a4, where + ".exclusive")
        else:
            a4 = False
        if n > 5:
            a5 = f[5]
            if type(a5) is not int or not 0 <= a5 <= U32_MAX:
                check_uint(a5, U32_MAX, where + ".credit")
        else:
            a5 = 0
        if n > 6:
            a6 = f[6]
            if type(a6) is not dict or a6:
                check_table(a6, where + ".arguments")
        else:
            a6 = {}
        return cls(a0, a1, a2, a3, a4, a5, a6)


@dataclass(frozen=True, slots=True)
class ConsumeOk(Frame):
    """Reply to CONSUME."""

    TYPE: ClassVar[int] = 0x31
    NAME: ClassVar[str] = 'consume_ok'
    DIRECTION: ClassVar[str] = 'server'
    rid: int
    consumer_tag: str

    def to_wire(self) -> list[Any]:
        return [self.rid, self.consumer_tag]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'consume_ok') -> ConsumeOk:
        check_arity(f, 2, 2, where)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        a1 = f[1]
        if type(a1) is not str or len(a1) > NAME_FAST:
            check_str(a1, NAME_MAX, where + ".consumer_tag")
        return cls(a0, a1)


@dataclass(frozen=True, slots=True)
class Cancel(Frame):
    """Stop a consumer; its unacked deliveries stay unacked until acked or the connection closes. Reply: OK."""

    TYPE: ClassVar[int] = 0x32
    NAME: ClassVar[str] = 'cancel'
    DIRECTION: ClassVar[str] = 'client'
    rid: int
    consumer_tag: str

    def to_wire(self) -> list[Any]:
        return [self.rid, self.consumer_tag]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'cancel') -> Cancel:
        check_arity(f, 2, 2, where)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        a1 = f[1]
        if type(a1) is not str or len(a1) > NAME_FAST:
            check_str(a1, NAME_MAX, where + ".consumer_tag")
        return cls(a0, a1)


@dataclass(frozen=True, slots=True)
class Cancelled(Frame):
    """The server stopped a consumer (its queue was deleted)."""

    TYPE: ClassVar[int] = 0x33
    NAME: ClassVar[str] = 'cancelled'
    DIRECTION: ClassVar[str] = 'server'
    consumer_tag: str
    code: int = 404
    message: str = ''

    def to_wire(self) -> list[Any]:
        return [self.consumer_tag, self.code, self.message]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'cancelled') -> Cancelled:
        check_arity(f, 1, 3, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not str or len(a0) > NAME_FAST:
            check_str(a0, NAME_MAX, where + ".consumer_tag")
        if n > 1:
            a1 = f[1]
            if type(a1) is not int or not 0 <= a1 <= U16_MAX:
                check_uint(a1, U16_MAX, where + ".code")
        else:
            a1 = 404
        if n > 2:
            a2 = f[2]
            if type(a2) is not str or len(a2) > STR_FAST:
                check_str(a2, STR_MAX, where + ".message")
        else:
            a2 = ''
        return cls(a0, a1, a2)


@dataclass(frozen=True, slots=True)
class Credit(Frame):
    """Grant a consumer more credit (added to what it has). No reply; an unknown tag gets ERROR rid 0."""

    TYPE: ClassVar[int] = 0x34
    NAME: ClassVar[str] = 'credit'
    DIRECTION: ClassVar[str] = 'client'
    consumer_tag: str
    credit: int

    def to_wire(self) -> list[Any]:
        return [self.consumer_tag, self.credit]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'credit') -> Credit:
        check_arity(f, 2, 2, where)
        a0 = f[0]
        if type(a0) is not str or len(a0) > NAME_FAST:
            check_str(a0, NAME_MAX, where + ".consumer_tag")
        a1 = f[1]
        if type(a1) is not int or not 0 <= a1 <= U32_MAX:
            check_uint(a1, U32_MAX, where + ".credit")
        return cls(a0, a1)


@dataclass(frozen=True, slots=True)
class Deliver(Frame):
    """One message pushed to a consumer; uses one credit."""

    TYPE: ClassVar[int] = 0x35
    NAME: ClassVar[str] = 'deliver'
    DIRECTION: ClassVar[str] = 'server'
    consumer_tag: str
    delivery_tag: int
    redelivered: bool = False
    exchange: str = ''
    routing_key: str = ''
    properties: dict[str, Any] = field(default_factory=dict)
    body: bytes = b''
    delivery_count: int = 1

    def to_wire(self) -> list[Any]:
        return [self.consumer_tag, self.delivery_tag, self.redelivered, self.exchange, self.routing_key, self.properties, self.body, self.delivery_count]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'deliver') -> Deliver:
        check_arity(f, 2, 8, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not str or len(a0) > NAME_FAST:
            check_str(a0, NAME_MAX, where + ".consumer_tag")
        a1 = f[1]
        if type(a1) is not int or not 0 <= a1 <= U64_MAX:
            check_uint(a1, U64_MAX, where + ".delivery_tag")
        if n > 2:
            a2 = f[2]
            if a2 is not True and a2 is not False:
                check_bool(a2, where + ".redelivered")
        else:
            a2 = False
        if n > 3:
            a3 = f[3]
            if type(a3) is not str or len(a3) > NAME_FAST:
                check_str(a3, NAME_MAX, where + ".exchange")
        else:
            a3 = ''
        if n > 4:
            a4 = f[4]
            if type(a4) is not str or len(a4) > NAME_FAST:
                check_str(a4, NAME_MAX, where + ".routing_key")
        else:
            a4 = ''
        if n > 5:
            a5 = f[5]
            if type(a5) is not dict or a5:
                check_props(a5, where + ".properties")
        else:
            a5 = {}
        if n > 6:
            a6 = f[6]
            if type(a6) is not bytes:
                check_bytes(a6, where + ".body")
        else:
            a6 = b''
        if n > 7:
            a7 = f[7]
            if type(a7) is not int or not 0 <= a7 <= U32_MAX:
                check_uint(a7, U32_MAX, where + ".delivery_count")
        else:
            a7 = 1
        return cls(a0, a1, a2, a3, a4, a5, a6, a7)


@dataclass(frozen=True, slots=True)
class DeliverBatch(Frame):
    """Several messages pushed to one consumer; uses one credit per entry."""

    TYPE: ClassVar[int] = 0x36
    NAME: ClassVar[str] = 'deliver_batch'
    DIRECTION: ClassVar[str] = 'server'
    consumer_tag: str
    entries: list[DeliveryEntry]

    def to_wire(self) -> list[Any]:
        return [self.consumer_tag, [list(e) for e in self.entries]]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'deliver_batch') -> DeliverBatch:
        check_arity(f, 2, 2, where)
        a0 = f[0]
        if type(a0) is not str or len(a0) > NAME_FAST:
            check_str(a0, NAME_MAX, where + ".consumer_tag")
        a1 = DeliveryEntry.list_from_wire(f[1], where + ".entries")
        return cls(a0, a1)


@dataclass(frozen=True, slots=True)
class DeliverRun(Frame):
    """Since 1.1. Several first deliveries (redelivered false, delivery_count 1) to one consumer that share exchange, routing key and properties, with consecutive delivery tags: DELIVER_BATCH without repeating the shared fields. Uses one credit per body. Sent only to a client whose preamble minor version is 1 or later."""

    TYPE: ClassVar[int] = 0x3d
    NAME: ClassVar[str] = 'deliver_run'
    DIRECTION: ClassVar[str] = 'server'
    consumer_tag: str
    first_tag: int
    exchange: str
    routing_key: str
    properties: dict[str, Any]
    bodies: list[bytes]

    def to_wire(self) -> list[Any]:
        return [self.consumer_tag, self.first_tag, self.exchange, self.routing_key, self.properties, self.bodies]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'deliver_run') -> DeliverRun:
        check_arity(f, 6, 6, where)
        a0 = f[0]
        if type(a0) is not str or len(a0) > NAME_FAST:
            check_str(a0, NAME_MAX, where + ".consumer_tag")
        a1 = f[1]
        if type(a1) is not int or not 0 <= a1 <= U64_MAX:
            check_uint(a1, U64_MAX, where + ".first_tag")
        a2 = f[2]
        if type(a2) is not str or len(a2) > NAME_FAST:
            check_str(a2, NAME_MAX, where + ".exchange")
        a3 = f[3]
        if type(a3) is not str or len(a3) > NAME_FAST:
            check_str(a3, NAME_MAX, where + ".routing_key")
        a4 = f[4]
        if type(a4) is not dict or a4:
            check_props(a4, where + ".properties")
        a5 = check_binlist(f[5], where + ".bodies")
        return cls(a0, a1, a2, a3, a4, a5)


@dataclass(frozen=True, slots=True)
class Ack(Frame):
    """Acknowledge a delivery (or, with multiple, every unacked one up to it; tag 0 + multiple = all)."""

    TYPE: ClassVar[int] = 0x37
    NAME: ClassVar[str] = 'ack'
    DIRECTION: ClassVar[str] = 'client'
    delivery_tag: int
    multiple: bool = False

    def to_wire(self) -> list[Any]:
        return [self.delivery_tag, self.multiple]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'ack') -> Ack:
        check_arity(f, 1, 2, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 <= a0 <= U64_MAX:
            check_uint(a0, U64_MAX, where + ".delivery_tag")
        if n > 1:
            a1 = f[1]
            if a1 is not True and a1 is not False:
                check_bool(a1, where + ".multiple")
        else:
            a1 = False
        return cls(a0, a1)


@dataclass(frozen=True, slots=True)
class Nack(Frame):
    """Refuse deliveries; requeue puts them back in their original order, flagged redelivered."""

    TYPE: ClassVar[int] = 0x38
    NAME: ClassVar[str] = 'nack'
    DIRECTION: ClassVar[str] = 'client'
    delivery_tag: int
    multiple: bool = False
    requeue: bool = True

    def to_wire(self) -> list[Any]:
        return [self.delivery_tag, self.multiple, self.requeue]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'nack') -> Nack:
        check_arity(f, 1, 3, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 <= a0 <= U64_MAX:
            check_uint(a0, U64_MAX, where + ".delivery_tag")
        if n > 1:
            a1 = f[1]
            if a1 is not True and a1 is not False:
                check_bool(a1, where + ".multiple")
        else:
            a1 = False
        if n > 2:
            a2 = f[2]
            if a2 is not True and a2 is not False:
                check_bool(a2, where + ".requeue")
        else:
            a2 = True
        return cls(a0, a1, a2)


@dataclass(frozen=True, slots=True)
class Reject(Frame):
    """Refuse one delivery; by default it is discarded (dead-lettered once configured)."""

    TYPE: ClassVar[int] = 0x39
    NAME: ClassVar[str] = 'reject'
    DIRECTION: ClassVar[str] = 'client'
    delivery_tag: int
    requeue: bool = False

    def to_wire(self) -> list[Any]:
        return [self.delivery_tag, self.requeue]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'reject') -> Reject:
        check_arity(f, 1, 2, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 <= a0 <= U64_MAX:
            check_uint(a0, U64_MAX, where + ".delivery_tag")
        if n > 1:
            a1 = f[1]
            if a1 is not True and a1 is not False:
                check_bool(a1, where + ".requeue")
        else:
            a1 = False
        return cls(a0, a1)


@dataclass(frozen=True, slots=True)
class Get(Frame):
    """Pull up to max_messages ready messages. Reply: GET_OK (possibly empty)."""

    TYPE: ClassVar[int] = 0x3a
    NAME: ClassVar[str] = 'get'
    DIRECTION: ClassVar[str] = 'client'
    rid: int
    queue: str
    max_messages: int = 1
    no_ack: bool = False

    def to_wire(self) -> list[Any]:
        return [self.rid, self.queue, self.max_messages, self.no_ack]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'get') -> Get:
        check_arity(f, 2, 4, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        a1 = f[1]
        if type(a1) is not str or len(a1) > NAME_FAST:
            check_str(a1, NAME_MAX, where + ".queue")
        if n > 2:
            a2 = f[2]
            if type(a2) is not int or not 0 <= a2 <= U32_MAX:
                check_uint(a2, U32_MAX, where + ".max_messages")
        else:
            a2 = 1
        if n > 3:
            a3 = f[3]
            if a3 is not True and a3 is not False:
                check_bool(a3, where + ".no_ack")
        else:
            a3 = False
        return cls(a0, a1, a2, a3)


@dataclass(frozen=True, slots=True)
class GetOk(Frame):
    """Reply to GET."""

    TYPE: ClassVar[int] = 0x3b
    NAME: ClassVar[str] = 'get_ok'
    DIRECTION: ClassVar[str] = 'server'
    rid: int
    entries: list[DeliveryEntry] = field(default_factory=list)
    message_count: int = 0

    def to_wire(self) -> list[Any]:
        return [self.rid, [list(e) for e in self.entries], self.message_count]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'get_ok') -> GetOk:
        check_arity(f, 1, 3, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 < a0 <= U32_MAX:
            check_uint(a0, U32_MAX, where + ".rid", 1)
        if n > 1:
            a1 = DeliveryEntry.list_from_wire(f[1], where + ".entries")
        else:
            a1 = []
        if n > 2:
            a2 = f[2]
            if type(a2) is not int or not 0 <= a2 <= U64_MAX:
                check_uint(a2, U64_MAX, where + ".message_count")
        else:
            a2 = 0
        return cls(a0, a1, a2)


@dataclass(frozen=True, slots=True)
class Extend(Frame):
    """Push back the ack deadline of an unacked delivery (the consumer is still working on it). No reply; 406 if the tag is unknown."""

    TYPE: ClassVar[int] = 0x3c
    NAME: ClassVar[str] = 'extend'
    DIRECTION: ClassVar[str] = 'client'
    delivery_tag: int
    timeout_ms: int = 0

    def to_wire(self) -> list[Any]:
        return [self.delivery_tag, self.timeout_ms]

    @classmethod
    def from_wire(cls, f: Any, where: str = 'extend') -> Extend:
        check_arity(f, 1, 2, where)
        n = len(f)
        a0 = f[0]
        if type(a0) is not int or not 0 <= a0 <= U64_MAX:
            check_uint(a0, U64_MAX, where + ".delivery_tag")
        if n > 1:
            a1 = f[1]
            if type(a1) is not int or not 0 <= a1 <= U64_MAX:
                check_uint(a1, U64_MAX, where + ".timeout_ms")
        else:
            a1 = 0
        return cls(a0, a1)


FRAME_TYPES: dict[int, type[Frame]] = {
    0x01: Hello,
    0x02: Auth,
    0x03: OpenOk,
    0x04: Heartbeat,
    0x05: Close,
    0x06: CloseOk,
    0x07: Error,
    0x08: Ok,
    0x09: Compressed,
    0x10: ExchangeDeclare,
    0x11: ExchangeDelete,
    0x12: QueueDeclare,
    0x13: QueueDeclareOk,
    0x14: QueueDelete,
    0x15: QueuePurge,
    0x16: MessageCountOk,
    0x17: Bind,
    0x18: Unbind,
    0x19: List,
    0x1a: ListOk,
    0x20: Publish,
    0x21: PublishBatch,
    0x25: PublishRun,
    0x22: Confirm,
    0x23: Return,
    0x24: PublishCredit,
    0x30: Consume,
    0x31: ConsumeOk,
    0x32: Cancel,
    0x33: Cancelled,
    0x34: Credit,
    0x35: Deliver,
    0x36: DeliverBatch,
    0x3d: DeliverRun,
    0x37: Ack,
    0x38: Nack,
    0x39: Reject,
    0x3a: Get,
    0x3b: GetOk,
    0x3c: Extend,
}

CLIENT_FRAMES: frozenset[int] = frozenset({0x02, 0x04, 0x05, 0x06, 0x09, 0x10, 0x11, 0x12, 0x14, 0x15, 0x17, 0x18, 0x19, 0x20, 0x21, 0x25, 0x30, 0x32, 0x34, 0x37, 0x38, 0x39, 0x3a, 0x3c})
SERVER_FRAMES: frozenset[int] = frozenset({0x01, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x13, 0x16, 0x1a, 0x22, 0x23, 0x24, 0x31, 0x33, 0x35, 0x36, 0x3d, 0x3b})


# ------------------------------------------------------------------ lifecycle


class Role(enum.Enum):
    """Which side of the connection a state machine runs for."""

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Connection states (spec/PROTOCOL.md section 6)."""

    AWAIT_PREAMBLE = 'await-preamble'  # server: waiting for the 8 preamble bytes
    AWAIT_AUTH = 'await-auth'  # server: HELLO sent, waiting for AUTH
    AUTHENTICATING = 'authenticating'  # server: AUTH received, deciding; no client frame may arrive
    AWAIT_HELLO = 'await-hello'  # client: preamble sent, waiting for HELLO
    AUTH_PIPELINED = 'auth-pipelined'  # client: AUTH sent with the preamble, before HELLO arrived (section 4); waiting for HELLO
    HELLO_RECEIVED = 'hello-received'  # client: HELLO received, AUTH not yet sent
    AWAIT_OPEN_OK = 'await-open-ok'  # client: AUTH sent, waiting for OPEN_OK
    OPEN = 'open'  # both: normal operation
    CLOSING = 'closing'  # both: this side sent CLOSE, waiting for CLOSE_OK
    CLOSE_RECEIVED = 'close-received'  # both: the peer sent CLOSE, this side must answer CLOSE_OK
    CLOSED = 'closed'  # both: nothing more is sent or decoded; close the transport

# (role, state) -> frame types that may be received
RECEIVE_ALLOWED: dict[tuple[Role, State], frozenset[int]] = {
    (Role.SERVER, State.AWAIT_PREAMBLE): frozenset(),
    (Role.SERVER, State.AWAIT_AUTH): frozenset({Auth.TYPE}),
    (Role.SERVER, State.AUTHENTICATING): frozenset(),
    (Role.SERVER, State.OPEN): frozenset({Heartbeat.TYPE, Close.TYPE, CloseOk.TYPE, Compressed.TYPE, ExchangeDeclare.TYPE, ExchangeDelete.TYPE, QueueDeclare.TYPE, QueueDelete.TYPE, QueuePurge.TYPE, Bind.TYPE, Unbind.TYPE, List.TYPE, Publish.TYPE, PublishBatch.TYPE, PublishRun.TYPE, Consume.TYPE, Cancel.TYPE, Credit.TYPE, Ack.TYPE, Nack.TYPE, Reject.TYPE, Get.TYPE, Extend.TYPE}),
    (Role.CLIENT, State.AWAIT_HELLO): frozenset({Hello.TYPE, Error.TYPE}),
    (Role.CLIENT, State.AUTH_PIPELINED): frozenset({Hello.TYPE, Error.TYPE}),
    (Role.CLIENT, State.HELLO_RECEIVED): frozenset({Error.TYPE}),
    (Role.CLIENT, State.AWAIT_OPEN_OK): frozenset({OpenOk.TYPE, Close.TYPE, Error.TYPE}),
    (Role.CLIENT, State.OPEN): frozenset({Heartbeat.TYPE, Close.TYPE, CloseOk.TYPE, Error.TYPE, Ok.TYPE, Compressed.TYPE, QueueDeclareOk.TYPE, MessageCountOk.TYPE, ListOk.TYPE, Confirm.TYPE, Return.TYPE, PublishCredit.TYPE, ConsumeOk.TYPE, Cancelled.TYPE, Deliver.TYPE, DeliverBatch.TYPE, DeliverRun.TYPE, GetOk.TYPE}),
    (Role.SERVER, State.CLOSING): frozenset({Close.TYPE, CloseOk.TYPE}),
    (Role.CLIENT, State.CLOSING): frozenset({Close.TYPE, CloseOk.TYPE}),
    (Role.SERVER, State.CLOSE_RECEIVED): frozenset(),
    (Role.CLIENT, State.CLOSE_RECEIVED): frozenset(),
    (Role.SERVER, State.CLOSED): frozenset(),
    (Role.CLIENT, State.CLOSED): frozenset(),
}

# (role, state) -> frame types that may be sent (anything else: LocalProtocolError)
SEND_ALLOWED: dict[tuple[Role, State], frozenset[int]] = {
    (Role.SERVER, State.AWAIT_PREAMBLE): frozenset({Error.TYPE}),
    (Role.SERVER, State.AWAIT_AUTH): frozenset({Hello.TYPE, Error.TYPE}),
    (Role.SERVER, State.AUTHENTICATING): frozenset({OpenOk.TYPE, Error.TYPE}),
    (Role.SERVER, State.OPEN): frozenset({Heartbeat.TYPE, Close.TYPE, CloseOk.TYPE, Error.TYPE, Ok.TYPE, Compressed.TYPE, QueueDeclareOk.TYPE, MessageCountOk.TYPE, ListOk.TYPE, Confirm.TYPE, Return.TYPE, PublishCredit.TYPE, ConsumeOk.TYPE, Cancelled.TYPE, Deliver.TYPE, DeliverBatch.TYPE, DeliverRun.TYPE, GetOk.TYPE}),
    (Role.SERVER, State.CLOSING): frozenset({CloseOk.TYPE}),
    (Role.SERVER, State.CLOSE_RECEIVED): frozenset({Heartbeat.TYPE, CloseOk.TYPE, Error.TYPE, Ok.TYPE, Compressed.TYPE, QueueDeclareOk.TYPE, MessageCountOk.TYPE, ListOk.TYPE, Confirm.TYPE, Return.TYPE, PublishCredit.TYPE, ConsumeOk.TYPE, Cancelled.TYPE, Deliver.TYPE, DeliverBatch.TYPE, DeliverRun.TYPE, GetOk.TYPE}),
    (Role.CLIENT, State.AWAIT_HELLO): frozenset({Auth.TYPE}),
    (Role.CLIENT, State.AUTH_PIPELINED): frozenset(),
    (Role.CLIENT, State.HELLO_RECEIVED): frozenset({Auth.TYPE}),
    (Role.CLIENT, State.AWAIT_OPEN_OK): frozenset(),
    (Role.CLIENT, State.OPEN): frozenset({Heartbeat.TYPE, Close.TYPE, CloseOk.TYPE, Compressed.TYPE, ExchangeDeclare.TYPE, ExchangeDelete.TYPE, QueueDeclare.TYPE, QueueDelete.TYPE, QueuePurge.TYPE, Bind.TYPE, Unbind.TYPE, List.TYPE, Publish.TYPE, PublishBatch.TYPE, PublishRun.TYPE, Consume.TYPE, Cancel.TYPE, Credit.TYPE, Ack.TYPE, Nack.TYPE, Reject.TYPE, Get.TYPE, Extend.TYPE}),
    (Role.CLIENT, State.CLOSING): frozenset({CloseOk.TYPE}),
    (Role.CLIENT, State.CLOSE_RECEIVED): frozenset({CloseOk.TYPE}),
    (Role.SERVER, State.CLOSED): frozenset(),
    (Role.CLIENT, State.CLOSED): frozenset(),
}

# (role, state) where a frame not allowed is dropped instead of refused
RECEIVE_DROPS: frozenset[tuple[Role, State]] = frozenset({(Role.SERVER, State.CLOSING), (Role.CLIENT, State.CLOSING)})

# (role, state, received frame type) -> next state
ON_RECEIVE: dict[tuple[Role, State, int], State] = {
    (Role.SERVER, State.AWAIT_AUTH, Auth.TYPE): State.AUTHENTICATING,
    (Role.CLIENT, State.AWAIT_HELLO, Hello.TYPE): State.HELLO_RECEIVED,
    (Role.CLIENT, State.AUTH_PIPELINED, Hello.TYPE): State.AWAIT_OPEN_OK,
    (Role.CLIENT, State.AWAIT_OPEN_OK, OpenOk.TYPE): State.OPEN,
    (Role.CLIENT, State.AWAIT_OPEN_OK, Close.TYPE): State.CLOSE_RECEIVED,
    (Role.SERVER, State.OPEN, Close.TYPE): State.CLOSE_RECEIVED,
    (Role.CLIENT, State.OPEN, Close.TYPE): State.CLOSE_RECEIVED,
    (Role.SERVER, State.CLOSING, CloseOk.TYPE): State.CLOSED,
    (Role.CLIENT, State.CLOSING, CloseOk.TYPE): State.CLOSED,
    (Role.SERVER, State.CLOSING, Close.TYPE): State.CLOSING,
    (Role.CLIENT, State.CLOSING, Close.TYPE): State.CLOSING,
}

# (role, state, sent frame type) -> next state
ON_SEND: dict[tuple[Role, State, int], State] = {
    (Role.SERVER, State.AUTHENTICATING, OpenOk.TYPE): State.OPEN,
    (Role.CLIENT, State.AWAIT_HELLO, Auth.TYPE): State.AUTH_PIPELINED,
    (Role.CLIENT, State.HELLO_RECEIVED, Auth.TYPE): State.AWAIT_OPEN_OK,
    (Role.SERVER, State.OPEN, Close.TYPE): State.CLOSING,
    (Role.CLIENT, State.OPEN, Close.TYPE): State.CLOSING,
    (Role.SERVER, State.CLOSE_RECEIVED, CloseOk.TYPE): State.CLOSED,
    (Role.CLIENT, State.CLOSE_RECEIVED, CloseOk.TYPE): State.CLOSED,
}


# ------------------------------------------------------------------ replies
# request frame type -> the frame type of its success reply (besides ERROR)
REPLIES: dict[int, int] = {
    ExchangeDeclare.TYPE: Ok.TYPE,
    ExchangeDelete.TYPE: Ok.TYPE,
    QueueDeclare.TYPE: QueueDeclareOk.TYPE,
    QueueDelete.TYPE: MessageCountOk.TYPE,
    QueuePurge.TYPE: MessageCountOk.TYPE,
    Bind.TYPE: Ok.TYPE,
    Unbind.TYPE: Ok.TYPE,
    List.TYPE: ListOk.TYPE,
    Consume.TYPE: ConsumeOk.TYPE,
    Cancel.TYPE: Ok.TYPE,
    Get.TYPE: GetOk.TYPE,
}

REPLY_CLASSES: dict[type[Frame], type[Frame]] = {
    ExchangeDeclare: Ok,
    ExchangeDelete: Ok,
    QueueDeclare: QueueDeclareOk,
    QueueDelete: MessageCountOk,
    QueuePurge: MessageCountOk,
    Bind: Ok,
    Unbind: Ok,
    List: ListOk,
    Consume: ConsumeOk,
    Cancel: Ok,
    Get: GetOk,
}
