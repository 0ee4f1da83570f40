"""Requests and replies, publish confirms, consuming with credit, acks (PROTOCOL.md 7, 12, 13)."""

from __future__ import annotations

import itertools
from typing import Any

from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.conformance.wire import Conn, Frame, declare, deliveries, open_conn

_names = itertools.count(1)


def qname(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def publish_confirmed(c: Conn, queue: str, bodies: list[bytes], first_seq: int = 1) -> None:
    entries = [["", queue, {}, b, False] for b in bodies]
    c.send_frame("publish_batch", first_seq, entries)
    confirmed = collect_confirms(c, first_seq, first_seq + len(bodies) - 1)
    assert all(ack for _, ack in confirmed.items())


def collect_confirms(
    c: Conn, first: int, last: int, others: list[Frame] | None = None
) -> dict[int, bool]:
    """Read CONFIRMs until first..last is settled; check the ranges are ordered and disjoint."""
    settled: dict[int, bool] = {}
    expect_next = first
    while len(settled) < last - first + 1:
        f = c.recv()
        if f.kind != "confirm":
            assert others is not None, f"unexpected {f!r} while waiting for confirms"
            others.append(f)
            continue
        assert f["first_seq"] == expect_next, f"confirm ranges out of order: {f!r}"
        assert f["first_seq"] <= f["last_seq"] <= last, f
        for s in range(f["first_seq"], f["last_seq"] + 1):
            settled[s] = f["ack"]
        expect_next = f["last_seq"] + 1
    return settled


def recv_deliveries(c: Conn, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < n:
        out.extend(deliveries(c.recv()))
    assert len(out) == n, f"got {len(out)} deliveries, expected {n}"
    return out


# ---------------------------------------------------------------------- requests
def test_pipelined_requests_replied_in_order_with_matching_rids(
    module_broker: BrokerProcess,
) -> None:
    q, x = qname("rr"), qname("rr-x")
    with open_conn(module_broker.port) as c:
        reqs = [
            wire.encode("queue_declare", 101, q, False, False, False, False, {}),
            wire.encode("queue_declare", 102, qname("missing"), True, False, False, True, {}),
            wire.encode("exchange_declare", 103, x, "topic", False, False, False, {}),
            wire.encode("bind", 104, x, q, "a.#", {}),
            wire.encode("list", 105, "queues"),
            wire.encode("queue_purge", 106, q),
            wire.encode("unbind", 107, x, q, "a.#", {}),
            wire.encode("exchange_delete", 108, x, False),
            wire.encode("queue_delete", 4294967295, q, False, False),
        ]
        c.send(b"".join(reqs))  # one write
        replies = [c.recv() for _ in reqs]
        assert [r["rid"] for r in replies] == [101, 102, 103, 104, 105, 106, 107, 108, 4294967295]
        kinds = [r.kind for r in replies]
        assert kinds == [
            "queue_declare_ok",
            "error",
            "ok",
            "ok",
            "list_ok",
            "message_count_ok",
            "ok",
            "ok",
            "message_count_ok",
        ]
        assert replies[1]["code"] == wire.NOT_FOUND
        assert q in [item["name"] for item in replies[4]["items"]]
        # The failed request did not close the connection.
        assert declare(c, 1, qname("rr-after"))["rid"] == 1
        c.expect_silence(0.1)


def test_request_errors_are_not_fatal(module_broker: BrokerProcess) -> None:
    q = qname("re")
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        cases = [
            (("queue_declare", 2, qname("nope"), True, False, False, True), wire.NOT_FOUND),
            (("queue_declare", 3, q, True, False, False, False), wire.PRECONDITION_FAILED),
            (("exchange_declare", 4, "amq.mine", "direct"), wire.code("access-refused")),
            (("exchange_declare", 5, qname("x"), "bogus-type"), wire.code("invalid-argument")),
            (("bind", 6, "", q, q), wire.code("access-refused")),
            (("get", 7, q, 0), wire.code("invalid-argument")),
            (("list", 8, "nonsense"), wire.code("invalid-argument")),
            (("cancel", 9, "no-such-ctag"), wire.NOT_FOUND),
            (
                ("queue_declare", 10, q, False, False, False, False, {"x-bogus": 1}),
                wire.code("invalid-argument"),
            ),
        ]
        for (kind, rid, *values), err in cases:
            reply = c.request(kind, rid, *values)
            assert (reply.kind, reply["rid"], reply["code"]) == ("error", rid, err), reply
        assert declare(c, 11, q)["queue"] == q


def test_server_named_queue(module_broker: BrokerProcess) -> None:
    with open_conn(module_broker.port) as c:
        reply = c.request("queue_declare", 1)  # every other field defaulted
        assert reply.kind == "queue_declare_ok"
        assert reply["queue"].startswith("amq.gen-")


# ---------------------------------------------------------------------- confirms
def test_publish_batch_confirms_exactly_1_to_100(module_broker: BrokerProcess) -> None:
    q = qname("pb")
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        entries = [["", q, {"message_id": str(i)}, b"m%d" % i, False] for i in range(100)]
        c.send_frame("publish_batch", 1, entries)
        settled = collect_confirms(c, 1, 100)
        assert sorted(settled) == list(range(1, 101))
        assert all(settled.values())
        c.expect_silence(0.2)  # nothing settled twice
        assert declare(c, 2, q)["message_count"] == 100
        # The next sequence number after the batch is 101.
        c.send_frame("publish", 101, "", q, {}, b"one more", False)
        c.expect("confirm", first_seq=101, last_seq=101, ack=True)


def test_publish_confirm_failure_cases(module_broker: BrokerProcess) -> None:
    q = qname("pc")
    missing_q, missing_x = qname("no-such-queue"), qname("no-such-exchange")
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        props = {"content_type": "text/plain", "priority": 5, "headers": {"k": [1, None, 2.5]}}
        c.send(
            b"".join(
                [
                    wire.encode("publish", 1, "", q, {}, b"routed", False),
                    wire.encode("publish", 2, "", missing_q, props, b"returned", True),
                    wire.encode("publish", 3, missing_x, "rk", {}, b"nacked", False),
                    wire.encode("publish", 4, "", missing_q, {}, b"dropped", False),
                ]
            )
        )
        frames = [c.recv() for _ in range(4)]
        ret = next(f for f in frames if f.kind == "return")
        assert ret.fields == {
            "seq": 2,
            "code": wire.NO_ROUTE,
            "message": ret["message"],
            "exchange": "",
            "routing_key": missing_q,
            "properties": props,
            "body": b"returned",
        }
        confirms = [f for f in frames if f.kind == "confirm"]
        settled = {}
        for f in confirms:
            for s in range(f["first_seq"], f["last_seq"] + 1):
                assert s not in settled, f"seq {s} settled twice"
                settled[s] = (f["ack"], f["code"])
        assert settled == {1: (True, 0), 2: (True, 0), 3: (False, wire.NOT_FOUND), 4: (True, 0)}
        # RETURN comes before the CONFIRM covering seq 2.
        covering = next(
            i
            for i, f in enumerate(frames)
            if f.kind == "confirm" and f["first_seq"] <= 2 <= f["last_seq"]
        )
        assert frames.index(ret) < covering
        nack = next(f for f in confirms if not f["ack"])
        assert (nack["first_seq"], nack["last_seq"]) == (3, 3)
        assert declare(c, 2, q)["message_count"] == 1  # the connection stays open


def test_seq0_publish_failures(module_broker: BrokerProcess) -> None:
    missing_q, missing_x = qname("nq"), qname("nx")
    with open_conn(module_broker.port) as c:
        c.send_frame("publish", 0, missing_x, "rk", {}, b"x", False)
        c.expect_error(wire.NOT_FOUND, rid=0)
        c.send_frame("publish", 0, "", missing_q, {}, b"x", True)
        ret = c.expect("return", seq=0, code=wire.NO_ROUTE, routing_key=missing_q)
        assert ret["body"] == b"x"
        c.send_frame("publish", 0, "", missing_q, {}, b"x", False)  # silently dropped
        c.expect_silence(0.2)
        declare(c, 1, qname("seq0-ok"))


# ---------------------------------------------------------------------- consuming
def test_consume_credit_ack_nack(module_broker: BrokerProcess) -> None:
    q = qname("cc")
    bodies = [b"msg-%d" % i for i in range(10)]
    with open_conn(module_broker.port) as pub:
        declare(pub, 1, q)
        publish_confirmed(pub, q, bodies)
    with open_conn(module_broker.port) as c:
        reply = c.request("consume", 1, q, "", False, False, 3, {})
        assert reply.kind == "consume_ok"
        ctag = reply["consumer_tag"]
        got = recv_deliveries(c, 3)
        c.expect_silence(0.3)  # exactly 3: credit is used up
        assert [d["body"] for d in got] == bodies[:3]
        assert [d["delivery_tag"] for d in got] == [1, 2, 3]
        for d in got:
            assert (d["consumer_tag"], d["redelivered"], d["delivery_count"]) == (ctag, False, 1)
            assert (d["exchange"], d["routing_key"], d["properties"]) == ("", q, {})

        c.send_frame("credit", ctag, 2)
        more = recv_deliveries(c, 2)
        c.expect_silence(0.3)
        assert [d["body"] for d in more] == bodies[3:5]
        assert [d["delivery_tag"] for d in more] == [4, 5]

        c.send_frame("ack", 4, True)  # tags 1..4
        qd = c.request("queue_declare", 2, q, False, False, False, True)
        assert (qd["message_count"], qd["consumer_count"]) == (5, 1)

        # NACK requeue: tag 5 goes back to the head, flagged redelivered.
        c.send_frame("nack", 5, False, True)
        c.send_frame("credit", ctag, 1)
        (again,) = recv_deliveries(c, 1)
        assert again["body"] == bodies[4]
        assert (again["redelivered"], again["delivery_count"]) == (True, 2)
        assert again["delivery_tag"] == 6
        c.send_frame("ack", 6)
        c.expect_silence(0.2)
        assert c.request("cancel", 3, ctag).kind == "ok"
        qd = c.request("queue_declare", 4, q, False, False, False, True)
        assert (qd["message_count"], qd["consumer_count"]) == (5, 0)


def test_consume_reply_precedes_deliveries_and_batches(module_broker: BrokerProcess) -> None:
    q = qname("cb")
    bodies = [b"b%d" % i for i in range(50)]
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        publish_confirmed(c, q, bodies)
        c.send_frame("consume", 2, q, "my-tag", False, False, 1000, {})
        c.expect("consume_ok", rid=2, consumer_tag="my-tag")
        got = recv_deliveries(c, 50)
        assert [d["body"] for d in got] == bodies
        assert [d["delivery_tag"] for d in got] == list(range(1, 51))
        assert {d["consumer_tag"] for d in got} == {"my-tag"}
        c.send_frame("ack", 0, True)  # tag 0 + multiple = all
        c.expect_silence(0.1)
        assert c.request("queue_declare", 3, q, False, False, False, True)["message_count"] == 0
        c.send_frame("ack", 1)  # already acked
        c.expect_error(wire.PRECONDITION_FAILED, rid=0)


def test_get_returns_entries_and_remaining_count(module_broker: BrokerProcess) -> None:
    q = qname("get")
    bodies = [b"g%d" % i for i in range(10)]
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        publish_confirmed(c, q, bodies)
        reply = c.request("get", 2, q, 5, False)
        assert reply.kind == "get_ok"
        assert [e["body"] for e in reply["entries"]] == bodies[:5]
        assert [e["delivery_tag"] for e in reply["entries"]] == [1, 2, 3, 4, 5]
        assert reply["message_count"] == 5
        c.send_frame("reject", 3, True)  # requeue one
        c.send_frame("ack", 5, True)  # the rest of 1..5
        reply = c.request("get", 3, q, 100, True)  # no_ack
        assert [e["body"] for e in reply["entries"]] == [bodies[2], *bodies[5:]]
        assert reply["entries"][0]["redelivered"] is True
        assert reply["message_count"] == 0
        empty = c.request("get", 4, q)
        assert (empty.kind, empty["entries"], empty["message_count"]) == ("get_ok", [], 0)
        c.send_frame("ack", 7)  # delivered with no_ack: unknown tag
        c.expect_error(wire.PRECONDITION_FAILED, rid=0)


def test_unknown_delivery_tag_and_consumer_tag_are_not_fatal(module_broker: BrokerProcess) -> None:
    with open_conn(module_broker.port) as c:
        c.send_frame("ack", 12345)
        err = c.expect_error(wire.PRECONDITION_FAILED, rid=0)
        assert err["message"]
        c.send_frame("nack", 99, False, True)
        c.expect_error(wire.PRECONDITION_FAILED, rid=0)
        c.send_frame("reject", 98)
        c.expect_error(wire.PRECONDITION_FAILED, rid=0)
        c.send_frame("credit", "no-such-consumer", 5)
        c.expect_error(wire.NOT_FOUND, rid=0)
        # Still open.
        declare(c, 1, qname("still-open"))


def test_unacked_deliveries_requeued_on_close(module_broker: BrokerProcess) -> None:
    q = qname("rq")
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        publish_confirmed(c, q, [b"a", b"b", b"c"])
    with open_conn(module_broker.port) as c:
        c.request("consume", 1, q, "", False, False, 2, {})
        assert [d["body"] for d in recv_deliveries(c, 2)] == [b"a", b"b"]
        c.send_frame("ack", 1)
        c.send_frame("close", wire.OK_CODE, "bye")
        assert c.expect_closed() == [wire.decode_one(wire.encode("close_ok"), "server")]
    with open_conn(module_broker.port) as c:
        reply = c.request("get", 1, q, 10, True)
        got = [(e["body"], e["redelivered"], e["delivery_count"]) for e in reply["entries"]]
        assert got == [(b"b", True, 2), (b"c", False, 1)]


def test_competing_consumers_round_robin(module_broker: BrokerProcess) -> None:
    q = qname("rr")
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        a = c.request("consume", 2, q, "a", False, False, 100, {})["consumer_tag"]
        b = c.request("consume", 3, q, "b", False, False, 100, {})["consumer_tag"]
        for i in range(6):
            c.send_frame("publish", i + 1, "", q, {}, b"%d" % i, False)
        others: list[Frame] = []
        collect_confirms(c, 1, 6, others)
        got: list[dict[str, Any]] = []
        for f in others:
            got.extend(deliveries(f))
        while len(got) < 6:
            got.extend(deliveries(c.recv()))
        by_tag: dict[str, list[bytes]] = {a: [], b: []}
        for d in got:
            by_tag[d["consumer_tag"]].append(d["body"])
        assert len(by_tag[a]) == len(by_tag[b]) == 3


def test_requeue_restores_original_order(module_broker: BrokerProcess) -> None:
    q = qname("order")
    bodies = [b"o%d" % i for i in range(6)]
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        publish_confirmed(c, q, bodies)
        assert len(c.request("get", 2, q, 4)["entries"]) == 4  # tags 1..4 = o0..o3
        c.send_frame("nack", 4)  # requeue (default) o3
        c.send_frame("nack", 2, True, True)  # o0, o1
        c.send_frame("reject", 3, True)  # o2
        reply = c.request("get", 3, q, 10, True)
        got = [(e["body"], e["redelivered"], e["delivery_count"]) for e in reply["entries"]]
        assert got == [
            (b"o0", True, 2),
            (b"o1", True, 2),
            (b"o2", True, 2),
            (b"o3", True, 2),
            (b"o4", False, 1),
            (b"o5", False, 1),
        ]
        assert [e["delivery_tag"] for e in reply["entries"]] == list(range(5, 11))


def test_reject_discards_by_default(module_broker: BrokerProcess) -> None:
    q = qname("rej")
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        publish_confirmed(c, q, [b"x", b"y"])
        assert [e["body"] for e in c.request("get", 2, q, 2)["entries"]] == [b"x", b"y"]
        c.send_frame("reject", 1)
        c.send_frame("nack", 2, False, False)
        qd = c.request("queue_declare", 3, q, False, False, False, True)
        assert qd["message_count"] == 0
        assert c.request("get", 4, q)["entries"] == []


def test_exclusive_queue_locked_for_other_connections(module_broker: BrokerProcess) -> None:
    q = qname("excl")
    with open_conn(module_broker.port) as owner, open_conn(module_broker.port) as other:
        assert owner.request("queue_declare", 1, q, False, True, False).kind == "queue_declare_ok"
        locked = wire.code("resource-locked")
        for kind, values in [
            ("queue_declare", (q, False, True, False)),
            ("get", (q,)),
            ("consume", (q,)),
            ("queue_purge", (q,)),
        ]:
            reply = other.request(kind, 2, *values)
            assert (reply.kind, reply["code"]) == ("error", locked), (kind, reply)
    with open_conn(module_broker.port) as c:  # deleted with its owner's connection
        reply = c.request("queue_declare", 1, q, False, False, False, True)
        assert (reply.kind, reply["code"]) == ("error", wire.NOT_FOUND)


def test_small_negotiated_frame_size_is_respected_by_the_server(
    module_broker: BrokerProcess,
) -> None:
    """With max_frame_size 4096 the server never sends a larger frame (the decoder enforces
    the negotiated cap), splitting DELIVER_BATCH / GET_OK as needed."""
    q = qname("small")
    bodies = [bytes([65 + i]) * 1500 for i in range(12)]
    with open_conn(module_broker.port) as pub:
        declare(pub, 1, q)
        publish_confirmed(pub, q, bodies)
    with open_conn(module_broker.port, 5.0, "anonymous", "", {}, 4096, 0) as c:
        assert c.dec.max_frame_size == 4096
        got = c.request("get", 1, q, 100, True)["entries"]
        assert 1 <= len(got) < 12
        c.request("consume", 2, q, "", True, False, 100, {})
        rest = recv_deliveries(c, 12 - len(got))
        assert [e["body"] for e in got] + [d["body"] for d in rest] == bodies


def test_frames_after_close_are_not_processed(module_broker: BrokerProcess) -> None:
    q = qname("after-close")
    with open_conn(module_broker.port) as c:
        c.send(wire.encode("close") + wire.encode("queue_declare", 1, q, False, False, False))
        frames = c.expect_closed()
        # The peer sends nothing after CLOSE: in CLOSE_RECEIVED any frame is 503 (section 6).
        # If the two frames arrive in separate reads the server may already have answered
        # CLOSE_OK and closed; either way the request is never executed.
        kinds = [(f.kind, f.fields.get("code")) for f in frames]
        assert kinds in ([("close_ok", None)], [("error", wire.UNEXPECTED_FRAME)]), frames
    with open_conn(module_broker.port) as c:
        reply = c.request("queue_declare", 1, q, False, False, False, True)
        assert (reply.kind, reply["code"]) == ("error", wire.NOT_FOUND)
