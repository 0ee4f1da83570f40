"""Broker.pump contains a failure to the session it belongs to (spec: no crashed server,
no other connection dropped).

Over the wire the decoder's nesting and key checks keep unencodable messages out (see
tests/conformance/test_wire_limits.py); these model-level tests drive the guards directly:
a session whose write fails, and a stored message msgpack cannot encode.
"""

from __future__ import annotations

from typing import Any

from conveyor.broker.core import Broker
from conveyor.broker.message import Message
from conveyor.broker.session import Session
from conveyor.protocol import SERVER_FRAMES, Consume, Decoder, Deliver, DeliverBatch, Frame


class Peer:
    """A Session with a decoding write callback; ``fail_writes`` makes writes raise."""

    def __init__(self, broker: Broker) -> None:
        self.frames: list[Frame] = []
        self.failures: list[BaseException] = []
        self.fail_writes = False
        decoder = Decoder(1 << 20, SERVER_FRAMES)

        def write(chunks: list[bytes]) -> None:
            if self.fail_writes:
                raise RuntimeError("transport exploded")
            self.frames.extend(decoder.feed(b"".join(chunks)))

        self.session = Session(broker, broker.new_session_id(), write, 1 << 20)
        self.session.on_failure = self.failures.append

    def bodies(self) -> list[bytes]:
        out: list[bytes] = []
        for f in self.frames:
            if isinstance(f, Deliver):
                out.append(f.body)
            elif isinstance(f, DeliverBatch):
                out.extend(e.body for e in f.entries)
        return out


def _consumer(broker: Broker, queue: str) -> Peer:
    p = Peer(broker)
    broker.declare_queue(p.session.id, queue, durable=False)
    p.session.handle([Consume(1, queue, "", True, False, 100, {})])
    broker.pump()
    return p


def test_a_failing_flush_closes_only_its_own_session() -> None:
    broker = Broker()
    bad, good = _consumer(broker, "qa"), _consumer(broker, "qb")
    bad.fail_writes = True
    for q in ("qa", "qb"):
        broker.enqueue(Message("", q, {}, b"m-" + q.encode()), [q])
    broker.pump()  # used to raise into whichever connection's input ran the pump
    assert [type(e) for e in bad.failures] == [RuntimeError]
    assert good.bodies() == [b"m-qb"] and not good.failures
    assert broker.errors.get(541) == 1


def test_an_unencodable_delivery_is_dropped_and_counted_not_raised() -> None:
    broker = Broker()
    peer = _consumer(broker, "qc")
    poison: dict[str, Any] = {"headers": {"x": object()}}  # msgpack cannot encode it
    broker.enqueue(Message("", "qc", poison, b"poison", 6), ["qc"])
    broker.pump()
    assert peer.bodies() == [] and not peer.failures
    assert broker.errors.get(541) == 1
    broker.enqueue(Message("", "qc", {}, b"after"), ["qc"])
    broker.pump()
    assert peer.bodies() == [b"after"]  # the consumer goes on receiving
