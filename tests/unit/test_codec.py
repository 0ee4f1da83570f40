"""Tests for the sans-IO codec and connection state machine in ``protocol/``.

The vectors in ``spec/vectors/`` are the contract: every valid vector must decode to its
documented fields and re-encode to the same bytes, every invalid vector must fail with its
documented error code, and every partial vector must wait for more data.
"""

from __future__ import annotations

import dataclasses
import json
import random
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor import protocol
from conveyor.protocol import _generated as g
from conveyor.protocol.codec import HEADER_SIZE
from conveyor.protocol.connection import Connection, Role, State

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "spec" / "vectors"
FRAMES = json.loads((VECTORS / "frames.json").read_text())["vectors"]
INVALID_DOC = json.loads((VECTORS / "invalid.json").read_text())
INVALID = [v for v in INVALID_DOC["vectors"] if v["stage"] != "partial"]
PARTIAL = [v for v in INVALID_DOC["vectors"] if v["stage"] == "partial"]

CAP = 1048576
ALL_FRAMES = g.CLIENT_FRAMES | g.SERVER_FRAMES
# The only exceptions a decoder may raise on hostile input.
EXPECTED_ERRORS: tuple[type[protocol.ConveyorError], ...] = (
    g.MalformedFrame,
    g.FrameTooLarge,
    g.UnexpectedFrame,
)
# Frame fields that hold lists of records, and the record class of their entries.
RECORD_FIELDS: dict[tuple[str, str], type[Any]] = {
    ("publish_batch", "entries"): g.PublishEntry,
    ("deliver_batch", "entries"): g.DeliveryEntry,
    ("get_ok", "entries"): g.DeliveryEntry,
}


def server_decoder() -> protocol.Decoder:
    return protocol.Decoder(max_frame_size=CAP, accept=g.CLIENT_FRAMES)


def accept_sets(cls: type[protocol.Frame]) -> list[frozenset[int]]:
    """The decoders that must accept ``cls``: the receiving side(s) of its direction."""
    return {
        "client": [g.CLIENT_FRAMES],
        "server": [g.SERVER_FRAMES],
        "both": [g.CLIENT_FRAMES, g.SERVER_FRAMES],
    }[cls.DIRECTION]


def from_json(v: Any) -> Any:
    """Vector JSON -> Python values: {"$bin": hex} -> bytes, recursively."""
    if isinstance(v, dict):
        if set(v) == {"$bin"}:
            return bytes.fromhex(v["$bin"])
        return {k: from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_json(x) for x in v]
    return v


def record_as_dict(rec: Any) -> dict[str, Any]:
    return dict(rec._asdict())


def frame_from_vector(vec: dict[str, Any]) -> protocol.Frame:
    """Build the frame object from a vector's decoded fields, independently of the decoder."""
    cls = g.FRAME_TYPES[vec["code"]]
    kwargs = {}
    for name, value in from_json(vec["decoded"]).items():
        rec = RECORD_FIELDS.get((vec["type"], name))
        kwargs[name] = [rec(**e) for e in value] if rec else value
    return cls(**kwargs)


def frame_len(data: bytes) -> int:
    return 4 + struct.unpack_from(">I", data)[0]


# =============================================================== (a) valid vectors


def test_frames_json_covers_every_frame_type_once() -> None:
    codes = [v["code"] for v in FRAMES]
    assert sorted(codes) == sorted(g.FRAME_TYPES)
    assert len(codes) == len(set(codes)) == 40


@pytest.mark.parametrize("vec", FRAMES, ids=[v["type"] for v in FRAMES])
def test_valid_vector_decodes_and_reencodes(vec: dict[str, Any]) -> None:
    data = bytes.fromhex(vec["hex"])
    cls = g.FRAME_TYPES[vec["code"]]
    assert vec["type"] == cls.NAME
    assert data[4] == vec["code"]
    assert frame_len(data) == len(data)
    expected = from_json(vec["decoded"])
    field_names = [f.name for f in dataclasses.fields(cls)]
    assert list(expected) == field_names  # vectors list every field, in wire order

    for accept in accept_sets(cls):
        dec = protocol.Decoder(max_frame_size=CAP, accept=accept)
        if cls is g.Compressed:
            # A decoder unwraps COMPRESSED (503 unless negotiated; tests/unit/
            # test_compression.py), so its vector is checked at the frame-class level.
            with pytest.raises(g.UnexpectedFrame):
                dec.feed(data)
            dec = protocol.Decoder(max_frame_size=CAP, accept=accept)
            frames = [cls.from_wire(msgpack.unpackb(data[5:]))]
        else:
            frames = dec.feed(data)
        assert len(frames) == 1
        frame = frames[0]
        assert type(frame) is cls
        assert vec["type"] == frame.NAME
        for name, want in expected.items():
            got = getattr(frame, name)
            if (vec["type"], name) in RECORD_FIELDS:
                assert [record_as_dict(e) for e in got] == want
            else:
                assert got == want
                assert type(got) is type(want)  # bool stays bool, bytes stay bytes
        assert dec.buffered == 0
        assert frame == frame_from_vector(vec)
        assert protocol.encode(frame) == data
        assert protocol.encode_many([frame, frame]) == data + data


@pytest.mark.parametrize(
    "vec",
    [v for v in FRAMES if g.FRAME_TYPES[v["code"]].DIRECTION != "both"],
    ids=[v["type"] for v in FRAMES if g.FRAME_TYPES[v["code"]].DIRECTION != "both"],
)
def test_valid_vector_refused_in_wrong_direction(vec: dict[str, Any]) -> None:
    cls = g.FRAME_TYPES[vec["code"]]
    wrong = g.SERVER_FRAMES if cls.DIRECTION == "client" else g.CLIENT_FRAMES
    with pytest.raises(g.UnexpectedFrame) as exc:
        protocol.Decoder(CAP, wrong).feed(bytes.fromhex(vec["hex"]))
    assert exc.value.code == 503


def test_all_vectors_in_one_stream() -> None:
    vectors = [v for v in FRAMES if v["type"] != "compressed"]  # unwrapped: see above
    data = b"".join(bytes.fromhex(v["hex"]) for v in vectors)
    frames = protocol.Decoder(CAP, ALL_FRAMES).feed(data)
    assert [f.NAME for f in frames] == [v["type"] for v in vectors]
    assert protocol.encode_many(frames) == data


OMITTED_CASES: list[tuple[int, list[Any], protocol.Frame]] = [
    (g.Ack.TYPE, [3], g.Ack(3, False)),
    (g.Nack.TYPE, [4], g.Nack(4, False, True)),
    (g.Reject.TYPE, [5], g.Reject(5, False)),
    (g.Close.TYPE, [], g.Close(200, "")),
    (g.Auth.TYPE, [], g.Auth("anonymous", "", {}, 0, 0)),
    (g.QueueDeclare.TYPE, [1], g.QueueDeclare(1, "", True, False, False, False, {})),
    (g.ExchangeDeclare.TYPE, [1, "x"], g.ExchangeDeclare(1, "x", "direct", True, False, False, {})),
    (g.Get.TYPE, [11, "q"], g.Get(11, "q", 1, False)),
    (g.Consume.TYPE, [9, "q"], g.Consume(9, "q", "", False, False, 0, {})),
    (g.Bind.TYPE, [6, "ex", "q"], g.Bind(6, "ex", "q", "", {})),
    (g.Publish.TYPE, [1, "", "q", {}, b"x"], g.Publish(1, "", "q", {}, b"x", False)),
    (
        g.PublishBatch.TYPE,
        [0, [["", "q", {}, b"a"]]],
        g.PublishBatch(0, [g.PublishEntry("", "q", {}, b"a", False)]),
    ),
]


@pytest.mark.parametrize(
    ("ftype", "fields", "expected"),
    OMITTED_CASES,
    ids=[g.FRAME_TYPES[c[0]].NAME for c in OMITTED_CASES],
)
def test_omitted_trailing_fields_take_defaults(
    ftype: int, fields: list[Any], expected: protocol.Frame
) -> None:
    body = msgpack.packb(fields, use_bin_type=True)
    data = struct.pack(">IB", len(body) + 1, ftype) + body
    assert server_decoder().feed(data) == [expected]


def test_omitted_trailing_fields_server_frames() -> None:
    dec = protocol.Decoder(CAP, g.SERVER_FRAMES)
    data = b"".join(
        struct.pack(">IB", len(b) + 1, t) + b
        for t, b in [
            (g.Confirm.TYPE, msgpack.packb([1, 3])),
            (g.Error.TYPE, msgpack.packb([0, 406])),
            (g.Cancelled.TYPE, msgpack.packb(["ctag-1"])),
            (g.GetOk.TYPE, msgpack.packb([11])),
            (g.Hello.TYPE, msgpack.packb(["1.0", 4096, 0])),
        ]
    )
    assert dec.feed(data) == [
        g.Confirm(1, 3, True, 0, ""),
        g.Error(0, 406, "", {}),
        g.Cancelled("ctag-1", 404, ""),
        g.GetOk(11, [], 0),
        g.Hello("1.0", 4096, 0, {}, []),
    ]


def test_omitted_body_defaults_to_empty_bytes() -> None:
    body = msgpack.packb([1, "", "q"])
    (frame,) = server_decoder().feed(struct.pack(">IB", len(body) + 1, g.Publish.TYPE) + body)
    assert isinstance(frame, g.Publish)
    assert frame.body == b""
    # and a frame built with the default must be accepted by a peer
    assert server_decoder().feed(protocol.encode(g.Publish(1))) == [g.Publish(1, body=b"")]


def test_frame_of_exactly_max_size_is_accepted() -> None:
    cap = 4096
    overhead = len(protocol.encode(g.Publish(1, "", "q", {}, b"", False))) - 4
    # an empty body is bin8 (c4 00); a ~4 KiB one is bin16 (c5 + 2 length bytes): 1 byte more
    body = b"\x00" * (cap - overhead - 1)
    frame = g.Publish(1, "", "q", {}, body, False)
    data = protocol.encode(frame)
    assert struct.unpack_from(">I", data)[0] == cap
    assert protocol.Decoder(cap, g.CLIENT_FRAMES).feed(data) == [frame]
    bigger = protocol.encode(g.Publish(1, "", "q", {}, body + b"\x00", False))
    with pytest.raises(g.FrameTooLarge):
        protocol.Decoder(cap, g.CLIENT_FRAMES).feed(bigger[:HEADER_SIZE])


def test_decoder_max_frame_size_is_clamped_to_ceiling() -> None:
    dec = protocol.Decoder(2**32 - 1, g.CLIENT_FRAMES)
    assert dec.max_frame_size == g.MAX_FRAME_SIZE_CEILING == 134217728
    with pytest.raises(g.FrameTooLarge):
        dec.feed(struct.pack(">IB", g.MAX_FRAME_SIZE_CEILING + 1, g.Publish.TYPE))


# =============================================================== (b) invalid vectors


def test_invalid_vectors_cover_the_required_cases() -> None:
    assert len(INVALID) >= 25
    assert len(PARTIAL) >= 5
    assert {v["code"] for v in INVALID} == {501, 502, 503, 505}
    names = [v["name"] for v in INVALID_DOC["vectors"]]
    assert len(names) == len(set(names))
    for v in INVALID:
        assert v["stage"] in ("preamble", "frame")
        assert g.ERROR_CODES[v["error"]] == v["code"]
        assert v["why"]


@pytest.mark.parametrize("vec", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vector_raises(vec: dict[str, Any]) -> None:
    data = bytes.fromhex(vec["hex"])
    expected_cls = type(protocol.error_for_code(vec["code"]))
    if vec["stage"] == "preamble":
        assert len(data) == 8
        with pytest.raises(protocol.ConveyorError) as exc:
            protocol.parse_preamble(data)
    else:
        dec = server_decoder()
        # Nothing is decided before the last byte: the vector is exactly one frame (or, for
        # size errors, exactly the 5 header bytes).
        assert dec.feed(data[:-1]) == []
        with pytest.raises(protocol.ConveyorError) as exc:
            dec.feed(data[-1:])
    err = exc.value
    assert type(err) is expected_cls
    assert isinstance(err, protocol.ProtocolError)
    assert err.code == vec["code"]
    assert err.name == vec["error"]
    assert err.fatal is True


@pytest.mark.parametrize("vec", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vector_behind_valid_frame_raises(vec: dict[str, Any]) -> None:
    """A bad frame behind a good one in the same read raises; the good one was consumed."""
    if vec["stage"] == "preamble":
        conn = Connection(Role.SERVER)
        with pytest.raises(protocol.ConveyorError) as exc:
            conn.receive_data(bytes.fromhex(vec["hex"]) + protocol.encode(g.Auth()))
        assert exc.value.code == vec["code"]
        assert conn.state is State.AWAIT_PREAMBLE
        return
    dec = server_decoder()
    good = protocol.encode(g.Heartbeat())
    with pytest.raises(protocol.ConveyorError) as exc:
        dec.feed(good + bytes.fromhex(vec["hex"]))
    assert exc.value.code == vec["code"]
    assert dec.buffered == len(vec["hex"]) // 2


def test_preamble_vectors_error_details() -> None:
    with pytest.raises(g.UnsupportedVersion) as exc:
        protocol.parse_preamble(b"CNVYMQ\x02\x00")
    assert exc.value.details == {"server_major": 1}
    assert "1.x" in exc.value.message
    assert protocol.parse_preamble(b"CNVYMQ\x01\x00") == (1, 0)
    assert protocol.parse_preamble(b"CNVYMQ\x01\x07") == (1, 7)  # any minor of major 1
    with pytest.raises(g.MalformedFrame):
        protocol.parse_preamble(b"CNVYMQ\x01")  # short


def test_frame_too_large_details() -> None:
    with pytest.raises(g.FrameTooLarge) as exc:
        server_decoder().feed(struct.pack(">IB", CAP + 1, g.Publish.TYPE))
    assert exc.value.details == {"length": CAP + 1, "max_frame_size": CAP}


@pytest.mark.parametrize("vec", PARTIAL, ids=[v["name"] for v in PARTIAL])
def test_partial_vector_needs_more_data(vec: dict[str, Any]) -> None:
    data = bytes.fromhex(vec["hex"])
    dec = server_decoder()
    assert dec.feed(data) == []
    assert dec.buffered == len(data)
    # byte by byte as well
    dec = server_decoder()
    for i in range(len(data)):
        assert dec.feed(data[i : i + 1]) == []
    assert dec.buffered == len(data)


def test_partial_publish_completes_with_last_byte() -> None:
    frame = g.Publish(1, "", "tasks", {}, b"hello", False)
    data = protocol.encode(frame)
    vec = next(v for v in PARTIAL if v["name"] == "publish_missing_last_byte")
    assert bytes.fromhex(vec["hex"]) == data[:-1]
    dec = server_decoder()
    assert dec.feed(data[:-1]) == []
    assert dec.feed(data[-1:]) == [frame]
    assert dec.buffered == 0


# =============================================================== strategies


def utf8_limited(max_bytes: int, max_chars: int | None = None) -> st.SearchStrategy[str]:
    """Text of at most ``max_bytes`` UTF-8 bytes (truncated on a character boundary)."""
    chars = max_chars if max_chars is not None else max_bytes
    return st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=chars).map(
            lambda s: s.encode()[:max_bytes].decode("utf-8", "ignore")
        ),
        st.just("n" * max_bytes),
        st.just("\u00e9" * (max_bytes // 2)),
    )


names = utf8_limited(255, 64)
bodies = st.binary(max_size=300)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
rids = st.integers(1, 2**32 - 1)

any_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
tables = st.dictionaries(st.text(max_size=12), any_value, max_size=5)
properties = st.fixed_dictionaries(
    {},
    optional={
        "message_id": names,
        "correlation_id": names,
        "reply_to": names,
        "content_type": names,
        "content_encoding": names,
        "type": names,
        "app_id": names,
        "headers": tables,
        "timestamp": u64,
        "ttl": u64,
        "priority": st.integers(0, 9),
        "persistent": st.booleans(),
        "delay": u64,
    },
)

publishes = st.builds(g.Publish, u64, names, names, properties, bodies, st.booleans())
publish_entries = st.builds(g.PublishEntry, names, names, properties, bodies, st.booleans())
publish_batches = st.builds(g.PublishBatch, u64, st.lists(publish_entries, min_size=1, max_size=5))
delivers = st.builds(g.Deliver, names, u64, st.booleans(), names, names, properties, bodies, u32)
delivery_entries = st.builds(
    g.DeliveryEntry, u64, st.booleans(), names, names, properties, bodies, u32
)
deliver_batches = st.builds(
    g.DeliverBatch, names, st.lists(delivery_entries, min_size=1, max_size=5)
)
queue_declares = st.builds(
    g.QueueDeclare, rids, names, st.booleans(), st.booleans(), st.booleans(), st.booleans(), tables
)
errors = st.builds(g.Error, u32, u16, utf8_limited(65535, 200), tables)
client_frames = st.one_of(
    publishes,
    publish_batches,
    queue_declares,
    st.builds(g.Ack, u64, st.booleans()),
    st.builds(g.Credit, names, u32),
    st.just(g.Heartbeat()),
    st.builds(g.Close, u16, utf8_limited(65535, 100)),
)
server_frames = st.one_of(
    delivers,
    deliver_batches,
    errors,
    st.builds(g.Confirm, u64, u64, st.booleans(), u16, st.text(max_size=50)),
    st.builds(g.GetOk, rids, st.lists(delivery_entries, max_size=3), u64),
    st.just(g.CloseOk()),
)


def decode_one(frame: protocol.Frame) -> protocol.Frame:
    (accept,) = accept_sets(type(frame))[:1]
    dec = protocol.Decoder(max_frame_size=CAP, accept=accept)
    out = dec.feed(protocol.encode(frame))
    assert len(out) == 1
    assert dec.buffered == 0
    return out[0]


# =============================================================== (c) fragmentation


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(st.one_of(client_frames, server_frames), min_size=1, max_size=40),
    chunks=st.lists(st.integers(1, 64), min_size=1, max_size=50),
)
def test_random_fragmentation_yields_same_frames(
    frames: list[protocol.Frame], chunks: list[int]
) -> None:
    data = protocol.encode_many(frames)
    assert data == b"".join(protocol.encode(f) for f in frames)
    dec = protocol.Decoder(CAP, ALL_FRAMES)
    out: list[protocol.Frame] = []
    pos = 0
    i = 0
    while pos < len(data):
        n = chunks[i % len(chunks)]
        i += 1
        out += dec.feed(memoryview(data)[pos : pos + n])
        pos += n
    assert out == frames
    assert dec.buffered == 0


def test_long_stream_fragmentation_with_compaction() -> None:
    """Well over 64 KiB in small reads exercises the buffer compaction path."""
    rng = random.Random(1234)
    frames: list[protocol.Frame] = []
    for i in range(3000):
        body = rng.randbytes(rng.randint(0, 200))
        frames.append(g.Publish(i + 1, "ex", f"k.{i}", {"priority": i % 10}, body, i % 2 == 0))
        if i % 7 == 0:
            frames.append(g.Ack(i, True))
    data = protocol.encode_many(frames)
    assert len(data) > 200_000
    dec = server_decoder()
    out: list[protocol.Frame] = []
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 2, 3, 5, 17, 100, 4096, 70000])
        out += dec.feed(data[pos : pos + n])
        pos += n
    assert out == frames
    assert dec.buffered == 0


# =============================================================== (d) round trips


def assert_round_trip(frame: protocol.Frame) -> None:
    back = decode_one(frame)
    assert back == frame
    # byte-identical re-encoding also catches type changes that == hides (True == 1)
    assert protocol.encode(back) == protocol.encode(frame)


@settings(max_examples=200, deadline=None)
@given(publishes)
def test_round_trip_publish(frame: g.Publish) -> None:
    assert_round_trip(frame)


@settings(max_examples=100, deadline=None)
@given(publish_batches)
def test_round_trip_publish_batch(frame: g.PublishBatch) -> None:
    assert_round_trip(frame)


@settings(max_examples=200, deadline=None)
@given(delivers)
def test_round_trip_deliver(frame: g.Deliver) -> None:
    assert_round_trip(frame)


@settings(max_examples=100, deadline=None)
@given(deliver_batches)
def test_round_trip_deliver_batch(frame: g.DeliverBatch) -> None:
    assert_round_trip(frame)


@settings(max_examples=200, deadline=None)
@given(queue_declares)
def test_round_trip_queue_declare(frame: g.QueueDeclare) -> None:
    assert_round_trip(frame)


@settings(max_examples=200, deadline=None)
@given(errors)
def test_round_trip_error(frame: g.Error) -> None:
    assert_round_trip(frame)


@pytest.mark.parametrize(
    "frame",
    [
        g.QueueDeclare(2**32 - 1, "q" * 255),
        g.Publish(2**64 - 1, "\u00e9" * 127 + "x", "", {"priority": 9, "ttl": 2**64 - 1}, b""),
        g.Error(0, 65535, "m" * 65535, {}),
        g.Credit("", 2**32 - 1),
    ],
    ids=["max-rid-and-name", "max-u64-multibyte-name", "max-str", "max-credit"],
)
def test_round_trip_at_limits(frame: protocol.Frame) -> None:
    assert_round_trip(frame)


# =============================================================== (e) fuzz


def fuzz_feed(data: bytes) -> None:
    try:
        frames = server_decoder().feed(data)
    except EXPECTED_ERRORS as exc:
        assert exc.code in (501, 502, 503)
        return
    for f in frames:
        assert isinstance(f, protocol.Frame)
        assert f.TYPE in g.CLIENT_FRAMES


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    fuzz_feed(data)


@settings(max_examples=1000, deadline=None)
@given(
    ftype=st.sampled_from([*sorted(g.FRAME_TYPES), 0x00, 0x09, 0xFF]), body=st.binary(max_size=120)
)
def test_fuzz_random_body_with_valid_header(ftype: int, body: bytes) -> None:
    fuzz_feed(struct.pack(">IB", len(body) + 1, ftype) + body)


@settings(max_examples=1000, deadline=None)
@given(
    ftype=st.sampled_from(sorted(g.CLIENT_FRAMES)),
    fields=st.lists(any_value, max_size=8),
)
def test_fuzz_random_msgpack_fields(ftype: int, fields: list[Any]) -> None:
    body = msgpack.packb(fields, use_bin_type=True)
    fuzz_feed(struct.pack(">IB", len(body) + 1, ftype) + body)


@settings(max_examples=1000, deadline=None)
@given(
    vec=st.sampled_from(FRAMES),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_fuzz_mutated_vectors(vec: dict[str, Any], flips: list[tuple[int, int]]) -> None:
    data = bytearray.fromhex(vec["hex"])
    for pos, byte in flips:
        data[pos % len(data)] = byte
    fuzz_feed(bytes(data))


# =============================================================== (f) connection


def open_server() -> Connection:
    conn = Connection(Role.SERVER)
    assert conn.state is State.AWAIT_PREAMBLE
    assert conn.receive_data(g.PREAMBLE) == []
    assert conn.state is State.AWAIT_AUTH
    assert conn.receive_data(protocol.encode(g.Auth())) == [g.Auth()]
    assert conn.state is State.AUTHENTICATING
    conn.send(g.OpenOk("c-1", CAP, 0))
    assert conn.state is State.OPEN
    return conn


def open_client() -> Connection:
    conn = Connection(Role.CLIENT)
    assert conn.preamble() == b"CNVYMQ\x01\x02"
    assert conn.state is State.AWAIT_HELLO
    hello = g.Hello("1.0", CAP, 10000, {"product": "conveyor"}, ["anonymous"])
    assert conn.receive_data(protocol.encode(hello)) == [hello]
    assert conn.state is State.HELLO_RECEIVED
    assert conn.send(g.Auth()) == protocol.encode(g.Auth())
    assert conn.state is State.AWAIT_OPEN_OK
    assert conn.receive_data(protocol.encode(g.OpenOk("c-1", CAP, 10000))) == [
        g.OpenOk("c-1", CAP, 10000)
    ]
    assert conn.state is State.OPEN
    return conn


def test_handshakes_reach_open() -> None:
    assert open_server().state is State.OPEN
    assert open_client().state is State.OPEN


@pytest.mark.parametrize(
    "frame",
    [g.Heartbeat(), g.QueueDeclare(1, "q"), g.Publish(0, "", "q", {}, b"x"), g.Close()],
    ids=["heartbeat", "queue_declare", "publish", "close"],
)
def test_server_rejects_frame_before_auth(frame: protocol.Frame) -> None:
    conn = Connection(Role.SERVER)
    with pytest.raises(g.UnexpectedFrame) as exc:
        conn.receive_data(g.PREAMBLE + protocol.encode(frame))
    assert exc.value.code == 503
    assert exc.value.details == {"state": "await-auth", "frame": frame.NAME}


def test_server_rejects_frame_while_authenticating() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(g.PREAMBLE + protocol.encode(g.Auth()))
    assert conn.state is State.AUTHENTICATING
    with pytest.raises(g.UnexpectedFrame):
        conn.receive_data(protocol.encode(g.Heartbeat()))


def test_server_rejects_second_auth_in_same_read() -> None:
    conn = Connection(Role.SERVER)
    with pytest.raises(g.UnexpectedFrame) as exc:
        conn.receive_data(g.PREAMBLE + protocol.encode(g.Auth()) * 2)
    assert exc.value.details["state"] == "authenticating"


def test_server_rejects_second_auth_when_open() -> None:
    conn = open_server()
    with pytest.raises(g.UnexpectedFrame) as exc:
        conn.receive_data(protocol.encode(g.Auth()))
    assert exc.value.details == {"state": "open", "frame": "auth"}


def test_server_open_passes_client_frames_through() -> None:
    conn = open_server()
    frames = [g.QueueDeclare(1, "q"), g.Publish(1, "", "q", {}, b"x"), g.Heartbeat(), g.Ack(1)]
    assert conn.receive_data(protocol.encode_many(frames)) == frames
    assert conn.state is State.OPEN


def test_client_rejects_deliver_before_hello() -> None:
    conn = Connection(Role.CLIENT)
    with pytest.raises(g.UnexpectedFrame) as exc:
        conn.receive_data(protocol.encode(g.Deliver("ctag-1", 1, body=b"x")))
    assert exc.value.details == {"state": "await-hello", "frame": "deliver"}


def test_client_rejects_deliver_before_open_ok() -> None:
    conn = Connection(Role.CLIENT)
    conn.receive_data(protocol.encode(g.Hello("1.0", CAP, 0)))
    conn.send(g.Auth())
    assert conn.state is State.AWAIT_OPEN_OK
    with pytest.raises(g.UnexpectedFrame) as exc:
        conn.receive_data(protocol.encode(g.Deliver("ctag-1", 1, body=b"x")))
    assert exc.value.details == {"state": "await-open-ok", "frame": "deliver"}


def test_client_rejects_anything_but_error_before_sending_auth() -> None:
    conn = Connection(Role.CLIENT)
    conn.receive_data(protocol.encode(g.Hello("1.0", CAP, 0)))
    with pytest.raises(g.UnexpectedFrame):
        conn.receive_data(protocol.encode(g.OpenOk("c-1", CAP, 0)))


@pytest.mark.parametrize(
    "frame", [g.Hello("1.0", CAP, 0), g.OpenOk("c-2", CAP, 0)], ids=["hello", "open_ok"]
)
def test_client_rejects_handshake_frames_when_open(frame: protocol.Frame) -> None:
    conn = open_client()
    with pytest.raises(g.UnexpectedFrame):
        conn.receive_data(protocol.encode(frame))


def test_client_receives_fatal_error_during_handshake() -> None:
    conn = Connection(Role.CLIENT)
    err = g.Error(0, 505, "this server speaks 1.x", {"server_major": 1})
    assert conn.receive_data(protocol.encode(err) + protocol.encode(g.Heartbeat())) == [err]
    assert conn.state is State.CLOSED
    assert conn.receive_data(protocol.encode(g.Heartbeat())) == []


def test_client_auth_failure() -> None:
    conn = Connection(Role.CLIENT)
    conn.receive_data(protocol.encode(g.Hello("1.0", CAP, 0)))
    conn.send(g.Auth("token", "bad"))
    err = g.Error(0, 401, "bad token")
    assert conn.receive_data(protocol.encode(err)) == [err]
    assert conn.state is State.CLOSED


def test_client_non_fatal_error_keeps_connection_open() -> None:
    conn = open_client()
    errs = [g.Error(7, 404, "no queue 'q1'", {"queue": "q1"}), g.Error(0, 406, "unknown tag")]
    assert conn.receive_data(protocol.encode_many(errs)) == errs
    assert conn.state is State.OPEN


def test_client_fatal_error_when_open_closes_and_drops_rest() -> None:
    conn = open_client()
    err = g.Error(0, 408, "heartbeat timeout")
    data = protocol.encode(g.Ok(1)) + protocol.encode(err) + protocol.encode(g.Ok(2))
    assert conn.receive_data(data) == [g.Ok(1), err]
    assert conn.state is State.CLOSED


def test_server_sending_fatal_error_closes() -> None:
    conn = Connection(Role.SERVER)
    with pytest.raises(g.MalformedFrame) as exc:
        conn.receive_data(b"GET / HTTP/1.1\r\n")
    out = conn.send(g.Error(0, exc.value.code, exc.value.message))
    assert out[4] == g.Error.TYPE
    assert conn.state is State.CLOSED
    assert conn.receive_data(g.PREAMBLE) == []


def test_server_sending_request_error_stays_open() -> None:
    conn = open_server()
    conn.send(g.Error(5, 404, "no queue"))
    assert conn.state is State.OPEN


def test_client_initiated_close() -> None:
    client, server = open_client(), open_server()
    wire = client.send(g.Close(200, "bye"))
    assert client.state is State.CLOSING
    assert server.receive_data(wire) == [g.Close(200, "bye")]
    assert server.state is State.CLOSE_RECEIVED
    wire = server.send(g.CloseOk())
    assert server.state is State.CLOSED
    # a delivery that crossed the CLOSE on the wire is dropped; CLOSE_OK closes
    crossed = protocol.encode(g.Deliver("ctag-1", 9, body=b"late"))
    assert client.receive_data(crossed + wire) == [g.CloseOk()]
    assert client.state is State.CLOSED
    assert client.receive_data(crossed) == []


def test_server_initiated_close() -> None:
    client, server = open_client(), open_server()
    wire = server.send(g.Close(320, "server shutting down"))
    assert server.state is State.CLOSING
    assert client.receive_data(wire) == [g.Close(320, "server shutting down")]
    assert client.state is State.CLOSE_RECEIVED
    late = protocol.encode(g.Ack(1))
    assert server.receive_data(late + client.send(g.CloseOk())) == [g.CloseOk()]
    assert client.state is State.CLOSED
    assert server.state is State.CLOSED


def test_simultaneous_close() -> None:
    client, server = open_client(), open_server()
    c_close, s_close = client.send(g.Close()), server.send(g.Close())
    assert client.receive_data(s_close) == [g.Close()]
    assert server.receive_data(c_close) == [g.Close()]
    assert client.state is State.CLOSING and server.state is State.CLOSING
    c_ok, s_ok = client.send(g.CloseOk()), server.send(g.CloseOk())
    assert client.receive_data(s_ok) == [g.CloseOk()]
    assert server.receive_data(c_ok) == [g.CloseOk()]
    assert client.state is State.CLOSED and server.state is State.CLOSED


def test_frame_after_peer_close_is_unexpected() -> None:
    server = open_server()
    with pytest.raises(g.UnexpectedFrame) as exc:
        server.receive_data(protocol.encode_many([g.Close(), g.Heartbeat()]))
    assert exc.value.details == {"state": "close-received", "frame": "heartbeat"}


def test_client_close_while_awaiting_open_ok() -> None:
    conn = Connection(Role.CLIENT)
    conn.receive_data(protocol.encode(g.Hello("1.0", CAP, 0)))
    conn.send(g.Auth())
    assert conn.receive_data(protocol.encode(g.Close(320, "shutdown"))) == [
        g.Close(320, "shutdown")
    ]
    assert conn.state is State.CLOSE_RECEIVED
    conn.send(g.CloseOk())
    assert conn.state is State.CLOSED


def test_preamble_split_byte_by_byte() -> None:
    conn = Connection(Role.SERVER)
    stream = g.PREAMBLE + protocol.encode(g.Auth("anonymous", "", {"library": "x"}))
    out: list[protocol.Frame] = []
    for i in range(len(stream)):
        out += conn.receive_data(stream[i : i + 1])
        if i < len(g.PREAMBLE) - 1:
            assert conn.state is State.AWAIT_PREAMBLE
        elif i < len(stream) - 1:
            assert conn.state is State.AWAIT_AUTH
            assert out == []
    assert out == [g.Auth("anonymous", "", {"library": "x"})]
    assert conn.state is State.AUTHENTICATING


@pytest.mark.parametrize("cut", [1, 3, 7, 8, 9, 12])
def test_preamble_split_across_two_feeds(cut: int) -> None:
    conn = Connection(Role.SERVER)
    stream = g.PREAMBLE + protocol.encode(g.Auth())
    assert conn.receive_data(memoryview(stream)[:cut]) + conn.receive_data(stream[cut:]) == [
        g.Auth()
    ]
    assert conn.state is State.AUTHENTICATING


@pytest.mark.parametrize(
    ("preamble", "error", "code"),
    [
        (b"AMQP\x00\x00\x09\x01", g.MalformedFrame, 501),
        (b"CNVYMQ\x02\x00", g.UnsupportedVersion, 505),
        (b"CNVYMQ\x00\x01", g.UnsupportedVersion, 505),
        (b"cnvymq\x01\x00", g.MalformedFrame, 501),
    ],
)
def test_bad_preamble_errors(preamble: bytes, error: type[Exception], code: int) -> None:
    conn = Connection(Role.SERVER)
    # not decided before all 8 bytes have arrived
    assert conn.receive_data(preamble[:7]) == []
    with pytest.raises(error) as exc:
        conn.receive_data(preamble[7:] + protocol.encode(g.Auth()))
    assert exc.value.code == code  # type: ignore[attr-defined]
    assert conn.state is State.AWAIT_PREAMBLE
    conn.fail()
    assert conn.state is State.CLOSED
    assert conn.receive_data(b"anything") == []


def test_connection_max_frame_size_applies_to_decoder() -> None:
    conn = open_server()
    assert conn.max_frame_size == CAP
    conn.max_frame_size = 4096
    assert conn.max_frame_size == 4096
    with pytest.raises(g.FrameTooLarge):
        conn.receive_data(struct.pack(">IB", 4097, g.Publish.TYPE))


def test_connection_rejects_wrong_direction_when_open() -> None:
    conn = open_server()
    with pytest.raises(g.UnexpectedFrame) as exc:
        conn.receive_data(protocol.encode(g.Deliver("ctag-1", 1, body=b"x")))
    assert exc.value.code == 503


# ---------------------------------------------------------------------- limits (1.2)
def test_nesting_limit_matches_the_spec() -> None:
    import tomllib

    from conveyor.protocol import _checks

    spec = tomllib.loads((ROOT / "spec" / "protocol.toml").read_text())["protocol"]
    assert _checks.NESTING_MAX == g.MAX_NESTING_DEPTH == spec["max_nesting_depth"]


def _nested(depth: int) -> Any:
    v: Any = 1
    for i in range(depth):
        v = [v] if i % 2 else {"k": v}
    return v


@pytest.mark.parametrize("depth", [g.MAX_NESTING_DEPTH - 1, g.MAX_NESTING_DEPTH])
def test_table_nesting_is_capped(depth: int) -> None:
    """The table is level 1: values of ``depth`` nested containers make depth + 1."""
    from conveyor.protocol._checks import check_table

    table = {"d": _nested(depth)}
    if depth + 1 <= g.MAX_NESTING_DEPTH:
        assert check_table(table, "t") is table
    else:
        with pytest.raises(g.MalformedFrame, match="nest deeper"):
            check_table(table, "t")


def test_nested_non_string_keys_are_malformed_at_any_depth() -> None:
    from conveyor.protocol._checks import check_table

    for bad in ({"a": {b"k": 1}}, {"a": [1, [{"ok": {2: 1}}]]}):
        with pytest.raises(g.MalformedFrame, match="map keys must be strings"):
            check_table(bad, "t")


def _worst_props(headers: dict[str, Any]) -> dict[str, Any]:
    """Every property at its widest: names of 255 bytes, u64 maxima."""
    from conveyor.protocol._checks import U64_MAX

    name = "n" * 255
    props: dict[str, Any] = {}
    for k, t in g.PROPERTY_TYPES.items():
        props[k] = {"name": name, "u64": U64_MAX, "priority": 9, "bool": True, "table": headers}[t]
    return props


def test_one_message_frames_fit_body_plus_headers_plus_the_overhead() -> None:
    """message_frame_overhead bounds every frame that carries one message: with all other
    fields at their widest, length - body - encoded headers <= 3072. So a connection's
    max_message_size (max_frame_size - 3072) fits any of them."""
    name = "n" * 255
    headers = {"h": "v" * 1000}
    props = _worst_props(headers)
    from conveyor.protocol._checks import U32_MAX, U64_MAX

    body = b"b" * 5000
    u64, u32 = U64_MAX, U32_MAX
    frames: dict[str, tuple[int, list[Any]]] = {
        "publish": (g.Publish.TYPE, [u64, name, name, props, body, True]),
        "publish_batch": (g.PublishBatch.TYPE, [u64, [[name, name, props, body, True]]]),
        "publish_run": (g.PublishRun.TYPE, [u64, name, name, props, True, [body]]),
        "return": (g.Return.TYPE, [u64, 312, "no route", name, name, props, body]),
        "deliver": (g.Deliver.TYPE, [name, u64, True, name, name, props, body, u32]),
        "deliver_batch": (g.DeliverBatch.TYPE, [name, [[u64, True, name, name, props, body, u32]]]),
        "deliver_run": (g.DeliverRun.TYPE, [name, u64, name, name, props, [body]]),
        "get_ok": (g.GetOk.TYPE, [u32, [[u64, True, name, name, props, body, u32]], u64]),
    }
    message = len(body) + len(msgpack.packb(headers))
    for kind, (ftype, fields) in frames.items():
        length = len(protocol.encode_fields(ftype, fields)) - 4
        assert length - message <= g.MESSAGE_FRAME_OVERHEAD, kind


def test_send_refuses_a_frame_over_the_peers_limit() -> None:
    """LocalProtocolError, nothing encoded for the wire, state unchanged (section 5)."""
    conn = Connection(Role.CLIENT)
    conn.receive_data(protocol.encode(g.Hello("1.2", 4096, 0, {}, ["anonymous"], 1024)))
    assert conn.send_limit == 4096
    with pytest.raises(protocol.LocalProtocolError, match="AUTH frame of"):
        conn.send(g.Auth("token", "t" * 5000))
    assert conn.state is State.HELLO_RECEIVED
    conn.send(g.Auth("token", "t" * 100))
    state: State = conn.state
    assert state is State.AWAIT_OPEN_OK
    with pytest.raises(protocol.LocalProtocolError):
        protocol.check_frames([b"\x00" * 4101], 4096)
    protocol.check_frames([b"\x00" * 4100], 4096)


def test_send_can_leave_out_fields_a_peer_does_not_speak() -> None:
    conn = Connection(Role.CLIENT)
    conn.receive_data(protocol.encode(g.Hello("1.1", CAP, 0, {}, ["anonymous"])))
    data = conn.send(g.Auth("anonymous", "", {}, 0, 0, ["zstd"]), trim=1)
    assert len(msgpack.unpackb(data[5:])) == 5
