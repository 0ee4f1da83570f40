"""PUBLISH_RUN and DELIVER_RUN over raw sockets (PROTOCOL.md 12, 13, 18; new in 1.1).

A run is one frame for many messages that share exchange, routing key and properties. A
PUBLISH_RUN must behave exactly like one PUBLISH per body (confirms, nacks, RETURNs, seq 0);
the server sends DELIVER_RUN instead of DELIVER_BATCH only to a client whose preamble said
minor 1 or later, and only for two or more first deliveries that share those fields.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import zstandard

from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.conformance.wire import Conn, Frame, declare, deliveries, message_count, open_conn

_names = itertools.count(1)
MAX_FRAMES = 200  # bound on the frames any one wait below reads
PROPS: dict[str, Any] = {"content_type": "text/plain", "persistent": False}


def qname(prefix: str) -> str:
    return f"run-{prefix}-{next(_names)}"


def read_until_settled(c: Conn, first: int, last: int) -> tuple[dict[int, Frame], list[Frame]]:
    """Read until every seq first..last is confirmed or nacked. Returns the CONFIRM covering
    each seq and every frame read, in order. Checks ranges arrive in order and disjoint."""
    settled: dict[int, Frame] = {}
    frames: list[Frame] = []
    expect_next = first
    deadline = time.monotonic() + c.timeout
    for _ in range(MAX_FRAMES):
        if len(settled) == last - first + 1:
            return settled, frames
        f = c.recv(max(0.0, deadline - time.monotonic()))
        frames.append(f)
        if f.kind != "confirm":
            continue
        assert f["first_seq"] == expect_next, f"confirm ranges out of order: {f!r}"
        assert f["first_seq"] <= f["last_seq"] <= last, f
        for s in range(f["first_seq"], f["last_seq"] + 1):
            settled[s] = f
        expect_next = f["last_seq"] + 1
    raise AssertionError(f"{first}..{last} not settled after {MAX_FRAMES} frames: {frames!r}")


def recv_delivery_frames(c: Conn, n: int) -> tuple[list[Frame], list[dict[str, Any]]]:
    """Read delivery frames until ``n`` deliveries arrived: (the frames, the deliveries)."""
    frames: list[Frame] = []
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + c.timeout
    for _ in range(MAX_FRAMES):
        if len(out) >= n:
            break
        f = c.recv(max(0.0, deadline - time.monotonic()))
        frames.append(f)
        out.extend(deliveries(f))
    assert len(out) == n, f"got {len(out)} deliveries, expected {n}: {frames!r}"
    return frames, out


def run_eligible(f: Frame) -> bool:
    """A DELIVER_BATCH that a 1.1 client should have received as a DELIVER_RUN instead."""
    es = f["entries"]
    return (
        len(es) >= 2
        and all(not e["redelivered"] and e["delivery_count"] == 1 for e in es)
        and len({(e["exchange"], e["routing_key"], repr(e["properties"])) for e in es}) == 1
        and [e["delivery_tag"] for e in es]
        == list(range(es[0]["delivery_tag"], es[0]["delivery_tag"] + len(es)))
    )


def consume(c: Conn, rid: int, queue: str, credit: int) -> str:
    reply = c.request("consume", rid, queue, "", False, False, credit, {})
    assert reply.kind == "consume_ok", reply
    return str(reply["consumer_tag"])


# ---------------------------------------------------------------------- (a) 1.1 consumer
@pytest.mark.parametrize(
    "props",
    [PROPS, {}, {"headers": {"k": "v"}, "priority": 3}],
    ids=["props", "no-props", "headers"],
)
def test_publish_run_is_one_confirm_range_and_one_deliver_run(
    module_broker: BrokerProcess, props: dict[str, Any]
) -> None:
    q = qname("a")
    bodies = [b"a-%d" % i for i in range(5)]
    with open_conn(module_broker.port) as pub:
        assert pub.hello is not None and pub.hello["version"] >= "1.1"
        declare(pub, 1, q)
        pub.send_frame("publish_run", 1, "", q, props, False, bodies)
        pub.expect("confirm", first_seq=1, last_seq=5, ack=True, code=0)
        pub.expect_silence(0.1)
        assert message_count(pub, 2, q) == 5
    with open_conn(module_broker.port) as c:
        ctag = consume(c, 1, q, 10)
        run = c.expect(
            "deliver_run", consumer_tag=ctag, exchange="", routing_key=q, properties=props
        )
        assert run["bodies"] == bodies
        first = run["first_tag"]
        assert first == 1  # the connection's first delivery; body i has tag first + i
        c.expect_silence(0.2)  # all five came in that one frame
        c.send_frame("ack", first + len(bodies) - 1, True)  # one cumulative ACK
        reply = c.request("queue_declare", 2, q, False, False, False, True, {})
        assert (reply["message_count"], reply["consumer_count"]) == (0, 1)
        for tag in (first, first + 4):  # each of them is settled: acking again is unknown
            c.send_frame("ack", tag)
            c.expect_error(wire.PRECONDITION_FAILED, rid=0)
        c.send_frame("close", wire.OK_CODE, "bye")
        assert [f.kind for f in c.expect_closed()] == ["close_ok"]
    with open_conn(module_broker.port) as c:  # nothing came back when the consumer left
        reply = c.request("get", 1, q, 10, True)
        assert (reply["entries"], reply["message_count"]) == ([], 0)


def test_deliver_run_for_messages_published_while_consuming(module_broker: BrokerProcess) -> None:
    """Whatever way dispatch groups them, a 1.1 consumer gets first deliveries in order with
    consecutive tags, and never a DELIVER_BATCH that should have been a run."""
    q = qname("live")
    bodies = [b"live-%d" % i for i in range(20)]
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        ctag = consume(c, 2, q, 100)
        c.send_frame("publish_run", 1, "", q, PROPS, False, bodies[:10])
        c.send_frame("publish_run", 11, "", q, PROPS, False, bodies[10:])
        frames: list[Frame] = []
        got: list[dict[str, Any]] = []
        settled = 0
        deadline = time.monotonic() + c.timeout
        for _ in range(MAX_FRAMES):
            if settled == 20 and len(got) == 20:
                break
            f = c.recv(max(0.0, deadline - time.monotonic()))
            if f.kind == "confirm":
                assert (f["first_seq"], f["ack"]) == (settled + 1, True), f
                settled = f["last_seq"]
                continue
            frames.append(f)
            got.extend(deliveries(f))
        assert (settled, len(got)) == (20, 20), frames
        assert [d["body"] for d in got] == bodies
        assert [d["delivery_tag"] for d in got] == list(range(1, 21))
        assert all(d["consumer_tag"] == ctag and d["properties"] == PROPS for d in got)
        assert not [f for f in frames if f.kind == "deliver_batch" and run_eligible(f)], frames
        assert {f.kind for f in frames} <= {"deliver", "deliver_run"}, frames
        c.send_frame("ack", 20, True)
        assert message_count(c, 3, q) == 0


# ---------------------------------------------------------------------- (b) 1.0 consumer
def test_minor_0_client_gets_deliver_batch_never_deliver_run(module_broker: BrokerProcess) -> None:
    """A client whose preamble says 1.0 may still send PUBLISH_RUN (the server accepts it from
    anyone) but only ever receives DELIVER_BATCH / DELIVER."""
    q = qname("b")
    bodies = [b"b-%d" % i for i in range(5)]
    with open_conn(module_broker.port, minor=0) as c:
        assert c.preamble == wire.MAGIC + bytes([wire.MAJOR, 0])
        assert c.hello is not None and c.hello["version"] == "1.0"
        declare(c, 1, q)
        c.send_frame("publish_run", 1, "", q, PROPS, False, bodies)
        c.expect("confirm", first_seq=1, last_seq=5, ack=True)
        ctag = consume(c, 2, q, 10)
        batch = c.expect("deliver_batch", consumer_tag=ctag)
        entries = batch["entries"]
        assert [e["body"] for e in entries] == bodies
        assert [e["delivery_tag"] for e in entries] == [1, 2, 3, 4, 5]
        for e in entries:
            assert (e["redelivered"], e["delivery_count"]) == (False, 1), e
            assert (e["exchange"], e["routing_key"], e["properties"]) == ("", q, PROPS), e
        c.expect_silence(0.2)
        # More runs, from a 1.1 publisher this time, while the 1.0 consumer waits.
        with open_conn(module_broker.port) as pub:
            pub.send_frame("publish_run", 1, "", q, PROPS, False, bodies)
            pub.send_frame("publish_run", 6, "", q, {}, False, bodies)
            read_until_settled(pub, 1, 10)
        c.send_frame("credit", ctag, 10)
        frames, got = recv_delivery_frames(c, 10)
        assert "deliver_run" not in {f.kind for f in frames}, frames
        assert [d["body"] for d in got] == bodies * 2
        assert [d["delivery_tag"] for d in got] == list(range(6, 16))
        c.send_frame("ack", 15, True)
        assert message_count(c, 3, q) == 0
        c.expect_silence(0.1)  # and nothing else (no stray DELIVER_RUN) arrived


# ---------------------------------------------------------------------- (c) redeliveries
def test_requeued_run_is_redelivered_as_deliver_batch(module_broker: BrokerProcess) -> None:
    q = qname("c")
    bodies = [b"c-%d" % i for i in range(5)]
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        c.send_frame("publish_run", 1, "", q, PROPS, False, bodies)
        c.expect("confirm", first_seq=1, last_seq=5, ack=True)
        ctag = consume(c, 2, q, 5)
        run = c.expect("deliver_run", consumer_tag=ctag, first_tag=1)
        assert run["bodies"] == bodies
        c.send_frame("nack", 5, True, True)  # all five back, in order, redelivered
        c.expect_silence(0.2)  # no credit left: nothing yet
        c.send_frame("credit", ctag, 5)
        batch = c.expect("deliver_batch", consumer_tag=ctag)
        entries = batch["entries"]
        assert [e["body"] for e in entries] == bodies
        assert [e["delivery_tag"] for e in entries] == [6, 7, 8, 9, 10]
        for e in entries:
            assert (e["redelivered"], e["delivery_count"]) == (True, 2), e
            assert (e["exchange"], e["routing_key"], e["properties"]) == ("", q, PROPS), e
        c.expect_silence(0.2)
        c.send_frame("ack", 10, True)
        assert message_count(c, 3, q) == 0


def test_mixed_and_single_deliveries_are_not_runs(module_broker: BrokerProcess) -> None:
    """Messages that differ in properties go as DELIVER_BATCH, a single one as DELIVER, even
    to a 1.1 client."""
    q = qname("mixed")
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        entries = [["", q, {"type": f"t{i % 2}"}, b"m-%d" % i, False] for i in range(4)]
        c.send_frame("publish_batch", 1, entries)
        c.expect("confirm", first_seq=1, last_seq=4, ack=True)
        ctag = consume(c, 2, q, 10)
        batch = c.expect("deliver_batch", consumer_tag=ctag)
        assert [e["body"] for e in batch["entries"]] == [e[3] for e in entries]
        assert [e["properties"] for e in batch["entries"]] == [e[2] for e in entries]
        c.send_frame("publish_run", 5, "", q, PROPS, False, [b"single"])
        c.expect("confirm", first_seq=5, last_seq=5, ack=True)
        one = c.expect("deliver", consumer_tag=ctag, delivery_tag=5, body=b"single")
        assert (one["redelivered"], one["delivery_count"], one["properties"]) == (False, 1, PROPS)
        c.send_frame("ack", 5, True)
        assert message_count(c, 3, q) == 0


# ---------------------------------------------------------------------- (d) failures
def test_publish_run_to_missing_exchange_nacks_every_seq(module_broker: BrokerProcess) -> None:
    bodies = [b"d-%d" % i for i in range(4)]
    with open_conn(module_broker.port) as c:
        c.send_frame("publish_run", 1, "no-such-exchange", "rk", PROPS, False, bodies)
        settled, frames = read_until_settled(c, 1, 4)
        assert [f.kind for f in frames] == ["confirm"] * len(frames), frames
        for seq in range(1, 5):
            f = settled[seq]
            assert (f["ack"], f["code"]) == (False, wire.NOT_FOUND), f
            assert f["message"], f
        # Still open, and the numbering went on past the run.
        c.send_frame("publish", 5, "", "no-such-queue", {}, b"x", False)
        c.expect("confirm", first_seq=5, last_seq=5, ack=True)
        # Unconfirmed (first_seq 0): as 4 PUBLISH with seq 0, one ERROR(rid 0, 404) each.
        c.send_frame("publish_run", 0, "no-such-exchange", "rk", {}, False, bodies)
        for _ in bodies:
            c.expect_error(wire.NOT_FOUND, rid=0)
        c.expect_silence(0.2)


def test_publish_run_nacks_only_the_bodies_over_the_size_limit(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory("--max-message-size", "1000")
    q = qname("big")
    bodies = [b"s1", b"x" * 1001, b"s2", b"y" * 2000, b"s3"]
    with open_conn(b.port) as c:
        declare(c, 1, q)
        c.send_frame("publish_run", 1, "", q, {}, False, bodies)
        settled, _ = read_until_settled(c, 1, 5)
        outcome = {s: (f["ack"], f["code"]) for s, f in settled.items()}
        too_large = wire.code("message-too-large")
        assert outcome == {
            1: (True, 0),
            2: (False, too_large),
            3: (True, 0),
            4: (False, too_large),
            5: (True, 0),
        }
        reply = c.request("get", 2, q, 10, True)
        assert [e["body"] for e in reply["entries"]] == [b"s1", b"s2", b"s3"]


def test_unroutable_mandatory_run_returns_each_body_then_confirms(
    module_broker: BrokerProcess,
) -> None:
    rk = qname("nowhere")
    bodies = [b"r-%d" % i for i in range(3)]
    with open_conn(module_broker.port) as c:
        c.send_frame("publish_run", 1, "", rk, PROPS, True, bodies)
        settled, frames = read_until_settled(c, 1, 3)
        returns = [f for f in frames if f.kind == "return"]
        assert [f["seq"] for f in returns] == [1, 2, 3], frames
        assert [f["body"] for f in returns] == bodies
        for f in returns:
            assert f["code"] == wire.NO_ROUTE, f
            assert (f["exchange"], f["routing_key"], f["properties"]) == ("", rk, PROPS), f
            # Each RETURN comes before the CONFIRM that settles its seq.
            assert frames.index(f) < frames.index(settled[f["seq"]]), frames
        assert all(f["ack"] for f in settled.values()), frames
        assert {f.kind for f in frames} == {"return", "confirm"}, frames
        # mandatory false: dropped silently, still acked, no RETURN.
        c.send_frame("publish_run", 4, "", rk, PROPS, False, bodies)
        settled, frames = read_until_settled(c, 4, 6)
        assert {f.kind for f in frames} == {"confirm"} and all(
            f["ack"] for f in settled.values()
        ), frames
        # first_seq 0, mandatory: one RETURN(seq 0) per body and nothing else.
        c.send_frame("publish_run", 0, "", rk, PROPS, True, bodies)
        got = [c.expect("return", seq=0, code=wire.NO_ROUTE) for _ in bodies]
        assert [f["body"] for f in got] == bodies
        c.expect_silence(0.2)


# ---------------------------------------------------------------------- (e) malformed
@pytest.mark.parametrize(
    ("bodies", "where"),
    [
        ([b"ok-0", b"ok-1", "not-bin", b"ok-3"], "publish_run.bodies[2]"),
        ([7], "publish_run.bodies[0]"),
        ([b"ok", None], "publish_run.bodies[1]"),
        (b"not-an-array", "publish_run.bodies"),
    ],
    ids=["str", "int", "nil", "bin-not-array"],
)
def test_publish_run_with_a_non_bin_body_is_malformed(
    module_broker: BrokerProcess, bodies: Any, where: str
) -> None:
    q = qname("e")
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        c.send_frame("publish_run", 1, "", q, {}, False, bodies)
        err = c.expect_fatal(wire.MALFORMED_FRAME)
        assert where in err["message"], err
        assert c.eof
    with open_conn(module_broker.port) as c:  # the whole frame was rejected
        assert message_count(c, 1, q) == 0
    assert module_broker.alive()


# ---------------------------------------------------------------------- (f) no confirms
def test_publish_run_with_first_seq_0_is_delivered_without_confirm(
    module_broker: BrokerProcess,
) -> None:
    q = qname("f")
    bodies = [b"f-%d" % i for i in range(3)]
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        c.send_frame("publish_run", 0, "", q, PROPS, False, bodies)
        # A request after it: its reply is the next frame, no CONFIRM before it.
        reply = c.request("queue_declare", 2, q, False, False, False, True, {})
        assert (reply.kind, reply["message_count"]) == ("queue_declare_ok", 3)
        # The unconfirmed run used no sequence numbers: the next confirmed publish is seq 1.
        c.send_frame("publish_run", 1, "", q, PROPS, False, [b"g-0", b"g-1"])
        c.expect("confirm", first_seq=1, last_seq=2, ack=True)
        ctag = consume(c, 3, q, 10)
        frames, got = recv_delivery_frames(c, 5)
        assert [d["body"] for d in got] == [*bodies, b"g-0", b"g-1"]
        assert [d["delivery_tag"] for d in got] == [1, 2, 3, 4, 5]
        assert all(d["consumer_tag"] == ctag for d in got)
        assert {f.kind for f in frames} == {"deliver_run"}, frames
        c.expect_silence(0.2)
        c.send_frame("ack", 5, True)
        assert message_count(c, 4, q) == 0


# ---------------------------------------------------------------------- compressed
def _compressed(kind: str, *values: Any) -> bytes:
    data = zstandard.ZstdCompressor().compress(msgpack.packb(list(values), use_bin_type=True))
    return wire.encode("compressed", wire.ftype(kind), data)


def _inner(f: Frame) -> Frame:
    assert f.kind == "compressed", f
    data = zstandard.ZstdDecompressor().decompress(f["data"], max_output_size=wire.U32)
    return wire.decode_body(wire.BY_CODE[f["inner_type"]], data)


@pytest.mark.parametrize(("minor", "inner"), [(1, "deliver_run"), (0, "deliver_batch")])
def test_compressed_publish_run_and_deliveries(
    module_broker: BrokerProcess, minor: int, inner: str
) -> None:
    q = qname("z")
    bodies = [b"z%d-" % i + b"abcdefgh" * 64 for i in range(8)]  # well over 1 KiB in all
    auth = ("anonymous", "", {"library": "raw", "compression": ["zstd"]}, 0, 0)
    with open_conn(module_broker.port, 5.0, *auth, minor=minor) as c:
        assert c.open_ok is not None and c.open_ok["compression"] == "zstd"
        declare(c, 1, q)
        c.send(_compressed("publish_run", 1, "", q, PROPS, False, bodies))
        c.expect("confirm", first_seq=1, last_seq=8, ack=True)
        ctag = consume(c, 2, q, 8)
        f = _inner(c.expect("compressed", inner_type=wire.ftype(inner)))
        assert f.kind == inner
        got = deliveries(f)
        assert [d["body"] for d in got] == bodies
        assert [d["delivery_tag"] for d in got] == list(range(1, 9))
        assert all(d["consumer_tag"] == ctag and d["properties"] == PROPS for d in got)
        c.expect_silence(0.2)
        c.send_frame("ack", 8, True)
        assert message_count(c, 3, q) == 0


# ---------------------------------------------------------------------- empty
@pytest.mark.parametrize("frame", ["publish_run", "publish_batch"])
def test_empty_run_or_batch_is_invalid_argument_and_uses_no_seq(
    module_broker: BrokerProcess, frame: str
) -> None:
    """The spec says at least one message: an empty one is ERROR 400 (rid 0), not fatal;
    nothing is published and the next publish still has seq 1."""
    q = qname("empty")
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        if frame == "publish_run":
            c.send_frame("publish_run", 1, "", q, PROPS, False, [])
        else:
            c.send_frame("publish_batch", 1, [])
        err = c.expect("error", rid=0, code=wire.code("invalid-argument"))
        assert "empty" in err["message"], err
        c.send_frame("publish_run", 1, "", q, PROPS, False, [b"after"])
        c.expect("confirm", first_seq=1, last_seq=1, ack=True)
        assert message_count(c, 2, q) == 1
