"""A tiny, independent Conveyor wire codec and blocking raw-socket client for conformance tests.

Built only from ``spec/`` (PROTOCOL.md, protocol.toml): frame type codes, field lists,
field types, defaults, property types and error codes are read from ``spec/protocol.toml``
with ``tomllib``; framing is ``struct`` + ``msgpack``. Nothing from ``protocol/``,
``broker/`` or ``client/`` is imported, so these tests check the broker against the spec
rather than against its own codec.

The decoder is strict (section 5 "Strictness"): it validates every frame it decodes, so
everything the broker sends is checked for conformance too.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
import tomllib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

SPEC_DIR = Path(__file__).resolve().parents[2] / "spec"
SPEC: dict[str, Any] = tomllib.loads((SPEC_DIR / "protocol.toml").read_text(encoding="utf-8"))

_P = SPEC["protocol"]
MAGIC: bytes = _P["magic"].encode("ascii")
MAJOR: int = _P["major"]
MINOR: int = _P["minor"]
PREAMBLE: bytes = MAGIC + bytes([MAJOR, MINOR])
MAX_FRAME_SIZE_DEFAULT: int = _P["max_frame_size_default"]
MAX_FRAME_SIZE_FLOOR: int = _P["max_frame_size_floor"]
MAX_FRAME_SIZE_CEILING: int = _P["max_frame_size_ceiling"]
HEARTBEAT_MS_DEFAULT: int = _P["heartbeat_ms_default"]
HEARTBEAT_MS_FLOOR: int = _P["heartbeat_ms_floor"]

HEADER = struct.Struct(">IB")
REQUIRED = "REQUIRED"

U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF
INT_RANGES = {
    "rid": (1, U32),
    "u16": (0, U16),
    "u32": (0, U32),
    "u64": (0, U64),
    "priority": (0, 9),
}
STR_LIMITS = {"name": 255, "str": 65535}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str
    default: Any  # REQUIRED or the default value (already converted: bytes for "bytes")

    @property
    def required(self) -> bool:
        return isinstance(self.default, str) and self.default == REQUIRED


@dataclass(frozen=True)
class FrameSpec:
    name: str
    code: int
    direction: str  # client | server | both
    fields: tuple[FieldSpec, ...]
    example: tuple[Any, ...]

    @property
    def n_required(self) -> int:
        return sum(1 for f in self.fields if f.required)


def _field_specs(raw: list[list[Any]]) -> tuple[FieldSpec, ...]:
    out = []
    for name, ftype, default, _doc in raw:
        if ftype == "bytes" and isinstance(default, str) and default != REQUIRED:
            default = default.encode()
        out.append(FieldSpec(name, ftype, default))
    return tuple(out)


FRAMES: dict[str, FrameSpec] = {
    f["name"]: FrameSpec(
        f["name"], f["code"], f["direction"], _field_specs(f["fields"]), tuple(f.get("example", ()))
    )
    for f in SPEC["frame"]
}
BY_CODE: dict[int, FrameSpec] = {f.code: f for f in FRAMES.values()}
RECORDS: dict[str, tuple[FieldSpec, ...]] = {
    name: _field_specs(r["fields"]) for name, r in SPEC["record"].items()
}
PROPERTIES: dict[str, str] = {k: v[0] for k, v in SPEC["properties"].items()}
ERRORS: dict[str, dict[str, Any]] = {e["name"]: e for e in SPEC["error"]}
ERROR_NAMES: dict[int, str] = {e["code"]: e["name"] for e in SPEC["error"]}
FATAL_CODES: frozenset[int] = frozenset(e["code"] for e in SPEC["error"] if e["fatal"])


def code(error_name: str) -> int:
    """Error code by spec name, e.g. ``code("not-found") == 404``."""
    return int(ERRORS[error_name]["code"])


def ftype(frame_name: str) -> int:
    """Frame type byte by spec name, e.g. ``ftype("ack") == 0x37``."""
    return FRAMES[frame_name].code


# Error codes used by the tests (values come from protocol.toml, never written twice).
OK_CODE = code("ok")
NO_ROUTE = code("no-route")
CONNECTION_FORCED = code("connection-forced")
NOT_FOUND = code("not-found")
PRECONDITION_FAILED = code("precondition-failed")
HEARTBEAT_TIMEOUT = code("heartbeat-timeout")
MALFORMED_FRAME = code("malformed-frame")
FRAME_TOO_LARGE = code("frame-too-large")
UNEXPECTED_FRAME = code("unexpected-frame")
UNSUPPORTED_VERSION = code("unsupported-version")
PROTOCOL_ERROR_CODES = frozenset(e["code"] for e in SPEC["error"] if e.get("protocol_error", False))


class WireError(Exception):
    """The bytes violate the spec; ``code`` is the error code the spec assigns."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(f"{err} {ERROR_NAMES.get(err, '?')}: {message}")
        self.code = err


# ---------------------------------------------------------------------- encoding
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def raw_frame(type_code: int, body: bytes) -> bytes:
    """A frame from a type byte and an already-encoded body (may be invalid on purpose)."""
    return HEADER.pack(len(body) + 1, type_code) + body


def encode(kind: str, /, *values: Any) -> bytes:
    """Encode frame ``kind`` with positional field values (trailing fields may be omitted)."""
    spec = FRAMES[kind]
    assert len(values) <= len(spec.fields), f"{kind}: too many fields"
    return raw_frame(spec.code, _packb(list(values)))


def _to_wire(fields: tuple[FieldSpec, ...], values: dict[str, Any]) -> list[Any]:
    out = []
    for f in fields:
        if f.name in values:
            v = values[f.name]
        else:
            assert not f.required, f"missing required field {f.name}"
            v = f.default
        if f.type.startswith("list:") and isinstance(v, list):
            rec = RECORDS[f.type[5:]]
            v = [_to_wire(rec, e) if isinstance(e, dict) else e for e in v]
        out.append(v)
    return out


def encode_fields(kind: str, /, **values: Any) -> bytes:
    """Encode frame ``kind`` with every field present (defaults from the spec)."""
    spec = FRAMES[kind]
    unknown = set(values) - {f.name for f in spec.fields}
    assert not unknown, f"{kind}: unknown fields {unknown}"
    return raw_frame(spec.code, _packb(_to_wire(spec.fields, values)))


# ---------------------------------------------------------------------- decoding
@dataclass
class Frame:
    kind: str  # spec name, e.g. "deliver"
    type_code: int
    fields: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def __repr__(self) -> str:
        return f"{self.kind.upper()}({self.fields!r})"


MAX_NESTING_DEPTH: int = _P["max_nesting_depth"]


def _check_nested(v: Any, where: str, depth: int = 1) -> None:
    """Inside tables any msgpack value is fine, but every map key must be a str and
    containers nest at most max_nesting_depth levels (the table itself is level 1)."""
    if isinstance(v, (dict, list)) and depth > MAX_NESTING_DEPTH:
        raise WireError(MALFORMED_FRAME, f"{where}: nested deeper than {MAX_NESTING_DEPTH}")
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise WireError(MALFORMED_FRAME, f"{where}: non-str map key {k!r}")
            _check_nested(x, where, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _check_nested(x, where, depth + 1)


def check_value(ftype_: str, v: Any, where: str) -> Any:
    """Validate one field value against its spec type; return the decoded value."""
    bad = WireError(MALFORMED_FRAME, f"{where}: {v!r:.80} is not a valid {ftype_}")
    if ftype_ in INT_RANGES:
        lo, hi = INT_RANGES[ftype_]
        if type(v) is not int or not lo <= v <= hi:
            raise bad
        return v
    if ftype_ == "bool":
        if type(v) is not bool:
            raise bad
        return v
    if ftype_ in STR_LIMITS:
        if type(v) is not str:
            raise bad
        try:
            n = len(v.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogate
            raise bad from None
        if n > STR_LIMITS[ftype_]:
            raise bad
        return v
    if ftype_ == "bytes":
        if type(v) is not bytes:
            raise bad
        return v
    if ftype_ == "table":
        if type(v) is not dict:
            raise bad
        _check_nested(v, where)
        return v
    if ftype_ == "props":
        if type(v) is not dict:
            raise bad
        for k, x in v.items():
            if type(k) is not str or k not in PROPERTIES:
                raise WireError(MALFORMED_FRAME, f"{where}: unknown property {k!r}")
            check_value(PROPERTIES[k], x, f"{where}.{k}")
        return v
    if ftype_ == "strlist":
        if type(v) is not list:
            raise bad
        return [check_value("name", x, where) for x in v]
    if ftype_ == "tablelist":
        if type(v) is not list:
            raise bad
        return [check_value("table", x, where) for x in v]
    if ftype_ == "binlist":
        if type(v) is not list:
            raise bad
        return [check_value("bytes", x, f"{where}[{i}]") for i, x in enumerate(v)]
    if ftype_.startswith("list:"):
        if type(v) is not list:
            raise bad
        rec = RECORDS[ftype_[5:]]
        return [check_fields(rec, x, f"{where}[{i}]") for i, x in enumerate(v)]
    raise AssertionError(f"unknown field type {ftype_} in protocol.toml")


def check_fields(fields: tuple[FieldSpec, ...], arr: Any, where: str) -> dict[str, Any]:
    """Positional array -> dict by field name, defaults filled in, every value checked."""
    if type(arr) is not list:
        raise WireError(MALFORMED_FRAME, f"{where}: not an array: {arr!r:.80}")
    required = sum(1 for f in fields if f.required)
    if not required <= len(arr) <= len(fields):
        raise WireError(
            MALFORMED_FRAME, f"{where}: {len(arr)} fields, expected {required}..{len(fields)}"
        )
    out: dict[str, Any] = {}
    for i, f in enumerate(fields):
        if i < len(arr):
            out[f.name] = check_value(f.type, arr[i], f"{where}.{f.name}")
        elif f.type.startswith("list:"):
            out[f.name] = list(f.default)
        else:
            out[f.name] = f.default
    return out


def decode_body(spec: FrameSpec, body: bytes) -> Frame:
    try:
        arr = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:  # not msgpack, truncated, trailing bytes, bad UTF-8
        raise WireError(MALFORMED_FRAME, f"{spec.name}: bad msgpack body ({exc})") from None
    return Frame(spec.name, spec.code, check_fields(spec.fields, arr, spec.name))


class Decoder:
    """Incremental, strict frame decoder.

    ``accept`` is "client" for a server-side decoder (accepts client and both frames) or
    "server" for a client-side one. Checks run in the spec's order: size on the 5 header
    bytes, then type, direction, body.
    """

    def __init__(self, max_frame_size: int, accept: str) -> None:
        self.max_frame_size = max_frame_size
        self.accept = accept
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self.buf += data
        out = []
        while len(self.buf) >= HEADER.size:
            length, tcode = HEADER.unpack_from(self.buf)
            if length > self.max_frame_size:
                raise WireError(FRAME_TOO_LARGE, f"length {length} > {self.max_frame_size}")
            if length == 0:
                raise WireError(MALFORMED_FRAME, "length 0")
            if len(self.buf) < 4 + length:
                break
            spec = BY_CODE.get(tcode)
            if spec is None:
                raise WireError(MALFORMED_FRAME, f"unknown frame type {tcode:#04x}")
            if spec.direction not in (self.accept, "both"):
                raise WireError(UNEXPECTED_FRAME, f"{spec.name} may not be sent by this peer")
            body = bytes(self.buf[5 : 4 + length])
            del self.buf[: 4 + length]
            out.append(decode_body(spec, body))
        return out


def decode_one(data: bytes, accept: str) -> Frame:
    """Decode exactly one complete frame."""
    frames = Decoder(MAX_FRAME_SIZE_CEILING, accept).feed(data)
    assert len(frames) == 1, f"expected one frame, got {frames}"
    return frames[0]


# ---------------------------------------------------------------------- raw client
class Closed(Exception):
    """The server closed the connection (EOF or reset)."""


class Conn:
    """A blocking raw-socket connection to the broker; every read is bounded in time."""

    def __init__(self, port: int, timeout: float = 5.0, minor: int = MINOR) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        # The preamble handshake() sends: the spec's version, or an older (or newer) minor.
        self.preamble = MAGIC + bytes([MAJOR, minor])
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.dec = Decoder(MAX_FRAME_SIZE_CEILING, "server")
        self.pending: deque[Frame] = deque()
        self.eof = False
        self.reset = False
        self.heartbeats = 0
        self.hello: Frame | None = None
        self.open_ok: Frame | None = None
        # Publish credit (section 12, "Publisher flow control"): the sum of every
        # PUBLISH_CREDIT received minus what send_publish used; recv() folds them in.
        self.credit_messages = 0
        self.credit_bytes = 0
        self.blocked = ""
        self.credit_frames: list[Frame] = []

    # -- output
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, kind: str, *values: Any) -> None:
        self.send(encode(kind, *values))

    def try_send(self, data: bytes) -> bool:
        """Send, tolerating the server having already closed (it may refuse mid-write)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    # -- input
    def _fill(self, deadline: float) -> None:
        """Read once from the socket (until ``deadline``); sets ``eof`` on close."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no frame from the server in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(262144)
        except TimeoutError:
            raise TimeoutError("no frame from the server in time") from None
        except ConnectionResetError:
            self.eof = self.reset = True
            return
        if not data:
            self.eof = True
            return
        self.pending.extend(self.dec.feed(data))

    def recv_any(self, timeout: float | None = None) -> Frame:
        """Next frame, heartbeats included. Raises Closed on EOF, TimeoutError on silence."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.pending:
            if self.eof:
                raise Closed("connection closed by the server")
            self._fill(deadline)
        return self.pending.popleft()

    def recv(self, timeout: float | None = None) -> Frame:
        """Next frame that is not a HEARTBEAT or PUBLISH_CREDIT (heartbeats are counted,
        credit is added to ``credit_messages`` / ``credit_bytes``)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            f = self.recv_any(max(0.0, deadline - time.monotonic()))
            if f.kind == "heartbeat":
                self.heartbeats += 1
                continue
            if f.kind == "publish_credit":
                self.add_credit(f)
                continue
            return f

    def add_credit(self, f: Frame) -> None:
        self.credit_frames.append(f)
        self.credit_messages += f["messages"]
        self.credit_bytes += f["bytes"]
        self.blocked = f["blocked"]

    def expect(self, kind: str, timeout: float | None = None, **fields: Any) -> Frame:
        """Next non-heartbeat frame must be ``kind`` with the given field values."""
        f = self.recv(timeout)
        assert f.kind == kind, f"expected {kind.upper()}, got {f!r}"
        for k, v in fields.items():
            assert f[k] == v, f"{kind.upper()}.{k}: expected {v!r}, got {f!r}"
        return f

    def expect_error(self, err: int, rid: int = 0, timeout: float | None = None) -> Frame:
        f = self.recv(timeout)
        assert f.kind == "error", f"expected ERROR {err}, got {f!r}"
        assert (f["rid"], f["code"]) == (rid, err), f"expected ERROR {rid=} {err}, got {f!r}"
        return f

    def expect_closed(self, timeout: float | None = None) -> list[Frame]:
        """Read until the server closes; return the non-heartbeat frames received first."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        got: list[Frame] = []
        while True:
            try:
                f = self.recv_any(max(0.0, deadline - time.monotonic()))
            except Closed:
                return got
            if f.kind == "publish_credit":
                self.add_credit(f)
            elif f.kind != "heartbeat":
                got.append(f)

    def expect_fatal(self, err: int, timeout: float | None = None) -> Frame:
        """ERROR(rid 0, err) is the last frame, then the server closes the socket."""
        frames = self.expect_closed(timeout)
        assert frames, f"server closed without sending ERROR {err}"
        last = frames[-1]
        assert last.kind == "error", f"expected ERROR {err} before close, got {frames!r}"
        assert (last["rid"], last["code"]) == (0, err), f"expected ERROR 0 {err}, got {last!r}"
        return last

    def expect_silence(self, duration: float) -> None:
        """Nothing but heartbeats arrives for ``duration`` and the connection stays open."""
        deadline = time.monotonic() + duration
        while True:
            try:
                f = self.recv(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return
            raise AssertionError(f"expected silence, got {f!r}")

    # -- protocol helpers
    def handshake(self, *auth: Any) -> Frame:
        """Preamble, HELLO, AUTH (positional AUTH fields), OPEN_OK; return OPEN_OK."""
        self.send(self.preamble)
        self.hello = self.expect("hello")
        if not auth:
            auth = ("anonymous", "", {"library": "conformance-raw"}, 0, 0)
        self.send_frame("auth", *auth)
        self.open_ok = self.expect("open_ok")
        # From now on both sides use the negotiated cap: the server must respect it too.
        self.dec.max_frame_size = self.open_ok["max_frame_size"]
        # Section 12: the initial PUBLISH_CREDIT is the frame right after OPEN_OK.
        while True:
            f = self.recv_any()
            if f.kind != "heartbeat":
                break
            self.heartbeats += 1
        assert f.kind == "publish_credit", f"expected PUBLISH_CREDIT after OPEN_OK, got {f!r}"
        self.add_credit(f)
        return self.open_ok

    def request(self, kind: str, rid: int, *values: Any, timeout: float | None = None) -> Frame:
        """Send a request and return its reply (success frame or ERROR with that rid)."""
        self.send_frame(kind, rid, *values)
        f = self.recv(timeout)
        assert f["rid"] == rid, f"expected reply to rid {rid}, got {f!r}"
        return f

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_conn(port: int, timeout: float = 5.0, *auth: Any, minor: int = MINOR) -> Conn:
    c = Conn(port, timeout, minor)
    c.handshake(*auth)
    return c


def declare(c: Conn, rid: int, queue: str) -> Frame:
    """A non-durable, non-exclusive queue (so other connections may use it)."""
    reply = c.request("queue_declare", rid, queue, False, False, False, False, {})
    assert reply.kind == "queue_declare_ok", reply
    return reply


def message_count(c: Conn, rid: int, queue: str) -> int:
    """Ready messages in ``queue`` (a passive declare)."""
    reply = c.request("queue_declare", rid, queue, False, False, False, True, {})
    assert reply.kind == "queue_declare_ok", reply
    return int(reply["message_count"])


def deliveries(frame: Frame) -> list[dict[str, Any]]:
    """DELIVER / DELIVER_BATCH / DELIVER_RUN -> list of delivery dicts (with consumer_tag)."""
    if frame.kind == "deliver":
        return [dict(frame.fields)]
    if frame.kind == "deliver_run":  # first deliveries with consecutive tags (since 1.1)
        assert frame["bodies"], "DELIVER_RUN without bodies"
        return [
            {
                "consumer_tag": frame["consumer_tag"],
                "delivery_tag": frame["first_tag"] + i,
                "redelivered": False,
                "exchange": frame["exchange"],
                "routing_key": frame["routing_key"],
                "properties": dict(frame["properties"]),
                "body": body,
                "delivery_count": 1,
            }
            for i, body in enumerate(frame["bodies"])
        ]
    assert frame.kind == "deliver_batch", f"not a delivery: {frame!r}"
    assert frame["entries"], "DELIVER_BATCH without entries"
    return [dict(e, consumer_tag=frame["consumer_tag"]) for e in frame["entries"]]
