"""REST messaging gateway (SQS-like) over the same queues as the binary protocol.

* ``POST /queues/{queue}/messages`` publishes through the default exchange (persistent)
  and answers 201 only once the message is durable, like a publisher confirm;
  ``POST /exchanges/{exchange}/messages`` routes through an exchange with a routing key;
  ``POST /queues/{queue}/messages/batch`` sends many, with a result per entry.
* ``GET /queues/{queue}/messages`` receives up to ``batch_size`` messages; each stays
  unacked, invisible to other consumers, until ``visibility_timeout`` seconds pass
  (default: the queue's ack timeout), then goes back to the queue. With
  ``wait_time_seconds`` (at most 20) an empty queue is waited on: the answer comes as
  soon as a message is ready (long polling; woken by the broker's pump, no polling).
* ``DELETE /queues/{queue}/messages/{receipt_handle}`` acknowledges one,
  ``POST /queues/{queue}/messages/batch-delete`` many (per-entry results), and
  ``PUT .../{receipt_handle}/visibility`` restarts one's invisibility (0: visible now).

Received messages are unacked deliveries of one real :class:`broker.session.Session`
(the "HTTP gateway" session, writing nowhere): the broker's ack-timeout sweep requeues
them when their deadline passes exactly as for a binary consumer, and closing the
gateway at shutdown requeues what is still out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from conveyor.broker.auth import Principal
from conveyor.broker.flow import take_http
from conveyor.broker.http.common import (
    HttpContext,
    committed,
    ctx,
    decode_body,
    encode_body,
    int_query,
    json_object,
    json_response,
    principal,
    queue_name,
)
from conveyor.broker.limits import publish_size
from conveyor.broker.message import Message, QueuedMessage
from conveyor.broker.pager import Pager
from conveyor.broker.queue import Queue
from conveyor.broker.session import Session
from conveyor.protocol import (
    ConveyorError,
    InvalidArgument,
    MessageTooLarge,
    NoRoute,
    NotFound,
    RateLimited,
    ResourceError,
)
from conveyor.protocol.limits import NAME_MAX, check_props

if TYPE_CHECKING:
    from conveyor.broker.core import Broker

log = logging.getLogger("conveyor.http.gateway")

SESSION_ID = "http-gateway"
BATCH_MAX = 100
VISIBILITY_MAX = 12 * 3600  # seconds
SECONDS_MAX = 10 * 365 * 86400  # delay and ttl: at most ten years
RECEIVE_BYTES = 8 << 20  # body bytes one receive returns at most (at least one message)
WAIT_MAX = 20  # seconds a receive may wait for a message (long polling), like SQS
HANDLE_MAX = 100  # characters of a receipt handle
ENTRY_ID_MAX = 80  # characters of a batch entry's id (SQS's limit)
U64_MAX = (1 << 64) - 1
# Name-typed message properties a send may set (spec/protocol.toml [properties]).
NAME_PROPERTIES = (
    "correlation_id",
    "reply_to",
    "content_type",
    "content_encoding",
    "type",
    "app_id",
)
PUBLISH_FIELDS = frozenset(
    {
        "message",
        "encoding",
        "priority",
        "delay",
        "ttl",
        "message_id",
        "headers",
        "timestamp",
        *NAME_PROPERTIES,
    }
)
EXCHANGE_FIELDS = frozenset({"routing_key", "mandatory"})


def _noop_write(_chunks: list[bytes]) -> None:
    return None


class Gateway:
    """The gateway's session: unacked HTTP deliveries, their receipt handles, and the
    receives waiting (long polling) for a message to arrive."""

    def __init__(self, broker: Broker, max_frame_size: int) -> None:
        self.broker = broker
        self.session = Session(broker, SESSION_ID, _noop_write, max_frame_size)
        self._nonces: dict[int, str] = {}  # delivery tag -> the secret part of its handle
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}  # queue -> long polls
        self.closing = False

    # ------------------------------------------------------------------ publish
    def publish(self, queue: str, body: bytes, properties: dict[str, Any]) -> str:
        """Enqueue on ``queue`` via the default exchange; returns the message id. The
        caller waits for :func:`committed` before answering."""
        q = self.broker.get_queue(queue, None)  # 404, or 405 resource-locked (exclusive)
        size = self._admit(body, properties, [q.name])
        self.broker.enqueue(Message("", q.name, properties, body, size), [q.name])
        self.broker.pump()
        return str(properties["message_id"])

    def publish_exchange(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: dict[str, Any],
        mandatory: bool,
    ) -> tuple[str, int]:
        """Route through ``exchange`` like a binary PUBLISH; returns (message id, how
        many queues took it). ``mandatory`` and no queue bound: 404 no-route, nothing
        stored."""
        broker = self.broker
        targets = list(broker.route(exchange, routing_key))  # 404 for a missing exchange
        if not targets and mandatory:
            raise NoRoute(
                f"no queue is bound to {exchange!r} for {routing_key!r}",
                {"exchange": exchange, "routing_key": routing_key},
            )
        size = self._admit(body, properties, targets)
        n = broker.enqueue(Message(exchange, routing_key, properties, body, size), targets)
        broker.pump()
        return str(properties["message_id"]), n

    def _admit(self, body: bytes, properties: dict[str, Any], targets: list[str]) -> int:
        """The binary publish's refusals (log unwritable, watermarks, malformed
        properties, size, full reject-publish queues); returns the message's size."""
        broker = self.broker
        failed = broker.store.failed
        if failed is not None:
            raise ResourceError(f"the broker cannot write its log ({failed}); retry later")
        wm = broker.flow.watermarks
        why = wm.reason(time.monotonic()) if wm is not None else ""
        if why:
            raise ResourceError(
                f"{why} watermark reached; publishers are blocked, retry later", {"reason": why}
            )
        try:
            check_props(properties, "message")
        except Exception as exc:  # noqa: BLE001 - the codec's own "malformed" error
            raise InvalidArgument(f"bad message properties: {exc}") from None
        size = publish_size(broker.limits, properties, body)
        if size > broker.max_message_size:
            raise MessageTooLarge(
                f"message of {len(body)} bytes exceeds the maximum of {broker.max_message_size}",
                {"max_message_size": broker.max_message_size},
            )
        if broker.limited:
            broker.check_capacity(targets, size, properties.get("message_id"))
        return size

    # ------------------------------------------------------------------ receive
    def receive(
        self, queue: str, batch_size: int, visibility_ms: int | None
    ) -> list[dict[str, Any]]:
        """Take up to ``batch_size`` ready messages (Session.take_ready, GET's code)."""
        broker = self.broker
        q = broker.get_queue(queue, None)
        # None: the queue's ack timeout (0 = none: until deleted); 0: visible again at
        # the next sweep
        timeout = None if visibility_ms is None else max(visibility_ms, 1)
        taken = self.session.take_ready(q, batch_size, RECEIVE_BYTES, 0, timeout)
        out: list[dict[str, Any]] = []
        for tag, qm in taken:
            nonce = secrets.token_hex(8)
            self._nonces[tag] = nonce
            m = qm.message
            body, encoding = encode_body(Pager.read(m))
            props = m.properties or {}
            mid = props.get("message_id")
            out.append(
                {
                    "id": str(mid) if mid is not None else str(m.id or ""),
                    "body": body,
                    "encoding": encoding,
                    "receipt_handle": f"{tag}.{nonce}",
                    "delivery_count": qm.delivery_count,
                    "redelivered": qm.redelivered,
                    "exchange": m.exchange,
                    "routing_key": m.routing_key,
                    "properties": props,
                }
            )
        if taken:
            broker.pump()
        return out

    async def wait_ready(self, queue: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until ``queue`` has a ready message, is gone,
        or the gateway closes (then False: stop polling). Woken from the broker's pump
        (``Broker.after_pump``), never by polling."""
        if self.closing:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(queue, []).append(fut)
        self.broker.after_pump = self._wake
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            waiting = self._waiters.get(queue)
            if waiting is not None and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self._waiters[queue]
            if not self._waiters:
                self.broker.after_pump = None
        return not self.closing

    def _wake(self) -> None:
        """After a pump: release the long polls of queues with a ready message (or
        deleted ones: they answer 404)."""
        queues = self.broker.queues
        for name in list(self._waiters):
            q = queues.get(name)
            if q is None or q.deleted:
                woken = self._waiters.pop(name)
            elif q.ready and q.peek() is not None:
                # The oldest polls first, no more of them than there are messages (each
                # takes at least one): a message does not wake a hundred pollers.
                waiting = [f for f in self._waiters[name] if not f.done()]
                woken, rest = waiting[: q.ready], waiting[q.ready :]
                if rest:
                    self._waiters[name] = rest
                else:
                    del self._waiters[name]
            else:
                continue
            for fut in woken:
                if not fut.done():
                    fut.set_result(None)
        if not self._waiters:
            self.broker.after_pump = None

    def stop_waiting(self) -> None:
        """Shutdown: long polls answer now (with what they have) instead of holding
        the listener's cleanup for up to WAIT_MAX seconds."""
        self.closing = True
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()
        self.broker.after_pump = None

    # ------------------------------------------------------------------ settle
    def _find(self, queue: str, handle: str) -> tuple[int, QueuedMessage, Queue] | None:
        """The live delivery ``handle`` names on ``queue``; None if it is unknown,
        malformed, expired (back in the queue) or of another queue."""
        tag_text, _, nonce = handle.partition(".")
        try:
            tag = int(tag_text)
        except ValueError:
            return None
        u = self.session.deliveries.get(tag)
        if u is None:
            self._nonces.pop(tag, None)
            return None
        qm, q, _c = u
        if self._nonces.get(tag) != nonce or q.name != queue:
            return None
        return tag, qm, q

    def delete(self, queue: str, handle: str) -> bool:
        """Acknowledge the delivery ``handle`` names; False if there is none."""
        return self.delete_many(queue, [handle])[0]

    def delete_many(self, queue: str, handles: list[str]) -> list[bool]:
        """Acknowledge several deliveries of ``queue`` (one ack record for all); for
        each handle, whether it named a live delivery."""
        tags: list[int] = []
        ok: list[bool] = []
        for handle in handles:
            hit = self._find(queue, handle)
            ok.append(hit is not None)
            if hit is None:
                continue
            tags.append(hit[0])
            del self._nonces[hit[0]]
        if tags:
            self.session.ack_settled(self.session.deliveries.pop_many(tags))
            self.broker.pump()
        return ok

    def change_visibility(self, queue: str, handle: str, visibility_ms: int) -> bool:
        """Restart the delivery's invisibility: ``visibility_ms`` from now (like a binary
        EXTEND); 0 makes it visible again at once (requeued, as when it times out).
        False if the handle names no live delivery."""
        hit = self._find(queue, handle)
        if hit is None:
            return False
        tag = hit[0]
        session = self.session
        if visibility_ms == 0:
            del self._nonces[tag]
            session.requeue_settled(session.deliveries.pop_many([tag]))
            self.broker.pump()
            return True
        return session.deliveries.extend(tag, visibility_ms, self.broker.clock())

    def prune(self) -> None:
        """Forget handles whose delivery timed out (called about once a second)."""
        unacked = self.session.deliveries
        if len(self._nonces) > len(unacked):
            for tag in [t for t in self._nonces if t not in unacked]:
                del self._nonces[tag]

    def close(self) -> None:
        """Shutdown: deliveries still out go back to their queues."""
        self.stop_waiting()
        self.session.close()
        self._nonces.clear()
        self.broker.pump()


# ---------------------------------------------------------------------- handlers
def _seconds(data: dict[str, Any], key: str) -> int | None:
    """A duration in seconds (number) from the JSON body, as milliseconds."""
    v = data.get(key)
    if v is None:
        return None
    if type(v) not in (int, float) or not math.isfinite(v) or not 0 <= v <= SECONDS_MAX:
        raise InvalidArgument(f"{key} must be a number of seconds 0..{SECONDS_MAX}", {"field": key})
    return round(float(v) * 1000)


def message_properties(data: dict[str, Any], extra: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The message properties of a send body (``extra``: other fields the caller
    reads itself, e.g. a batch entry's ``id``)."""
    unknown = set(data) - PUBLISH_FIELDS - extra
    if unknown:
        raise InvalidArgument(
            f"unknown field {sorted(unknown)[0]!r}", {"field": sorted(unknown)[0]}
        )
    props: dict[str, Any] = {"persistent": True}
    priority = data.get("priority")
    if priority is not None:
        if type(priority) is not int or not 0 <= priority <= 9:
            raise InvalidArgument("priority must be an integer 0..9", {"field": "priority"})
        props["priority"] = priority
    delay = _seconds(data, "delay")
    if delay:
        props["delay"] = delay
    ttl = _seconds(data, "ttl")
    if ttl is not None:
        props["ttl"] = ttl
    headers = data.get("headers")
    if headers is not None:
        if not isinstance(headers, dict):
            raise InvalidArgument("headers must be an object", {"field": "headers"})
        if headers:
            props["headers"] = headers
    for key in NAME_PROPERTIES:
        v = data.get(key)
        if v is None:
            continue
        if not isinstance(v, str) or not v or len(v.encode("utf-8", "replace")) > 255:
            raise InvalidArgument(f"{key} must be a string of 1..255 bytes", {"field": key})
        props[key] = v
    ts = data.get("timestamp")
    if ts is not None:
        if type(ts) is not int or not 0 <= ts <= U64_MAX:
            raise InvalidArgument(
                "timestamp must be an integer (ms since the epoch)", {"field": "timestamp"}
            )
        props["timestamp"] = ts
    mid = data.get("message_id")
    if mid is None:
        mid = uuid.uuid4().hex
    elif not isinstance(mid, str) or not mid or len(mid.encode("utf-8", "replace")) > 255:
        raise InvalidArgument(
            "message_id must be a string of 1..255 bytes", {"field": "message_id"}
        )
    props["message_id"] = mid
    return props


def _body_of(data: dict[str, Any]) -> bytes:
    if "message" not in data:
        raise InvalidArgument("'message' is required", {"field": "message"})
    return decode_body(data["message"], data.get("encoding"))


def _take_rate(c: HttpContext, p: Principal, n: int) -> None:
    wait = take_http(c.broker.flow, p, n, time.monotonic())
    if wait:  # the subject's rate, shared with its binary connections
        raise RateLimited(
            f"{p.subject!r} is over its publish rate; retry in {wait:.2f}s",
            {"retry_after": round(wait, 3)},
        )


async def post_message(request: web.Request) -> web.Response:
    queue = queue_name(request, "queue")
    c = ctx(request)
    p = principal(request)
    p.check_publish("", queue)  # write on the queue
    data = await json_object(request)
    props = message_properties(data)
    body = _body_of(data)
    _take_rate(c, p, len(body))
    mid = c.gateway.publish(queue, body, props)
    await committed(c.broker)
    return json_response({"id": mid}, status=201)


async def post_exchange_message(request: web.Request) -> web.Response:
    exchange = request.match_info["exchange"]
    if not exchange or len(exchange.encode("utf-8", "surrogatepass")) > NAME_MAX:
        raise InvalidArgument(
            f"exchange name must be 1..{NAME_MAX} bytes", {"exchange": exchange[:NAME_MAX]}
        )
    c = ctx(request)
    p = principal(request)
    data = await json_object(request)
    rk = data.get("routing_key", "")
    if not isinstance(rk, str) or len(rk.encode("utf-8", "replace")) > NAME_MAX:
        raise InvalidArgument(
            f"routing_key must be a string of 0..{NAME_MAX} bytes", {"field": "routing_key"}
        )
    mandatory = data.get("mandatory", False)
    if type(mandatory) is not bool:
        raise InvalidArgument("mandatory must be true or false", {"field": "mandatory"})
    p.check_publish(exchange, rk)  # write on the exchange
    props = message_properties(data, EXCHANGE_FIELDS)
    body = _body_of(data)
    _take_rate(c, p, len(body))
    mid, routed = c.gateway.publish_exchange(exchange, rk, body, props, mandatory)
    await committed(c.broker)
    return json_response({"id": mid, "routed": routed}, status=201)


def _entries(data: dict[str, Any], extra: frozenset[str]) -> list[dict[str, Any]]:
    """A batch body's ``entries``: 1..BATCH_MAX objects with distinct string ids."""
    unknown = set(data) - {"entries"}
    if unknown:
        raise InvalidArgument(
            f"unknown field {sorted(unknown)[0]!r}", {"field": sorted(unknown)[0]}
        )
    entries = data.get("entries")
    if not isinstance(entries, list) or not 1 <= len(entries) <= BATCH_MAX:
        raise InvalidArgument(
            f"entries must be a list of 1..{BATCH_MAX} objects", {"field": "entries"}
        )
    seen: set[str] = set()
    for e in entries:
        if not isinstance(e, dict):
            raise InvalidArgument("each entry must be an object", {"field": "entries"})
        eid = e.get("id")
        if not isinstance(eid, str) or not 1 <= len(eid) <= ENTRY_ID_MAX:
            raise InvalidArgument(
                f"each entry needs an id: a string of 1..{ENTRY_ID_MAX} characters", {"field": "id"}
            )
        if eid in seen:
            raise InvalidArgument(f"entry id {eid!r} is used twice", {"field": "id", "id": eid})
        seen.add(eid)
    return entries


def _failure(eid: str, exc: ConveyorError) -> dict[str, Any]:
    return {"id": eid, "code": exc.code, "name": exc.name, "message": exc.message}


async def post_message_batch(request: web.Request) -> web.Response:
    """Send up to BATCH_MAX messages; each entry succeeds or fails on its own (like SQS
    SendMessageBatch). 200 once every successful entry is durable."""
    queue = queue_name(request, "queue")
    c = ctx(request)
    p = principal(request)
    p.check_publish("", queue)
    entries = _entries(await json_object(request), frozenset({"id"}))
    c.broker.get_queue(queue, None)  # a missing (or locked) queue fails the whole request
    gw = c.gateway
    ok: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for e in entries:
        try:
            props = message_properties(e, frozenset({"id"}))
            body = _body_of(e)
            _take_rate(c, p, len(body))
            ok.append({"id": e["id"], "message_id": gw.publish(queue, body, props)})
        except ConveyorError as exc:
            failed.append(_failure(e["id"], exc))
    if ok:
        await committed(c.broker)
    return json_response({"successful": ok, "failed": failed})


async def get_messages(request: web.Request) -> web.Response:
    """Receive; with ``wait_time_seconds`` an empty queue is waited on (long polling)
    until a message is ready or the time is up."""
    queue = queue_name(request, "queue")
    c = ctx(request)
    principal(request).require("read", "queue", queue)
    batch = int_query(request, "batch_size", 1, 1, BATCH_MAX)
    vis = request.query.get("visibility_timeout")
    visibility_ms = None
    if vis is not None:
        visibility_ms = int_query(request, "visibility_timeout", 0, 0, VISIBILITY_MAX) * 1000
    wait = int_query(request, "wait_time_seconds", 0, 0, WAIT_MAX)
    gw = c.gateway
    messages = gw.receive(queue, batch, visibility_ms)
    if not messages and wait:
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        while not messages:
            left = end - loop.time()
            if left <= 0 or not await gw.wait_ready(queue, left):
                break
            transport = request.transport
            if transport is None or transport.is_closing():
                break  # the caller hung up: take nothing it would never see
            messages = gw.receive(queue, batch, visibility_ms)
    return json_response({"messages": messages})


def _handle(request: web.Request) -> str:
    handle = request.match_info["receipt_handle"]
    if len(handle) > HANDLE_MAX:
        raise InvalidArgument(
            f"receipt handles are at most {HANDLE_MAX} characters", {"field": "receipt_handle"}
        )
    return handle


_NO_HANDLE = (
    "no such receipt handle on this queue (already deleted, or its visibility "
    "timeout passed and the message is back in the queue)"
)


async def delete_message(request: web.Request) -> web.Response:
    queue = queue_name(request, "queue")
    c = ctx(request)
    principal(request).require("read", "queue", queue)
    c.broker.get_queue(queue, None)  # 404 for the queue itself
    if not c.gateway.delete(queue, _handle(request)):
        raise NotFound(_NO_HANDLE, {"queue": queue})
    return web.Response(status=204)


async def delete_message_batch(request: web.Request) -> web.Response:
    """Delete (acknowledge) up to BATCH_MAX receipt handles; per-entry results."""
    queue = queue_name(request, "queue")
    c = ctx(request)
    principal(request).require("read", "queue", queue)
    entries = _entries(await json_object(request), frozenset())
    c.broker.get_queue(queue, None)
    handles: list[str] = []
    for e in entries:
        unknown = set(e) - {"id", "receipt_handle"}
        h = e.get("receipt_handle")
        if unknown or not isinstance(h, str) or not 1 <= len(h) <= HANDLE_MAX:
            raise InvalidArgument(
                f"each entry is {{id, receipt_handle}} (a string of 1..{HANDLE_MAX} characters)",
                {"id": e["id"]},
            )
        handles.append(h)
    done = c.gateway.delete_many(queue, handles)
    missing = NotFound(_NO_HANDLE, {"queue": queue})
    return json_response(
        {
            "successful": [{"id": e["id"]} for e, ok in zip(entries, done, strict=True) if ok],
            "failed": [
                _failure(e["id"], missing) for e, ok in zip(entries, done, strict=True) if not ok
            ],
        }
    )


async def put_visibility(request: web.Request) -> web.Response:
    """Change one received message's visibility timeout (SQS ChangeMessageVisibility)."""
    queue = queue_name(request, "queue")
    c = ctx(request)
    principal(request).require("read", "queue", queue)
    handle = _handle(request)
    data = await json_object(request)
    unknown = set(data) - {"visibility_timeout"}
    if unknown:
        raise InvalidArgument(
            f"unknown field {sorted(unknown)[0]!r}", {"field": sorted(unknown)[0]}
        )
    v = data.get("visibility_timeout")
    if type(v) is not int or not 0 <= v <= VISIBILITY_MAX:
        raise InvalidArgument(
            f"visibility_timeout must be an integer 0..{VISIBILITY_MAX} (seconds)",
            {"field": "visibility_timeout"},
        )
    c.broker.get_queue(queue, None)
    if not c.gateway.change_visibility(queue, handle, v * 1000):
        raise NotFound(_NO_HANDLE, {"queue": queue})
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/queues/{queue}/messages", post_message)
    app.router.add_get("/queues/{queue}/messages", get_messages)
    app.router.add_post("/queues/{queue}/messages/batch", post_message_batch)
    app.router.add_post("/queues/{queue}/messages/batch-delete", delete_message_batch)
    app.router.add_delete("/queues/{queue}/messages/{receipt_handle}", delete_message)
    app.router.add_put("/queues/{queue}/messages/{receipt_handle}/visibility", put_visibility)
    app.router.add_post("/exchanges/{exchange}/messages", post_exchange_message)
