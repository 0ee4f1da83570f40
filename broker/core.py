"""The broker model: exchanges, queues, bindings and dispatch, as plain objects.

Sessions (one per connection) call these methods; nothing here knows about sockets or
event loops, so the whole routing and queue model is testable with direct calls. After
handling a batch of input the transport layer calls :meth:`Broker.pump`, which dispatches
every queue that changed and lets every session with output write it once.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from conveyor.broker import commands
from conveyor.broker.counters import LatencyHistogram
from conveyor.broker.deadletter import automatic_cycle, dead_letter_properties
from conveyor.broker.exchange import EXCHANGE_TYPES, Exchange, make_exchange
from conveyor.broker.flow import FlowControl
from conveyor.broker.limits import (
    Limits,
    QueueOwners,
    check_binding,
    check_consumer_count,
    check_queue_count,
)
from conveyor.broker.message import GONE, READY, Message, QueuedMessage
from conveyor.broker.options import QueueOptions
from conveyor.broker.pager import Pager
from conveyor.broker.queue import Consumer, Queue
from conveyor.broker.scheduling import LoopScheduler
from conveyor.broker.store import MemoryStore, Record, Store
from conveyor.broker.stream import Streams, check_classic, check_declare
from conveyor.broker.timers import TimerHeap
from conveyor.protocol import (
    AccessRefused,
    InvalidArgument,
    NotFound,
    PreconditionFailed,
    QueueFull,
    ResourceLocked,
)

if TYPE_CHECKING:
    from conveyor.broker.session import Session

log = logging.getLogger("conveyor.broker")

BUILTIN_EXCHANGES = (("amq.direct", "direct"), ("amq.topic", "topic"), ("amq.fanout", "fanout"))
# Arguments exchanges and bindings accept (queues: broker.options, from the spec).
EXCHANGE_ARGUMENTS: frozenset[str] = frozenset()
BINDING_ARGUMENTS: frozenset[str] = frozenset()


def _check_arguments(arguments: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    for key in arguments:
        if key not in allowed:
            raise InvalidArgument(f"unknown {what} argument {key!r}", {"argument": key})


class Broker:
    """All routing and queue state of one broker."""

    def __init__(
        self,
        store: Store | None = None,
        *,
        max_message_size: int = 1 << 20,
        durable: bool = False,
        pager: Pager | None = None,
    ) -> None:
        self.store: Store = store or MemoryStore()
        # Keeps ready bodies within a memory budget by paging queue tails to disk.
        self.pager = pager
        # With a durable store, durable queues log their commands (broker.journal).
        self.durable = durable
        self.journal: list[Record] = []
        self.next_message_id = 1
        # Set by the transport (loop.call_soon): lets store callbacks trigger a pump.
        self.scheduler: Callable[[Callable[[], None]], Any] | None = None
        self._pump_handle: Any = None
        self._turn_pumps = 0  # pumps pump_input ran at once in this loop turn
        self.max_message_size = max_message_size
        # Publisher flow control (broker.flow); the transport sets it from its Config.
        self.flow = FlowControl(max_message_size=max_message_size)
        # Resource limits (broker.limits); the transport sets them from its Config.
        self.limits = Limits()
        self.queue_owners = QueueOwners()  # max_queues_per_subject (token subjects)
        self.exchanges: dict[str, Exchange] = {}
        self.queues: dict[str, Queue] = {}
        self.sessions: dict[str, Session] = {}
        self._dirty_queues: set[Queue] = set()
        # Queues whose dispatch stopped at its batch cap: dispatched again next loop turn,
        # once the batch was written (and a full socket paused its consumer).
        self._more_queues: set[Queue] = set()
        self._dirty_sessions: set[Session] = set()
        self._ids = itertools.count(1)
        self.started = time.time()
        # Timers (delay, TTL, ack timeouts, queue expiry) are a heap of
        # (due ms, seq, kind, queue, message); the transport calls :meth:`tick` when the
        # earliest is due, via ``timer_hook(seconds from now)`` it is given.
        self.clock: Callable[[], int] = _wall_ms
        self.timers: TimerHeap[Queue, QueuedMessage] = TimerHeap(lambda: self.clock(), _stale_timer)
        self._timers = self.timers.heap
        self.dead_lettered = 0
        # Set when deliveries of logged queues were journaled (Session.deliver): the next
        # pump writes the log through before any session writes its frames.
        self.deliveries_logged = False
        self.limited = False  # a queue has overflow reject-publish (publish checks capacity)
        # Plain counters for broker.metrics (read at scrape time, never on a hot path):
        # per-queue counters of deleted queues, so broker-wide totals never go down
        self.retired: dict[str, int] = dict.fromkeys(RETIRED_COUNTERS, 0)
        self.retired_published = 0  # Session.published of closed connections
        self.connections_opened = 0
        self.errors: dict[int, int] = {}  # ERROR frames sent, by code
        self.nacks: dict[int, int] = {}  # publish nacks (CONFIRM ok=false) sent, by code
        self.latency = LatencyHistogram()  # publish -> delivery, recorded per batch
        # Stream queues (broker.stream); Durability sets their directory and fsync policy.
        self.streams = Streams(lambda: self.clock(), self.wake, self.pump_soon, LoopScheduler())
        self.now = 0  # ms: the clock as of the current dispatch round (set by pump)
        # Run at the end of each pump while set: the HTTP gateway's long polls look for
        # ready messages on their queues then (None when nobody waits: no cost).
        self.after_pump: Callable[[], None] | None = None
        for name, etype in BUILTIN_EXCHANGES:
            self.exchanges[name] = make_exchange(etype, name, builtin=True)

    # ------------------------------------------------------------------ helpers
    def new_session_id(self) -> str:
        return f"c-{next(self._ids)}"

    def mark_session(self, session: Session) -> None:
        self._dirty_sessions.add(session)

    def count_error(self, code: int, n: int = 1, *, nack: bool = False) -> None:
        """An ERROR frame (or, with ``nack``, a publish nack) with ``code`` was sent."""
        d = self.nacks if nack else self.errors
        d[code] = d.get(code, 0) + n

    def _log(self, records: Iterable[Record]) -> None:
        if self.durable:
            self.journal.extend(records)

    def flush_journal(self) -> None:
        """Hand the commands gathered since the last call to the store, as one batch
        (and write the appends buffered for streams)."""
        if self.streams.pending:
            self.streams.flush()
        if self.journal:
            batch = self.journal
            self.journal = []
            self.store.append(batch)

    def commit(self, callback: Callable[[BaseException | None], None]) -> None:
        """``callback`` once everything logged or appended to a stream so far is durable
        (publisher confirms, deferred replies)."""
        self.streams.commit(self.store, callback)

    def get_queue(self, name: str, session_id: str | None) -> Queue:
        """Look up a queue the session may use (not another connection's exclusive one)."""
        q = self.queues.get(name)
        if q is None:
            raise NotFound(f"no queue {name!r}", {"queue": name})
        if q.exclusive_owner is not None and q.exclusive_owner != session_id:
            raise ResourceLocked(
                f"queue {name!r} is exclusive to another connection", {"queue": name}
            )
        return q

    def get_exchange(self, name: str) -> Exchange:
        ex = self.exchanges.get(name)
        if ex is None:
            raise NotFound(f"no exchange {name!r}", {"exchange": name})
        return ex

    # ------------------------------------------------------------------ exchanges
    def declare_exchange(
        self,
        name: str,
        etype: str = "direct",
        *,
        durable: bool = True,
        auto_delete: bool = False,
        passive: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> Exchange:
        arguments = arguments or {}
        if not name:
            raise AccessRefused("the default exchange cannot be declared", {"exchange": name})
        existing = self.exchanges.get(name)
        if passive:
            if existing is None:
                raise NotFound(f"no exchange {name!r}", {"exchange": name})
            return existing
        if etype not in EXCHANGE_TYPES:
            raise InvalidArgument(
                f"unknown exchange type {etype!r} (expected one of {', '.join(EXCHANGE_TYPES)})",
                {"type": etype},
            )
        _check_arguments(arguments, EXCHANGE_ARGUMENTS, "exchange")
        if existing is not None:
            for key, was, asked in (
                ("type", existing.type, etype),
                ("durable", existing.durable, durable),
                ("auto_delete", existing.auto_delete, auto_delete),
                ("arguments", existing.arguments, arguments),
            ):
                if was != asked:
                    raise PreconditionFailed(
                        f"exchange {name!r} exists with different settings: {key}: {was!r} "
                        f"vs {asked!r} (existing vs requested)",
                        {"exchange": name, "setting": key, "existing": was, "requested": asked},
                    )
            return existing
        if name.startswith("amq."):
            raise AccessRefused(
                f"exchange names starting 'amq.' are reserved: {name!r}", {"exchange": name}
            )
        ex = make_exchange(
            etype, name, durable=durable, auto_delete=auto_delete, arguments=arguments
        )
        self.exchanges[name] = ex
        if durable:
            self._log([commands.exchange_declare(name, etype, auto_delete, arguments)])
        return ex

    def delete_exchange(self, name: str, *, if_unused: bool = False) -> None:
        if not name or name.startswith("amq."):
            raise AccessRefused(f"exchange {name!r} cannot be deleted", {"exchange": name})
        ex = self.get_exchange(name)
        if if_unused and ex.bindings:
            raise PreconditionFailed(
                f"exchange {name!r} has {len(ex.bindings)} bindings", {"exchange": name}
            )
        self._remove_exchange(ex)

    def _remove_exchange(self, ex: Exchange) -> None:
        for key, qname in list(ex.bindings):
            q = self.queues.get(qname)
            if q is not None:
                q.bindings.discard((ex.name, key))
        del self.exchanges[ex.name]
        if ex.durable:
            self._log([commands.exchange_delete(ex.name)])

    # ------------------------------------------------------------------ queues
    def declare_queue(
        self,
        session_id: str | None,
        name: str = "",
        *,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        passive: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> Queue:
        arguments = arguments or {}
        if passive:
            q = self.get_queue(name, session_id)
            q.last_used = self.clock()
            return q
        opts = QueueOptions(arguments)  # validates (400 on a bad argument)
        if opts.queue_type == "stream":
            check_declare(arguments, durable, exclusive, auto_delete)
        else:
            check_classic(arguments)
        if not name:
            name = f"amq.gen-{secrets.token_urlsafe(12)}"
        elif name.startswith("amq.") and name not in self.queues:
            raise AccessRefused(
                f"queue names starting 'amq.' are reserved: {name!r}", {"queue": name}
            )
        existing = self.queues.get(name)
        if existing is not None:
            self.get_queue(name, session_id)  # exclusivity check
            diff = _queue_difference(existing, durable, exclusive, auto_delete, opts)
            if diff is not None:
                key, was, asked = diff
                raise PreconditionFailed(
                    f"queue {name!r} exists with different settings: {key}: {was!r} vs "
                    f"{asked!r} (existing vs requested)",
                    {"queue": name, "setting": key, "existing": was, "requested": asked},
                )
            existing.last_used = self.clock()
            return existing
        check_queue_count(self.limits, len(self.queues))
        owner = self._queue_owner(session_id)
        if owner is not None:
            self.queue_owners.check(self.limits, owner)
        if opts.queue_type == "stream":
            q = self.streams.create(name, arguments, fresh=True)
        else:
            q = Queue(
                name,
                durable=durable and not exclusive,
                exclusive_owner=session_id if exclusive else None,
                auto_delete=auto_delete,
                arguments=arguments,
            )
        q.durable = durable  # reported as declared; exclusive queues never outlive their owner
        if q.takes_pager():
            q.pager = self.pager
        self.adopt_queue(q)
        self.queues[name] = q
        if owner is not None:
            self.queue_owners.add(name, owner)
        if exclusive and session_id is not None:
            s = self.sessions.get(session_id)
            if s is not None:
                s.exclusive_queues.add(name)
        if durable and not exclusive and self.durable:
            q.logged = True
            self._log([commands.queue_declare(name, auto_delete, arguments)])
        # Exclusive queues (often one per short-lived RPC client) only at debug level.
        log.log(
            logging.DEBUG if exclusive else logging.INFO,
            "queue %r declared",
            name,
            extra={
                "event": "queue.declared",
                "queue": name,
                "durable": durable,
                "exclusive": exclusive,
                "auto_delete": auto_delete,
            },
        )
        return q

    def _queue_owner(self, session_id: str | None) -> str | None:
        """The subject a new queue counts against (max_queues_per_subject): the
        declaring session's, if its principal is restricted (a token or certificate)."""
        s = self.sessions.get(session_id) if session_id is not None else None
        p = s.principal if s is not None else None
        return p.subject if p is not None and p.permissions is not None else None

    def delete_queue(
        self,
        session_id: str | None,
        name: str,
        *,
        if_unused: bool = False,
        if_empty: bool = False,
    ) -> int:
        q = self.get_queue(name, session_id)
        if if_unused and q.consumers:
            raise PreconditionFailed(
                f"queue {name!r} has {len(q.consumers)} consumers", {"queue": name}
            )
        if if_empty and q.ready:
            raise PreconditionFailed(f"queue {name!r} has {q.ready} messages", {"queue": name})
        return self._remove_queue(q, f"queue {name!r} deleted")

    def _remove_queue(self, q: Queue, reason: str, event: str = "queue.deleted") -> int:
        n = q.purge()
        q.deleted = True
        self._drop_timers(q, q.timers)
        retired = self.retired
        for key in RETIRED_COUNTERS:
            retired[key] += getattr(q, key)
        log.log(
            logging.DEBUG if q.exclusive_owner is not None else logging.INFO,
            "%s (%d ready messages dropped)",
            reason,
            n,
            extra={"event": event, "queue": q.name, "reason": reason, "messages": n},
        )
        for c in list(q.consumers):
            c.session.consumer_cancelled(c, 404, reason)
        q.consumers.clear()
        for exname, key in list(q.bindings):
            ex = self.exchanges.get(exname)
            if ex is not None:
                ex.unbind(key, q.name)
                self._maybe_autodelete_exchange(ex)
        q.bindings.clear()
        self.queues.pop(q.name, None)
        self.queue_owners.remove(q.name)
        q.on_removed()
        self._dirty_queues.discard(q)
        if q.exclusive_owner is not None:
            s = self.sessions.get(q.exclusive_owner)
            if s is not None:
                s.exclusive_queues.discard(q.name)
        elif q.logged:
            self._log([commands.queue_delete(q.name)])
        return n

    def purge_queue(self, session_id: str | None, name: str) -> int:
        q = self.get_queue(name, session_id)
        now = self.clock()
        q.check_purgeable()
        q.release(now)  # due by now: ready, so purged (replaying "qp" decides the same)
        n = q.purge()
        self._drop_timers(q, q.purged_timers)
        if q.logged:
            self._log([commands.queue_purge(name, now)])
        return n

    # ------------------------------------------------------------------ bindings
    def bind(
        self,
        session_id: str | None,
        exchange: str,
        queue: str,
        key: str = "",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        if not exchange:
            raise AccessRefused("the default exchange cannot be bound", {"exchange": exchange})
        _check_arguments(arguments or {}, BINDING_ARGUMENTS, "binding")
        ex = self.get_exchange(exchange)
        q = self.get_queue(queue, session_id)
        if (key, queue) not in ex.bindings:  # a repeated bind is no new binding
            check_binding(self.limits, ex.type == "topic", key, len(ex.bindings), len(q.bindings))
        if ex.bind(key, queue):
            q.bindings.add((exchange, key))
            if ex.durable and q.logged:
                self._log([commands.bind(exchange, queue, key)])

    def unbind(self, session_id: str | None, exchange: str, queue: str, key: str = "") -> None:
        if not exchange:
            raise AccessRefused("the default exchange cannot be unbound", {"exchange": exchange})
        ex = self.get_exchange(exchange)
        q = self.get_queue(queue, session_id)
        if ex.unbind(key, queue):
            q.bindings.discard((exchange, key))
            if ex.durable and q.logged:
                self._log([commands.unbind(exchange, queue, key)])
            self._maybe_autodelete_exchange(ex)

    def _maybe_autodelete_exchange(self, ex: Exchange) -> None:
        if ex.auto_delete and not ex.bindings and ex.name in self.exchanges:
            self._remove_exchange(ex)

    # ------------------------------------------------------------------ publish
    def route(self, exchange: str, routing_key: str) -> Iterable[str]:
        """Queue names a message goes to; raises NotFound for a missing exchange."""
        if not exchange:
            return (routing_key,) if routing_key in self.queues else ()
        ex = self.exchanges.get(exchange)
        if ex is None:
            raise NotFound(f"no exchange {exchange!r}", {"exchange": exchange})
        return ex.route(routing_key)

    def check_capacity(
        self, queue_names: Iterable[str], size: int, message_id: str | None = None
    ) -> None:
        """Refuse a publish (409) if a target queue with overflow reject-publish is full;
        checked before anything is enqueued, so a refused publish is nowhere. A retry of a
        message the queue took within its dedup window is no refusal (it is confirmed)."""
        queues = self.queues
        for qname in queue_names:
            q = queues[qname]
            if q.opts.rejects_publish and q.is_full(size):
                if (
                    message_id is not None
                    and q.opts.dedup_window_ms
                    and q.seen(message_id, self.clock())
                ):
                    continue
                raise QueueFull(
                    f"queue {qname!r} is full (overflow reject-publish)", {"queue": qname}
                )

    def enqueue(self, message: Message, queue_names: Iterable[str], now: int = 0) -> int:
        """Put ``message`` on each named queue; returns how many took it (a duplicate
        message_id within a queue's dedup window is confirmed but not enqueued).

        ``now``: the clock read once for a whole batch of publishes (0 = read it here)."""
        queues = self.queues
        dirty = self._dirty_queues
        n = 0
        logged: list[str] | None = None
        now = now or self.clock()
        if not message.ts:
            # Publish time rounded up (the clock truncates to the ms): a delay then never
            # ends before the true publish time + delay.
            message.ts = now + 1
        props = message.properties
        msg_id = props.get("message_id") if props else None
        for qname in queue_names:
            q = queues[qname]
            if msg_id is not None and q.opts.dedup_window_ms and q.duplicate(msg_id, now):
                n += 1  # the queue has it already: taken (a mandatory retry is no RETURN)
                continue
            if q.append_if_log(message):
                n += 1
                continue
            qm = q.enqueue(message, now)
            if qm.state != READY or qm.expires:
                self.arm_message(q, qm)
            if q.consumers:
                dirty.add(q)
            if q.logged and message.persistent:
                if logged is None:
                    logged = [qname]
                else:
                    logged.append(qname)
            n += 1
            if q.has_limit and q.over_limit():
                self._enforce_limit(q)
        if logged is not None:
            mid = self.next_message_id
            self.next_message_id = mid + 1
            message.id = mid
            self.journal.append(
                commands.publish(
                    mid,
                    logged,
                    message.exchange,
                    message.routing_key,
                    message.properties,
                    message.body,
                    message.ts,
                )
            )
        return n

    def enqueue_many(self, messages: list[Message], queue_names: Iterable[str], now: int) -> None:
        """``enqueue`` for a run of new messages that share their targets (a publish
        batch): the same commands in the same order, with the per-queue work done once
        per run. Queues with dedup, a length limit or a stream take the general path."""
        queues = [self.queues[name] for name in queue_names]
        for q in queues:
            if q.appends_to_log or q.opts.dedup_window_ms or q.has_limit:
                for m in messages:
                    self.enqueue(m, queue_names, now)
                return
        logged: list[str] = []
        dirty = self._dirty_queues
        for q in queues:
            for qm in q.enqueue_many(messages, now):
                self.arm_message(q, qm)
            if q.consumers:
                dirty.add(q)
            if q.logged:
                logged.append(q.name)
        if logged:
            records = commands.publish_run(self.next_message_id, logged, messages)
            self.journal.extend(records)
            self.next_message_id += len(records)

    def _enforce_limit(self, q: Queue) -> None:
        """max_length / max_length_bytes with drop-head: the oldest go (dead-lettered)."""
        dropped: list[QueuedMessage] = []
        while q.over_limit():
            qm = q.drop_head()
            if qm is None:
                break
            dropped.append(qm)
        if dropped:
            self.dead_letter(q, dropped, "max-length")

    # ------------------------------------------------------------------ dead letters
    def dead_letter(self, q: Queue, qms: list[QueuedMessage], reason: str) -> None:
        """Messages leave ``q`` for good (rejected, expired, max-length, delivery-limit):
        republished to its dead-letter exchange with a death record, or dropped.

        Their removal from ``q`` is logged after the republishes, in the same journal
        batch, so a crash keeps either both or neither. Each message is handled on its
        own: one that cannot be dead-lettered (a bug, a header the broker cannot read) is
        dropped, counted and logged, and the others go on (``Session.close`` and the
        timers call this and must always complete).
        """
        if reason == "expired":
            q.expired += len(qms)
        dlx = q.opts.dead_letter_exchange
        if dlx is not None and not q.deleted:
            now = self.clock()
            for qm in qms:
                try:
                    self._dead_letter_one(q, qm, dlx, reason, now)
                except Exception:
                    q.dead_letter_dropped += 1
                    log.exception(
                        "queue %r: message could not be dead-lettered (%s); dropped",
                        q.name,
                        reason,
                        extra={
                            "event": "message.dead_letter_failed",
                            "queue": q.name,
                            "reason": reason,
                        },
                    )
        if q.logged:
            self.log_ids(commands.ack, q, qms)

    def _dead_letter_one(
        self, q: Queue, qm: QueuedMessage, dlx: str, reason: str, now: int
    ) -> None:
        """Republish one message of ``q`` to ``dlx`` with its new death record.

        Cycle guard (RabbitMQ's rule): a target queue is skipped when the message's
        history, newest first, reaches that queue through automatic deaths only (expired,
        max-length, delivery-limit). A cycle with an explicit rejection in it is a
        consumer's choice (retry with back-off) and goes on, so a rejection is never a
        loop. A message the guard leaves without any target is dropped, counted in
        ``dead_letter_dropped`` and logged.
        """
        m = qm.message
        rk = q.opts.dead_letter_routing_key or m.routing_key
        try:
            targets = list(self.route(dlx, rk))
        except NotFound:
            log.warning("dead-letter exchange %r of queue %r does not exist; dropped", dlx, q.name)
            return
        # Headers may be paged with the body.
        props, deaths = dead_letter_properties(
            Pager.properties(m),
            queue=q.name,
            reason=reason,
            exchange=m.exchange,
            routing_key=m.routing_key,
            now=now,
        )
        if not targets:
            return  # the exchange routes it nowhere: dropped, as a publish would be
        kept = [t for t in targets if not automatic_cycle(reason, deaths, t)]
        if not kept:
            q.dead_letter_dropped += 1
            log.warning(
                "queue %r: message dead-lettered (%s) in an automatic cycle back to %s; dropped",
                q.name,
                reason,
                ", ".join(map(repr, targets)),
                extra={
                    "event": "message.dead_letter_cycle",
                    "queue": q.name,
                    "reason": reason,
                    "targets": targets,
                },
            )
            return
        targets = [
            t
            for t in kept
            if not (self.queues[t].opts.rejects_publish and self.queues[t].is_full(m.size))
        ]
        body = Pager.read(m)
        dead = Message(dlx, rk, props, body, ts=now)
        if self.enqueue(dead, targets):
            q.dead_lettered += 1
            self.dead_lettered += 1

    # ------------------------------------------------------------------ timers
    def arm_message(self, q: Queue, qm: QueuedMessage) -> None:
        """Timers a newly enqueued message needs (delay release, TTL expiry)."""
        if qm.state != READY:  # delayed: release when due
            self._add_timer(q.next_due(), _RELEASE, q, None)
        if qm.expires:
            self._add_timer(qm.expires, _EXPIRE, q, qm)

    @property
    def timer_hook(self) -> Callable[[float], None] | None:
        """The transport's wake-up (seconds from now), set by the server."""
        return self.timers.hook

    @timer_hook.setter
    def timer_hook(self, hook: Callable[[float], None] | None) -> None:
        self.timers.hook = hook

    def _add_timer(self, due: int, kind: int, q: Queue | None, qm: QueuedMessage | None) -> None:
        self.timers.add(due, kind, q, qm)

    def next_timer(self) -> int:
        """When the earliest timer is due (ms since the epoch), 0 if none."""
        return self.timers.next_due()

    def tick(self) -> None:
        """Run every due timer, then dispatch; re-arm the transport's timer."""
        now = self.clock()
        for kind, q, qm in self.timers.due(now):
            if q is None:  # ack-timeout sweep
                self._sweep(now)
                continue
            if q.deleted:
                continue
            elif kind == _RELEASE:
                if q.release(now) and q.consumers:
                    self._dirty_queues.add(q)
                nxt = q.next_due()
                if nxt and nxt > now:
                    self._add_timer(nxt, _RELEASE, q, None)
            elif kind == _EXPIRE:
                assert qm is not None
                if qm.expires <= now and q.remove(qm):
                    self.dead_letter(q, [qm], "expired")
            elif kind == _QUEUE_EXPIRY:
                self._check_queue_expiry(q, now)
        self.timers.rearm(now)
        self.pump()

    def _drop_timers(self, q: Queue, stale: int) -> None:
        """``stale`` timers of ``q`` point at nothing any more (deleted queue, purged
        messages): once such entries are half the heap (or 65,536), drop them all in one
        pass, so a deleted queue's messages (a TTL or delay of 2^63 ms keeps its timer for
        ever) are freed, at O(1) amortised cost per entry."""
        self.timers.drop_stale(stale)

    def start_timers(self) -> None:
        """Called once the transport set ``timer_hook``: starts the ack-timeout sweeps and
        arms the timers added before (recovered delayed/expiring messages and queues)."""
        self.timers.start()
        self._add_timer(self.clock() + SWEEP_MS, _SWEEP, None, None)
        self.timers.arm()

    def _sweep(self, now: int) -> None:
        """Deliveries past their ack deadline go back to their queues (or dead-letter)."""
        for s in list(self.sessions.values()):
            if s.unacked:
                s.expire_deliveries(now)
        self._add_timer(now + SWEEP_MS, _SWEEP, None, None)
        self.streams.housekeeping(now)  # group offsets to disk, stream retention

    def _check_queue_expiry(self, q: Queue, now: int) -> None:
        ttl = q.opts.expires_ms
        if q.consumers:
            return  # re-armed when the last consumer leaves
        if now - q.last_used >= ttl:
            self._remove_queue(
                q, f"queue {q.name!r} expired (unused for {ttl} ms)", "queue.expired"
            )
        else:
            self._add_timer(q.last_used + ttl, _QUEUE_EXPIRY, q, None)

    def adopt_queue(self, q: Queue) -> None:
        """Arm a new (or recovered) queue's expiry timer."""
        q.last_used = self.clock()
        if q.opts.rejects_publish:
            self.limited = True
        if q.opts.expires_ms:
            self._add_timer(q.last_used + q.opts.expires_ms, _QUEUE_EXPIRY, q, None)

    # ------------------------------------------------------------------ consumers
    def add_consumer(self, consumer: Consumer) -> None:
        q = consumer.queue
        if consumer.exclusive and q.consumers:
            raise ResourceLocked(f"queue {q.name!r} already has consumers", {"queue": q.name})
        if any(c.exclusive for c in q.consumers):
            raise ResourceLocked(f"queue {q.name!r} has an exclusive consumer", {"queue": q.name})
        check_consumer_count(self.limits, len(consumer.session.consumers))
        q.add_consumer(consumer)
        self._dirty_queues.add(q)

    def remove_consumer(self, consumer: Consumer) -> None:
        q = consumer.queue
        q.remove_consumer(consumer)
        if q.auto_delete and q.had_consumer and not q.consumers and not q.deleted:
            self._remove_queue(q, f"auto-delete queue {q.name!r} lost its last consumer")
        elif not q.consumers and not q.deleted:
            self.adopt_queue(q)  # unused from now: queue expiry counts again
        elif q.opts.single_active_consumer:
            self._dirty_queues.add(q)  # the next consumer takes over

    def wake(self, queue: Queue) -> None:
        """Something changed (credit, requeue): dispatch this queue at the next pump."""
        if queue.consumers and not queue.deleted:
            self._dirty_queues.add(queue)

    def requeue(self, queue: Queue, qms: list[QueuedMessage]) -> None:
        """Delivered messages come back (nack, ack timeout, lost connection); those past
        the delivery limit or their TTL are dead-lettered instead."""
        limit = queue.opts.delivery_limit
        now = self.clock()
        dead: list[QueuedMessage] = []
        expired: list[QueuedMessage] = []
        if limit or any(qm.expires for qm in qms):
            back = []
            for qm in qms:
                if limit and qm.delivery_count >= limit:
                    dead.append(qm)
                elif qm.expires and qm.expires <= now:
                    expired.append(qm)
                else:
                    back.append(qm)
            qms = back
        if dead or expired:
            queue.discard(len(dead) + len(expired))
            if dead:
                self.dead_letter(queue, dead, "delivery-limit")
            if expired:
                self.dead_letter(queue, expired, "expired")
        if not qms:
            return
        queue.requeue(qms)
        self.wake(queue)
        if queue.logged:
            self.log_ids(commands.requeue, queue, qms)

    def reject(self, queue: Queue, qms: list[QueuedMessage]) -> None:
        """Delivered messages refused without requeue: dead-lettered (or dropped)."""
        queue.discard(len(qms))
        for qm in qms:
            qm.state = GONE
        self.dead_letter(queue, qms, "rejected")

    def log_ids(self, record: commands.IdsRecord, queue: Queue, qms: list[QueuedMessage]) -> None:
        """Log delivered (commands.deliver), gone (commands.ack) or requeued
        (commands.requeue) messages of a logged queue."""
        ids = [qm.message.id for qm in qms if qm.message.id]
        if ids and not queue.deleted:
            self.journal.append(record(queue.name, ids))

    # ------------------------------------------------------------------ pump
    def pump_input(self) -> None:
        """After a connection's input was handled. The first few connections in a loop
        turn are pumped at once (a client's round trip, whose ack and next publish
        usually arrive together, waits for nothing); the rest of a busy turn share one
        pump at its end, so many connections that each sent a little (many confirmed
        publishers) cost one journal write, one dispatch and one write per connection
        per turn instead of one each per connection."""
        if self.scheduler is None:
            self.pump()
            return
        n = self._turn_pumps
        if n >= PUMPS_PER_TURN:
            self.pump_soon()
            return
        if not n:
            self.scheduler(self._end_turn)
        self._turn_pumps = n + 1
        self.pump()

    def _end_turn(self) -> None:
        self._turn_pumps = 0

    def pump_soon(self) -> None:
        """Run :meth:`pump` on the next loop turn (for events outside data_received)."""
        if self._pump_handle is None and self.scheduler is not None:
            self._pump_handle = self.scheduler(self._pump_later)

    def _pump_later(self) -> None:
        self._pump_handle = None
        self.pump()

    def pump(self) -> None:
        """Dispatch every changed queue, then let each session with output flush once."""
        if self.streams.pending:
            self.streams.flush()
        rounds = 0
        while self._dirty_queues and rounds < 16:
            rounds += 1
            dirty = self._dirty_queues
            self._dirty_queues = set()
            self.now = now = self.clock()  # deliveries read it (latency histogram)
            for q in dirty:
                if not q.deleted:
                    try:
                        q.dispatch(_deliver, now)
                    except Exception:  # a bug: this queue's turn fails, not the caller
                        log.exception("dispatching queue %r failed", q.name)
                        self.count_error(541)
                    if q.more:
                        q.more = False
                        self._more_queues.add(q)
        if self.journal:
            self.flush_journal()
        if self.deliveries_logged:  # their records reach the OS before the frames go out
            self.deliveries_logged = False
            self.store.write_through()
        pager = self.pager
        if pager is not None:
            if pager.resident > pager.budget:
                self.page_out()
            pager.flush()
        if self._dirty_sessions:
            sessions = self._dirty_sessions
            self._dirty_sessions = set()
            for s in sessions:
                try:
                    s.flush()
                except Exception as exc:  # contained to that session's connection
                    log.exception("flushing connection %s failed; closing it", s.id)
                    self._session_failed(s, exc)
        if self._more_queues:
            self._dirty_queues |= self._more_queues
            self._more_queues = set()
            self.pump_soon()  # without a loop (model tests) the next pump does them
        if self.after_pump is not None:
            self.after_pump()

    def _session_failed(self, session: Session, exc: Exception) -> None:
        """A session's flush raised (a bug): only its own connection is closed, never the
        connection whose input happened to run this pump (spec: no crashed server)."""
        self.count_error(541)
        hook = session.on_failure
        if hook is not None:
            hook(exc)

    def page_out(self) -> None:
        """Bring ready bodies in memory down to 3/4 of the budget, largest queues first
        (hysteresis: paging does not restart on every publish once over)."""
        pager = self.pager
        assert pager is not None
        want = pager.resident - pager.budget * 3 // 4
        out: list[Message] = []
        for q in sorted(self.queues.values(), key=lambda q: q.mem_bytes, reverse=True):
            if want <= 0 or q.mem_bytes <= 0:
                break
            want -= q.page_out(want, out)
        pager.write(out)

    # ------------------------------------------------------------------ sessions
    def attach(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.connections_opened += 1

    def detach(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.retired_published += session.published
        self._dirty_sessions.discard(session)
        for name in list(session.exclusive_queues):
            q = self.queues.get(name)
            if q is not None:
                self._remove_queue(q, f"exclusive queue {name!r}: owner connection closed")
        session.exclusive_queues.clear()

    # ------------------------------------------------------------------ listings
    def list(self, kind: str) -> list[dict[str, Any]]:
        if kind == "queues":
            return [
                {
                    "name": st.name,
                    "durable": st.durable,
                    "exclusive": st.exclusive,
                    "auto_delete": st.auto_delete,
                    "messages": st.ready,
                    "unacked": st.unacked,
                    "consumers": st.consumers,
                    "arguments": st.arguments,
                    "published": st.published,
                    "delivered": st.delivered,
                    "acked": st.acked,
                    "delayed": st.delayed,
                    "paged": st.paged,
                    "dead_lettered": st.dead_lettered,
                    "expired": st.expired,
                    "dead_letter_dropped": st.dead_letter_dropped,
                    # streams: offsets, groups (broker.stream)
                    **st.type_fields(),
                }
                for st in [
                    q.statistics() for q in sorted(self.queues.values(), key=lambda q: q.name)
                ]
            ]
        if kind == "exchanges":
            return [
                {
                    "name": e.name,
                    "type": e.type,
                    "durable": e.durable,
                    "auto_delete": e.auto_delete,
                    "bindings": len(e.bindings),
                }
                for e in sorted(self.exchanges.values(), key=lambda e: e.name)
            ]
        if kind == "bindings":
            return [
                {"exchange": e.name, "queue": q, "routing_key": k}
                for e in sorted(self.exchanges.values(), key=lambda e: e.name)
                for k, q in sorted(e.bindings)
            ]
        if kind == "consumers":
            return [
                {
                    "queue": c.queue.name,
                    "consumer_tag": c.tag,
                    "connection": s.id,
                    "credit": c.credit,
                    "unacked": c.unacked,
                    "no_ack": c.no_ack,
                }
                for s in self.sessions.values()
                for c in s.consumers.values()
            ]
        if kind == "connections":  # publish credit and why it is withheld (broker.flow)
            return [{**s.flow.info(), "name": s.name} for s in self.sessions.values()]
        raise InvalidArgument(f"unknown list kind {kind!r}", {"kind": kind})


_RELEASE, _EXPIRE, _SWEEP, _QUEUE_EXPIRY = 0, 1, 2, 3


def _stale_timer(kind: int, q: Queue, qm: QueuedMessage | None) -> bool:
    """A timer entry of a deleted queue, or the TTL entry of a purged message."""
    return q.deleted or (kind == _EXPIRE and qm is not None and qm.state == GONE)


# Queue counters kept broker-wide after the queue is deleted (Broker.retired).
RETIRED_COUNTERS = (
    "published",
    "delivered",
    "acked",
    "redelivered",
    "dead_lettered",
    "expired",
    "dead_letter_dropped",
)
SWEEP_MS = 100  # how often deliveries are checked against their ack deadline
PUMPS_PER_TURN = 4  # connections pumped at once per loop turn (Broker.pump_input)


def _queue_difference(
    q: Queue, durable: bool, exclusive: bool, auto_delete: bool, opts: QueueOptions
) -> tuple[str, Any, Any] | None:
    """The first setting a redeclare asks differently for, as (name, existing value,
    requested value), or None. Arguments are compared by their effective values, so
    an absent key equals its default (``{}`` matches ``{"max_priority": 0}``)."""
    for key, was, asked in (
        ("durable", q.durable, durable),
        ("exclusive", q.exclusive_owner is not None, exclusive),
        ("auto_delete", q.auto_delete, auto_delete),
    ):
        if was != asked:
            return key, was, asked
    for key in QueueOptions.__slots__:
        was, asked = getattr(q.opts, key), getattr(opts, key)
        if was != asked or type(was) is not type(asked):
            return key, was, asked
    return None


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _deliver(consumer: Consumer, batch: list[QueuedMessage]) -> None:
    consumer.session.deliver(consumer, batch)
