"""``mq-cli get/peek``, ``queue``, ``move``, ``subscribe`` and ``request``.

All of them use the binary protocol through the client library (GET, LIST, PUBLISH,
CONSUME), so they work without the HTTP listener. ``--json`` prints one JSON object per
line: a message (as ``consume --json``), a queue's details, or what a command did.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from conveyor.cli.security import client_options
from conveyor.protocol import DEFAULT_PORT

_url_flag = click.option(
    "--url",
    envvar="CONVEYOR_URL",
    default=f"mq://127.0.0.1:{DEFAULT_PORT}",
    show_default=True,
    help="Broker URL: mq://[TOKEN@]host:port, or mqs:// for TLS (env CONVEYOR_URL).",
)
_json_flag = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")


def _url_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return client_options(_url_flag(f))


def _progress(show: bool | None, length: int, label: str) -> Any:
    """A click progress bar on stderr (None when off: not a terminal, or --no-progress)."""
    if not (sys.stderr.isatty() if show is None else show):
        return None
    return click.progressbar(length=length, label=label, file=sys.stderr)


def _print_message(msg: Any, as_json: bool, n: int) -> None:
    from conveyor.cli.main import _as_json

    if as_json:
        click.echo(json.dumps(_as_json(msg)))
        return
    view = _as_json(msg)
    meta = (
        f"#{n} exchange={msg.exchange!r} routing_key={msg.routing_key!r} "
        f"redelivered={msg.redelivered} delivery_count={msg.delivery_count}"
    )
    click.echo(meta)
    click.echo(f"  properties: {json.dumps(msg.properties)}")
    if msg.deaths:
        click.echo(f"  x-death: {json.dumps(msg.deaths)}")
    click.echo(f"  body ({view['body_encoding']}): {view['body']}")


def _get_command(peek: bool) -> Callable[..., None]:
    @click.argument("queue")
    @click.option(
        "--count",
        "-n",
        type=click.IntRange(1, 10_000),
        default=1 if not peek else 10,
        show_default=True,
        help="At most this many messages (those ready now).",
    )
    @_json_flag
    @_url_option
    def command(queue: str, count: int, as_json: bool, url: str, ack: bool = not peek) -> None:
        from conveyor.cli.main import _connect, _run

        async def go() -> int:
            async with await _connect(url) as conn:
                msgs = await conn.get(queue, count)
                for i, m in enumerate(msgs, 1):
                    _print_message(m, as_json, i)
                sys.stdout.flush()  # printed before settled: a closed stdout leaves them
                for m in msgs:
                    if ack:
                        m.ack()
                    else:
                        m.nack(requeue=True)
                return len(msgs)

        try:
            n = _run(go)
        except BrokenPipeError:  # stdout closed before the flush: nothing was settled
            from conveyor.cli.main import _stdout_closed

            _stdout_closed()
        if not as_json and n == 0:
            click.echo(f"{queue}: no ready messages", err=True)

    return command


_GET_DOC = """Take up to --count ready messages from QUEUE and print each with its properties
and x-death records; then ack them (--ack, the default: they leave the queue) or requeue
them (--requeue: they go back to the head, in order).

A requeue counts as a delivery: delivery_count goes up and the message is marked
redelivered (on a queue with --delivery-limit a look uses one of its deliveries). A
message is settled only after its line was written. Nothing ready: a note on stderr,
exit 0 (``--json``: no lines)."""

get = click.command("get", help=_GET_DOC)(
    click.option(
        "--ack/--requeue",
        "ack",
        default=True,
        show_default=True,
        help="Remove the messages, or put them back.",
    )(_get_command(False))
)
peek = click.command(
    "peek",
    help="Look at up to --count ready messages of QUEUE without "
    "consuming them: ``get --requeue`` (same output; every message goes "
    "back to the head of the queue in order; a look counts as a "
    "delivery, see ``get --help``).",
)(_get_command(True))


# ---------------------------------------------------------------------- queue details
async def queue_details(conn: Any, name: str, interval: float) -> dict[str, Any]:
    """The queue's LIST row, its consumers and (``interval`` > 0) rates per second from
    two samples that far apart."""
    from conveyor.client import NotFound

    async def row() -> dict[str, Any]:
        found = next((q for q in await conn.list("queues") if q.get("name") == name), None)
        if found is None:
            raise NotFound(f"no queue {name!r}")
        return dict(found)

    first = await row()
    at = time.monotonic()
    out = first
    rates = {"publish": 0.0, "deliver": 0.0, "ack": 0.0}
    if interval > 0:
        await asyncio.sleep(interval)
        out = await row()
        dt = time.monotonic() - at
        for rate, counter in (("publish", "published"), ("deliver", "delivered"), ("ack", "acked")):
            rates[rate] = round(max(0, out.get(counter, 0) - first.get(counter, 0)) / dt, 2)
    out["rates"] = rates
    out["type"] = queue_type(out)
    out["consumer_list"] = [c for c in await conn.list("consumers") if c.get("queue") == name]
    return out


def queue_type(item: dict[str, Any]) -> str:
    """classic, stream or priority (a classic queue with max_priority > 0)."""
    if item.get("type") == "stream":
        return "stream"
    args = item.get("arguments") or {}
    prio = args.get("max_priority", 0) if isinstance(args, dict) else 0
    return "priority" if isinstance(prio, int) and prio > 0 else str(item.get("type", "classic"))


_COUNTERS = (
    "messages",
    "unacked",
    "consumers",
    "delayed",
    "paged",
    "published",
    "delivered",
    "acked",
    "dead_lettered",
    "expired",
)


@click.command("queue")
@click.argument("name")
@click.option(
    "--interval",
    type=click.FloatRange(0, 60),
    default=1.0,
    show_default=True,
    help="Seconds between the two samples the rates come from; 0 = no rates.",
)
@_json_flag
@_url_option
def queue(name: str, interval: float, as_json: bool, url: str) -> None:
    """Details of queue NAME: type, flags, arguments, depth (messages = ready), unacked,
    delayed, paged (ready messages whose bodies wait on disk), counters and rates, its
    consumers, and for streams first/head offset, bytes and each group's offset and lag."""
    from conveyor.cli.main import _connect, _run

    async def go() -> dict[str, Any]:
        async with await _connect(url) as conn:
            return await queue_details(conn, name, interval)

    d = _run(go)
    if as_json:
        click.echo(json.dumps(d))
        return
    flags = [f for f in ("durable", "exclusive", "auto_delete") if d.get(f)]
    click.echo(f"queue {d['name']}  type {d['type']}  {' '.join(flags) or 'transient'}")
    click.echo("  " + "  ".join(f"{k}={d.get(k, 0)}" for k in _COUNTERS))
    r = d["rates"]
    click.echo(
        f"  rates/s: publish={r['publish']} deliver={r['deliver']} ack={r['ack']}"
        + ("" if interval > 0 else " (--interval 0: not sampled)")
    )
    click.echo(f"  arguments: {json.dumps(d.get('arguments') or {})}")
    if d["type"] == "stream":
        click.echo(
            f"  offsets: first={d.get('first_offset', 0)} head={d.get('head_offset', 0)}"
            f" bytes={d.get('bytes', 0)}"
        )
        for g, info in sorted((d.get("groups") or {}).items()):
            click.echo(f"  group {g}: {json.dumps(info)}")
    for c in d["consumer_list"]:
        click.echo(
            f"  consumer {c.get('consumer_tag')} connection={c.get('connection')} "
            f"credit={c.get('credit')} unacked={c.get('unacked')} "
            f"no_ack={c.get('no_ack')}"
        )


# ---------------------------------------------------------------------- move
async def move_messages(
    conn: Any,
    source: str,
    target_of: Callable[[Any], str | None],
    count: int | None,
    timeout: float,
    bar: Any = None,
) -> tuple[int, int, str]:
    """Republish messages of ``source`` (same body and properties, default exchange) to
    ``target_of(msg)``; returns (moved, skipped, why the first skip happened).

    A message is acked in ``source`` only once its republish is confirmed, so a failure
    at any point leaves it there (at worst also in the target). Messages without a target,
    whose target is ``source``, or that the broker refuses go back to ``source`` at the end
    (requeued at once, the next GET would hand them straight back)."""
    from conveyor.client import RequestError

    moved = skipped = 0
    why = ""
    held: list[Any] = []
    try:
        idle_since = time.monotonic()
        while count is None or moved + skipped < count:
            want = 100 if count is None else min(100, count - moved - skipped)
            msgs = await conn.get(source, want)  # pull: nothing taken goes unhandled
            if not msgs:
                if time.monotonic() - idle_since >= timeout:
                    break
                await asyncio.sleep(min(0.05, timeout))
                continue
            idle_since = time.monotonic()
            sends: list[tuple[Any, str]] = []
            for m in msgs:
                dest = target_of(m)
                if dest is None or dest == source:
                    held.append(m)
                    skipped += 1
                    why = why or "no x-death record naming another queue (use --to)"
                else:
                    sends.append((m, dest))
            # mandatory: a target queue that does not exist is a refusal (no-route),
            # not a message silently dropped after its ack.
            results = await asyncio.gather(
                *(
                    conn.publish("", dest, m.body, properties=m.properties, mandatory=True)
                    for m, dest in sends
                ),
                return_exceptions=True,
            )
            for (m, _), r in zip(sends, results, strict=True):
                if r is None:
                    m.ack()
                    moved += 1
                elif isinstance(r, RequestError):
                    held.append(m)
                    skipped += 1
                    why = why or f"{r.name} ({r.code}): {r.message}"
                else:
                    raise r  # timeout or lost connection: the unacked stay in the source
            if bar is not None:
                bar.update(len(msgs))
    finally:
        for m in held:
            m.nack(requeue=True)
        if bar is not None:
            bar.render_finish()
    return moved, skipped, why


@click.command("move")
@click.argument("source")
@click.argument("target")
@click.option(
    "--count", "-n", type=click.IntRange(1), default=None, help="Move at most N messages [all]."
)
@click.option(
    "--timeout",
    type=click.FloatRange(0),
    default=0.5,
    show_default=True,
    help="Stop once SOURCE has had no ready message for S seconds.",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar [on a terminal].")
@_json_flag
@_url_option
def move(
    source: str,
    target: str,
    count: int | None,
    timeout: float,
    progress: bool | None,
    as_json: bool,
    url: str,
) -> None:
    """Move ready messages from queue SOURCE to queue TARGET (any two queues), keeping
    body and properties (headers, x-death, message_id ...); prints how many moved.

    Each message leaves SOURCE only once its copy in TARGET is confirmed. A TARGET that
    does not exist refuses them: they stay in SOURCE, counted as skipped, exit 1."""
    from conveyor.cli.main import _connect, _run

    if source == target:
        raise click.BadParameter("must differ from SOURCE", param_hint="TARGET")

    async def go() -> tuple[int, int, str]:
        async with await _connect(url) as conn:
            total = count
            if total is None:
                rows = await conn.list("queues")
                total = next(
                    (int(q.get("messages", 0)) for q in rows if q.get("name") == source), 0
                )
            bar = _progress(progress, total, f"moving {source} -> {target}")
            return await move_messages(conn, source, lambda _m: target, count, timeout, bar)

    moved, skipped, why = _run(go)
    if as_json:
        click.echo(
            json.dumps({"moved": moved, "skipped": skipped, "source": source, "target": target})
        )
    else:
        click.echo(
            f"moved {moved} messages from {source} to {target}"
            + (f", skipped {skipped}" if skipped else "")
        )
    if skipped:
        click.echo(f"mq-cli: {skipped} message(s) left in {source}: {why}", err=True)
        sys.exit(1)


# ---------------------------------------------------------------------- subscribe
@click.command("subscribe")
@click.argument("exchange")
@click.argument("routing_key", metavar="KEY", default="")
@click.option("--count", "-n", type=click.IntRange(1), default=None, help="Stop after N messages.")
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Stop after S seconds with no message (exit 0).",
)
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (with --count) [on a terminal]."
)
@_json_flag
@_url_option
def subscribe(
    exchange: str,
    routing_key: str,
    count: int | None,
    timeout: float | None,
    progress: bool | None,
    as_json: bool,
    url: str,
) -> None:
    """Print what EXCHANGE routes with KEY (a topic pattern for topic exchanges) from now
    on, until Ctrl-C, --count or --timeout; like ``nats sub``.

    The messages come through a temporary queue (server-named, exclusive, auto-delete,
    transient) bound for this command only: nothing is taken from other queues, and
    the queue disappears with the connection. On a terminal, stderr says when the
    subscription is live."""
    from conveyor.cli.main import _connect, _run

    async def go() -> int:
        got = 0
        async with await _connect(url) as conn:
            info = await conn.declare_queue("", exclusive=True, auto_delete=True, durable=False)
            await conn.bind(exchange, info.name, routing_key)
            if sys.stderr.isatty():
                click.echo(
                    f"subscribed to {exchange!r} key {routing_key!r} via {info.name}", err=True
                )
            bar = _progress(progress if count is not None else False, count or 0, "receiving")
            consumer = await conn.consume(info.name, prefetch=256, no_ack=True)
            out = sys.stdout.buffer
            while count is None or got < count:
                msgs = await consumer.get_batch(None if count is None else count - got, timeout)
                if not msgs:
                    break
                if as_json:
                    from conveyor.cli.main import _as_json

                    out.write(b"".join(json.dumps(_as_json(m)).encode() + b"\n" for m in msgs))
                else:
                    out.write(b"".join(m.body + b"\n" for m in msgs))
                out.flush()
                got += len(msgs)
                if bar is not None:
                    bar.update(len(msgs))
            if bar is not None:
                bar.render_finish()
            await consumer.cancel()
        return got

    try:
        _run(go)
    except BrokenPipeError:
        from conveyor.cli.main import _stdout_closed

        _stdout_closed()


# ---------------------------------------------------------------------- request
@click.command("request")
@click.argument("exchange")
@click.argument("routing_key", metavar="KEY")
@click.argument("body", required=False, default="")
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to wait for the reply.",
)
@click.option("--header", "headers", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--content-type")
@_json_flag
@_url_option
def request(
    exchange: str,
    routing_key: str,
    body: str,
    timeout: float,
    headers: tuple[str, ...],
    content_type: str | None,
    as_json: bool,
    url: str,
) -> None:
    """Send BODY to EXCHANGE with KEY as a request (reply_to and correlation_id set) and
    print the reply's body (``--json``: the reply with its properties); like ``nats req``.

    Exit status 4 if no reply comes within --timeout, 5 if no queue takes the request
    (nobody can answer it)."""
    from conveyor.cli.main import _as_json, _connect, _properties, _run
    from conveyor.client import NoRoute

    props = _properties(content_type, None, None, None, headers, None, None, None, False)

    async def go() -> Any:
        async with await _connect(url) as conn:
            try:
                return await conn.rpc(
                    exchange, routing_key, body.encode(), timeout=timeout, properties=props
                )
            except NoRoute:
                return None

    reply = _run(go)
    if reply is None:
        click.echo(
            f"mq-cli: no route: no queue took the request (exchange {exchange!r}, "
            f"routing key {routing_key!r})",
            err=True,
        )
        sys.exit(5)
    if as_json:
        click.echo(json.dumps(_as_json(reply)))
    else:
        sys.stdout.buffer.write(reply.body + b"\n")
        sys.stdout.flush()
