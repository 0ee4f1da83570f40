"""The WAL fixture of tests/unit/test_commands.py: a deterministic session script whose log
holds every logged command, written as a WAL segment.

``tests/data/commands_wal/`` was written by this script run against the code before the
commands were typed (broker.commands did not exist: records were literal tuples), with::

    python -m tests.data.make_commands_fixture tests/data/commands_wal

It holds ``wal/00000000000000000001.wal`` (the records exactly as that code framed them)
and ``state.msgpack`` (``snapshot_dict`` of what that code recovered from it). The test
runs :func:`drive` again with the current code and compares the bytes, then recovers the
committed segment and compares the state. Only APIs both versions have are used here.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack

from conveyor.broker.core import Broker
from conveyor.broker.session import Session
from conveyor.broker.wal import frame_record, seg_name
from conveyor.protocol import (
    SERVER_FRAMES,
    Ack,
    Bind,
    Consume,
    Decoder,
    ExchangeDeclare,
    ExchangeDelete,
    Frame,
    Get,
    Nack,
    Publish,
    QueueDeclare,
    QueueDelete,
    QueuePurge,
    Reject,
    Unbind,
)

CLOCK_MS = 1_700_000_000_000  # a fixed clock: publish and purge times are in the records


class FrameStore:
    """A Store that frames each appended batch as WalStore does (one record per batch)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.failed: BaseException | None = None

    def append(self, records: Iterable[Any]) -> None:
        batch = list(records)
        if batch:
            self.frames.append(frame_record(msgpack.packb(batch, use_bin_type=True)))

    def commit(self, callback: Callable[[BaseException | None], None]) -> None:
        callback(None)

    def write_through(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Client:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.frames: list[Frame] = []
        decoder = Decoder(1 << 20, SERVER_FRAMES)

        def write(chunks: list[bytes]) -> None:
            self.frames.extend(decoder.feed(b"".join(chunks)))

        self.session = Session(broker, broker.new_session_id(), write, 1 << 20)
        self.rid = itertools.count(1)
        self.seq = itertools.count(1)

    def send(self, *frames: Frame) -> list[Frame]:
        self.session.handle(list(frames))
        self.broker.pump()
        self.broker.flush_journal()
        out, self.frames = self.frames, []
        return out

    def publish(
        self, exchange: str, key: str, *bodies: bytes, props: dict[str, Any] | None = None
    ) -> None:
        self.send(*[Publish(next(self.seq), exchange, key, props or {}, b, False) for b in bodies])

    def tags(self, frames: list[Frame]) -> list[int]:
        out: list[int] = []
        for f in frames:
            entries = getattr(f, "entries", None)
            if entries is not None:
                out.extend(e.delivery_tag for e in entries)
            elif hasattr(f, "delivery_tag"):
                out.append(f.delivery_tag)
        return out


def drive() -> tuple[Broker, FrameStore]:
    """Every command the log has, through sessions: xd xr qd qr qp b u p d a r."""
    store = FrameStore()
    broker = Broker(store, durable=True)
    broker.clock = lambda: CLOCK_MS
    c = _Client(broker)
    r = c.rid
    c.send(
        ExchangeDeclare(next(r), "fx.topic", "topic", True, False, False, {}),
        ExchangeDeclare(next(r), "fx.dlx", "fanout", True, False, False, {}),
        ExchangeDeclare(next(r), "fx.gone", "direct", True, False, False, {}),
    )
    c.send(
        QueueDeclare(next(r), "fx.work", True, False, False, False, {}),
        QueueDeclare(next(r), "fx.dead", True, False, False, False, {}),
        QueueDeclare(
            next(r), "fx.retry", True, False, False, False, {"dead_letter_exchange": "fx.dlx"}
        ),
        QueueDeclare(next(r), "fx.dedup", True, False, False, False, {"dedup_window_ms": 60_000}),
        QueueDeclare(next(r), "fx.purged", True, False, False, False, {}),
        QueueDeclare(next(r), "fx.deleted", True, False, False, False, {}),
        QueueDeclare(next(r), "fx.transient", False, False, False, False, {}),
    )
    c.send(
        Bind(next(r), "fx.topic", "fx.work", "a.#", {}),
        Bind(next(r), "fx.topic", "fx.purged", "p.*", {}),
        Bind(next(r), "fx.topic", "fx.purged", "unbound", {}),
        Bind(next(r), "fx.dlx", "fx.dead", "", {}),
        Bind(next(r), "fx.gone", "fx.work", "k", {}),
        Bind(next(r), "fx.topic", "fx.deleted", "d", {}),
    )
    c.send(Unbind(next(r), "fx.topic", "fx.purged", "unbound", {}))
    # A run of publishes with one target (Broker.enqueue_many), then single ones.
    c.publish("fx.topic", "a.b", *[b"work-%d" % i for i in range(6)])
    c.publish("fx.topic", "a.c", b"props", props={"headers": {"h": [1, "two"]}, "priority": 3})
    c.publish("fx.topic", "a.c", b"not logged", props={"persistent": False})
    c.publish("", "fx.retry", b"retry-1", b"retry-2")
    c.publish("", "fx.dedup", b"once", props={"message_id": "m-1"})
    c.publish("", "fx.dedup", b"twice", props={"message_id": "m-1"})
    c.publish("fx.topic", "p.x", b"purged", b"delayed")
    c.publish("fx.topic", "p.y", b"still delayed", props={"delay": 3_600_000})
    c.publish("fx.topic", "d", b"deleted with its queue")
    c.publish("", "fx.transient", b"transient queue")
    # Deliveries: ack one, requeue one (nack), leave one unacked (connection closes).
    got = c.tags(c.send(Consume(next(r), "fx.work", "", False, False, 3, {})))
    c.send(Ack(got[0], False))
    c.send(Nack(got[1], False, True))
    # Reject without requeue: dead-lettered (gone from fx.retry, published on fx.dead).
    got = c.tags(c.send(Get(next(r), "fx.retry", 1, False)))
    c.send(Reject(got[0], False))
    c.send(Get(next(r), "fx.retry", 1, True))  # no_ack: gone at once
    c.send(QueuePurge(next(r), "fx.purged"))
    c.send(QueueDelete(next(r), "fx.deleted", False, False))
    c.send(ExchangeDelete(next(r), "fx.gone", False))
    c2 = _Client(broker)
    got = c2.tags(c2.send(Consume(next(c2.rid), "fx.dead", "", False, False, 10, {})))
    c2.send(Ack(got[0], True))
    c.session.close()  # fx.work's unacked delivery: requeued
    broker.pump()
    broker.flush_journal()
    c2.session.close()
    broker.pump()
    broker.flush_journal()
    return broker, store


def write(out: Path) -> None:
    """Write the fixture: the WAL segment and the state recovery builds from it."""
    from conveyor.broker.config import Config
    from conveyor.broker.durability import Durability
    from conveyor.broker.journal import snapshot_dict

    _broker, store = drive()
    wal = out / "wal"
    wal.mkdir(parents=True, exist_ok=True)
    (wal / seg_name(1)).write_bytes(b"".join(store.frames))
    work = out.parent / (out.name + ".tmp")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(out, work)
    d = Durability(Config(data_dir=str(work)))
    recovered = d.open()
    state = snapshot_dict(recovered)
    d.close()
    shutil.rmtree(work)
    (out / "state.msgpack").write_bytes(msgpack.packb(state, use_bin_type=True))


if __name__ == "__main__":
    write(Path(sys.argv[1]))
