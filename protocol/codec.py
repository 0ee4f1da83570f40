"""Sans-IO framing: bytes in, frames out; frames in, bytes out.

Wire layout (spec/PROTOCOL.md, "Framing")::

    +----------------+-----------+------------------------------+
    | length: uint32 | type: u8  | body: msgpack array          |
    +----------------+-----------+------------------------------+
      big-endian; length counts type + body (so >= 1)

The decoder is incremental: feed it any fragmentation of the stream and it yields the
same frames. It checks the length against the negotiated cap *before* buffering the
body, so an oversized frame is refused after 5 bytes, not after the peer has filled our
memory. No sockets, no asyncio: broker and client both drive it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import msgpack
import zstandard

from conveyor.protocol._generated import (
    FRAME_TYPES,
    MAGIC,
    MAX_FRAME_SIZE_CEILING,
    PREAMBLE,
    VERSION_MAJOR,
    Compressed,
    DeliverBatch,
    DeliverRun,
    Frame,
    FrameTooLarge,
    MalformedFrame,
    PublishBatch,
    PublishRun,
    UnexpectedFrame,
    UnsupportedVersion,
)
from conveyor.protocol.errors import LocalProtocolError

HEADER = struct.Struct(">IB")
HEADER_SIZE = HEADER.size
_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack

# Wire compression (spec/PROTOCOL.md "Compressed frames"): only these frames are wrapped,
# and only when the encoded body is big enough for compression to pay for itself.
COMPRESSIBLE = frozenset({PublishBatch.TYPE, PublishRun.TYPE, DeliverBatch.TYPE, DeliverRun.TYPE})
COMPRESS_MIN_BYTES = 1024
_COMPRESSED = Compressed.TYPE
_zstd_compress = zstandard.ZstdCompressor(level=3).compress
_zstd_decompressor = zstandard.ZstdDecompressor()

__all__ = [
    "COMPRESSIBLE",
    "COMPRESS_MIN_BYTES",
    "HEADER_SIZE",
    "PREAMBLE",
    "Decoder",
    "check_frames",
    "compress_frame",
    "encode",
    "encode_fields",
    "encode_many",
    "encode_run",
    "inflate",
    "oversized_frames",
    "parse_preamble",
    "unpack_body",
]


def encode(frame: Frame) -> bytes:
    """Encode one frame to its wire bytes."""
    body: bytes = _packb(frame.to_wire())
    return _pack_header(len(body) + 1, frame.TYPE) + body


def encode_fields(ftype: int, fields: list[Any]) -> bytes:
    """Encode a frame straight from its field list (hot paths skip the frame object)."""
    body: bytes = _packb(fields)
    return _pack_header(len(body) + 1, ftype) + body


def encode_run(
    ftype: int, fields: list[Any], first_at: int, bodies: list[bytes], budget: int
) -> list[bytes]:
    """PUBLISH_RUN / DELIVER_RUN frames for ``bodies``: ``fields`` are the frame's fields
    before the bodies, ``fields[first_at]`` the seq or tag of the first body. Bodies are
    split so each frame's bodies take at most ``budget`` bytes (the caller leaves room for
    the other fields); the seq/tag of each frame follows on from the one before."""
    if sum(map(len, bodies)) + 8 * len(bodies) <= budget:
        return [encode_fields(ftype, [*fields, bodies])]
    out: list[bytes] = []
    head = list(fields)
    chunk: list[bytes] = []
    size = 0
    for body in bodies:
        if chunk and size + len(body) + 8 > budget:
            out.append(encode_fields(ftype, [*head, chunk]))
            head[first_at] += len(chunk)
            chunk, size = [], 0
        chunk.append(body)
        size += len(body) + 8
    out.append(encode_fields(ftype, [*head, chunk]))
    return out


def oversized_frames(frames: list[bytes], cap: int) -> list[int]:
    """Indexes of the encoded frames in ``frames`` whose length field exceeds ``cap``."""
    limit = cap + 4
    return [i for i, f in enumerate(frames) if len(f) > limit]


def check_frames(frames: list[bytes], cap: int) -> None:
    """Raise LocalProtocolError unless every encoded frame fits the peer's ``cap`` (the
    negotiated max_frame_size): a sender MUST NOT produce a larger frame (section 5)."""
    if frames and max(map(len, frames)) > cap + 4:
        i = oversized_frames(frames, cap)[0]
        f = frames[i]
        name = FRAME_TYPES[f[4]].NAME.upper() if f[4] in FRAME_TYPES else f"type {f[4]:#04x}"
        raise LocalProtocolError(
            f"{name} frame of {len(f) - 4} bytes exceeds the peer's maximum frame size of {cap}"
        )


def compress_frame(frame: bytes) -> bytes:
    """Wrap an encoded frame in a COMPRESSED frame when its body is over 1 KiB and zstd
    makes it smaller; otherwise return it unchanged (always valid to send).

    Only for a connection that negotiated compression (OPEN_OK.compression = "zstd").
    The decompressed body is the original one, so it fits the frame cap if ``frame`` did.
    """
    body = frame[HEADER_SIZE:]
    if len(body) <= COMPRESS_MIN_BYTES:
        return frame
    outer: bytes = _packb([frame[4], _zstd_compress(body)])
    if len(outer) >= len(body):
        return frame  # incompressible
    return _pack_header(len(outer) + 1, _COMPRESSED) + outer


def inflate(data: bytes, cap: int) -> bytes:
    """Decompress one zstd frame of at most ``cap`` bytes, refusing before allocating.

    The content size must be declared in the zstd frame header; a missing or larger one is
    frame-too-large (a decompression bomb never gets its buffer), broken data is malformed.
    """
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise MalformedFrame(f"compressed: not a zstd frame ({exc})") from None
    if size < 0 or size > cap:
        raise FrameTooLarge(
            f"compressed frame declares {'no' if size < 0 else size} content size; "
            f"the maximum is {cap}",
            {"length": size, "max_frame_size": cap},
        )
    try:
        out: bytes = _zstd_decompressor.decompress(data, max_output_size=cap)
    except zstandard.ZstdError as exc:
        raise MalformedFrame(f"compressed: bad zstd data ({exc})") from None
    if len(out) != size:
        raise MalformedFrame("compressed: content differs from its declared size")
    return out


def encode_many(frames: Iterable[Frame]) -> bytes:
    """Encode many frames into one buffer, so a burst costs one write."""
    parts: list[bytes] = []
    append = parts.append
    for frame in frames:
        body = _packb(frame.to_wire())
        append(_pack_header(len(body) + 1, frame.TYPE))
        append(body)
    return b"".join(parts)


def parse_preamble(data: bytes) -> tuple[int, int]:
    """Check the 8-byte preamble; return (major, minor) or raise.

    Raises MalformedFrame if the magic is wrong (not our protocol) and
    UnsupportedVersion if the major version differs from ours.
    """
    if len(data) != len(PREAMBLE) or data[: len(MAGIC)] != MAGIC:
        raise MalformedFrame(f"bad preamble {bytes(data[:8])!r}: expected {PREAMBLE!r}")
    major, minor = data[len(MAGIC)], data[len(MAGIC) + 1]
    if major != VERSION_MAJOR:
        raise UnsupportedVersion(
            f"client asked for protocol {major}.{minor}; this server speaks {VERSION_MAJOR}.x",
            {"server_major": VERSION_MAJOR},
        )
    return major, minor


def _unpack_body(body: bytes | bytearray, where: str) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        # ExtraData: trailing bytes after the array; ValueError covers bad UTF-8.
        raise MalformedFrame(f"{where}: body is not one msgpack value ({exc})") from None


# Public name for receivers that decode hot frames themselves (the client's DELIVER path):
# the msgpack value of a frame body, or MalformedFrame naming the frame. An alias, not a
# wrapper, so it costs no extra call per frame.
unpack_body = _unpack_body


class Decoder:
    """Incremental frame decoder with a hard size cap.

    ``accept`` is the set of frame types this side may receive (the spec's direction
    column); anything else is unexpected-frame, because a server never accepts a
    DELIVER and a client never accepts a PUBLISH.
    """

    __slots__ = ("_buf", "_pos", "accept", "compression", "max_frame_size")

    def __init__(self, max_frame_size: int, accept: frozenset[int]) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_frame_size = min(max_frame_size, MAX_FRAME_SIZE_CEILING)
        self.accept = accept
        # Set once OPEN_OK negotiated compression; until then COMPRESSED is unexpected.
        self.compression = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Append ``data`` and return every complete frame (possibly none: need more data)."""
        buf = self._buf
        if self._pos and self._pos == len(buf):
            buf.clear()
            self._pos = 0
        buf += data
        frames: list[Frame] = []
        pos = self._pos
        end = len(buf)
        cap = self.max_frame_size
        types = FRAME_TYPES
        accept = self.accept
        try:
            while end - pos >= HEADER_SIZE:
                length, ftype = _unpack_header(buf, pos)
                if length > cap:
                    raise FrameTooLarge(
                        f"frame of {length} bytes exceeds the maximum of {cap}",
                        {"length": length, "max_frame_size": cap},
                    )
                if length == 0:
                    raise MalformedFrame("frame length 0 (must count the type byte)")
                if end - pos < 4 + length:
                    break
                cls = types.get(ftype)
                if cls is None:
                    raise MalformedFrame(f"unknown frame type {ftype:#04x}")
                if ftype not in accept:
                    raise UnexpectedFrame(f"{cls.NAME.upper()} may not be sent by this peer")
                body = _unpack_body(buf[pos + HEADER_SIZE : pos + 4 + length], cls.NAME)
                if ftype == _COMPRESSED:
                    frames.append(self._unwrap(cls.from_wire(body)))
                else:
                    frames.append(cls.from_wire(body))
                pos += 4 + length
        finally:
            self._pos = pos
            # Compact once the consumed prefix dominates, so the buffer stays O(frame).
            if pos > 65536 and pos * 2 > end:
                del buf[:pos]
                self._pos = 0
        return frames

    def _unwrap(self, frame: Frame) -> Frame:
        """The inner frame of a COMPRESSED frame (spec/PROTOCOL.md "Compressed frames")."""
        assert isinstance(frame, Compressed)
        if not self.compression:
            raise UnexpectedFrame("COMPRESSED frame but compression was not negotiated")
        inner = frame.inner_type
        if inner not in COMPRESSIBLE or inner not in self.accept:
            raise UnexpectedFrame(f"COMPRESSED may not carry frame type {inner:#04x}")
        cls = FRAME_TYPES[inner]
        data = inflate(frame.data, self.max_frame_size)
        return cls.from_wire(_unpack_body(data, cls.NAME))
