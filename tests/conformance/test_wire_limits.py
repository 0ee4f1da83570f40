"""Frame and message size limits, nesting limits and the handshake gaps of PROTOCOL.md
4, 5, 9, 12 and 15, over raw sockets.

The raw client's decoder (``tests.conformance.wire``) enforces the negotiated
max_frame_size on what the broker sends, as section 5 requires of every receiver: a frame
over it fails the test with 502 instead of being accepted.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest

from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.conformance.wire import Conn, declare, deliveries, open_conn

SMALL = wire.MAX_FRAME_SIZE_FLOOR  # 4096: the smallest frame a client may negotiate
SMALL_AUTH = ("anonymous", "", {"library": "small-frames"}, SMALL, 0)
OVERHEAD = wire.SPEC["protocol"]["message_frame_overhead"]
NESTING = wire.SPEC["protocol"]["max_nesting_depth"]
TOO_LARGE = wire.code("message-too-large")
INVALID_ARGUMENT = wire.code("invalid-argument")
_names = itertools.count()


def qname(prefix: str) -> str:
    return f"wl-{prefix}-{next(_names)}"


def nested(depth: int) -> Any:
    """A header value of ``depth`` nested containers (the headers map adds one level)."""
    v: Any = 1
    for i in range(depth):
        v = [v] if i % 2 else {"k": v}
    return v


def consume(c: Conn, rid: int, queue: str, credit: int = 100) -> str:
    reply = c.request("consume", rid, queue, "", False, False, credit, {})
    assert reply.kind == "consume_ok", reply
    return str(reply["consumer_tag"])


def count(c: Conn, rid: int, queue: str) -> int:
    reply = c.request("queue_declare", rid, queue, False, False, False, True, {})
    assert reply.kind == "queue_declare_ok", reply
    return int(reply["message_count"])


# ---------------------------------------------------------------------- 1, 2: sizes
def test_hello_and_open_ok_announce_the_maximum_message_size(module_broker: BrokerProcess) -> None:
    """1.2: HELLO says the server's maximum message size, OPEN_OK this connection's,
    min(server's, max_frame_size - message_frame_overhead)."""
    with Conn(module_broker.port) as c:
        ok = c.handshake()
        assert c.hello is not None
        server_max = c.hello["max_message_size"]
        assert server_max == wire.MAX_FRAME_SIZE_DEFAULT - 8192  # the broker's default
        assert ok["max_message_size"] == server_max
    with Conn(module_broker.port) as c:
        ok = c.handshake(*SMALL_AUTH)
        assert ok["max_frame_size"] == SMALL
        assert ok["max_message_size"] == SMALL - OVERHEAD


def test_a_1_1_client_gets_hello_and_open_ok_without_the_1_2_fields(
    module_broker: BrokerProcess,
) -> None:
    """Strict 1.1 receivers refuse extra fields, so the server leaves them out."""
    with Conn(module_broker.port, minor=1) as c:
        c.send(c.preamble)
        raw = c.sock.recv(4096)
        length, code = wire.HEADER.unpack_from(raw)
        assert code == wire.ftype("hello")
        assert len(msgpack.unpackb(raw[5 : 4 + length])) == 5
        c.dec.feed(raw)  # the decoder checks it too
        c.send_frame("auth", *SMALL_AUTH)
        ok = c.expect("open_ok")
        assert ok["max_message_size"] == 0  # omitted: the default


def test_deliver_never_exceeds_the_consumers_frame_size(module_broker: BrokerProcess) -> None:
    """A 10,000-byte message published on a 1 MiB connection is not sent to a consumer that
    negotiated 4096 (the broker used to send a 10,024-byte DELIVER): the consumer gets ERROR
    rid 0 413 naming it, the message is dead-lettered (reason too-large), not looped, and
    later messages that fit still arrive."""
    q, dlq = qname("big"), qname("big-dlq")
    with open_conn(module_broker.port) as pub, Conn(module_broker.port) as sub:
        sub.handshake(*SMALL_AUTH)
        declare(pub, 1, dlq)
        reply = pub.request(
            "queue_declare",
            2,
            q,
            False,
            False,
            False,
            False,
            {"dead_letter_exchange": "", "dead_letter_routing_key": dlq},
        )
        assert reply.kind == "queue_declare_ok", reply
        pub.send_frame("publish", 1, "", q, {}, b"x" * 10_000, False)
        pub.expect("confirm", first_seq=1, last_seq=1, ack=True)
        tag = consume(sub, 1, q)
        err = sub.expect_error(TOO_LARGE)
        assert err["details"]["consumer_tag"] == tag
        assert err["details"]["queue"] == q
        assert err["details"]["max_message_size"] == SMALL - OVERHEAD
        pub.send_frame("publish", 2, "", q, {}, b"small", False)
        pub.expect("confirm", first_seq=2, last_seq=2, ack=True)
        got = deliveries(sub.recv())
        assert [d["body"] for d in got] == [b"small"]
        sub.expect_silence(0.2)  # the big one is not redelivered
        assert count(pub, 3, q) == 0
        dead = pub.request("get", 4, dlq, 1, True)
        assert dead.kind == "get_ok" and len(dead["entries"]) == 1
        death = dead["entries"][0]["properties"]["headers"]["x-death"][0]
        assert (death["reason"], death["queue"]) == ("too-large", q)
        assert len(dead["entries"][0]["body"]) == 10_000


def test_deliver_batch_and_runs_fit_a_small_frame(module_broker: BrokerProcess) -> None:
    """Messages just under the connection's max_message_size, delivered many at once, go
    in frames that each fit 4096 bytes (the raw decoder would fail with 502 otherwise)."""
    q = qname("batch")
    limit = SMALL - OVERHEAD
    props = {"headers": {"h": "v" * 100}, "content_type": "c" * 255}
    hsize = len(msgpack.packb(props["headers"]))
    with open_conn(module_broker.port) as pub, Conn(module_broker.port) as sub:
        sub.handshake(*SMALL_AUTH)
        declare(pub, 1, q)
        bodies = [bytes([65 + i]) * (limit - hsize) for i in range(6)]
        pub.send_frame("publish_run", 1, "", q, props, False, bodies[:3])
        pub.send_frame(
            "publish_batch",
            4,
            [["", q, dict(props, priority=i), b, False] for i, b in enumerate(bodies[3:])],
        )
        got_confirms = 0
        while got_confirms < 6:
            f = pub.expect("confirm", ack=True)
            got_confirms += f["last_seq"] - f["first_seq"] + 1
        consume(sub, 1, q, credit=10)
        got: list[dict[str, Any]] = []
        while len(got) < 6:
            got.extend(deliveries(sub.recv()))
        assert [d["body"] for d in got] == bodies


def test_get_ok_never_exceeds_the_frame_size(module_broker: BrokerProcess) -> None:
    """GET on a 4096 connection: a message too large for it is dead-lettered (ERROR rid 0
    413), the GET_OK that follows carries only what fits (the broker used to send a
    10,035-byte GET_OK)."""
    q = qname("get")
    with open_conn(module_broker.port) as pub, Conn(module_broker.port) as sub:
        sub.handshake(*SMALL_AUTH)
        declare(pub, 1, q)
        pub.send_frame("publish", 1, "", q, {}, b"y" * 10_000, False)
        pub.send_frame("publish", 2, "", q, {}, b"f" * 3000, False)  # over 1024, but fits
        pub.send_frame("publish", 3, "", q, {}, b"fits", False)
        confirmed = 0
        while confirmed < 3:
            f = pub.expect("confirm", ack=True)
            confirmed = f["last_seq"]
        sub.send_frame("get", 1, q, 10, False)
        err = sub.recv()
        assert (err.kind, err["rid"], err["code"]) == ("error", 0, TOO_LARGE), err
        reply = sub.expect("get_ok", rid=1)
        assert [e["body"] for e in reply["entries"]] == [b"f" * 3000]  # alone: 4096
        reply = sub.request("get", 2, q, 10, False)
        assert [e["body"] for e in reply["entries"]] == [b"fits"]
        assert count(pub, 2, q) == 0


def test_return_fits_the_publishers_frame_size(module_broker: BrokerProcess) -> None:
    """A mandatory publish that fits a 4096 frame but is over the connection's
    max_message_size is nacked 413 (it used to come back as a RETURN 11 bytes over the
    cap); one within it is returned as usual, in a frame that fits."""
    with Conn(module_broker.port) as c:
        c.handshake(*SMALL_AUTH)
        frame = b""
        for n in range(SMALL - 64, SMALL):  # a PUBLISH of exactly the cap
            frame = wire.encode("publish", 1, "amq.direct", "nowhere", {}, b"r" * n, True)
            if len(frame) - 4 == SMALL:
                break
        assert len(frame) - 4 == SMALL
        c.send(frame)
        f = c.recv()
        assert (f.kind, f["ack"], f["code"]) == ("confirm", False, TOO_LARGE), f
        small = b"r" * (SMALL - OVERHEAD)
        c.send_frame(
            "publish", 2, "amq.direct", "nowhere", {"content_type": "t" * 255}, small, True
        )
        ret = c.expect("return", seq=2, code=wire.NO_ROUTE)
        assert ret["body"] == small
        c.expect("confirm", first_seq=2, last_seq=2, ack=True)


# ---------------------------------------------------------------------- 5: nesting, keys
def test_headers_nested_deeper_than_the_limit_are_malformed(module_broker: BrokerProcess) -> None:
    """max_nesting_depth (32, the headers map being level 1): 32 is accepted, 33 is 501."""
    q = qname("deep")
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        c.send_frame("publish", 1, "", q, {"headers": {"d": nested(NESTING - 1)}}, b"ok", False)
        c.expect("confirm", first_seq=1, last_seq=1, ack=True)
        c.send_frame("publish", 2, "", q, {"headers": {"d": nested(NESTING)}}, b"x", False)
        err = c.expect_fatal(wire.MALFORMED_FRAME)
        assert "nest" in err["message"]


def test_headers_just_under_the_packer_limit_do_not_wedge_a_queue(
    module_broker: BrokerProcess,
) -> None:
    """Headers deep enough that the broker could size them but not store or deliver them
    (they used to be accepted, then delivery raised inside the pump, dropping a connection
    and wedging the consumer) are refused at the door; the consumer keeps receiving."""
    q = qname("packer")

    def pk(v: Any) -> bytes:
        return bytes(msgpack.packb(v))

    def publish_body(depth: int) -> bytes:
        # Encoded by hand: msgpack may refuse to nest the whole frame this deep.
        return (
            b"\x96"
            + pk(1)
            + pk("")
            + pk(q)
            + b"\x81"
            + pk("headers")
            + pk({"d": nested(depth)})
            + pk(b"deep")
            + pk(False)
        )

    deep = NESTING
    while True:  # the deepest headers whose PUBLISH msgpack still decodes
        try:
            msgpack.unpackb(publish_body(deep + 1))
        except ValueError:
            break
        deep += 1
    with pytest.raises(ValueError):  # a DELIVER_BATCH of it could not be encoded
        pk(["ctag", [[1, False, "", q, {"headers": {"d": nested(deep)}}, b"deep", 1]]])
    with open_conn(module_broker.port) as sub, open_conn(module_broker.port) as pub:
        reply = sub.request("queue_declare", 1, q, True, False, False, False, {})
        assert reply.kind == "queue_declare_ok", reply  # durable: its log record nests too
        consume(sub, 2, q)
        pub.send(wire.raw_frame(wire.ftype("publish"), publish_body(deep)))
        pub.expect_fatal(wire.MALFORMED_FRAME)
        with open_conn(module_broker.port) as pub2:
            pub2.send_frame("publish", 1, "", q, {}, b"after", False)
            pub2.expect("confirm", first_seq=1, last_seq=1, ack=True)
        assert [d["body"] for d in deliveries(sub.recv())] == [b"after"]
    assert "Fatal error" not in module_broker.log_text()


@pytest.mark.parametrize("where", ["headers", "arguments"])
def test_non_string_keys_nested_anywhere_are_malformed(
    module_broker: BrokerProcess, where: str
) -> None:
    """A bin key in a map nested inside a table (it used to be accepted, then HTTP peek
    and the gateway GET answered 500)."""
    q = qname("binkey")
    bad = {"outer": [{"ok": 1}, {b"bin-key": 1}]}
    with open_conn(module_broker.port) as c:
        if where == "headers":
            declare(c, 1, q)
            c.send_frame("publish", 1, "", q, {"headers": bad}, b"x", False)
        else:
            c.send_frame("queue_declare", 1, q, False, False, False, False, bad)
        err = c.expect_fatal(wire.MALFORMED_FRAME)
        assert "key" in err["message"]


# ---------------------------------------------------------------------- 6: pipelining
def test_preamble_and_auth_in_one_write_get_hello_then_open_ok(
    module_broker: BrokerProcess,
) -> None:
    """A pipelining client sends the preamble and AUTH in one write: HELLO still comes
    first (it used to be skipped), then OPEN_OK and PUBLISH_CREDIT."""
    with Conn(module_broker.port) as c:
        c.send(wire.PREAMBLE + wire.encode("auth", "anonymous", "", {}, 0, 0))
        hello = c.expect("hello")
        assert hello["version"] == f"{wire.MAJOR}.{wire.MINOR}"
        ok = c.expect("open_ok")
        assert ok["max_frame_size"] == wire.MAX_FRAME_SIZE_DEFAULT
        f = c.recv_any()
        assert f.kind == "publish_credit", f


# ---------------------------------------------------------------------- 3: seq numbers
def test_sequence_numbers_must_increase(module_broker: BrokerProcess) -> None:
    """seq 7 then 3: CONFIRM 7, then ERROR rid 0 400 for 3, which is not published (the
    broker used to answer CONFIRM 3). A batch or run overlapping used numbers is refused
    whole; the connection stays open and numbering goes on above the last used."""
    q = qname("seq")
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        c.send_frame("publish", 7, "", q, {}, b"seven", False)
        c.expect("confirm", first_seq=7, last_seq=7, ack=True)
        c.send_frame("publish", 3, "", q, {}, b"three", False)
        err = c.expect_error(INVALID_ARGUMENT)
        assert (err["details"]["seq"], err["details"]["last_seq"]) == (3, 7)
        c.send_frame("publish_batch", 7, [["", q, {}, b"a", False], ["", q, {}, b"b", False]])
        c.expect_error(INVALID_ARGUMENT)
        c.send_frame("publish_run", 5, "", q, {}, False, [b"c"])
        c.expect_error(INVALID_ARGUMENT)
        c.send_frame("publish", 0, "", q, {}, b"unconfirmed", False)  # seq 0: unchecked
        c.send_frame("publish", 8, "", q, {}, b"eight", False)
        c.expect("confirm", first_seq=8, last_seq=8, ack=True)
        assert count(c, 2, q) == 3


# ---------------------------------------------------------------------- 3, 4: redeclare
def test_redeclare_compares_effective_settings_and_names_the_difference(
    module_broker: BrokerProcess,
) -> None:
    q = qname("redeclare")
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        again = c.request(
            "queue_declare",
            2,
            q,
            False,
            False,
            False,
            False,
            {"max_priority": 0, "overflow": "drop-head"},
        )
        assert again.kind == "queue_declare_ok", again  # defaults spelled out: the same
        limited = qname("redeclare-len")
        reply = c.request(
            "queue_declare", 3, limited, False, False, False, False, {"max_length": 5}
        )
        assert reply.kind == "queue_declare_ok", reply
        err = c.request("queue_declare", 4, limited, False, False, False, False, {})
        assert (err.kind, err["code"]) == ("error", wire.PRECONDITION_FAILED), err
        assert "max_length: 5 vs 0" in err["message"]
        assert err["details"] == {
            "queue": limited,
            "setting": "max_length",
            "existing": 5,
            "requested": 0,
        }
        err = c.request("queue_declare", 5, limited, True, False, False, False, {"max_length": 5})
        assert err["details"]["setting"] == "durable", err
        # passive: every other field is ignored
        ok = c.request("queue_declare", 6, limited, True, True, True, True, {"max_length": 1})
        assert ok.kind == "queue_declare_ok", ok


# ---------------------------------------------------------------------- 3: compression
@pytest.mark.parametrize("place", ["auth-field", "client-properties"])
def test_compression_negotiated_in_auth(broker_factory: Any, place: str) -> None:
    """1.2: AUTH.compression; the pre-1.2 place, client_properties.compression, still
    works."""
    b = broker_factory()
    with Conn(b.port) as c:
        if place == "auth-field":
            ok = c.handshake("anonymous", "", {}, 0, 0, ["zstd"])
        else:
            ok = c.handshake("anonymous", "", {"compression": ["zstd"]}, 0, 0)
        assert ok["compression"] == "zstd"
    with Conn(b.port) as c:
        assert c.handshake("anonymous", "", {}, 0, 0, [])["compression"] == ""


# ---------------------------------------------------------------------- 3: CLOSE_OK in OPEN
def test_close_ok_without_close_ends_the_connection(module_broker: BrokerProcess) -> None:
    """CLOSE_OK in OPEN (no CLOSE was sent): the peer is gone, the server closes the
    transport without an answer (section 6)."""
    with open_conn(module_broker.port) as c:
        c.send(wire.encode("close_ok"))
        assert c.expect_closed() == []


# ---------------------------------------------------------------------- x-death poison
@pytest.mark.parametrize(
    "x_death",
    [
        5,
        "not-a-list",
        {"reason": "expired"},
        [1, "two", None],
        [{"count": "many", "queue": ["unhashable"], "reason": "expired"}],
        [{"count": -3, "queue": {"k": 1}, "reason": ["x"], "time": "t"}],
    ],
    ids=["int", "str", "map", "scalars", "bad-fields", "bad-types"],
)
def test_dead_lettering_a_message_with_a_malformed_x_death(
    module_broker: BrokerProcess, x_death: Any
) -> None:
    """x-death is the broker's header, but a publisher may send anything under that key:
    dead-lettering such a message (here: rejected) must still work, keep the publisher's
    malformed records out, and never fail the connection (it used to answer 541)."""
    q, dlq = qname("xd"), qname("xd-dlq")
    with open_conn(module_broker.port) as c:
        declare(c, 1, dlq)
        reply = c.request(
            "queue_declare",
            2,
            q,
            False,
            False,
            False,
            False,
            {"dead_letter_exchange": "", "dead_letter_routing_key": dlq},
        )
        assert reply.kind == "queue_declare_ok", reply
        c.send_frame("publish", 1, "", q, {"headers": {"x-death": x_death, "k": "v"}}, b"p", False)
        c.expect("confirm", first_seq=1, last_seq=1, ack=True)
        consume(c, 3, q, credit=1)
        (d,) = deliveries(c.recv())
        c.send_frame("reject", d["delivery_tag"], False)
        got = c.request("get", 4, dlq, 1, True)
        assert got.kind == "get_ok" and len(got["entries"]) == 1, got
        headers = got["entries"][0]["properties"]["headers"]
        assert headers["k"] == "v"
        newest = headers["x-death"][0]
        assert (newest["reason"], newest["queue"], newest["count"]) == ("rejected", q, 1)
        assert all(isinstance(r, dict) for r in headers["x-death"])


# ---------------------------------------------------------------------- 3: 401 reasons
def test_auth_with_a_mechanism_not_offered_is_401_reason_mechanism(broker_factory: Any) -> None:
    b = broker_factory()
    with Conn(b.port) as c:
        c.send(c.preamble)
        c.expect("hello")
        c.send_frame("auth", "kerberos", "", {}, 0, 0)
        err = c.expect_fatal(wire.code("authentication-failed"))
        assert err["details"] == {"mechanism": "kerberos", "reason": "mechanism"}
