"""Conveyor's wire protocol, sans-IO: frame classes, codec and connection state machine.

Everything here is generated from or checked against ``spec/protocol.toml``; nothing
here touches sockets or event loops.
"""

from protocol._generated import *  # noqa: F403
from protocol._generated import (
    DEFAULT_PORT,
    ERROR_CODES,
    FATAL_CODES,
    FRAME_TYPES,
    PREAMBLE,
    Frame,
)
from protocol.codec import (
    Decoder,
    check_frames,
    compress_frame,
    encode,
    encode_fields,
    encode_many,
    encode_run,
    inflate,
    parse_preamble,
)
from protocol.errors import (
    ConveyorError,
    FatalError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RequestError,
    error_for_code,
)

__all__ = [
    "DEFAULT_PORT",
    "ERROR_CODES",
    "FATAL_CODES",
    "FRAME_TYPES",
    "PREAMBLE",
    "ConveyorError",
    "Decoder",
    "FatalError",
    "Frame",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestError",
    "check_frames",
    "compress_frame",
    "encode",
    "encode_fields",
    "encode_many",
    "encode_run",
    "error_for_code",
    "inflate",
    "parse_preamble",
]
