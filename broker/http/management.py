"""Management API (JSON under ``/api``): overview, queues, exchanges, bindings,
connections, consumers; purge, delete, peek, redrive and depth history of queues;
declaring and deleting exchanges and bindings; closing connections; whoami.

Every endpoint needs the management right (broker.http.common.require_admin). Changes go
through the broker model like the binary protocol's requests, and answers to durable
changes wait until they are logged.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from conveyor.broker import commands
from conveyor.broker.auth import ACTIONS, ANONYMOUS, Principal
from conveyor.broker.flow import disk_free, process_rss
from conveyor.broker.http.common import (
    committed,
    ctx,
    encode_body,
    int_query,
    json_object,
    json_response,
    principal,
    queue_name,
    require_admin,
)
from conveyor.broker.http.gateway import SESSION_ID
from conveyor.broker.http.stats import HISTORY_INTERVAL, HISTORY_SAMPLES, history_row
from conveyor.broker.message import DELAYED, Message, death_records
from conveyor.broker.options import QueueOptions
from conveyor.broker.pager import Pager
from conveyor.protocol import ConveyorError, InvalidArgument, NotFound, QueueFull
from conveyor.protocol.limits import NAME_MAX

if TYPE_CHECKING:
    from conveyor.broker.core import Broker
    from conveyor.broker.http.common import HttpContext
    from conveyor.broker.queue import Queue
    from conveyor.broker.server import BrokerProtocol

PEEK_MAX = 1000
REDRIVE_MAX = 100_000
OPTION_NAMES = QueueOptions.__slots__


def _version() -> str:
    from conveyor.broker.server import VERSION

    return VERSION


def queue_json(c: HttpContext, q: Queue) -> dict[str, Any]:
    st = q.statistics()
    opts = st.options
    return {
        "name": st.name,
        "durable": st.durable,
        "exclusive": st.exclusive,
        "auto_delete": st.auto_delete,
        "arguments": st.arguments,
        # messages: the ready count, as in every listing; ready: the same number (older name)
        "ready": st.ready,
        "unacked": st.unacked,
        "messages": st.ready,
        "delayed": st.delayed,
        "paged": st.paged,
        "consumers": st.consumers,
        "counters": {
            "published": st.published,
            "delivered": st.delivered,
            "acked": st.acked,
            "dead_lettered": st.dead_lettered,
            "expired": st.expired,
            "dead_letter_dropped": st.dead_letter_dropped,
        },
        "rates": c.stats.queue(st.name),
        "settings": {k: getattr(opts, k) for k in OPTION_NAMES},
        # streams: offsets and per-group committed offset and lag
        **st.type_fields(),
    }


def _queue(c: HttpContext, name: str) -> Queue:
    q = c.broker.queues.get(name)
    if q is None:
        raise NotFound(f"no queue {name!r}", {"queue": name})
    return q


def _protocols(c: HttpContext) -> dict[str, BrokerProtocol]:
    return {p.session.id: p for p in c.server.protocols if p.session is not None}


# ---------------------------------------------------------------------- overview
async def overview(request: web.Request) -> web.Response:
    require_admin(request)
    c = ctx(request)
    b = c.broker
    stats = [q.statistics() for q in b.queues.values()]
    ready = sum(st.ready for st in stats)
    unacked = sum(st.unacked for st in stats)
    cfg = c.server.config
    return json_response(
        {
            "product": "conveyor",
            "version": _version(),
            "uptime_s": round(time.time() - b.started, 3),
            "messages": {
                "ready": ready,
                "unacked": unacked,
                "total": ready + unacked,
                "dead_lettered": b.dead_lettered,
            },
            "rates": c.stats.rates,
            "connections": len(_protocols(c)),
            "consumers": sum(len(s.consumers) for s in b.sessions.values()),
            "queues": len(b.queues),
            "exchanges": len(b.exchanges),
            "memory": {"rss": process_rss()},
            "disk": {"free": disk_free(cfg.data_dir), "data_dir": cfg.data_dir},
        }
    )


# ---------------------------------------------------------------------- queues
async def list_queues(request: web.Request) -> web.Response:
    require_admin(request)
    c = ctx(request)
    return json_response([queue_json(c, q) for _n, q in sorted(c.broker.queues.items())])


async def get_queue(request: web.Request) -> web.Response:
    require_admin(request)
    c = ctx(request)
    return json_response(queue_json(c, _queue(c, queue_name(request))))


async def put_queue(request: web.Request) -> web.Response:
    """Declare a queue (idempotent: 200 if it exists with the same settings). A token's
    new queue counts against its subject's max_queues_per_subject, as over the wire."""
    p = require_admin(request)
    c = ctx(request)
    name = queue_name(request)
    data = await json_object(request, required=False)
    unknown = set(data) - {"durable", "auto_delete", "arguments"}
    if unknown:
        raise InvalidArgument(f"unknown field {sorted(unknown)[0]!r}")
    durable, auto_delete = data.get("durable", True), data.get("auto_delete", False)
    arguments = data.get("arguments") or {}
    if type(durable) is not bool or type(auto_delete) is not bool:
        raise InvalidArgument("durable and auto_delete must be booleans")
    if not isinstance(arguments, dict):
        raise InvalidArgument("arguments must be an object")
    existed = name in c.broker.queues
    owner = p.subject if p.permissions is not None and not existed else None
    if owner is not None:
        c.broker.queue_owners.check(c.broker.limits, owner)
    q = c.broker.declare_queue(
        None, name, durable=durable, auto_delete=auto_delete, arguments=arguments
    )
    if owner is not None:
        c.broker.queue_owners.add(q.name, owner)
    await committed(c.broker)
    return json_response(queue_json(c, q), status=200 if existed else 201)


async def delete_queue(request: web.Request) -> web.Response:
    require_admin(request)
    c = ctx(request)
    name = queue_name(request)
    n = c.broker.delete_queue(
        None,
        name,
        if_unused=request.query.get("if_unused") == "true",
        if_empty=request.query.get("if_empty") == "true",
    )
    c.broker.pump()
    await committed(c.broker)
    return json_response({"queue": name, "messages": n})


async def purge_queue(request: web.Request) -> web.Response:
    require_admin(request)
    c = ctx(request)
    name = queue_name(request)
    n = c.broker.purge_queue(None, name)
    await committed(c.broker)
    return json_response({"queue": name, "purged": n})


def message_json(qm: Any) -> dict[str, Any]:
    m = qm.message
    body, encoding = encode_body(Pager.read(m))
    props = Pager.properties(m) or {}  # headers may be paged with the body
    mid = props.get("message_id")
    return {
        "id": str(mid) if mid is not None else str(m.id or ""),
        "body": body,
        "encoding": encoding,
        "exchange": m.exchange,
        "routing_key": m.routing_key,
        "properties": props,
        "delivery_count": qm.delivery_count,
        "redelivered": qm.redelivered,
        "delayed": qm.state == DELAYED,
    }


async def peek(request: web.Request) -> web.Response:
    """Waiting messages in delivery order, without taking them (read-only). Shows
    bodies, so besides the management right it needs ``read`` on the queue."""
    p = require_admin(request)
    c = ctx(request)
    q = _queue(c, queue_name(request))
    p.require("read", "queue", q.name)
    count = int_query(request, "count", 10, 1, PEEK_MAX)
    msgs = list(itertools.islice(q.waiting(), count))
    return json_response(
        {
            "queue": q.name,
            "ready": q.statistics().ready,
            "messages": [message_json(qm) for qm in msgs],
        }
    )


def _death_record(props: dict[str, Any]) -> dict[str, Any] | None:
    """The newest well-formed x-death record, as dead-lettering reads them."""
    headers = props.get("headers")
    deaths = death_records(headers.get("x-death")) if isinstance(headers, dict) else []
    return deaths[0] if deaths else None


def _death_queue(props: dict[str, Any]) -> str | None:
    first = _death_record(props)
    name = first.get("queue") if first is not None else None
    return name if isinstance(name, str) and name else None


def _dead_letters_into(
    broker: Broker, origin: Queue, source: Queue, record: dict[str, Any] | None
) -> bool:
    """Could ``origin`` (the queue an x-death record names) have dead-lettered into
    ``source``? Its dead-letter exchange must route (with its dead-letter routing key, or
    the record's) to ``source``. A record a client wrote naming any other queue fails, so
    a redrive never moves a forged message into a queue it never came from."""
    dlx = origin.opts.dead_letter_exchange
    if dlx is None:
        return False
    key = origin.opts.dead_letter_routing_key
    if key is None:
        rk = record.get("routing_key") if record is not None else None
        key = rk if isinstance(rk, str) else ""
    try:
        return source.name in broker.route(dlx, key)
    except ConveyorError:
        return False


def redrive_queue(
    broker: Broker, source: Queue, to: str | None, limit: int, who: Principal = ANONYMOUS
) -> dict[str, Any]:
    """Move ready messages of ``source`` to ``to`` or to the queue of each message's
    newest x-death record (same body and properties, via the default exchange); the
    rest stay. Synchronous: the moves and removals reach the journal in one batch.

    ``who`` (the requester) needs write on every destination. An x-death destination
    is only trusted if that queue really dead-letters into ``source``
    (:func:`_dead_letters_into`): the header itself may have been written by a client."""
    moved = skipped = 0
    reasons: dict[str, int] = {}
    now = broker.clock()
    if source.release(now):
        broker.wake(source)
    for qm in list(itertools.islice(source.waiting(), limit * 4 + 1000)):
        if moved + skipped >= limit:
            break
        if qm.state == DELAYED:
            continue
        m = qm.message
        props = dict(Pager.properties(m) or {})  # headers (x-death) may be paged
        dest = to or _death_queue(props)
        why = ""
        if dest is None:
            why = "no x-death record naming a queue (use ?to=QUEUE)"
        elif dest == source.name:
            why = "the target is the source queue"
        elif dest not in broker.queues:
            why = f"no queue {dest!r}"
        elif broker.queues[dest].exclusive_owner is not None:
            why = f"queue {dest!r} is exclusive to a connection"
        elif not who.can("write", dest):
            why = f"{who.subject!r} may not write queue {dest!r}"
        elif to is None and not _dead_letters_into(
            broker, broker.queues[dest], source, _death_record(props)
        ):
            why = (
                f"x-death names queue {dest!r}, which does not dead-letter into "
                f"{source.name!r} (use ?to=QUEUE)"
            )
        if not why and dest is not None:
            body = Pager.read(m)
            try:
                if broker.limited:
                    broker.check_capacity([dest], m.size, props.get("message_id"))
            except QueueFull as exc:
                why = exc.message
            else:
                props.pop("delay", None)
                broker.enqueue(Message("", dest, props, body, m.size), [dest])
                if source.remove(qm) and source.logged:
                    broker.log_ids(commands.ack, source, [qm])
                moved += 1
                continue
        skipped += 1
        reasons[why] = reasons.get(why, 0) + 1
    broker.pump()
    return {"queue": source.name, "moved": moved, "skipped": skipped, "reasons": reasons}


async def redrive(request: web.Request) -> web.Response:
    p = require_admin(request)
    c = ctx(request)
    q = _queue(c, queue_name(request))
    p.require("read", "queue", q.name)  # it takes the source's messages
    to = request.query.get("to") or None
    if to is not None and to not in c.broker.queues:
        raise NotFound(f"no queue {to!r}", {"queue": to})
    if to is not None:
        p.require("write", "queue", to)
    limit = int_query(request, "count", REDRIVE_MAX, 1, REDRIVE_MAX)
    result = redrive_queue(c.broker, q, to, limit, p)
    await committed(c.broker)
    return json_response(result)


async def queue_history(request: web.Request) -> web.Response:
    """The queue's recorded depth/unacked/rates (one row per HISTORY_INTERVAL, the last
    HISTORY_SAMPLES), then a row for now: a chart has data the moment it opens."""
    require_admin(request)
    c = ctx(request)
    q = _queue(c, queue_name(request))
    rows = c.stats.history(q.name)
    st = q.statistics()
    rows.append(history_row(time.time() * 1000, st.ready, st.unacked, c.stats.queue(q.name)))
    return json_response(
        {
            "queue": q.name,
            "interval_s": HISTORY_INTERVAL,
            "max_samples": HISTORY_SAMPLES,
            "samples": rows,
        }
    )


# ---------------------------------------------------------------------- exchanges, bindings
def _name(value: Any, what: str, *, empty: bool = False) -> str:
    """A name from a request: a string of at most NAME_MAX UTF-8 bytes (400 otherwise)."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string", {"field": what})
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid Unicode text", {"field": what}) from None
    if size > NAME_MAX or (not value and not empty):
        raise InvalidArgument(
            f"{what} must be {0 if empty else 1}..{NAME_MAX} bytes", {"field": what}
        )
    return value


def _exchange_json(c: HttpContext, name: str) -> dict[str, Any]:
    for row in c.broker.list("exchanges"):
        if row["name"] == name:
            return row
    raise NotFound(f"no exchange {name!r}", {"exchange": name})


async def list_exchanges(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(ctx(request).broker.list("exchanges"))


async def put_exchange(request: web.Request) -> web.Response:
    """Declare an exchange (idempotent: 200 if it exists with the same settings, 409 if
    with others), like EXCHANGE_DECLARE."""
    p = require_admin(request)
    c = ctx(request)
    name = _name(request.match_info["name"], "exchange")
    data = await json_object(request, required=False)
    unknown = set(data) - {"type", "durable", "auto_delete", "arguments"}
    if unknown:
        raise InvalidArgument(f"unknown field {sorted(unknown)[0]!r}")
    etype = data.get("type", "direct")
    durable, auto_delete = data.get("durable", True), data.get("auto_delete", False)
    arguments = data.get("arguments") or {}
    if not isinstance(etype, str):
        raise InvalidArgument("type must be a string", {"field": "type"})
    if type(durable) is not bool or type(auto_delete) is not bool:
        raise InvalidArgument("durable and auto_delete must be booleans")
    if not isinstance(arguments, dict):
        raise InvalidArgument("arguments must be an object")
    p.require_declare("exchange", name, False)
    existed = name in c.broker.exchanges
    c.broker.declare_exchange(
        name, etype, durable=durable, auto_delete=auto_delete, arguments=arguments
    )
    await committed(c.broker)
    return json_response(_exchange_json(c, name), status=200 if existed else 201)


async def delete_exchange(request: web.Request) -> web.Response:
    p = require_admin(request)
    c = ctx(request)
    name = _name(request.match_info["name"], "exchange")
    if_unused = request.query.get("if_unused", "false")
    if if_unused not in ("true", "false"):
        raise InvalidArgument("if_unused must be true or false", {"if_unused": if_unused})
    p.require("configure", "exchange", name)
    c.broker.delete_exchange(name, if_unused=if_unused == "true")
    await committed(c.broker)
    return json_response({"exchange": name})


async def _binding_request(request: web.Request, data: dict[str, Any]) -> tuple[str, str, str]:
    unknown = set(data) - {"exchange", "queue", "routing_key"}
    if unknown:
        raise InvalidArgument(f"unknown field {sorted(unknown)[0]!r}")
    for key in ("exchange", "queue"):
        if key not in data:
            raise InvalidArgument(f"{key} is required", {"field": key})
    exchange = _name(data["exchange"], "exchange")
    queue = _name(data["queue"], "queue")
    key = _name(data.get("routing_key", ""), "routing_key", empty=True)
    principal(request).require_bind(exchange, queue)
    return exchange, queue, key


def _bound(c: HttpContext, exchange: str, queue: str, key: str) -> bool:
    """Is there such a binding? (404 for a missing exchange.)"""
    return (key, queue) in c.broker.get_exchange(exchange).bindings


def _binding_json(exchange: str, queue: str, key: str) -> dict[str, str]:
    return {"exchange": exchange, "queue": queue, "routing_key": key}


async def list_bindings(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(ctx(request).broker.list("bindings"))


async def post_binding(request: web.Request) -> web.Response:
    """Bind a queue to an exchange (BIND): 201, or 200 if the binding existed."""
    require_admin(request)
    c = ctx(request)
    exchange, queue, key = await _binding_request(request, await json_object(request))
    existed = _bound(c, exchange, queue, key)
    c.broker.bind(None, exchange, queue, key)
    created = not existed
    await committed(c.broker)
    return json_response(_binding_json(exchange, queue, key), status=201 if created else 200)


async def _unbind(request: web.Request, data: dict[str, Any]) -> web.Response:
    c = ctx(request)
    exchange, queue, key = await _binding_request(request, data)
    if not _bound(c, exchange, queue, key):
        raise NotFound(
            f"no binding of {queue!r} to {exchange!r} with key {key!r}",
            {"exchange": exchange, "queue": queue, "routing_key": key},
        )
    c.broker.unbind(None, exchange, queue, key)
    await committed(c.broker)
    return json_response(_binding_json(exchange, queue, key))


async def delete_binding(request: web.Request) -> web.Response:
    """DELETE /api/bindings with a JSON body {exchange, queue, routing_key}."""
    require_admin(request)
    return await _unbind(request, await json_object(request))


async def delete_binding_path(request: web.Request) -> web.Response:
    """DELETE /api/bindings/{exchange}/{queue}/{key}; the key may be empty (a trailing
    slash), names are percent-encoded path segments."""
    require_admin(request)
    m = request.match_info
    return await _unbind(
        request, {"exchange": m["exchange"], "queue": m["queue"], "routing_key": m["key"]}
    )


# ---------------------------------------------------------------------- the rest
async def whoami(request: web.Request) -> web.Response:
    """Who the caller is and what it may do (any caller that authenticates; the
    dashboard shows it and hides what it may not use)."""
    p = principal(request)
    perms = p.permissions
    may = {a: ["*"] if perms is None else list(getattr(perms, a)) for a in ACTIONS}
    return json_response(
        {
            "subject": p.subject,
            "anonymous": p.anonymous,
            "management": perms is None or "*" in perms.configure,
            "permissions": may,
            "expires_at": p.expires_at,
        }
    )


async def list_consumers(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(ctx(request).broker.list("consumers"))


async def list_connections(request: web.Request) -> web.Response:
    require_admin(request)
    c = ctx(request)
    protos = _protocols(c)
    out = []
    for info in c.broker.list("connections"):
        if info.get("id") == SESSION_ID:
            continue
        p = protos.get(info["id"])
        s = c.broker.sessions.get(info["id"])
        info = dict(info)
        # LIST says why credit is withheld in "blocked" ("" if not); JSON: a flag + why
        info["blocked_reason"] = info["blocked"]
        info["blocked"] = bool(info["blocked"])
        info["consumers"] = len(s.consumers) if s is not None else 0
        info["unacked"] = len(s.unacked) if s is not None else 0
        info["tls"] = bool(
            p is not None
            and p.transport is not None
            and p.transport.get_extra_info("sslcontext") is not None
        )
        out.append(info)
    return json_response(out)


async def close_connection(request: web.Request) -> web.Response:
    require_admin(request)
    c = ctx(request)
    cid = request.match_info["id"]
    p = _protocols(c).get(cid)
    if p is None:
        raise NotFound(f"no connection {cid!r}", {"connection": cid})
    p.begin_close(320, "connection closed by an administrator (management API)")
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/overview", overview)
    r.add_get("/api/queues", list_queues)
    r.add_get("/api/queues/{name}", get_queue)
    r.add_put("/api/queues/{name}", put_queue)
    r.add_delete("/api/queues/{name}", delete_queue)
    r.add_post("/api/queues/{name}/purge", purge_queue)
    r.add_get("/api/queues/{name}/peek", peek)
    r.add_post("/api/queues/{name}/redrive", redrive)
    r.add_get("/api/queues/{name}/history", queue_history)
    r.add_get("/api/exchanges", list_exchanges)
    r.add_put("/api/exchanges/{name}", put_exchange)
    r.add_delete("/api/exchanges/{name}", delete_exchange)
    r.add_get("/api/bindings", list_bindings)
    r.add_post("/api/bindings", post_binding)
    r.add_delete("/api/bindings", delete_binding)
    r.add_delete("/api/bindings/{exchange}/{queue}/{key:.*}", delete_binding_path)
    r.add_get("/api/whoami", whoami)
    r.add_get("/api/consumers", list_consumers)
    r.add_get("/api/connections", list_connections)
    r.add_delete("/api/connections/{id}", close_connection)
