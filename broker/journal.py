"""How recovery replays the logged commands (broker.commands) and what a snapshot holds.

Recovery applies a snapshot and then the commands logged after it to a ``Replay`` (per
queue: message id -> state, in publish order), then builds the broker; messages that were
delivered and not acked come back ready, flagged redelivered, with their delivery count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conveyor.broker.commands import Entry, apply
from conveyor.broker.exchange import make_exchange
from conveyor.broker.message import GONE, Message, QueuedMessage
from conveyor.broker.pager import Pager
from conveyor.broker.queue import Queue

if TYPE_CHECKING:
    from conveyor.broker.core import Broker

log = logging.getLogger("conveyor.recovery")


@dataclass
class Replay:
    """State rebuilt from a snapshot plus commands; applied to a Broker at the end."""

    exchanges: dict[str, tuple[str, bool, dict[str, Any]]] = field(default_factory=dict)
    queues: dict[str, tuple[bool, dict[str, Any]]] = field(default_factory=dict)
    bindings: set[tuple[str, str, str]] = field(default_factory=set)
    messages: dict[str, dict[int, Entry]] = field(default_factory=dict)
    next_id: int = 1
    commands: int = 0
    # queue -> message_id -> publish time, for queues with a dedup window
    dedup: dict[str, dict[str, int]] = field(default_factory=dict)
    # With a pager, bodies past its budget go to page files as they are read, so
    # recovering a backlog larger than memory does not need that memory.
    pager: Pager | None = None
    _resident: int = 0
    _pending_bytes: int = 0
    # Messages a (repaired) snapshot indexes whose entries were in its damaged part.
    lost: int = 0

    def new_message(
        self, mid: int, exchange: str, rk: str, props: dict[str, Any], body: bytes, ts: int
    ) -> Message:
        """A recovered message, resident or handed to the pager (replay's commands call it)."""
        m = Message(exchange, rk, props, body, ts=ts)
        m.id = mid
        pager = self.pager
        if pager is not None:
            if self._resident + m.size <= pager.budget // 2:
                self._resident += m.size
            else:
                pager.pending.append(m)
                self._pending_bytes += len(body)
                if self._pending_bytes >= 1 << 20:
                    pager.flush()
                    self._pending_bytes = 0
        return m

    # ------------------------------------------------------------------ snapshot
    def load_snapshot(
        self, snap: dict[str, Any], entries: Iterable[list[Any]] | None = None
    ) -> None:
        """Load a snapshot's head and its message entries ([id, exchange, routing key,
        properties, body]); ``entries`` defaults to the head's own "entries" list."""
        self.next_id = snap["next_id"]
        for name, etype, auto_delete, args in snap["exchanges"]:
            self.exchanges[name] = (etype, auto_delete, args)
        for name, auto_delete, args in snap["queues"]:
            self.queues[name] = (auto_delete, args)
            self.messages[name] = {}
        for ex, q, key in snap["bindings"]:
            self.bindings.add((ex, q, key))
        bodies: dict[int, Message] = {}
        for e in snap.get("entries", ()) if entries is None else entries:
            bodies[e[0]] = self.new_message(
                e[0], e[1], e[2], e[3], e[-1], e[4] if len(e) > 5 else 0
            )
        for qname, pairs in snap.get("dedup", {}).items():
            self.dedup[qname] = dict(pairs)
        for qname, entries in snap["queue_messages"].items():
            table = self.messages.setdefault(qname, {})
            for mid, count, *held in entries:
                body = bodies.get(mid)
                if body is None:  # only after --repair of a damaged snapshot
                    self.lost += 1
                    continue
                # held: a consumer had it unacked (a later purge must keep it)
                table[mid] = Entry(body, count, bool(held and held[0]))

    # ------------------------------------------------------------------ commands
    def apply(self, batch: list[list[Any]]) -> None:
        """Apply a batch of decoded commands in order, each through commands.APPLY (the
        table a follower would use too); an unknown op is a ValueError."""
        for cmd in batch:
            self.commands += 1
            apply(self, cmd)

    # ------------------------------------------------------------------ result
    def build(self, broker: Broker) -> int:
        """Create the recovered objects in ``broker``; returns the number of messages."""
        for name, (etype, auto_delete, args) in self.exchanges.items():
            if name not in broker.exchanges:
                broker.exchanges[name] = make_exchange(
                    etype, name, durable=True, auto_delete=auto_delete, arguments=args
                )
        if self.pager is not None:
            self.pager.flush()
        total = 0
        now = broker.clock()
        # Held unacked when the broker stopped, already delivered delivery_limit times:
        # their connection is lost, and a message that comes back at its limit is
        # dead-lettered, not delivered once more (done once exchanges and bindings exist).
        spent: list[tuple[Queue, QueuedMessage]] = []
        for name, (auto_delete, args) in self.queues.items():
            if args.get("queue_type") == "stream":  # its messages are in its own segments
                st = broker.streams.create(name, args, fresh=False)
                st.logged = True
                broker.queues[name] = st
                broker.adopt_queue(st)
                continue
            q = Queue(name, durable=True, auto_delete=auto_delete, arguments=args)
            q.logged = True
            if not q.opts.max_priority:
                q.pager = broker.pager
            broker.queues[name] = q
            broker.adopt_queue(q)
            for _mid, e in self.messages.get(name, {}).items():
                m = e.message
                limit = q.opts.delivery_limit
                if e.unacked and limit and e.count >= limit:
                    qm = QueuedMessage(0, m)
                    qm.delivery_count = e.count
                    qm.state = GONE
                    spent.append((q, qm))
                    continue
                if q.pager is None and m.body is None:
                    m.body = Pager.read(m)  # priority queues keep bodies in memory
                    m.properties = Pager.properties(m)
                qm = q.enqueue(m, now)
                qm.delivery_count = e.count
                qm.redelivered = e.count > 0
                broker.arm_message(q, qm)
                total += 1
            q.published = 0
            if q.opts.dedup_window_ms:
                q.load_dedup(self.dedup.get(name, {}), now)
        for ex, qname, key in self.bindings:
            exo = broker.exchanges.get(ex)
            bq = broker.queues.get(qname)
            if exo is not None and bq is not None and exo.bind(key, qname):
                bq.bindings.add((ex, key))
        broker.next_message_id = self.next_id
        for q, qm in spent:
            broker.dead_letter(q, [qm], "delivery-limit")
        return total


SnapshotMessage = tuple[int, str, str, dict[str, Any], int, Any]


def snapshot_state(broker: Broker) -> tuple[dict[str, Any], list[SnapshotMessage]]:
    """Everything a restart needs: a head of plain data (durable objects, per-queue
    message indexes) and the persistent messages, whose entries ``snapshot_entries``
    produces later (off the event loop: bodies may have to come from page files).

    A message is captured by its page when it has one, not by the Message object: a
    consumer draining the queue meanwhile loads bodies into those objects, and holding
    them here would keep every body it consumed in memory until the snapshot is done.

    Messages a consumer holds unacked are included with their delivery count, so after a
    restart they come back redelivered, exactly as replaying the log would give.
    """
    logged = {name: q for name, q in broker.queues.items() if q.logged}
    # (id, delivery count, held unacked by a session: 1/0)
    per_queue: dict[str, list[tuple[int, int, int]]] = {name: [] for name in logged}
    bodies: dict[int, Message] = {}
    for name, q in logged.items():
        for qm in q.iter_messages():
            m = qm.message
            if m.id:
                per_queue[name].append((m.id, qm.delivery_count, 0))
                bodies[m.id] = m
    for s in broker.sessions.values():
        for qm, q, _c in s.unacked.values():
            m = qm.message
            if q.logged and m.id and q.name in per_queue and not q.deleted:
                per_queue[q.name].append((m.id, qm.delivery_count, 1))
                bodies[m.id] = m
    for entries in per_queue.values():
        entries.sort()
    head = {
        "version": 2,
        "dedup": {name: q.dedup_entries() for name, q in logged.items() if q.opts.dedup_window_ms},
        "next_id": broker.next_message_id,
        "exchanges": [
            [e.name, e.type, e.auto_delete, e.arguments]
            for e in broker.exchanges.values()
            if e.durable and not e.builtin
        ],
        "queues": [[q.name, q.auto_delete, q.arguments] for q in logged.values()],
        "bindings": [
            [e.name, q, k]
            for e in broker.exchanges.values()
            if e.durable
            for k, q in e.bindings
            if q in logged
        ],
        "queue_messages": {name: [list(x) for x in entries] for name, entries in per_queue.items()},
    }
    return head, [
        (
            m.id,
            m.exchange,
            m.routing_key,
            m.properties,
            m.ts,
            m.page if m.page is not None else m.body,
        )
        for m in bodies.values()
    ]


def snapshot_entries(messages: list[SnapshotMessage]) -> Iterator[list[Any]]:
    """Snapshot entries: [id, exchange, routing key, properties, ts, body] (the body
    last, as write_snapshot expects), reading paged bodies. Safe in a worker thread."""
    read = Pager.read_page
    for i, (mid, exchange, rk, props, ts, src) in enumerate(messages):
        messages[i] = None  # type: ignore[call-overload]  # written: release it now
        if type(src) is bytes:
            yield [mid, exchange, rk, props, ts, src]
        else:  # paged: the body, and the headers if they were paged with it
            yield [mid, exchange, rk, Pager.page_properties(props, src), ts, read(src)]


def snapshot_dict(broker: Broker) -> dict[str, Any]:
    """The whole snapshot as one value (the head plus "entries"): for tests and tools."""
    head, messages = snapshot_state(broker)
    return dict(head, entries=list(snapshot_entries(messages)))
