"""Publisher flow control over raw sockets (PROTOCOL.md section 12, "Publisher flow control").

PUBLISH_CREDIT right after OPEN_OK; a client that respects its credit keeps publishing
as the server tops it up; a client that publishes beyond its credit is read more slowly
but neither closed nor robbed of a message; why credit is withheld is on the wire and in
LIST connections.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.conformance.wire import Conn, declare, message_count, open_conn

_names = itertools.count(1)
BLOCKED_REASONS = {"", "rate", "memory", "disk", "queue-full"}


def qname(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def settle(settled: dict[int, bool], f: wire.Frame) -> None:
    assert f.kind == "confirm", f"unexpected {f!r} (the connection must stay usable)"
    for s in range(f["first_seq"], f["last_seq"] + 1):
        assert s not in settled, f"seq {s} confirmed twice"
        settled[s] = f["ack"]


def read_confirms(
    c: Conn, last: int, timeout: float, settled: dict[int, bool] | None = None
) -> dict[int, bool]:
    """Settle seqs 1..last (recv() folds PUBLISH_CREDIT frames into c.credit_*)."""
    settled = {} if settled is None else settled
    deadline = time.monotonic() + timeout
    while len(settled) < last:
        settle(settled, c.recv(max(0.01, deadline - time.monotonic())))
    return settled


def connections(c: Conn, rid: int) -> list[dict[str, Any]]:
    reply = c.request("list", rid, "connections")
    assert reply.kind == "list_ok", reply
    return list(reply["items"])


def test_publish_credit_follows_open_ok(module_broker: BrokerProcess) -> None:
    with Conn(module_broker.port) as c:
        c.send(wire.PREAMBLE)
        c.expect("hello")
        c.send_frame("auth", "anonymous", "", {"library": "raw"}, 0, 0)
        c.expect("open_ok")
        f = c.recv_any()
        assert f.kind == "publish_credit", f"expected PUBLISH_CREDIT right after OPEN_OK: {f!r}"
        assert f["blocked"] in BLOCKED_REASONS
        # An idle test broker has no reason to withhold the initial credit.
        assert f["messages"] > 0 and f["bytes"] > 0 and f["blocked"] == "", f


def test_a_client_that_respects_its_credit_keeps_publishing(module_broker: BrokerProcess) -> None:
    """Publish three windows' worth, never beyond the credit: the server keeps topping up."""
    q = qname("fc-respect")
    with open_conn(module_broker.port) as c:
        declare(c, 1, q)
        total = 3 * c.credit_messages
        settled: dict[int, bool] = {}
        seq = 0
        deadline = time.monotonic() + 30
        while seq < total:
            # The rule: a message needs message credit >= 1 and byte credit > 0 before it.
            n = min(c.credit_messages, total - seq, 100)
            if n <= 0 or c.credit_bytes <= 0:
                f = c.recv_any(max(0.01, deadline - time.monotonic()))
                if f.kind == "publish_credit":
                    c.add_credit(f)
                elif f.kind != "heartbeat":
                    settle(settled, f)
                continue
            c.send_frame("publish_batch", seq + 1, [["", q, {}, b"m", False]] * n)
            seq += n
            c.credit_messages -= n
            c.credit_bytes -= n  # one body byte each
        read_confirms(c, total, 20, settled)
        assert all(settled.values())
        assert message_count(c, 2, q) == total
        assert len(c.credit_frames) >= 3  # the initial grant and top-ups
        assert all(f["blocked"] == "" for f in c.credit_frames)


def test_publishing_beyond_credit_is_read_slower_not_closed(broker_factory: Any) -> None:
    """A client ignoring its credit: every message is confirmed and enqueued, the
    connection stays open, and the server only takes its next request once the rate
    (1,000 messages/s here) has paid back what was overdrawn."""
    b = broker_factory("--publish-rate-messages", "1000", "--heartbeat-ms", "0")
    q = qname("fc-overdraw")
    with open_conn(b.port, 20.0) as c:
        declare(c, 1, q)
        initial = c.credit_messages
        assert 0 < initial <= 1000
        total = initial + 2000
        start = time.monotonic()
        for first in range(1, total + 1, 100):  # all of it at once, ignoring the credit
            c.send_frame("publish_batch", first, [["", q, {}, b"over", False]] * 100)
        settled = read_confirms(c, total, timeout=20)
        assert len(settled) == total and all(settled.values()), "a publish was refused"
        assert message_count(c, 2, q) == total  # nothing dropped
        elapsed = time.monotonic() - start
        # 2,000 beyond the credit at 1,000/s: the request above waited for the payback.
        assert elapsed >= 1.5, f"the overdraft was not paid back at the rate ({elapsed:.2f}s)"
        assert elapsed < 15
        assert not c.eof
        # Grants go on until the credit is positive again (c.credit_messages is the sum
        # of every grant: this client never deducted what it sent).
        deadline = time.monotonic() + 5
        while c.credit_messages - total <= 0 and time.monotonic() < deadline:
            c.expect_silence(0.1)
        assert c.credit_messages - total > 0
        assert c.open_ok is not None
        (me,) = [x for x in connections(c, 3) if x["id"] == c.open_ok["connection_id"]]
        assert me["published"] == total
        assert me["credit_messages"] == c.credit_messages - total


def test_blocked_reason_on_the_wire_and_in_list_connections(broker_factory: Any) -> None:
    """A disk limit no file system meets: credit is withheld from the start, "disk"."""
    b = broker_factory("--disk-free-limit", str(1 << 60))
    with open_conn(b.port) as c:
        (first,) = c.credit_frames
        assert (first["messages"], first["bytes"], first["blocked"]) == (0, 0, "disk")
        c.expect_silence(0.5)  # blocked: no credit arrives, and the connection stays open
        assert c.open_ok is not None
        (me,) = [x for x in connections(c, 1) if x["id"] == c.open_ok["connection_id"]]
        assert me["blocked"] == "disk"
        assert (me["credit_messages"], me["published"]) == (0, 0)
        assert set(me) >= {
            "id",
            "peer",
            "subject",
            "credit_messages",
            "credit_bytes",
            "blocked",
            "published",
        }
