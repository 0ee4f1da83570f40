"""Preamble, HELLO / AUTH / OPEN_OK, negotiation and handshake-state errors (PROTOCOL.md 4, 6)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.conformance.wire import Conn

INVALID = json.loads((wire.SPEC_DIR / "vectors" / "invalid.json").read_text())
PREAMBLE_VECTORS = [v for v in INVALID["vectors"] if v["stage"] == "preamble"]


def test_hello_then_open_ok(module_broker: BrokerProcess) -> None:
    with Conn(module_broker.port) as c:
        c.send(wire.PREAMBLE)
        hello = c.expect("hello")
        assert hello["version"] == f"{wire.MAJOR}.{wire.MINOR}" == "1.2"
        assert hello["max_frame_size"] == wire.MAX_FRAME_SIZE_DEFAULT
        assert hello["heartbeat_ms"] == wire.HEARTBEAT_MS_DEFAULT
        props = hello["server_properties"]
        assert props["product"] == "conveyor"
        assert isinstance(props["version"], str) and isinstance(props["platform"], str)
        # A loopback peer of a broker without --require-auth may also be anonymous.
        assert hello["auth_mechanisms"] == ["token", "anonymous"]
        c.expect_silence(0.1)  # nothing else until AUTH

        c.send_frame("auth", "anonymous", "", {"library": "raw"}, 0, 0)
        ok = c.expect("open_ok")
        assert isinstance(ok["connection_id"], str) and ok["connection_id"]
        assert ok["max_frame_size"] == hello["max_frame_size"]
        assert ok["heartbeat_ms"] == hello["heartbeat_ms"]
        # The connection is open: a request works.
        reply = c.request("queue_declare", 1, "hs-open", False, False, True)
        assert reply.kind == "queue_declare_ok"
        assert reply["queue"] == "hs-open"
        assert (reply["message_count"], reply["consumer_count"]) == (0, 0)


def test_preamble_split_across_writes_and_frames_in_one_write(module_broker: BrokerProcess) -> None:
    """A receiver accepts any fragmentation: the preamble byte by byte, AUTH in pieces."""
    with Conn(module_broker.port) as c:
        for b in wire.PREAMBLE:
            c.send(bytes([b]))
        c.expect("hello")
        auth = wire.encode("auth")  # every field defaulted: the empty array
        assert auth == bytes.fromhex("000000020290")
        c.send(auth[:3])
        c.send(auth[3:])
        c.expect("open_ok")


def test_connection_ids_are_distinct(module_broker: BrokerProcess) -> None:
    ids = set()
    for _ in range(3):
        with Conn(module_broker.port) as c:
            ids.add(c.handshake()["connection_id"])
    assert len(ids) == 3


@pytest.mark.parametrize(("minor", "version"), [(0, "1.0"), (1, "1.1"), (2, "1.2"), (7, "1.2")])
def test_minor_version_is_accepted(module_broker: BrokerProcess, minor: int, version: str) -> None:
    """Any minor of major 1 is accepted; HELLO.version is the lower of the two minors
    (PROTOCOL.md 18): a 1.0 client still gets "1.0", a newer one the server's "1.2"."""
    with Conn(module_broker.port, minor=minor) as c:
        c.send(c.preamble)
        assert c.expect("hello")["version"] == version == f"{wire.MAJOR}.{min(minor, wire.MINOR)}"
        c.send_frame("auth", "anonymous", "", {"library": "raw"}, 0, 0)
        c.expect("open_ok")


NEGOTIATION = [
    # (client max_frame_size, client heartbeat_ms) -> expected (max_frame_size, heartbeat_ms)
    ((0, 0), (wire.MAX_FRAME_SIZE_DEFAULT, wire.HEARTBEAT_MS_DEFAULT)),
    ((65536, 3000), (65536, 3000)),
    ((wire.MAX_FRAME_SIZE_FLOOR, 0), (wire.MAX_FRAME_SIZE_FLOOR, wire.HEARTBEAT_MS_DEFAULT)),
    ((1000, 0), (wire.MAX_FRAME_SIZE_FLOOR, wire.HEARTBEAT_MS_DEFAULT)),  # floor 4096
    ((2**31, 60000), (wire.MAX_FRAME_SIZE_DEFAULT, wire.HEARTBEAT_MS_DEFAULT)),  # min of both
]


@pytest.mark.parametrize(("client", "expected"), NEGOTIATION, ids=[str(n[0]) for n in NEGOTIATION])
def test_negotiation(
    module_broker: BrokerProcess, client: tuple[int, int], expected: tuple[int, int]
) -> None:
    with Conn(module_broker.port) as c:
        ok = c.handshake("anonymous", "", {}, *client)
        assert (ok["max_frame_size"], ok["heartbeat_ms"]) == expected


def test_negotiated_max_frame_size_is_enforced(module_broker: BrokerProcess) -> None:
    """With max_frame_size 8192 negotiated, a frame of length 8192 passes and 8193 is 502."""
    with Conn(module_broker.port) as c:
        assert c.handshake("anonymous", "", {}, 8192, 0)["max_frame_size"] == 8192
        # A PUBLISH whose length field is exactly 8192 (allowed): pad the body.
        probe = wire.encode("publish", 0, "", "no-such-queue", {}, b"x" * 300)  # bin16 body
        pad = 300 + 8192 - (len(probe) - 4)
        frame = wire.encode("publish", 0, "", "no-such-queue", {}, b"x" * pad)
        assert len(frame) - 4 == 8192
        c.send(frame)  # accepted as a frame; its message is over OPEN_OK.max_message_size
        err = c.expect_error(wire.code("message-too-large"))
        assert err["details"]["max_message_size"] == 8192 - 3072
        assert c.request("queue_declare", 1, "", False, True, True).kind == "queue_declare_ok"
        c.send(wire.HEADER.pack(8193, wire.ftype("publish")))  # only the 5 header bytes
        err = c.expect_fatal(wire.FRAME_TOO_LARGE)
        assert err["details"].get("max_frame_size", 8192) == 8192


@pytest.mark.parametrize("vec", PREAMBLE_VECTORS, ids=lambda v: v["name"])
def test_invalid_preamble_vectors(module_broker: BrokerProcess, vec: dict[str, Any]) -> None:
    with Conn(module_broker.port) as c:
        c.send(bytes.fromhex(vec["hex"]))
        err = c.expect_fatal(vec["code"])
        if vec["code"] == wire.UNSUPPORTED_VERSION:
            assert err["details"] == {"server_major": wire.MAJOR}
            assert "1.x" in err["message"]
    assert module_broker.alive()


@pytest.mark.parametrize("major", [0, 2, 255])
def test_unsupported_major_version(module_broker: BrokerProcess, major: int) -> None:
    with Conn(module_broker.port) as c:
        c.send(wire.MAGIC + bytes([major, 0]))
        err = c.expect_fatal(wire.UNSUPPORTED_VERSION)
        assert err["details"]["server_major"] == wire.MAJOR


def test_preamble_split_then_bad_magic(module_broker: BrokerProcess) -> None:
    with Conn(module_broker.port) as c:
        c.send(b"CNVY")
        c.expect_silence(0.2)  # 4 bytes are not a preamble yet
        c.send(b"XQ\x01\x00")
        c.expect_fatal(wire.MALFORMED_FRAME)


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_instead_of_preamble(module_broker: BrokerProcess, seed: int) -> None:
    junk = random.Random(seed).randbytes(4096)
    assert junk[:6] != wire.MAGIC
    with Conn(module_broker.port) as c:
        c.try_send(junk)
        c.expect_fatal(wire.MALFORMED_FRAME)
    assert module_broker.alive()
    with Conn(module_broker.port) as c:
        c.handshake()


@pytest.mark.parametrize(
    "kind, values",
    [
        ("queue_declare", (1, "before-auth")),
        ("heartbeat", ()),
        ("close", (200, "bye")),
        ("publish", (1, "", "q", {}, b"x")),
    ],
    ids=["queue_declare", "heartbeat", "close", "publish"],
)
def test_frames_before_auth_are_unexpected(
    module_broker: BrokerProcess, kind: str, values: tuple[Any, ...]
) -> None:
    with Conn(module_broker.port) as c:
        c.send(wire.PREAMBLE)
        c.expect("hello")
        c.send_frame(kind, *values)
        c.expect_fatal(wire.UNEXPECTED_FRAME)


def test_frame_before_auth_did_not_take_effect(module_broker: BrokerProcess) -> None:
    with Conn(module_broker.port) as c:
        c.send(wire.PREAMBLE)
        c.expect("hello")
        c.send_frame("queue_declare", 1, "hs-never-declared")
        c.expect_fatal(wire.UNEXPECTED_FRAME)
    with Conn(module_broker.port) as c:
        c.handshake()
        err = c.request("queue_declare", 1, "hs-never-declared", True, False, False, True)
        assert (err.kind, err["code"]) == ("error", wire.NOT_FOUND)


def test_second_auth_is_unexpected(module_broker: BrokerProcess) -> None:
    with Conn(module_broker.port) as c:
        c.handshake()
        c.send_frame("auth", "anonymous", "", {}, 0, 0)
        c.expect_fatal(wire.UNEXPECTED_FRAME)


def test_unknown_auth_mechanism_fails_authentication(module_broker: BrokerProcess) -> None:
    """AUTH with a mechanism HELLO did not offer must not open the connection."""
    with Conn(module_broker.port) as c:
        c.send(wire.PREAMBLE)
        hello = c.expect("hello")
        assert "no-such-mechanism" not in hello["auth_mechanisms"]
        c.send_frame("auth", "no-such-mechanism", "secret", {}, 0, 0)
        c.expect_fatal(wire.code("authentication-failed"))
