"""Conveyor's wire protocol, sans-IO: frame classes, codec and connection state machine.

Everything here is generated from or checked against ``spec/protocol.toml``; nothing
here touches sockets or event loops.
"""

from conveyor.protocol._generated import *  # noqa: F403
from conveyor.protocol._generated import (
    DEFAULT_PORT,
    ERROR_CODES,
    FATAL_CODES,
    FRAME_TYPES,
    PREAMBLE,
    Frame,
)
from conveyor.protocol.codec import (
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
from conveyor.protocol.errors import (
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
