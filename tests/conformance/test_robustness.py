"""Isolation: bad connections never disturb a well-behaved one on the same broker.

While other raw connections send garbage, truncated, oversized and malformed frames in a
loop, one well-behaved raw connection keeps declaring, publishing with confirms, consuming
under credit and acking. At the end every one of its messages was confirmed exactly once
and delivered exactly once, in order.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

from tests.broker_process import BrokerProcess
from tests.conformance import wire
from tests.conformance.wire import Conn, deliveries, open_conn

INVALID = json.loads((wire.SPEC_DIR / "vectors" / "invalid.json").read_text())
FRAME_VECTORS = [v for v in INVALID["vectors"] if v["stage"] == "frame"]
BAD_CONNECTIONS = 150  # at least this many bad connections while the good one works
MIN_ROUNDS = 30
BAD_THREADS = 2
WINDOW = 40  # consumer credit window of the good connection


def _one_bad_connection(port: int, i: int, rnd: random.Random) -> None:
    mode = i % 6
    with Conn(port, timeout=5.0) as c:
        if mode == 0:  # random bytes instead of the preamble
            c.try_send(rnd.randbytes(2048).replace(b"C", b"c"))
            c.expect_fatal(wire.MALFORMED_FRAME)
            return
        c.handshake()
        if mode == 1:  # 64 KiB of garbage
            c.try_send(rnd.randbytes(65536))
            frames = c.expect_closed()
            assert frames and frames[-1].kind == "error", frames
            assert frames[-1]["code"] in wire.PROTOCOL_ERROR_CODES, frames
        elif mode == 2:  # truncated frame, then the client vanishes
            full = wire.encode("publish", 1, "", "x", {}, rnd.randbytes(2000))
            c.send(full[: rnd.randrange(1, len(full))])
        elif mode == 3:  # oversized length, header only
            c.send(
                wire.HEADER.pack(
                    rnd.randrange(wire.MAX_FRAME_SIZE_DEFAULT + 1, 2**32),
                    wire.ftype("publish_batch"),
                )
            )
            c.expect_fatal(wire.FRAME_TOO_LARGE)
        elif mode == 4:  # a malformed-frame vector
            vec = FRAME_VECTORS[i % len(FRAME_VECTORS)]
            c.try_send(bytes.fromhex(vec["hex"]))
            c.expect_fatal(vec["code"])
        else:  # a valid request, then a frame only the server may send
            assert c.request("queue_declare", 1, "", False, True, True).kind == "queue_declare_ok"
            c.send_frame("deliver", "ctag-1", 1, False, "", "q", {}, b"x", 1)
            c.expect_fatal(wire.UNEXPECTED_FRAME)


def _bad_worker(
    port: int,
    start: int,
    step: int,
    errors: list[BaseException],
    done: list[int],
    stop: threading.Event,
) -> None:
    """Open bad connections one after another until told to stop."""
    rnd = random.Random(start)
    i = start
    try:
        while not stop.is_set():
            _one_bad_connection(port, i, rnd)
            done.append(i)
            i += step
    except BaseException as exc:
        errors.append(exc)


class GoodClient:
    """Publisher + consumer on one raw connection, with complete bookkeeping."""

    def __init__(self, port: int, queue: str) -> None:
        self.c = open_conn(port, timeout=10.0)
        self.queue = queue
        self.next_seq = 1
        self.next_rid = 1
        self.published: list[bytes] = []
        self.confirm_next = 1  # first seq not yet settled: ranges must start exactly here
        self.nacked: list[int] = []
        self.delivered: list[bytes] = []
        self.tags: list[int] = []
        self.ctag = ""
        self.pending_rid = 0

    def rid(self) -> int:
        self.next_rid += 1
        return self.next_rid

    def start(self) -> None:
        reply = self.c.request("queue_declare", self.rid(), self.queue, False, False, False, False)
        assert reply.kind == "queue_declare_ok", reply
        reply = self.c.request("consume", self.rid(), self.queue, "", False, False, WINDOW, {})
        assert reply.kind == "consume_ok", reply
        self.ctag = reply["consumer_tag"]

    def publish_round(self, n: int) -> None:
        bodies = [b"good-%d" % (len(self.published) + k) for k in range(n)]
        if len(self.published) // n % 2:
            entries = [["", self.queue, {"message_id": b.decode()}, b, False] for b in bodies]
            data = wire.encode("publish_batch", self.next_seq, entries)
        else:
            data = b"".join(
                wire.encode("publish", self.next_seq + k, "", self.queue, {}, b, True)
                for k, b in enumerate(bodies)
            )
        # A request in the same write: its reply must come back with its rid.
        rid = self.rid()
        data += wire.encode("queue_declare", rid, self.queue, False, False, False, True)
        self.c.send(data)
        self.next_seq += n
        self.published.extend(bodies)
        self.pending_rid = rid

    def handle(self, f: wire.Frame) -> None:
        if f.kind == "confirm":
            assert f["first_seq"] == self.confirm_next, f"confirm out of order: {f!r}"
            assert f["first_seq"] <= f["last_seq"] < self.next_seq, f
            if not f["ack"]:
                self.nacked.extend(range(f["first_seq"], f["last_seq"] + 1))
            self.confirm_next = f["last_seq"] + 1
        elif f.kind in ("deliver", "deliver_batch", "deliver_run"):
            ds = deliveries(f)
            for d in ds:
                assert d["consumer_tag"] == self.ctag and not d["redelivered"], d
                assert d["delivery_count"] == 1, d
                self.delivered.append(d["body"])
                self.tags.append(d["delivery_tag"])
            # Ack what arrived (multiple), then top the credit back up.
            self.c.send(
                wire.encode("ack", ds[-1]["delivery_tag"], True)
                + wire.encode("credit", self.ctag, len(ds))
            )
        elif f.kind == "queue_declare_ok":
            assert f["rid"] == self.pending_rid, f
            self.pending_rid = 0
        else:
            raise AssertionError(f"unexpected frame on the good connection: {f!r}")

    def settled(self) -> bool:
        return (
            self.confirm_next == self.next_seq
            and len(self.delivered) == len(self.published)
            and not self.pending_rid
        )

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.settled():
            assert time.monotonic() < deadline, (
                f"good connection stalled: confirmed <{self.confirm_next}, "
                f"next seq {self.next_seq}, delivered {len(self.delivered)}/"
                f"{len(self.published)}"
            )
            self.handle(self.c.recv(max(0.01, deadline - time.monotonic())))


def test_bad_connections_do_not_disturb_a_good_one(broker: BrokerProcess) -> None:
    good = GoodClient(broker.port, "robust-good")
    good.start()
    errors: list[BaseException] = []
    done: list[int] = []
    stop = threading.Event()
    workers = [
        threading.Thread(
            target=_bad_worker, args=(broker.port, k, BAD_THREADS, errors, done, stop), daemon=True
        )
        for k in range(BAD_THREADS)
    ]
    for w in workers:
        w.start()
    rounds = 0
    try:
        while (rounds < MIN_ROUNDS or len(done) < BAD_CONNECTIONS) and not errors:
            good.publish_round(10)
            good.drain(timeout=10.0)
            rounds += 1
            assert rounds < 5000, "bad connections made no progress"
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert not errors, f"bad-connection expectations failed: {errors!r}"
    assert len(done) >= BAD_CONNECTIONS

    # Every message confirmed exactly once (ranges were contiguous and ordered), none nacked.
    assert good.confirm_next == good.next_seq == len(good.published) + 1
    assert good.nacked == []
    # Delivered exactly once, in publish order, with consecutive delivery tags.
    assert good.delivered == good.published
    assert good.tags == list(range(1, len(good.published) + 1))
    good.c.expect_silence(0.2)
    reply = good.c.request("queue_declare", good.rid(), good.queue, False, False, False, True)
    assert (reply["message_count"], reply["consumer_count"]) == (0, 1)
    good.c.send_frame("close", wire.OK_CODE, "done")
    assert [f.kind for f in good.c.expect_closed()] == ["close_ok"]
    good.c.close()

    assert broker.alive(), broker.log_text()[-3000:]
    with open_conn(broker.port) as c:
        reply = c.request("queue_declare", 1, good.queue, False, False, False, True)
        assert (reply["message_count"], reply["consumer_count"]) == (0, 0)


def test_many_concurrent_bad_connections_then_healthy(broker: BrokerProcess) -> None:
    """Bad connections opened all at once (not one by one) and left half-open."""
    rnd = random.Random(7)
    conns: list[Conn] = []
    try:
        for i in range(40):
            c = Conn(broker.port)
            conns.append(c)
            if i % 2:
                c.send(wire.PREAMBLE)
            c.send(rnd.randbytes(rnd.randrange(1, 7)) if i % 4 == 1 else b"")
        with open_conn(broker.port) as good:
            q: Any = good.request("queue_declare", 1, "", False, True, True)
            assert q.kind == "queue_declare_ok"
            good.send_frame("publish", 1, "", q["queue"], {}, b"ok", False)
            good.expect("confirm", first_seq=1, last_seq=1, ack=True)
    finally:
        for c in conns:
            c.close()
    assert broker.alive()
