"""REST messaging gateway (SQS-like) over the same queues as the binary protocol.

* ``POST /queues/{queue}/messages`` publishes through the default exchange (persistent)
  and answers 201 only once the message is durable, like a publisher confirm.
* ``GET /queues/{queue}/messages`` receives up to ``batch_size`` messages; each stays
  unacked, invisible to other consumers, until ``visibility_timeout`` seconds pass
  (default: the queue's ack timeout), then goes back to the queue.
* ``DELETE /queues/{queue}/messages/{receipt_handle}`` acknowledges one.

Received messages are unacked deliveries of one real :class:`broker.session.Session`
(the "HTTP gateway" session, writing nowhere): the broker's ack-timeout sweep requeues
them when their deadline passes exactly as for a binary consumer, and closing the
gateway at shutdown requeues what is still out.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from broker.flow import take_http
from broker.http.common import (
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
from broker.limits import publish_size
from broker.message import Message, QueuedMessage
from broker.pager import Pager
from broker.session import Session
from protocol import InvalidArgument, MessageTooLarge, NotFound, RateLimited, ResourceError
from protocol._generated import check_props

if TYPE_CHECKING:
    from broker.core import Broker

log = logging.getLogger("conveyor.http.gateway")

SESSION_ID = "http-gateway"
BATCH_MAX = 100
VISIBILITY_MAX = 12 * 3600  # seconds
SECONDS_MAX = 10 * 365 * 86400  # delay and ttl: at most ten years
RECEIVE_BYTES = 8 << 20  # body bytes one receive returns at most (at least one message)
PUBLISH_FIELDS = frozenset({"message", "encoding", "priority", "delay", "ttl", "message_id",
                            "headers"})


def _noop_write(_chunks: list[bytes]) -> None:
    return None


class Gateway:
    """The gateway's session: unacked HTTP deliveries and their receipt handles."""

    def __init__(self, broker: Broker, max_frame_size: int) -> None:
        self.broker = broker
        self.session = Session(broker, SESSION_ID, _noop_write, max_frame_size)
        self._tag = 0
        self._nonces: dict[int, str] = {}  # delivery tag -> the secret part of its handle

    # ------------------------------------------------------------------ publish
    def publish(self, queue: str, body: bytes, properties: dict[str, Any]) -> str:
        """Enqueue on ``queue`` via the default exchange; returns the message id. The
        caller waits for :func:`committed` before answering."""
        broker = self.broker
        q = broker.get_queue(queue, None)  # 404, or 405 resource-locked (exclusive)
        failed = broker.store.failed
        if failed is not None:
            raise ResourceError(f"the broker cannot write its log ({failed}); retry later")
        wm = broker.flow.watermarks
        why = wm.reason(time.monotonic()) if wm is not None else ""
        if why:
            raise ResourceError(f"{why} watermark reached; publishers are blocked, retry later",
                                {"reason": why})
        try:
            check_props(properties, "message")
        except Exception as exc:  # noqa: BLE001 - the codec's own "malformed" error
            raise InvalidArgument(f"bad message properties: {exc}") from None
        size = publish_size(broker.limits, properties, body)
        if size > broker.max_message_size:
            raise MessageTooLarge(
                f"message of {len(body)} bytes exceeds the maximum of "
                f"{broker.max_message_size}", {"max_message_size": broker.max_message_size})
        if broker.limited:
            broker.check_capacity([q.name], size, properties.get("message_id"))
        broker.enqueue(Message("", q.name, properties, body, size), [q.name])
        broker.pump()
        return str(properties["message_id"])

    # ------------------------------------------------------------------ receive
    def receive(self, queue: str, batch_size: int, visibility_ms: int | None
                ) -> list[dict[str, Any]]:
        broker = self.broker
        q = broker.get_queue(queue, None)
        now = broker.clock()
        q.last_used = now
        if visibility_ms is None:  # the queue's ack timeout (0 = none: until deleted)
            ms = q.opts.ack_timeout_ms
            deadline = now + ms if ms else 0
        else:  # 0: visible again at the next sweep
            deadline = now + max(visibility_ms, 1)
        session = self.session
        out: list[dict[str, Any]] = []
        taken: list[QueuedMessage] = []
        size = 0
        while len(out) < batch_size:
            head = q.peek()
            if head is None or (out and size + head.message.size > RECEIVE_BYTES):
                break
            qm = q.take(1, deadline)[0]
            self._tag += 1
            tag = self._tag
            nonce = secrets.token_hex(8)
            self._nonces[tag] = nonce
            session.unacked[tag] = (qm, q, None)
            if deadline and (not session.min_deadline or deadline < session.min_deadline):
                session.min_deadline = deadline
            m = qm.message
            size += m.size
            body, encoding = encode_body(Pager.read(m))
            props = m.properties or {}
            mid = props.get("message_id")
            out.append({"id": str(mid) if mid is not None else str(m.id or ""),
                        "body": body, "encoding": encoding,
                        "receipt_handle": f"{tag}.{nonce}",
                        "delivery_count": qm.delivery_count, "redelivered": qm.redelivered,
                        "properties": props})
            taken.append(qm)
        if taken:
            if q.logged:
                broker.log_ids("d", q, taken)
            broker.pump()
        return out

    # ------------------------------------------------------------------ delete
    def delete(self, queue: str, handle: str) -> bool:
        """Acknowledge the delivery ``handle`` names; False if it is unknown, expired
        (back in the queue) or of another queue."""
        tag_text, _, nonce = handle.partition(".")
        try:
            tag = int(tag_text)
        except ValueError:
            return False
        u = self.session.unacked.get(tag)
        if u is None:
            self._nonces.pop(tag, None)
            return False
        qm, q, _c = u
        if self._nonces.get(tag) != nonce or q.name != queue:
            return False
        del self.session.unacked[tag]
        del self._nonces[tag]
        q.ack(1)
        if q.logged:
            self.broker.log_ids("a", q, [qm])
        self.broker.pump()
        return True

    def prune(self) -> None:
        """Forget handles whose delivery timed out (called about once a second)."""
        unacked = self.session.unacked
        if len(self._nonces) > len(unacked):
            for tag in [t for t in self._nonces if t not in unacked]:
                del self._nonces[tag]

    def close(self) -> None:
        """Shutdown: deliveries still out go back to their queues."""
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
        raise InvalidArgument(f"{key} must be a number of seconds 0..{SECONDS_MAX}",
                              {"field": key})
    return round(float(v) * 1000)


def message_properties(data: dict[str, Any]) -> dict[str, Any]:
    unknown = set(data) - PUBLISH_FIELDS
    if unknown:
        raise InvalidArgument(f"unknown field {sorted(unknown)[0]!r}",
                              {"field": sorted(unknown)[0]})
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
    mid = data.get("message_id")
    if mid is None:
        mid = uuid.uuid4().hex
    elif not isinstance(mid, str) or not mid or len(mid.encode("utf-8", "replace")) > 255:
        raise InvalidArgument("message_id must be a string of 1..255 bytes",
                              {"field": "message_id"})
    props["message_id"] = mid
    return props


async def post_message(request: web.Request) -> web.Response:
    queue = queue_name(request, "queue")
    c = ctx(request)
    p = principal(request)
    p.check_publish("", queue)  # write on the queue
    data = await json_object(request)
    if "message" not in data:
        raise InvalidArgument("'message' is required", {"field": "message"})
    props = message_properties(data)
    body = decode_body(data["message"], data.get("encoding"))
    wait = take_http(c.broker.flow, p, len(body), time.monotonic())
    if wait:  # the subject's rate, shared with its binary connections
        raise RateLimited(f"{p.subject!r} is over its publish rate; retry in {wait:.2f}s",
                          {"retry_after": round(wait, 3)})
    mid = c.gateway.publish(queue, body, props)
    await committed(c.broker)
    return json_response({"id": mid}, status=201)


async def get_messages(request: web.Request) -> web.Response:
    queue = queue_name(request, "queue")
    c = ctx(request)
    principal(request).require("read", "queue", queue)
    batch = int_query(request, "batch_size", 1, 1, BATCH_MAX)
    vis = request.query.get("visibility_timeout")
    visibility_ms = None
    if vis is not None:
        visibility_ms = int_query(request, "visibility_timeout", 0, 0, VISIBILITY_MAX) * 1000
    return json_response({"messages": c.gateway.receive(queue, batch, visibility_ms)})


async def delete_message(request: web.Request) -> web.Response:
    queue = queue_name(request, "queue")
    c = ctx(request)
    principal(request).require("read", "queue", queue)
    handle = request.match_info["receipt_handle"]
    if not c.gateway.delete(queue, handle):
        raise NotFound("no such receipt handle on this queue (already deleted, or its "
                       "visibility timeout passed and the message is back in the queue)",
                       {"queue": queue})
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/queues/{queue}/messages", post_message)
    app.router.add_get("/queues/{queue}/messages", get_messages)
    app.router.add_delete("/queues/{queue}/messages/{receipt_handle}", delete_message)
