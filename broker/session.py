"""Per-connection logic: frames in, model calls, frames out.

A Session owns a connection's consumers, its unacked deliveries (a
:class:`broker.deliveries.Deliveries`, shared with the HTTP gateway) and its
publish-confirm bookkeeping. It never touches a socket: it queues
encoded frames and hands them to the transport's ``write`` callback when :meth:`flush`
runs, once per batch of input, so a burst of deliveries or confirms costs one write.
Deliveries are encoded straight from field lists (no frame object per message).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import msgpack

from conveyor.broker import commands
from conveyor.broker.auth import ANONYMOUS, Principal
from conveyor.broker.confirms import Confirms
from conveyor.broker.core import Broker
from conveyor.broker.deliveries import Deliveries, Unacked
from conveyor.broker.flow import PublisherFlow
from conveyor.broker.limits import check_seq_range, publish_size
from conveyor.broker.message import Message, QueuedMessage
from conveyor.broker.pager import Pager
from conveyor.broker.queue import UNACKED_OVERHEAD, Consumer, Queue
from conveyor.broker.stream import check_consume_arguments
from conveyor.protocol import (
    Ack,
    Bind,
    Cancel,
    Cancelled,
    Confirm,
    ConsumeOk,
    ConveyorError,
    Credit,
    Deliver,
    DeliverBatch,
    DeliverRun,
    DeliveryEntry,
    Error,
    ExchangeDeclare,
    ExchangeDelete,
    Extend,
    Frame,
    Get,
    GetOk,
    Heartbeat,
    InternalError,
    InvalidArgument,
    List,
    ListOk,
    MessageCountOk,
    MessageTooLarge,
    Nack,
    NotFound,
    Ok,
    PreconditionFailed,
    Publish,
    PublishBatch,
    PublishEntry,
    PublishRun,
    QueueDeclare,
    QueueDeclareOk,
    QueueDelete,
    QueuePurge,
    Reject,
    RequestError,
    ResourceError,
    Return,
    Unbind,
    compress_frame,
    encode,
    encode_fields,
    encode_run,
)
from conveyor.protocol import Consume as ConsumeFrame
from conveyor.protocol.codec import check_frames, oversized_frames
from conveyor.protocol.errors import LocalProtocolError
from conveyor.protocol.limits import MESSAGE_FRAME_OVERHEAD

log = logging.getLogger("conveyor.session")
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack

U32_MAX = 0xFFFFFFFF
GET_MAX = 10000
# Bytes a delivery entry may add beyond body + headers (strings, other properties, tags).
ENTRY_OVERHEAD = 4608
# GET_OK's fields around its one entry (rid, message count, the type byte) beyond a
# one-entry DELIVER_BATCH without a consumer tag.
GET_OK_EXTRA = 16
U64_MAX = 0xFFFFFFFFFFFFFFFF

_DELIVER = Deliver.TYPE
_DELIVER_BATCH = DeliverBatch.TYPE
_DELIVER_RUN = DeliverRun.TYPE
_CONFIRM = Confirm.TYPE


def _empty(frame: str, field: str, first_seq: int) -> InvalidArgument:
    """A batch or run without messages (the spec says at least one): 400, nothing
    published, no sequence number used; the connection stays open."""
    return InvalidArgument(
        f"{frame}: {field} is empty (at least one message)",
        {"frame": frame, "first_seq": first_seq},
    )


def _disk_refusal(broker: Broker) -> bool:
    """Free space is below the disk-free guard: publishes take the per-message path,
    which nacks them (506)."""
    wm = broker.flow.watermarks
    return wm is not None and bool(wm.refusal)


class Session:
    """State and frame handlers of one open connection."""

    def __init__(
        self,
        broker: Broker,
        session_id: str,
        write: Callable[[list[bytes]], None],
        max_frame_size: int,
    ) -> None:
        self.broker = broker
        self.id = session_id
        self._write = write
        self.max_frame_size = max_frame_size
        # Largest message (body + encoded headers) this connection may publish or be
        # delivered, announced in OPEN_OK: any frame carrying one such message fits
        # max_frame_size (spec/PROTOCOL.md, "Limits"), so nothing sent exceeds the cap.
        self.max_message_size = max(
            0, min(broker.max_message_size, max_frame_size - MESSAGE_FRAME_OVERHEAD)
        )
        # Sequence checks, confirm ranges and nacks; CONFIRMs after the group commit.
        self.confirms = Confirms(broker, self)
        # Set by the transport: closes this connection only, after a failure in flush.
        self.on_failure: Callable[[BaseException], None] | None = None
        # OPEN_OK negotiated zstd: DELIVER_BATCH frames over 1 KiB go out COMPRESSED.
        self.compress = False
        # The client speaks 1.1: first deliveries that share exchange, routing key and
        # properties go out as DELIVER_RUN (bodies only) instead of DELIVER_BATCH entries.
        self.runs = False
        self.out: list[bytes] = []
        # (consumer, entries, Message.size of each entry) awaiting the next flush
        # (consumer, DELIVER_BATCH entries or a DELIVER_RUN's (first tag, shared fields,
        # bodies), Message.size of each)
        self._deliveries: list[tuple[Consumer, Any, list[int]]] = []
        self.consumers: dict[str, Consumer] = {}
        # Unacked deliveries, their tags and ack deadlines: written only through it.
        self.deliveries = Deliveries()
        self.exclusive_queues: set[str] = set()
        self._ctag = 0
        self.closed = False
        # AUTH.client_properties.connection_name (connection_name()): shown in logs and LIST.
        self.name = ""
        # The transport's write buffer is full (pause_writing): nothing is dispatched to
        # this connection's consumers until it drains (resume_writing).
        self.write_paused = False
        # Bytes of deliveries queued for the next flush (stream catch-up waits for a
        # flush once one connection has DISPATCH_BYTES pending).
        self.pending_bytes = 0
        self.published = 0
        self._now = 0  # ms; set per handled batch of frames
        self.published_bytes = 0  # body bytes of all publishes (publish credit, broker.flow)
        # Set by the transport after AUTH: permissions and publish rate come from it.
        self.principal: Principal = ANONYMOUS
        # Publish credit (broker.flow); inactive until the transport opens it after OPEN_OK.
        self.flow = PublisherFlow(self)
        self._handlers: dict[int, Callable[[Any], None]] = {
            Publish.TYPE: self._on_publish,
            PublishBatch.TYPE: self._on_publish_batch,
            PublishRun.TYPE: self._on_publish_run,
            Ack.TYPE: self._on_ack,
            Nack.TYPE: self._on_nack,
            Reject.TYPE: self._on_reject,
            Credit.TYPE: self._on_credit,
            Extend.TYPE: self._on_extend,
            Heartbeat.TYPE: _ignore,
        }
        self._requests: dict[int, Callable[[Any], Frame]] = {
            ExchangeDeclare.TYPE: self._exchange_declare,
            ExchangeDelete.TYPE: self._exchange_delete,
            QueueDeclare.TYPE: self._queue_declare,
            QueueDelete.TYPE: self._queue_delete,
            QueuePurge.TYPE: self._queue_purge,
            Bind.TYPE: self._bind,
            Unbind.TYPE: self._unbind,
            List.TYPE: self._list,
            ConsumeFrame.TYPE: self._consume,
            Cancel.TYPE: self._cancel,
            Get.TYPE: self._get,
        }
        broker.attach(self)

    @property
    def unacked(self) -> MappingProxyType[int, Unacked]:
        """Read-only mapping delivery tag -> (message, queue, consumer or None)."""
        return self.deliveries.view

    # ------------------------------------------------------------------ input
    def handle(self, frames: list[Frame]) -> None:
        """Act on a batch of frames (connection frames are handled by the transport)."""
        handlers = self._handlers
        deferred: list[tuple[int, Frame]] | None = None
        self._now = self.broker.clock()  # one clock read for the batch's publishes
        for frame in frames:
            h = handlers.get(frame.TYPE)
            if h is not None:
                try:
                    h(frame)
                except RequestError as exc:
                    self.out.append(encode(Error(0, exc.code, exc.message, exc.details)))
                    self.broker.count_error(exc.code)
                continue
            req = self._requests.get(frame.TYPE)
            if req is None:
                continue  # CLOSE/CLOSE_OK are the transport's
            rid: int = frame.rid  # type: ignore[attr-defined]
            logged = len(self.broker.journal)
            try:
                reply = req(frame)
            except RequestError as exc:
                reply = Error(rid, exc.code, exc.message, exc.details)
                self.broker.count_error(exc.code)
            except ConveyorError:
                raise
            except Exception:
                log.exception("bug handling %s on %s", frame.NAME, self.id)
                err = InternalError(f"internal error handling {frame.NAME}")
                reply = Error(rid, err.code, err.message, {})
                self.broker.count_error(err.code)
            if deferred is None and len(self.broker.journal) > logged:
                deferred = []  # a durable change: reply once its record is on disk
            if deferred is not None:
                deferred.append((rid, reply))
            else:
                self.out.append(encode(reply))
        self._end_batch()
        if deferred:
            replies = deferred
            self.broker.commit(lambda err: self._send_replies(replies, err))
        self.broker.mark_session(self)

    def _send_replies(self, replies: list[tuple[int, Frame]], err: BaseException | None) -> None:
        """Replies held back until the topology change they confirm was logged; later
        replies of the same batch wait with them, so replies keep their order."""
        if self.closed:
            return
        for rid, reply in replies:
            if err is not None and not isinstance(reply, Error):
                reply = Error(
                    rid,
                    ResourceError.code,
                    f"done but not yet on disk ({err}); retry the request",
                    {},
                )
                self.broker.count_error(ResourceError.code)
            self.out.append(encode(reply))
        self.broker.mark_session(self)
        self.broker.pump_soon()

    def send(self, frame: Frame) -> None:
        self.out.append(encode(frame))
        self.broker.mark_session(self)

    # ------------------------------------------------------------------ output
    def flush(self) -> None:
        """Write everything queued (replies, confirms, deliveries) in one call."""
        if self.closed:
            return
        if self._deliveries:
            deliveries = self._deliveries
            self._deliveries = []
            for consumer, payload, sizes in deliveries:
                try:
                    if type(payload) is tuple:
                        self._encode_run(consumer.tag, payload, sizes)
                    else:
                        self._encode_deliveries(consumer.tag, payload, sizes)
                except (ValueError, TypeError, OverflowError) as exc:
                    self._unencodable(consumer, payload, exc)
            self.pending_bytes = 0
        if self.out:
            out = self.out
            self.out = []
            if max(map(len, out)) > self.max_frame_size + 4:
                out = self._drop_oversized(out)
            self._write(out)

    def _drop_oversized(self, out: list[bytes]) -> list[bytes]:
        """The last guard of the frame cap (protocol.codec): a frame over the peer's
        max_frame_size is never written (the peer would have to close with 502); it is
        logged and counted. The checks before encoding make this unreachable."""
        try:
            check_frames(out, self.max_frame_size)
        except LocalProtocolError as exc:
            log.error("%s: %s; not sent", self.id, exc)
            bad = set(oversized_frames(out, self.max_frame_size))
            self.broker.count_error(InternalError.code, n=len(bad))
            return [f for i, f in enumerate(out) if i not in bad]
        return out

    def _unencodable(self, consumer: Consumer, payload: Any, exc: Exception) -> None:
        """Deliveries msgpack cannot encode (the decoder's checks should make this
        impossible): they are dropped, counted and logged, instead of raising into the
        pump and whichever connection ran it (re-routing them would only fail again)."""
        if type(payload) is tuple:
            first, bodies = payload[0], payload[2]
            tags = list(range(first, first + len(bodies)))
        else:
            tags = [e[0] for e in payload]
        gone: list[QueuedMessage] = []
        for u in self.deliveries.pop_many(tags):
            gone.append(u[0])
            if u[2] is not None:
                u[2].unacked -= 1
        log.error(
            "%s: %d deliveries to consumer %r cannot be encoded (%s); dropped",
            self.id,
            len(tags),
            consumer.tag,
            exc,
        )
        self.broker.count_error(InternalError.code, n=len(tags))
        q = consumer.queue
        if gone and q.drop_refused(gone) and q.logged:
            self.broker.log_ids(commands.ack, q, gone)

    def _encode_deliveries(self, tag: str, entries: list[list[Any]], sizes: list[int]) -> None:
        """DELIVER for one message, else DELIVER_BATCH frames that each fit the frame cap."""
        out = self.out
        if len(entries) == 1:
            out.append(encode_fields(_DELIVER, [tag, *entries[0]]))
            return
        budget = self.max_frame_size - 1024
        if sum(sizes) + ENTRY_OVERHEAD * len(entries) <= budget:
            out.append(encode_fields(_DELIVER_BATCH, [tag, entries]))
            if self.compress:
                out[-1] = compress_frame(out[-1])
            return
        start = len(out)
        chunk: list[list[Any]] = []
        size = 0
        for e, msize in zip(entries, sizes, strict=True):
            esize = msize + ENTRY_OVERHEAD
            if chunk and size + esize > budget:
                out.append(encode_fields(_DELIVER_BATCH, [tag, chunk]))
                chunk, size = [], 0
            chunk.append(e)
            size += esize
        if chunk:
            out.append(encode_fields(_DELIVER_BATCH, [tag, chunk]))
        if self.compress:
            out[start:] = [compress_frame(f) for f in out[start:]]

    def _encode_run(
        self,
        tag: str,
        payload: tuple[int, tuple[str, str, dict[str, Any]], list[bytes]],
        sizes: list[int],
    ) -> None:
        """DELIVER_RUN frames that each fit the frame cap (the shared fields once each)."""
        first, (ex, rk, props), bodies = payload
        budget = self.max_frame_size - ENTRY_OVERHEAD - (sizes[0] - len(bodies[0]))
        frames = encode_run(_DELIVER_RUN, [tag, first, ex, rk, props], 1, bodies, budget)
        self.out.extend([compress_frame(f) for f in frames] if self.compress else frames)

    # ------------------------------------------------------------------ publish
    def _on_publish(self, f: Publish) -> None:
        if f.seq:
            self.confirms.check_seq("publish", f.seq, 1)
        self.published_bytes += len(f.body)
        self._publish(f.seq, f.exchange, f.routing_key, f.properties, f.body, f.mandatory)

    def _on_publish_batch(self, f: PublishBatch) -> None:
        seq = f.first_seq
        entries = f.entries
        if not entries:
            raise _empty("publish_batch", "entries", seq)
        check_seq_range(seq, len(entries))  # 501 if the seqs pass 2^64-1
        if seq:
            self.confirms.check_seq("publish_batch", seq, len(entries))
        self.published_bytes += sum([len(e.body) for e in entries])
        broker = self.broker
        if (
            self.principal.permissions is None
            and not broker.limited
            and broker.store.failed is None
            and not _disk_refusal(broker)
        ):
            self._publish_run(seq, entries)
            return
        publish = self._publish
        for e in entries:
            publish(seq, e.exchange, e.routing_key, e.properties, e.body, e.mandatory)
            if seq:
                seq += 1

    def _on_publish_run(self, f: PublishRun) -> None:
        """PUBLISH_RUN: the bodies share exchange, routing key, properties, mandatory."""
        seq = f.first_seq
        bodies = f.bodies
        if not bodies:
            raise _empty("publish_run", "bodies", seq)
        check_seq_range(seq, len(bodies), "publish_run")
        if seq:
            self.confirms.check_seq("publish_run", seq, len(bodies))
        self.published_bytes += sum(map(len, bodies))
        broker = self.broker
        props = f.properties
        ex, rk, mandatory = f.exchange, f.routing_key, f.mandatory
        targets: Any = None
        if (
            self.principal.permissions is None
            and not broker.limited
            and broker.store.failed is None
            and not _disk_refusal(broker)
            and "headers" not in props
            and max(map(len, bodies)) <= self.max_message_size
        ):
            try:
                targets = broker.route(ex, rk)
            except RequestError:
                targets = None
        if targets is None or (mandatory and not targets):
            # Per-message policy or an outcome to report per message: one by one.
            publish = self._publish
            for body in bodies:
                publish(seq, ex, rk, props, body, mandatory)
                if seq:
                    seq += 1
            return
        ts = self._now + 1
        # One properties dict for the run: the broker never changes a message's properties
        # in place (dead-lettering and streams copy), and DELIVER_RUN finds them shared.
        self._enqueue_run(
            [Message(ex, rk, props, body, len(body), ts) for body in bodies], targets, seq
        )

    def _publish_run(self, seq: int, entries: list[PublishEntry]) -> None:
        """A batch's publishes when no per-message policy applies (no token permissions,
        no reject-publish queue, the log is writable): entries with the same exchange and
        routing key are routed once and enqueued together (``Broker.enqueue_many``).
        Anything unusual (headers, too large, no route, a routing error) goes through
        ``_publish`` on its own, in order, so replies and confirms are the same."""
        broker = self.broker
        route = broker.route
        max_size = self.max_message_size
        now = self._now
        ts = now + 1  # publish time rounded up, as Broker.enqueue does
        run: list[Message] = []
        append = run.append
        first = seq
        key: tuple[str, str] | None = None
        targets: Any = ()
        for ex, rk, props, body, mandatory in entries:
            if key is None or ex != key[0] or rk != key[1]:
                if run:
                    self._enqueue_run(run, targets, first)
                    run = []
                    append = run.append
                    first = seq
                key = (ex, rk)
                try:
                    targets = route(ex, rk)
                except RequestError:
                    key = None
                    targets = ()
            size = len(body)
            if (
                key is None
                or size > max_size
                or (props and "headers" in props)
                or (mandatory and not targets)
            ):
                if run:
                    self._enqueue_run(run, targets, first)
                    run = []
                    append = run.append
                self._publish(seq, ex, rk, props, body, mandatory)
                if seq:
                    seq += 1
                first = seq
                continue
            append(Message(ex, rk, props, body, size, ts))
            if seq:
                seq += 1
        if run:
            self._enqueue_run(run, targets, first)

    def _enqueue_run(self, run: list[Message], targets: Any, first: int) -> None:
        self.published += len(run)
        if len(run) == 1:  # keys that change message by message: the plain path is cheaper
            self.broker.enqueue(run[0], targets, self._now)
        elif targets:
            self.broker.enqueue_many(run, targets, self._now)
        if first:
            self.confirms.ack(first, first + len(run) - 1)

    def _publish(
        self,
        seq: int,
        exchange: str,
        routing_key: str,
        properties: dict[str, Any],
        body: bytes,
        mandatory: bool,
    ) -> None:
        broker = self.broker
        self.published += 1
        try:
            if self.principal.permissions is not None:  # a token's; decided once per name
                self.principal.check_publish(exchange, routing_key)
            failed = broker.store.failed
            if failed is not None:
                raise ResourceError(f"the broker cannot write its log ({failed}); retry later")
            wm = broker.flow.watermarks
            if wm is not None and wm.refusal and wm.refusing(self.flow.clock()):
                raise ResourceError(wm.refusal, {"reason": "disk"})
            size = publish_size(broker.limits, properties, body)  # max_headers, header bytes
            if size > self.max_message_size:
                raise MessageTooLarge(
                    f"message of {size} bytes exceeds the maximum of "
                    f"{self.max_message_size} (max_message_size)",
                    {"limit": "max_message_size", "max_message_size": self.max_message_size},
                )
            targets = broker.route(exchange, routing_key)
            if broker.limited:  # some queue has overflow reject-publish
                targets = list(targets)
                self.flow.note(targets)  # a full one withholds publish credit
                broker.check_capacity(targets, size, properties.get("message_id"))
        except RequestError as exc:
            if seq:
                self.confirms.nack(seq, exc)
            else:
                self.send(Error(0, exc.code, exc.message, exc.details))
                broker.count_error(exc.code)
            return
        msg = Message(exchange, routing_key, properties, body, size)
        if not broker.enqueue(msg, targets, self._now) and mandatory:
            self.out.append(
                encode(Return(seq, 312, "no route", exchange, routing_key, properties, body))
            )
        if seq:
            self.confirms.ack(seq, seq)

    def _end_batch(self) -> None:
        """Confirms wait for the batch's log records (Confirms.end_batch); publish credit
        is topped up once per batch."""
        self.confirms.end_batch()
        flow = self.flow
        if flow.active and flow.seen != self.published:
            flow.after_batch()  # top up publish credit, or hold reading if overdrawn

    # ------------------------------------------------------------------ delivery
    def deliver(self, consumer: Consumer, batch: list[QueuedMessage]) -> None:
        """Called by queue dispatch: assign tags, track unacked, queue the frames."""
        limit = self.max_message_size
        sizes: list[int] = []
        if len(batch) == 1:
            if batch[0].message.size > limit:
                batch = self._refuse_too_large(consumer.queue, batch, consumer)
                if not batch:
                    return
        else:
            sizes = [qm.message.size for qm in batch]
            if max(sizes) > limit:
                batch = self._refuse_too_large(consumer.queue, batch, consumer)
                if not batch:
                    return
                sizes = [qm.message.size for qm in batch]
        no_ack = consumer.no_ack
        queue = consumer.queue
        first = self.deliveries.add(batch, queue, consumer, no_ack)
        tag = first + len(batch) - 1
        if len(batch) == 1:  # many queues with little each: no per-batch machinery
            qm = batch[0]
            m = qm.message
            sizes = [m.size]
            payload: Any = [
                [
                    first,
                    qm.redelivered,
                    m.exchange,
                    m.routing_key,
                    m.properties,
                    m.body,
                    qm.delivery_count,
                ]
            ]
        else:
            run = self.runs and self._run_of(batch)
            if run:
                payload = (first, run, [qm.message.body for qm in batch])
            else:
                payload = [
                    [
                        t,
                        qm.redelivered,
                        m.exchange,
                        m.routing_key,
                        m.properties,
                        m.body,
                        qm.delivery_count,
                    ]
                    for t, qm, m in zip(
                        range(first, tag + 1), batch, [qm.message for qm in batch], strict=True
                    )
                ]
        broker = self.broker
        broker.latency.observe_batch(batch, broker.now)  # pump's clock reading: no call here
        if no_ack:
            queue.ack(len(batch))
        else:
            consumer.unacked += len(batch)
            consumer.unacked_bytes += sum(sizes) + UNACKED_OVERHEAD * len(batch)
        if queue.logged:
            broker.log_ids(commands.ack if no_ack else commands.deliver, queue, batch)
            broker.deliveries_logged = True
        self._deliveries.append((consumer, payload, sizes))
        self.pending_bytes += sum(sizes)
        self.broker.mark_session(self)

    def _refuse_too_large(
        self, queue: Queue, batch: list[QueuedMessage], consumer: Consumer | None
    ) -> list[QueuedMessage]:
        """Messages of ``batch`` over this connection's max_message_size whose frame
        (measured) does not fit its max_frame_size cannot be sent to it: they leave the
        queue (dead-lettered with reason "too-large", which never routes back to this
        queue, or dropped) instead of looping, and the connection gets ERROR rid 0 413
        naming them. The rest is returned for delivery; a consumer gets back the credit
        the refused ones used."""
        limit = self.max_message_size
        tag = consumer.tag if consumer is not None else ""
        big = [qm for qm in batch if qm.message.size > limit and not self._fits(tag, qm)]
        if not big:
            return batch
        refused = {id(qm) for qm in big}
        keep = [qm for qm in batch if id(qm) not in refused]
        if consumer is not None:
            consumer.credit += len(big)
            self.broker.wake(queue)
        if queue.drop_refused(big):
            self.broker.dead_letter(queue, big, "too-large")
        self.broker.count_error(MessageTooLarge.code, n=len(big))
        largest = max([qm.message.size for qm in big])
        where = f"consumer {consumer.tag!r}" if consumer is not None else "GET"
        log.warning(
            "%s: %d message(s) of queue %r (up to %d bytes) exceed the connection's "
            "max_message_size %d; dead-lettered, not delivered to %s",
            self.id,
            len(big),
            queue.name,
            largest,
            limit,
            where,
        )
        details: dict[str, Any] = {
            "queue": queue.name,
            "messages": len(big),
            "size": largest,
            "max_message_size": limit,
        }
        if consumer is not None:
            details["consumer_tag"] = consumer.tag
        self.out.append(
            encode(
                Error(
                    0,
                    MessageTooLarge.code,
                    f"{len(big)} message(s) of queue {queue.name!r} (up to {largest} bytes) exceed "
                    f"this connection's max_message_size of {limit}: dead-lettered (reason "
                    f"too-large), not delivered",
                    details,
                )
            )
        )
        self.broker.mark_session(self)
        return keep

    def _fits(self, tag: str, qm: QueuedMessage) -> bool:
        """Whether ``qm`` fits this connection's frame cap alone in any delivery frame:
        measured as a one-entry DELIVER_BATCH with the widest tag and count, plus room
        for GET_OK's rid and message count (DELIVER and DELIVER_RUN are smaller)."""
        m = qm.message
        body = Pager.read(m)
        size = len(
            _packb([tag, [[U64_MAX, True, m.exchange, m.routing_key, m.properties, body, U32_MAX]]])
        )
        return size + GET_OK_EXTRA <= self.max_frame_size

    @staticmethod
    def _run_of(batch: list[QueuedMessage]) -> tuple[str, str, dict[str, Any]] | None:
        """(exchange, routing key, properties) if every message of ``batch`` is a first
        delivery sharing them (a DELIVER_RUN), else None."""
        if len(batch) < 2:
            return None
        m0 = batch[0].message
        ex, rk, props = m0.exchange, m0.routing_key, m0.properties
        for qm in batch:
            m = qm.message
            if (
                qm.delivery_count != 1
                or qm.redelivered
                or m.routing_key != rk
                or (m.properties is not props and m.properties != props)
                or m.exchange != ex
            ):
                return None
        return ex, rk, props

    def _settle(self, tag: int, multiple: bool) -> list[Unacked]:
        """Remove and return the unacked deliveries an ack/nack/reject names."""
        out = self.deliveries.settle(tag, multiple)
        if len(out) == 1:  # a single ack: no per-run loop
            u = out[0]
            if u[2] is not None:
                self._unheld(u[2], 1, u[0].message.size)
        elif out:
            self._release(out)
        return out

    def _release(self, out: list[Unacked]) -> None:
        """Settled deliveries no longer count against their consumers."""
        c = None
        k = size = 0
        for u in out:  # consumers' unacked counts, updated once per run of one consumer
            if u[2] is not c:
                if c is not None:
                    self._unheld(c, k, size)
                c = u[2]
                k = size = 0
            k += 1
            size += u[0].message.size
        if c is not None:
            self._unheld(c, k, size)

    def _unheld(self, c: Consumer, n: int, size: int) -> None:
        """``n`` deliveries of ``size`` bytes to ``c`` were settled; a consumer that
        dispatch held at its unacked-bytes cap is dispatched to again."""
        c.unacked -= n
        c.unacked_bytes -= size + UNACKED_OVERHEAD * n
        if c.held:
            c.held = False
            self.broker.wake(c.queue)

    def pause_writing(self, paused: bool) -> None:
        """The transport's write buffer filled up (True) or drained (False): consumers of
        this connection get nothing while it is full, and are dispatched to once it
        drains."""
        self.write_paused = paused
        if not paused and not self.closed:
            for c in self.consumers.values():
                self.broker.wake(c.queue)
            self.broker.pump_soon()

    def _on_ack(self, f: Ack) -> None:
        self.ack_settled(self._settle(f.delivery_tag, f.multiple))

    def ack_settled(self, settled: list[Unacked]) -> None:
        """Acknowledge deliveries already removed from :attr:`deliveries` (ACK, the
        gateway's delete): one ack record per queue."""
        if len(settled) == 1:
            qm, q, _c = settled[0]
            if q.settle_acked([qm]):
                self.broker.log_ids(commands.ack, q, [qm])
            return
        if not settled:
            return
        by_queue: dict[Queue, list[QueuedMessage]] = {}
        q0 = settled[0][1]
        if all([u[1] is q0 for u in settled]):  # one queue: the usual case
            if not q0.logged and q0.acks_by_count:
                q0.ack(len(settled))
                return
            by_queue[q0] = [u[0] for u in settled]
        else:
            for u in settled:
                lst = by_queue.get(u[1])
                if lst is None:
                    by_queue[u[1]] = [u[0]]
                else:
                    lst.append(u[0])
        for q, qms in by_queue.items():
            if q.settle_acked(qms):
                self.broker.log_ids(commands.ack, q, qms)

    def _refuse(self, settled: list[Unacked], requeue: bool) -> None:
        """Requeue (or dead-letter) deliveries already removed from :attr:`deliveries`
        (NACK, REJECT, timeouts, the gateway's visibility 0), queue by queue."""
        by_queue: dict[Queue, list[QueuedMessage]] = {}
        for u in settled:
            by_queue.setdefault(u[1], []).append(u[0])
        for q, qms in by_queue.items():
            if q.settle_refused(qms, requeue):
                continue
            if requeue:
                self.broker.requeue(q, qms)
            else:
                self.broker.reject(q, qms)

    def requeue_settled(self, settled: list[Unacked]) -> None:
        """Put deliveries already removed from :attr:`deliveries` back in their queues
        (the gateway's visibility 0)."""
        self._refuse(settled, requeue=True)

    def _on_nack(self, f: Nack) -> None:
        self._refuse(self._settle(f.delivery_tag, f.multiple), f.requeue)

    def _on_reject(self, f: Reject) -> None:
        self._refuse(self._settle(f.delivery_tag, False), f.requeue)

    def _on_extend(self, f: Extend) -> None:
        d = self.deliveries
        if not d.extend(f.delivery_tag, f.timeout_ms, self.broker.clock()):
            why = (
                "its ack timeout already expired (the message was requeued)"
                if d.timed_out(f.delivery_tag)
                else "unknown delivery tag"
            )
            raise PreconditionFailed(
                f"cannot extend delivery {f.delivery_tag}: {why}", {"delivery_tag": f.delivery_tag}
            )

    def expire_deliveries(self, now: int) -> None:
        """Deliveries past their ack deadline go back to their queue (as if nacked)."""
        settled = self.deliveries.expire(now)
        if not settled:
            return
        for u in settled:
            if u[2] is not None:
                self._unheld(u[2], 1, u[0].message.size)
        log.info("%s: %d deliveries passed their ack timeout; requeued", self.id, len(settled))
        self._refuse(settled, requeue=True)

    def _on_credit(self, f: Credit) -> None:
        c = self.consumers.get(f.consumer_tag)
        if c is None:
            raise NotFound(f"no consumer {f.consumer_tag!r}", {"consumer_tag": f.consumer_tag})
        c.credit = min(c.credit + f.credit, U32_MAX)
        self.broker.wake(c.queue)

    # ------------------------------------------------------------------ requests
    def _exchange_declare(self, f: ExchangeDeclare) -> Frame:
        self.principal.require_declare("exchange", f.exchange, f.passive)
        self.broker.declare_exchange(
            f.exchange,
            f.type,
            durable=f.durable,
            auto_delete=f.auto_delete,
            passive=f.passive,
            arguments=f.arguments,
        )
        return Ok(f.rid)

    def _exchange_delete(self, f: ExchangeDelete) -> Frame:
        self.principal.require("configure", "exchange", f.exchange)
        self.broker.delete_exchange(f.exchange, if_unused=f.if_unused)
        return Ok(f.rid)

    def _queue_declare(self, f: QueueDeclare) -> Frame:
        self.principal.require_declare("queue", f.queue, f.passive)
        q = self.broker.declare_queue(
            self.id,
            f.queue,
            durable=f.durable,
            exclusive=f.exclusive,
            auto_delete=f.auto_delete,
            passive=f.passive,
            arguments=f.arguments,
        )
        return QueueDeclareOk(f.rid, q.name, q.ready, len(q.consumers))

    def _queue_delete(self, f: QueueDelete) -> Frame:
        self.principal.require("configure", "queue", f.queue)
        n = self.broker.delete_queue(self.id, f.queue, if_unused=f.if_unused, if_empty=f.if_empty)
        return MessageCountOk(f.rid, n)

    def _queue_purge(self, f: QueuePurge) -> Frame:
        self.principal.require("configure", "queue", f.queue)
        return MessageCountOk(f.rid, self.broker.purge_queue(self.id, f.queue))

    def _bind(self, f: Bind) -> Frame:
        self.principal.require_bind(f.exchange, f.queue)
        self.broker.bind(self.id, f.exchange, f.queue, f.routing_key, f.arguments)
        return Ok(f.rid)

    def _unbind(self, f: Unbind) -> Frame:
        self.principal.require_bind(f.exchange, f.queue)
        self.broker.unbind(self.id, f.exchange, f.queue, f.routing_key)
        return Ok(f.rid)

    def _list(self, f: List) -> Frame:
        return ListOk(f.rid, self.principal.visible(f.kind, self.broker.list(f.kind)))

    def _consume(self, f: ConsumeFrame) -> Frame:
        check_consume_arguments(f.arguments, None)  # unknown keys: 400 before anything else
        self.principal.require("read", "queue", f.queue)
        q = self.broker.get_queue(f.queue, self.id)
        check_consume_arguments(f.arguments, q)  # 400: unknown, or stream-only on a classic
        tag = f.consumer_tag
        if not tag:
            self._ctag += 1
            tag = f"ctag-{self._ctag}"
            while tag in self.consumers:
                self._ctag += 1
                tag = f"ctag-{self._ctag}"
        elif tag in self.consumers:
            raise PreconditionFailed(
                f"consumer tag {tag!r} already in use on this connection", {"consumer_tag": tag}
            )
        c = q.new_consumer(tag, self, f.no_ack, f.exclusive, f.credit, f.arguments)
        self.broker.add_consumer(c)
        self.consumers[tag] = c
        return ConsumeOk(f.rid, tag)

    def _cancel(self, f: Cancel) -> Frame:
        c = self.consumers.pop(f.consumer_tag, None)
        if c is None:
            raise NotFound(f"no consumer {f.consumer_tag!r}", {"consumer_tag": f.consumer_tag})
        self.broker.remove_consumer(c)
        return Ok(f.rid)

    def _get(self, f: Get) -> Frame:
        if not 1 <= f.max_messages <= GET_MAX:
            raise InvalidArgument(
                f"max_messages must be 1..{GET_MAX}", {"max_messages": f.max_messages}
            )
        self.principal.require("read", "queue", f.queue)
        q = self.broker.get_queue(f.queue, self.id)
        taken = self.take_ready(
            q, f.max_messages, self.max_frame_size - 1024, ENTRY_OVERHEAD, None, f.no_ack
        )
        entries = [
            DeliveryEntry(
                tag,
                qm.redelivered,
                qm.message.exchange,
                qm.message.routing_key,
                qm.message.properties,
                Pager.read(qm.message),
                qm.delivery_count,
            )
            for tag, qm in taken
        ]
        return GetOk(f.rid, entries, q.ready)

    def take_ready(
        self,
        q: Queue,
        limit: int,
        budget: int,
        overhead: int,
        timeout_ms: int | None,
        no_ack: bool = False,
    ) -> list[tuple[int, QueuedMessage]]:
        """Pull up to ``limit`` ready messages off ``q`` under new delivery tags: GET and
        the HTTP gateway's receive share this, so both count, log and time out alike.

        At least one message, then more while their sizes plus ``overhead`` each fit in
        ``budget`` bytes. Unless ``no_ack``, each stays unacked here until ``timeout_ms``
        from now (None: the queue's ack timeout; 0 there: no deadline), when the
        ack-timeout sweep requeues it."""
        broker = self.broker
        now = broker.clock()
        q.last_used = now
        ms = q.opts.ack_timeout_ms if timeout_ms is None else timeout_ms
        deadline = now + ms if ms and not no_ack else 0
        taken: list[QueuedMessage] = []
        size = 0
        while len(taken) < limit:
            head = q.peek()
            if head is None:
                break
            if head.message.size > self.max_message_size and not self._fits("", head):
                self._refuse_too_large(q, q.take(1, 0), None)  # fits no frame of ours
                continue
            esize = head.message.size + overhead
            if taken and size + esize > budget:
                break  # does not fit this reply; stays at the head
            taken.append(q.take(1, deadline)[0])
            size += esize
        if not taken:
            return []
        first = self.deliveries.add(taken, q, None, no_ack)
        if no_ack:
            q.ack(len(taken))
        broker.latency.observe_batch(taken, broker.clock())
        if q.logged:
            broker.log_ids(commands.ack if no_ack else commands.deliver, q, taken)
        return list(zip(range(first, first + len(taken)), taken, strict=True))

    # ------------------------------------------------------------------ lifecycle
    def consumer_cancelled(self, consumer: Consumer, code: int, message: str) -> None:
        """The broker removed a consumer (its queue was deleted)."""
        if self.consumers.pop(consumer.tag, None) is not None and not self.closed:
            self.send(Cancelled(consumer.tag, code, message))

    def close(self) -> None:
        """Connection gone: requeue unacked deliveries, drop consumers and exclusive queues."""
        if self.closed:
            return
        self.closed = True
        try:
            self.flow.close()
        except Exception:
            log.exception("%s: closing publish credit failed", self.id)
        self._requeue_on_close(self.deliveries.drain())
        for c in list(self.consumers.values()):
            try:
                self.broker.remove_consumer(c)
            except Exception:
                log.exception(
                    "%s: removing consumer %r of queue %r failed", self.id, c.tag, c.queue.name
                )
        self.consumers.clear()
        self.broker.detach(self)

    def _requeue_on_close(self, settled: list[Unacked]) -> None:
        """Unacked deliveries of a closed connection go back (or dead-letter), queue by
        queue. A failure is contained to its queue and logged (dead-lettering already
        drops a single bad message, counted): the connection always ends, with no ghost
        left holding consumers and deliveries, and the other queues get theirs back.
        Persistent messages a failure left out are still in the log as delivered and
        come back at the next start."""
        by_queue: dict[Queue, list[Unacked]] = {}
        for u in settled:
            by_queue.setdefault(u[1], []).append(u)
        for q, us in by_queue.items():
            try:
                self._refuse(us, requeue=True)
            except Exception:
                log.exception(
                    "%s: requeueing %d deliveries of queue %r failed",
                    self.id,
                    len(us),
                    q.name,
                    extra={"event": "session.requeue_failed", "queue": q.name},
                )


def _ignore(_: Any) -> None:
    return None


CONNECTION_NAME_MAX = 255


def connection_name(client_properties: dict[str, Any]) -> str:
    """The name a client gave its connection (``connection_name`` in AUTH's informational
    client_properties): a string, cut to 255 characters, control characters replaced so it
    cannot forge log lines; anything else is no name."""
    name = client_properties.get("connection_name")
    if type(name) is not str:
        return ""
    name = name[:CONNECTION_NAME_MAX]
    return "".join(ch if ch.isprintable() else "?" for ch in name)
