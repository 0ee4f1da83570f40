"""The commands the broker logs: the one vocabulary of durable queue and topology state.

Every change a restart must see is one command, a msgpack array whose first element is
its op code (:class:`Op`). The broker appends them to the write-ahead log in batches;
recovery applies them, in order, to a :class:`broker.journal.Replay` through
:data:`APPLY`. This is also the unit a cluster will replicate: the leader appends these
commands, followers apply the same commands through the same table, so a follower's state
is by construction what a restart of the leader would rebuild.

====  =======================================  ==========================================
op    fields                                   effect
====  =======================================  ==========================================
xd    name, type, auto_delete, arguments       exchange declared (durable)
xr    name                                     exchange deleted
qd    name, auto_delete, arguments             queue declared (durable, not exclusive)
qr    name                                     queue deleted
qp    name, time                               queue purged at ``time`` (ms): ready messages
                                               removed (not unacked or still delayed ones)
b     exchange, queue, key                     binding added
u     exchange, queue, key                     binding removed
p     id, [queues], exchange, key, props,      persistent message enqueued on those queues
      body, ts                                 (ts: publish time in ms; delay/TTL count from it)
d     queue, [ids]                             messages delivered (delivery count + 1)
a     queue, [ids]                             messages gone: acked, rejected, expired,
                                               dropped or dead-lettered (a dead-lettered
                                               message is a new ``p`` on its target)
r     queue, [ids]                             messages requeued (ready again)
====  =======================================  ==========================================

Streams are not in this log: a stream's segments are its own log (:func:`stream_entry`
builds an appended item) and a consumer group's committed offsets are a file of their
own (:func:`group_offsets`); neither has an op code.

The constructors are plain functions returning tuples whose op is a plain ``str`` (the
enum's value), so msgpack writes the bytes the literal tuples gave before. They are on
the publish and deliver paths: a publish run takes one ``publish_run`` call, deliveries
and acks one call per batch (``Broker.log_ids``), never an enum lookup per record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from conveyor.broker.message import Message
from conveyor.broker.store import Record

if TYPE_CHECKING:
    from conveyor.broker.journal import Replay


class Op(StrEnum):
    """Op codes of the logged commands: the first element of each record on disk.

    Append-only: a member is never renamed, re-valued or removed, since logs and
    snapshots written by any earlier version must still replay (and followers of a
    different version must agree). A new command gets a new, unused code.
    """

    EXCHANGE_DECLARE = "xd"
    EXCHANGE_DELETE = "xr"
    QUEUE_DECLARE = "qd"
    QUEUE_DELETE = "qr"
    QUEUE_PURGE = "qp"
    BIND = "b"
    UNBIND = "u"
    PUBLISH = "p"
    DELIVER = "d"
    ACK = "a"
    REQUEUE = "r"


# Plain str values: what goes into a record (no enum instance is ever written).
_XD: str = Op.EXCHANGE_DECLARE.value
_XR: str = Op.EXCHANGE_DELETE.value
_QD: str = Op.QUEUE_DECLARE.value
_QR: str = Op.QUEUE_DELETE.value
_QP: str = Op.QUEUE_PURGE.value
_B: str = Op.BIND.value
_U: str = Op.UNBIND.value
_P: str = Op.PUBLISH.value
_D: str = Op.DELIVER.value
_A: str = Op.ACK.value
_R: str = Op.REQUEUE.value


# --------------------------------------------------------------------------- constructors
def exchange_declare(name: str, etype: str, auto_delete: bool, arguments: dict[str, Any]) -> Record:
    return (_XD, name, etype, auto_delete, arguments)


def exchange_delete(name: str) -> Record:
    return (_XR, name)


def queue_declare(name: str, auto_delete: bool, arguments: dict[str, Any]) -> Record:
    return (_QD, name, auto_delete, arguments)


def queue_delete(name: str) -> Record:
    return (_QR, name)


def queue_purge(name: str, at: int) -> Record:
    """``at``: the purge time (ms), which decides which delayed messages stay."""
    return (_QP, name, at)


def bind(exchange: str, queue: str, key: str) -> Record:
    return (_B, exchange, queue, key)


def unbind(exchange: str, queue: str, key: str) -> Record:
    return (_U, exchange, queue, key)


def publish(
    mid: int,
    queues: list[str],
    exchange: str,
    routing_key: str,
    properties: dict[str, Any] | None,
    body: bytes | None,
    ts: int,
) -> Record:
    """A persistent message enqueued on the logged ``queues`` (the list is shared by a
    run of publishes with the same targets: not copied)."""
    return (_P, mid, queues, exchange, routing_key, properties, body, ts)


# The (queue, [ids]) records, passed as functions by callers that pick one per batch
# (Broker.log_ids): a module attribute costs less than an enum member lookup.
IdsRecord = Callable[[str, list[int]], Record]


def deliver(queue: str, ids: list[int]) -> Record:
    return (_D, queue, ids)


def ack(queue: str, ids: list[int]) -> Record:
    return (_A, queue, ids)


def requeue(queue: str, ids: list[int]) -> Record:
    return (_R, queue, ids)


def publish_run(mid: int, queues: list[str], messages: Iterable[Message]) -> list[Record]:
    """``publish`` records of the persistent ones among ``messages`` (a publish run with
    the same targets), numbered from ``mid``, each message's id set to its number: one
    call per run, so the per-message cost is the tuple's alone."""
    out: list[Record] = []
    append = out.append
    for m in messages:
        if m.persistent:
            m.id = mid
            append((_P, mid, queues, m.exchange, m.routing_key, m.properties, m.body, m.ts))
            mid += 1
    return out


def stream_entry(message: Message) -> tuple[int, str, str, dict[str, Any], bytes]:
    """An item a stream appends to its segments: (ts, exchange, routing key,
    properties, body); the stream store adds its offset."""
    body = message.body if message.body is not None else b""
    return (message.ts, message.exchange, message.routing_key, message.properties, body)


def group_offsets(committed: Iterable[tuple[str, int]]) -> dict[str, int]:
    """What a stream's groups file holds: group name -> committed offset."""
    return dict(committed)


# --------------------------------------------------------------------------- apply
@dataclass
class Entry:
    """A message of a queue during replay: its delivery count, and whether a consumer
    held it unacked (purge keeps those; they come back redelivered)."""

    message: Message
    count: int = 0
    unacked: bool = False


def delayed_at(m: Message, at: int) -> bool:
    """Still invisible (its delay not over) at ``at`` ms, as Queue.release decides."""
    delay: int = (m.properties.get("delay") or 0) if at and m.properties else 0
    return bool(delay) and m.ts + delay > at


def _apply_publish(state: Replay, cmd: list[Any]) -> None:
    _, mid, queues, exchange, rk, props, body, *rest = cmd
    ts = rest[0] if rest else 0
    m = state.new_message(mid, exchange, rk, props, body, ts)
    msg_id = props.get("message_id") if props else None
    if mid >= state.next_id:
        state.next_id = mid + 1
    for q in queues:
        table = state.messages.get(q)
        if table is not None:
            table[mid] = Entry(m)
            if msg_id is not None and state.queues[q][1].get("dedup_window_ms"):
                state.dedup.setdefault(q, {})[msg_id] = ts


def _apply_ack(state: Replay, cmd: list[Any]) -> None:
    table = state.messages.get(cmd[1])
    if table is not None:
        for mid in cmd[2]:
            table.pop(mid, None)


def _apply_deliver(state: Replay, cmd: list[Any]) -> None:
    table = state.messages.get(cmd[1])
    if table is not None:
        for mid in cmd[2]:
            e = table.get(mid)
            if e is not None:
                e.count += 1
                e.unacked = True


def _apply_requeue(state: Replay, cmd: list[Any]) -> None:
    table = state.messages.get(cmd[1])
    if table is not None:
        for mid in cmd[2]:
            e = table.get(mid)
            if e is not None:
                e.unacked = False


def _apply_queue_purge(state: Replay, cmd: list[Any]) -> None:
    table = state.messages.get(cmd[1])
    if table is not None:
        at = cmd[2] if len(cmd) > 2 else 0  # logs before purge times: no delay kept
        for mid in [k for k, e in table.items() if not e.unacked and not delayed_at(e.message, at)]:
            del table[mid]


def _apply_exchange_declare(state: Replay, cmd: list[Any]) -> None:
    state.exchanges[cmd[1]] = (cmd[2], cmd[3], cmd[4])


def _apply_exchange_delete(state: Replay, cmd: list[Any]) -> None:
    state.exchanges.pop(cmd[1], None)
    state.bindings = {b for b in state.bindings if b[0] != cmd[1]}


def _apply_queue_declare(state: Replay, cmd: list[Any]) -> None:
    state.queues[cmd[1]] = (cmd[2], cmd[3])
    state.messages.setdefault(cmd[1], {})


def _apply_queue_delete(state: Replay, cmd: list[Any]) -> None:
    state.queues.pop(cmd[1], None)
    state.messages.pop(cmd[1], None)
    state.dedup.pop(cmd[1], None)
    state.bindings = {b for b in state.bindings if b[1] != cmd[1]}


def _apply_bind(state: Replay, cmd: list[Any]) -> None:
    state.bindings.add((cmd[1], cmd[2], cmd[3]))


def _apply_unbind(state: Replay, cmd: list[Any]) -> None:
    state.bindings.discard((cmd[1], cmd[2], cmd[3]))


APPLY: dict[Op, Callable[[Replay, list[Any]], None]] = {
    Op.EXCHANGE_DECLARE: _apply_exchange_declare,
    Op.EXCHANGE_DELETE: _apply_exchange_delete,
    Op.QUEUE_DECLARE: _apply_queue_declare,
    Op.QUEUE_DELETE: _apply_queue_delete,
    Op.QUEUE_PURGE: _apply_queue_purge,
    Op.BIND: _apply_bind,
    Op.UNBIND: _apply_unbind,
    Op.PUBLISH: _apply_publish,
    Op.DELIVER: _apply_deliver,
    Op.ACK: _apply_ack,
    Op.REQUEUE: _apply_requeue,
}
"""Op -> the function that applies one such command (a decoded record) to a Replay.
A plain dict lookup with the record's str op (a StrEnum hashes as its value)."""


def apply(state: Replay, cmd: list[Any]) -> None:
    """Apply one decoded command; an op no member names is a ValueError (a log from a
    newer version, or damage the checksums did not catch)."""
    fn = APPLY.get(cmd[0])
    if fn is None:
        raise ValueError(f"unknown log command {cmd[0]!r}")
    fn(state, cmd)
