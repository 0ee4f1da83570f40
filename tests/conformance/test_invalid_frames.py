"""Fatal protocol errors after the handshake (PROTOCOL.md 5 "Strictness", vectors/invalid.json).

Every client->server vector of spec/vectors/invalid.json is sent on an open connection: the
server must answer ERROR(rid 0, vector code) and close that connection only; the broker keeps
serving everyone else. Partial vectors must get neither an answer nor a close.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest

from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.conformance.wire import Conn, open_conn

INVALID = json.loads((wire.SPEC_DIR / "vectors" / "invalid.json").read_text())
FRAME_VECTORS = [v for v in INVALID["vectors"] if v["stage"] == "frame"]
PARTIAL_VECTORS = [v for v in INVALID["vectors"] if v["stage"] == "partial"]


def _assert_healthy(b: BrokerProcess) -> None:
    assert b.alive(), f"broker died; log tail:\n{b.log_text()[-3000:]}"
    with open_conn(b.port) as c:
        reply = c.request("queue_declare", 1, "", False, True, True)
        assert reply.kind == "queue_declare_ok"


def test_vectors_match_server_defaults(module_broker: BrokerProcess) -> None:
    """The vectors assume max_frame_size 1048576: the default the broker negotiates."""
    with open_conn(module_broker.port) as c:
        assert c.open_ok is not None
        assert c.open_ok["max_frame_size"] == INVALID["decoder"]["max_frame_size"]


@pytest.mark.parametrize("vec", FRAME_VECTORS, ids=lambda v: v["name"])
def test_invalid_frame_vector(module_broker: BrokerProcess, vec: dict[str, Any]) -> None:
    with open_conn(module_broker.port) as c:
        c.try_send(bytes.fromhex(vec["hex"]))
        c.expect_fatal(vec["code"])
    assert module_broker.alive()


def test_invalid_frame_vectors_leave_broker_healthy(module_broker: BrokerProcess) -> None:
    """After every vector (previous test), a new connection still works end to end."""
    _assert_healthy(module_broker)


@pytest.mark.parametrize("vec", FRAME_VECTORS[:12], ids=lambda v: v["name"])
def test_invalid_vector_after_valid_traffic(
    module_broker: BrokerProcess, vec: dict[str, Any]
) -> None:
    """The same errors mid-session: after requests were answered, and with rid 0 always."""
    with open_conn(module_broker.port) as c:
        assert c.request("queue_declare", 7, "", False, True, True).kind == "queue_declare_ok"
        c.try_send(bytes.fromhex(vec["hex"]))
        c.expect_fatal(vec["code"])


def test_partial_vectors_get_no_answer_and_no_close(module_broker: BrokerProcess) -> None:
    conns: list[tuple[str, Conn]] = []
    try:
        for vec in PARTIAL_VECTORS:
            c = open_conn(module_broker.port)
            c.send(bytes.fromhex(vec["hex"]))
            conns.append((vec["name"], c))
        time.sleep(0.5)
        for name, c in conns:
            try:
                c.expect_silence(0.01)
            except AssertionError as exc:
                raise AssertionError(f"partial vector {name}: {exc}") from None
            assert not c.eof, f"partial vector {name}: server closed the connection"
    finally:
        for _, c in conns:
            c.close()


def test_partial_publish_completes_when_last_byte_arrives(module_broker: BrokerProcess) -> None:
    """publish_missing_last_byte: once the last byte arrives the frame is a valid PUBLISH."""
    vec = next(v for v in PARTIAL_VECTORS if v["name"] == "publish_missing_last_byte")
    with open_conn(module_broker.port) as c:
        data = bytes.fromhex(vec["hex"])
        length = wire.HEADER.unpack_from(data)[0]
        assert len(data) == 4 + length - 1
        c.send(data)
        c.expect_silence(0.2)
        c.send(b"\xc2")  # the missing byte: the trailing `mandatory` false
        # PUBLISH(seq 1, "", "tasks", {}, b"hello", false): routed or not, it is acked.
        c.expect("confirm", first_seq=1, last_seq=1, ack=True)


def test_truncated_frame_then_client_closes(module_broker: BrokerProcess) -> None:
    for _ in range(5):
        c = open_conn(module_broker.port)
        full = wire.encode("publish", 1, "", "nowhere", {}, b"x" * 1000)
        c.send(full[: len(full) // 2])
        c.close()
    c = open_conn(module_broker.port)
    c.send(wire.HEADER.pack(100, wire.ftype("ack")))  # header only, then vanish
    c.close()
    _assert_healthy(module_broker)


@pytest.mark.parametrize("length", [wire.MAX_FRAME_SIZE_DEFAULT + 1, 2**31, 2**32 - 1])
def test_oversized_length_header_only(module_broker: BrokerProcess, length: int) -> None:
    with open_conn(module_broker.port) as c:
        c.send(wire.HEADER.pack(length, wire.ftype("publish")))  # the 5 header bytes, no body
        err = c.expect_fatal(wire.FRAME_TOO_LARGE, timeout=3.0)
        assert err["details"].get("length", length) == length


def test_length_exactly_max_frame_size_is_accepted(module_broker: BrokerProcess) -> None:
    """A frame whose length equals max_frame_size is allowed (the cap is inclusive)."""
    with open_conn(module_broker.port) as c:
        assert c.open_ok is not None
        cap = c.open_ok["max_frame_size"]
        probe = wire.encode("publish", 1, "", "nowhere", {}, b"x" * 70000)  # bin32 body
        size = 70000 + cap - (len(probe) - 4)
        frame = wire.encode("publish", 1, "", "nowhere", {}, b"x" * size)
        assert len(frame) - 4 == cap
        c.send(frame)
        # Not a protocol error; the body exceeds the broker's max message size -> nack 413,
        # or (if it fits) ack. Either way a CONFIRM for seq 1, and the connection stays open.
        f = c.expect("confirm", first_seq=1, last_seq=1)
        if not f["ack"]:
            assert f["code"] == wire.code("message-too-large")
        assert c.request("queue_declare", 2, "", False, True, True).kind == "queue_declare_ok"


@pytest.mark.parametrize("seed", range(6))
def test_garbage_after_handshake(module_broker: BrokerProcess, seed: int) -> None:
    junk = random.Random(seed).randbytes(64 * 1024)
    with open_conn(module_broker.port) as c:
        c.try_send(junk)
        frames = c.expect_closed(timeout=5.0)
        assert frames, "server closed without an ERROR frame"
        err = frames[-1]
        assert err.kind == "error" and err["rid"] == 0, frames
        assert err["code"] in (wire.MALFORMED_FRAME, wire.FRAME_TOO_LARGE, wire.UNEXPECTED_FRAME)
    assert module_broker.alive()


def test_random_frames_get_the_code_the_spec_assigns(module_broker: BrokerProcess) -> None:
    """Random bodies behind plausible headers: the server's verdict equals the spec codec's."""
    rnd = random.Random(1234)
    client_codes = [f.code for f in wire.FRAMES.values() if f.direction != "server"]
    checked = 0
    for _ in range(40):
        tcode = rnd.choice(client_codes) if rnd.random() < 0.8 else rnd.randrange(256)
        body = rnd.randbytes(rnd.randrange(1, 48))
        if rnd.random() < 0.5:  # an array header makes it get past the msgpack check more often
            body = bytes([0x90 + rnd.randrange(1, 8)]) + body
        frame = wire.raw_frame(tcode, body)
        try:
            wire.Decoder(wire.MAX_FRAME_SIZE_DEFAULT, "client").feed(frame)
            continue  # by chance a valid frame (or needs more data): nothing to assert
        except wire.WireError as exc:
            expected = exc.code
        with open_conn(module_broker.port) as c:
            c.try_send(frame)
            c.expect_fatal(expected)
        checked += 1
    assert checked >= 20
    _assert_healthy(module_broker)
