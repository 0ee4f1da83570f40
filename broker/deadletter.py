"""Dead-lettering's pure part: the properties a dead-lettered message is republished
with (its x-death history) and the automatic-cycle rule. No broker state is read here,
so the rules are unit-tested without a broker; ``Broker.dead_letter`` routes the result.
"""

from __future__ import annotations

from typing import Any

from conveyor.broker.message import death_records

AUTOMATIC_REASONS = frozenset({"expired", "max-length", "delivery-limit"})


def dead_letter_properties(
    properties: dict[str, Any],
    *,
    queue: str,
    reason: str,
    exchange: str,
    routing_key: str,
    now: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The new properties of a message leaving ``queue`` for ``reason`` at ``now`` (ms),
    and its death history, newest first (the list stored under headers["x-death"]).

    The record for the same (queue, reason) moves to the front with its count raised by
    one and its time set; a new one is made otherwise, with the message's original
    ``exchange``/``routing_key``. Unreadable records are dropped (``death_records``).
    Per-message ``ttl``/``delay`` go: the copy would expire or wait again at once. The
    input is not modified."""
    props = dict(properties)
    raw_headers = props.get("headers")
    headers = dict(raw_headers) if isinstance(raw_headers, dict) else {}
    deaths = death_records(headers.get("x-death"))
    record = None
    for d in deaths:
        if d.get("queue") == queue and d.get("reason") == reason:
            record = d
            deaths.remove(d)
            break
    if record is None:
        record = {
            "reason": reason,
            "queue": queue,
            "exchange": exchange,
            "routing_key": routing_key,
            "count": 0,
        }
    count = record.get("count")
    record["count"] = (count if type(count) is int and count >= 0 else 0) + 1
    record["time"] = now
    deaths.insert(0, record)
    headers["x-death"] = deaths
    props["headers"] = headers
    props.pop("ttl", None)  # would expire again at once; the queue's TTL still applies
    props.pop("delay", None)
    return props, deaths


def automatic_cycle(reason: str, deaths: list[dict[str, Any]], target: str) -> bool:
    """Would dead-lettering to ``target`` close a cycle of automatic deaths only?
    ``deaths``: the message's history, newest first, its new record included. A cycle
    with an explicit rejection in it is a consumer's choice (retry) and goes on."""
    if reason == "rejected":
        return False
    for d in deaths:
        if d.get("reason") == "rejected":
            return False
        if d.get("queue") == target:
            return True
    return False
