"""``mq-cli``: run the broker and talk to it from the shell.

Every client command takes ``--url`` (default ``mq://127.0.0.1:5680``, or $CONVEYOR_URL),
plus ``--tls-ca/--tls-cert/--tls-key`` for ``mqs://`` URLs, ``--token`` (cli.security) and
``--context NAME`` (cli.contexts), and ``--json``; a mutating command prints one line (or
one JSON object) saying what it did. Exit status 0 on success; otherwise one line on
stderr and a non-zero status: 1 = the broker refused (with its error name and code),
2 = usage, 3 = cannot connect / connection lost, 4 = timed out, 5 = ``publish``: published
but not routed (no queue took some messages; without --mandatory), or ``request``: no
queue took the request. A closed stdout (``mq-cli consume ... | head``) ends a command
quietly with 141, the status of a process killed by SIGPIPE.

The inspection and messaging commands (get, peek, queue, move, subscribe, request) live
in cli.messages, contexts in cli.contexts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click

from conveyor.cli.certs import gen_certs
from conveyor.cli.contexts import context as context_group
from conveyor.cli.contexts import resolve as resolve_context
from conveyor.cli.flow_flags import flow_options
from conveyor.cli.limit_flags import limit_options
from conveyor.cli.messages import get as get_command
from conveyor.cli.messages import move as move_command
from conveyor.cli.messages import move_messages, queue_type
from conveyor.cli.messages import peek as peek_command
from conveyor.cli.messages import queue as queue_command
from conveyor.cli.messages import request as request_command
from conveyor.cli.messages import subscribe as subscribe_command
from conveyor.cli.security import client_options, connect_options, security_options
from conveyor.cli.stats import stats as stats_command
from conveyor.cli.stats import top as top_command
from conveyor.cli.tokens import token as token_group
from conveyor.protocol import DEFAULT_PORT

T = TypeVar("T")
DEFAULT_URL = f"mq://127.0.0.1:{DEFAULT_PORT}"

_url_flag = click.option(
    "--url",
    envvar="CONVEYOR_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="Broker URL: mq://[TOKEN@]host:port, or mqs:// for TLS (env CONVEYOR_URL).",
)


def url_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--url plus the TLS and token flags every client command shares (cli.security)."""
    return client_options(_url_flag(f))


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a client coroutine, turning every failure into one line and an exit code."""
    from conveyor.client import ConnectionClosed, ConveyorError, PublishTimeout, RequestTimeout

    async def main() -> T:
        return await coro_fn()

    try:
        return asyncio.run(main())
    except (PublishTimeout, RequestTimeout) as exc:
        click.echo(f"mq-cli: timed out: {exc.message}", err=True)
        sys.exit(4)
    except ConnectionClosed as exc:
        click.echo(f"mq-cli: {exc.message}", err=True)
        sys.exit(3)
    except ConveyorError as exc:
        click.echo(f"mq-cli: {exc.name} ({exc.code}): {exc.message}", err=True)
        sys.exit(1)
    except ValueError as exc:
        click.echo(f"mq-cli: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


async def _connect(url: str) -> Any:
    from conveyor.client import connect

    url, from_context = resolve_context(url)
    try:
        return await connect(
            url, reconnect=False, timeout=10, **{**from_context, **connect_options(url)}
        )
    except OSError as exc:  # connecting failed is ConnectionClosed: this is a TLS file
        raise ValueError(f"cannot load TLS settings: {exc}") from None


_json_flag = click.option(
    "--json", "as_json", is_flag=True, help="Print what was done as one JSON object."
)


def _done(as_json: bool, obj: dict[str, Any], line: str) -> None:
    """What a mutating command did: one line of text, or one JSON object (--json)."""
    click.echo(json.dumps(obj) if as_json else line)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="mq-cli")
def cli() -> None:
    """Conveyor message broker: server and client commands."""


# ---------------------------------------------------------------------- server
@cli.command()
@click.option("--host", default=None, help="Listen address [127.0.0.1].")
@click.option("--port", type=int, default=None, help=f"Listen port [{DEFAULT_PORT}]; 0 = any free.")
@click.option("--data-dir", default=None, help="Data directory [./conveyor-data].")
@click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="TOML file with the same settings.",
)
@click.option("--max-frame-size", type=int, default=None, help="Largest frame in bytes [1048576].")
@click.option(
    "--max-message-size",
    type=int,
    default=None,
    help="Largest message body in bytes [max frame size - 8192].",
)
@click.option("--heartbeat-ms", type=int, default=None, help="Heartbeat interval [10000]; 0 = off.")
@click.option(
    "--log-level",
    default=None,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="[info]",
)
@click.option(
    "--log-format",
    default=None,
    type=click.Choice(["text", "json"]),
    help="Log lines as text or as one JSON object per line [text].",
)
@click.option(
    "--fsync",
    default=None,
    type=click.Choice(["always", "interval", "never"]),
    help="When confirmed messages reach the disk [always]; see docs/durability.md.",
)
@click.option("--fsync-interval-ms", type=int, default=None, help="For --fsync interval [100].")
@click.option(
    "--snapshot-bytes", type=int, default=None, help="Snapshot after this much log [64 MiB]."
)
@click.option("--segment-bytes", type=int, default=None, help="Log segment size [64 MiB].")
@click.option(
    "--memory-budget",
    type=int,
    default=None,
    help="Bytes of ready message bodies kept in memory; the rest wait in page "
    "files under the data directory [256 MiB].",
)
@click.option(
    "--wire-compression/--no-wire-compression",
    "wire_compression",
    default=None,
    help="Allow clients to negotiate zstd-compressed batches [allowed].",
)
@click.option(
    "--repair",
    is_flag=True,
    default=None,
    help="Start even if a log or stream segment or a snapshot is corrupt: keep "
    "every valid record, drop the damaged ones (originals kept as "
    "*.corrupt) and log what was dropped; see docs/durability.md.",
)
@limit_options
@flow_options
@security_options
@click.option(
    "--http-port",
    "http_port",
    type=click.IntRange(-1, 65535),
    default=None,
    help="HTTP listener (management API, REST gateway, /metrics, dashboard) on "
    "--host: a port, 0 = any free; -1 = off [off]. Auth as for the binary "
    "protocol (Authorization: Bearer TOKEN).",
)
def server(
    host: str | None,
    port: int | None,
    data_dir: str | None,
    config_path: str | None,
    max_frame_size: int | None,
    max_message_size: int | None,
    heartbeat_ms: int | None,
    log_level: str | None,
    log_format: str | None,
    fsync: str | None,
    fsync_interval_ms: int | None,
    snapshot_bytes: int | None,
    segment_bytes: int | None,
    memory_budget: int | None,
    repair: bool | None,
    wire_compression: bool | None,
    **limits: int | None,
) -> None:
    """Run the broker in the foreground until SIGTERM / Ctrl-C."""
    from conveyor.broker import config as config_mod
    from conveyor.broker.app import run
    from conveyor.broker.durability import CorruptLog, DataDirLocked

    try:
        cfg = config_mod.load(
            config_path,
            host=host,
            port=port,
            data_dir=data_dir,
            max_frame_size=max_frame_size,
            max_message_size=max_message_size,
            heartbeat_ms=heartbeat_ms,
            log_level=log_level,
            log_format=log_format,
            fsync=fsync,
            fsync_interval_ms=fsync_interval_ms,
            snapshot_bytes=snapshot_bytes,
            segment_bytes=segment_bytes,
            memory_budget=memory_budget,
            repair=repair,
            wire_compression=wire_compression,
            **limits,
        )
    except config_mod.ConfigError as exc:
        click.echo(f"mq-cli: {exc}", err=True)
        sys.exit(2)
    try:
        run(cfg)
    except CorruptLog as exc:
        click.echo(f"mq-cli: refusing to start: {exc}. Nothing was changed; {exc.hint}.", err=True)
        sys.exit(1)
    except DataDirLocked as exc:
        click.echo(f"mq-cli: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"mq-cli: cannot start the broker: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------- topology
@cli.command("declare-exchange")
@click.argument("name")
@click.option(
    "--type",
    "etype",
    type=click.Choice(["direct", "topic", "fanout"]),
    default="direct",
    show_default=True,
)
@click.option("--durable/--transient", default=True, show_default=True)
@click.option("--auto-delete", is_flag=True)
@_json_flag
@url_option
def declare_exchange(
    name: str, etype: str, durable: bool, auto_delete: bool, as_json: bool, url: str
) -> None:
    """Declare an exchange; prints what was declared."""

    async def go() -> None:
        async with await _connect(url) as conn:
            await conn.declare_exchange(name, etype, durable=durable, auto_delete=auto_delete)

    _run(go)
    _done(
        as_json,
        {"exchange": name, "type": etype, "durable": durable, "auto_delete": auto_delete},
        f"declared exchange {name} ({etype}{'' if durable else ', transient'})",
    )


@cli.command("declare-queue")
@click.argument("name")
@click.option("--durable/--transient", default=True, show_default=True)
@click.option("--exclusive", is_flag=True, help="Owned by this (short-lived) connection.")
@click.option("--auto-delete", is_flag=True)
@click.option(
    "--ack-timeout-ms",
    type=click.IntRange(0),
    help="Unacked this long, a delivery returns to the queue; 0 = never.",
)
@click.option(
    "--delivery-limit",
    type=click.IntRange(0, 2**32 - 1),
    help="Dead-letter a message after this many deliveries; 0 = unlimited.",
)
@click.option("--dead-letter-exchange", help="Exchange that receives dead letters.")
@click.option("--dead-letter-routing-key", help="Their routing key [the message's own].")
@click.option("--message-ttl-ms", type=click.IntRange(0), help="Messages expire after; 0 = never.")
@click.option(
    "--expires-ms",
    type=click.IntRange(0),
    help="Delete the queue after this long unused; 0 = never.",
)
@click.option("--max-priority", type=click.IntRange(0, 9), help="Priority order; 0 = FIFO.")
@click.option("--max-length", type=click.IntRange(0), help="At most this many ready messages.")
@click.option(
    "--max-length-bytes", type=click.IntRange(0), help="At most this many bytes of ready bodies."
)
@click.option(
    "--overflow",
    type=click.Choice(["drop-head", "reject-publish"]),
    help="At the length limit: dead-letter the oldest, or refuse the publish.",
)
@click.option(
    "--dedup-window-ms",
    type=click.IntRange(0),
    help="Drop a message_id seen within this window; 0 = off.",
)
@click.option(
    "--single-active-consumer/--no-single-active-consumer",
    default=None,
    help="Deliver to one consumer at a time.",
)
@click.option(
    "--type",
    "queue_type",
    type=click.Choice(["classic", "stream"]),
    help="stream: an append-only log read by offset (durable only) [classic].",
)
@click.option(
    "--max-age",
    "max_age",
    metavar="DURATION",
    help="Streams: delete segments older than this, e.g. 7d, 12h, 30m, 90s, "
    "500ms (a bare number is ms); 0 = keep forever.",
)
@click.option(
    "--stream-segment-bytes",
    type=click.IntRange(1),
    help="Streams: segment file size; retention deletes whole segments [64 MiB].",
)
@click.option(
    "--stream-compression",
    type=click.Choice(["none", "zstd"]),
    help="Streams: store record batches zstd-compressed [none].",
)
@_json_flag
@url_option
def declare_queue(
    name: str,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
    url: str,
    max_age: str | None,
    as_json: bool,
    **queue_arguments: Any,
) -> None:
    """Declare a queue; prints its name and depth.

    Options left out are not sent (the broker's default applies); redeclaring an existing
    queue with different ones fails with precondition-failed. A stream (--type stream) is
    bounded by --max-length-bytes (size on disk) and/or --max-age."""
    if max_age is not None:
        queue_arguments["max_age_ms"] = _duration_ms(max_age)

    async def go() -> None:
        async with await _connect(url) as conn:
            info = await conn.declare_queue(
                name,
                durable=durable,
                exclusive=exclusive,
                auto_delete=auto_delete,
                **queue_arguments,
            )
            _done(
                as_json,
                {"queue": info.name, "messages": info.messages, "consumers": info.consumer_count},
                f"{info.name}\tmessages={info.messages}\tconsumers={info.consumer_count}",
            )

    _run(go)


_DURATION_UNITS = {
    "ms": 1,
    "s": 1000,
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
    "w": 604_800_000,
}


def _duration_ms(text: str) -> int:
    """``7d``, ``12h``, ``30m``, ``90s``, ``500ms`` or a bare number of ms, as ms."""
    t = text.strip().lower()
    num, unit = t, "ms"
    for u in sorted(_DURATION_UNITS, key=len, reverse=True):
        if t.endswith(u) and t[: -len(u)].strip():
            num, unit = t[: -len(u)].strip(), u
            break
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if not 0 <= value < 2**63 / _DURATION_UNITS[unit]:
        raise click.BadParameter(
            f"{text!r} is not a duration like 7d, 12h, 30m, 90s or 500ms", param_hint="--max-age"
        )
    return round(value * _DURATION_UNITS[unit])


def _binding_command(unbind: bool) -> Callable[..., None]:
    @click.option("--exchange", "-e", required=True)
    @click.option("--queue", "-q", required=True)
    @click.option("--routing-key", "-k", default="", show_default=True)
    @_json_flag
    @url_option
    def command(exchange: str, queue: str, routing_key: str, as_json: bool, url: str) -> None:
        async def go() -> None:
            async with await _connect(url) as conn:
                if unbind:
                    await conn.unbind(exchange, queue, routing_key)
                else:
                    await conn.bind(exchange, queue, routing_key)

        _run(go)
        verb = "unbound" if unbind else "bound"
        _done(
            as_json,
            {verb: True, "exchange": exchange, "queue": queue, "routing_key": routing_key},
            f"{verb} queue {queue} {'from' if unbind else 'to'} exchange {exchange} "
            f"with key {routing_key!r}",
        )

    return command


cli.command("bind", help="Bind a queue to an exchange.")(_binding_command(False))
cli.command("unbind", help="Remove a binding.")(_binding_command(True))


@cli.command("delete-exchange")
@click.argument("name")
@click.option("--if-unused", is_flag=True)
@_json_flag
@url_option
def delete_exchange(name: str, if_unused: bool, as_json: bool, url: str) -> None:
    """Delete an exchange and its bindings."""

    async def go() -> None:
        async with await _connect(url) as conn:
            await conn.delete_exchange(name, if_unused=if_unused)

    _run(go)
    _done(as_json, {"exchange": name, "deleted": True}, f"deleted exchange {name}")


@cli.command("delete-queue")
@click.argument("name")
@click.option("--if-unused", is_flag=True)
@click.option("--if-empty", is_flag=True)
@_json_flag
@url_option
def delete_queue(name: str, if_unused: bool, if_empty: bool, as_json: bool, url: str) -> None:
    """Delete a queue; prints how many messages it held."""

    async def go() -> None:
        async with await _connect(url) as conn:
            n = await conn.delete_queue(name, if_unused=if_unused, if_empty=if_empty)
            _done(
                as_json,
                {"queue": name, "deleted": True, "messages": n},
                f"deleted {name}: {n} messages",
            )

    _run(go)


@cli.command()
@click.argument("name")
@_json_flag
@url_option
def purge(name: str, as_json: bool, url: str) -> None:
    """Remove every ready message from a queue; prints how many."""

    async def go() -> None:
        async with await _connect(url) as conn:
            n = await conn.purge(name)
            _done(as_json, {"queue": name, "purged": n}, f"purged {name}: {n} messages")

    _run(go)


def _listing(
    kind: str,
    columns: Sequence[str],
    computed: dict[str, Callable[[dict[str, Any]], str]] | None = None,
) -> Callable[..., None]:
    """A listing command; ``computed`` columns are derived from each item, and shown only
    when at least one item has a value for them."""

    @click.option("--json", "as_json", is_flag=True, help="One JSON array.")
    @url_option
    def command(as_json: bool, url: str) -> None:
        async def go() -> list[dict[str, Any]]:
            async with await _connect(url) as conn:
                items: list[dict[str, Any]] = await conn.list(kind)
                return items

        items = _run(go)
        if as_json:
            click.echo(json.dumps(items, indent=1))
            return
        fmt = computed or {}
        cols = [c for c in columns if c not in fmt or any(fmt[c](it) for it in items)]
        rows = [
            [(fmt[c](it) or "-") if c in fmt else str(it.get(c, "")) for c in cols] for it in items
        ]
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
        click.echo("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))

    return command


def _group_lag(item: dict[str, Any]) -> str:
    """Streams: ``group=lag`` for each consumer group, e.g. ``billing=0,audit=1200``."""
    groups = item.get("groups")
    if item.get("type") != "stream" or not isinstance(groups, dict):
        return ""
    return (
        ",".join(
            f"{g}={info.get('lag', '?') if isinstance(info, dict) else '?'}"
            for g, info in sorted(groups.items())
        )
        or "-"
    )


cli.command(
    "queues",
    help="List queues: type (classic, stream, priority), depth (MESSAGES: "
    "ready), unacked and consumers; for streams, each consumer "
    "group's lag (GROUP_LAG, group=messages behind).",
)(
    _listing(
        "queues",
        [
            "name",
            "type",
            "messages",
            "unacked",
            "consumers",
            "durable",
            "exclusive",
            "auto_delete",
            "group_lag",
        ],
        {"group_lag": _group_lag, "type": queue_type},
    )
)
cli.command(
    "consumers",
    help="List every consumer on the broker: queue, tag, connection, credit, unacked, no_ack.",
)(_listing("consumers", ["queue", "consumer_tag", "connection", "credit", "unacked", "no_ack"]))
cli.command("exchanges", help="List exchanges.")(
    _listing("exchanges", ["name", "type", "durable", "auto_delete", "bindings"])
)
cli.command("bindings", help="List bindings.")(
    _listing("bindings", ["exchange", "queue", "routing_key"])
)
cli.command("connections", help="List connections with publish credit and why it is withheld.")(
    _listing(
        "connections", ["id", "name", "peer", "subject", "credit_messages", "blocked", "published"]
    )
)


# ---------------------------------------------------------------------- messaging
def _properties(
    content_type: str | None,
    message_id: str | None,
    correlation_id: str | None,
    reply_to: str | None,
    headers: Sequence[str],
    priority: int | None,
    ttl: int | None,
    delay: int | None,
    persistent: bool,
) -> dict[str, Any]:
    props: dict[str, Any] = {"persistent": persistent}
    for k, v in (
        ("content_type", content_type),
        ("message_id", message_id),
        ("correlation_id", correlation_id),
        ("reply_to", reply_to),
        ("priority", priority),
        ("ttl", ttl),
        ("delay", delay),
    ):
        if v is not None:
            props[k] = v
    if headers:
        hdrs: dict[str, str] = {}
        for h in headers:
            if "=" not in h:
                raise click.BadParameter(f"header {h!r} must be KEY=VALUE", param_hint="--header")
            k, v = h.split("=", 1)
            hdrs[k] = v
        props["headers"] = hdrs
    return props


@cli.command()
@click.argument("body", required=False)
@click.option("--exchange", "-e", default="", help="Exchange; empty = default exchange.")
@click.option("--routing-key", "-k", default="", help="Routing key (queue name for default).")
@click.option(
    "--count", "-n", type=int, default=1, show_default=True, help="Publish BODY this many times."
)
@click.option("--persistent/--transient", default=True, show_default=True)
@click.option(
    "--mandatory",
    is_flag=True,
    help="A message no queue takes is an error (exit 1, stop) instead of "
    '"published but not routed" (exit 5, go on).',
)
@click.option("--content-type")
@click.option("--message-id")
@click.option("--correlation-id")
@click.option("--reply-to")
@click.option("--header", "headers", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--priority", type=click.IntRange(0, 9))
@click.option("--ttl", type=click.IntRange(0), help="Time to live in ms.")
@click.option("--delay", type=click.IntRange(0), help="Delay in ms.")
@click.option(
    "--batch",
    type=click.IntRange(1, 10000),
    default=500,
    show_default=True,
    help="Messages per pipelined batch.",
)
@click.option(
    "--timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to wait for each batch's confirms.",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar [on a terminal].")
@_json_flag
@url_option
def publish(
    body: str | None,
    exchange: str,
    routing_key: str,
    count: int,
    persistent: bool,
    mandatory: bool,
    content_type: str | None,
    message_id: str | None,
    correlation_id: str | None,
    reply_to: str | None,
    headers: tuple[str, ...],
    priority: int | None,
    ttl: int | None,
    delay: int | None,
    batch: int,
    timeout: float,
    progress: bool | None,
    as_json: bool,
    url: str,
) -> None:
    """Publish BODY, or one message per stdin line; exits 0 once every message is confirmed
    and routed to a queue, printing "published N messages ..." (--json: {"published": N,
    "unrouted": 0, ...}).

    Messages that matched no queue are dropped by the broker: then "published but not
    routed" is printed with their count and the exit status is 5 (with --mandatory: an
    error, exit 1). If the broker refuses one (e.g. queue-full), publishing stops and the
    error line says how many messages were stored before it."""
    props = _properties(
        content_type,
        message_id,
        correlation_id,
        reply_to,
        headers,
        priority,
        ttl,
        delay,
        persistent,
    )
    if count < 1:
        raise click.BadParameter("must be >= 1", param_hint="--count")
    show = sys.stderr.isatty() if progress is None else progress

    def bodies() -> Any:
        if body is not None:
            for _ in range(count):
                yield body.encode()
        else:
            for line in sys.stdin.buffer:
                yield line.rstrip(b"\n").removesuffix(b"\r")

    async def go() -> tuple[int, int]:
        from conveyor.client import ConveyorError, NoRoute

        stored = unrouted = sent = 0
        async with await _connect(url) as conn:
            chunk: list[bytes] = []
            bar = (
                click.progressbar(
                    length=count if body is not None else 0, label="publishing", file=sys.stderr
                )
                if show
                else None
            )

            async def send() -> None:
                nonlocal stored, unrouted, sent
                sent += len(chunk)
                try:  # always mandatory: a message no queue took comes back (RETURN)
                    await conn.publish_batch(
                        chunk,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=props,
                        mandatory=True,
                        timeout=timeout,
                    )
                    stored += len(chunk)
                except NoRoute as exc:
                    stored += exc.details.get("stored", 0)
                    unrouted += exc.details.get("returned", len(chunk))
                    if mandatory:
                        raise _counted(exc, stored, sent) from None
                except ConveyorError as exc:
                    stored += exc.details.get("stored", 0)
                    raise _counted(exc, stored, sent) from None
                if bar is not None:
                    bar.update(len(chunk))
                chunk.clear()

            for b in bodies():
                chunk.append(b)
                if len(chunk) >= batch:
                    await send()
            if chunk:
                await send()
            if bar is not None:
                bar.render_finish()
        return stored, unrouted

    stored, unrouted = _run(go)
    if as_json or not unrouted:  # as text, the unrouted case is its stderr line alone
        _done(
            as_json,
            {
                "published": stored,
                "unrouted": unrouted,
                "exchange": exchange,
                "routing_key": routing_key,
            },
            f"published {stored} messages to exchange {exchange!r} with key "
            f"{routing_key!r} (all confirmed)",
        )
    if unrouted:
        click.echo(
            f"mq-cli: published but not routed: {unrouted} of {stored + unrouted} "
            f"message(s) matched no queue (exchange {exchange!r}, routing key "
            f"{routing_key!r}); {stored} stored",
            err=True,
        )
        sys.exit(5)


def _counted(exc: Any, stored: int, sent: int) -> Any:
    """``exc`` (same class and code) with how far the publish got in its message."""
    out = type(exc)(
        f"{exc.message} ({stored} of {sent} message(s) sent were confirmed stored "
        "before this; publishing stopped)",
        exc.details,
    )
    out.code = exc.code
    return out


@cli.command()
@click.option("--queue", "-q", required=True)
@click.option("--count", "-n", type=click.IntRange(1), default=None, help="Stop after N messages.")
@click.option(
    "--timeout",
    type=click.FloatRange(0),
    default=None,
    help="Stop after S seconds with no message (exit 0); 0 = print the messages "
    "ready now, then exit.",
)
@click.option(
    "--ack/--no-ack",
    default=True,
    show_default=True,
    help="--no-ack: at-most-once, messages count as acked when sent.",
)
@click.option("--prefetch", type=click.IntRange(1, 65535), default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line with properties.")
@click.option(
    "--offset",
    "offset",
    metavar="first|last|next|N|TIME",
    help="Streams: start at the first message, the newest, only new ones (the "
    "default without --group), offset N, or the first message appended at or "
    "after an ISO-8601 TIME (e.g. 2024-05-01T12:00:00Z; no zone = local time).",
)
@click.option(
    "--group",
    metavar="NAME",
    help="Streams: read as consumer group NAME (acks commit its offset). A group "
    "that exists resumes after what it committed; a NEW group starts at "
    "--offset, by default at the first retained message (like Kafka's "
    "auto.offset.reset=earliest).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (its length: --count, else the queue's depth "
    "when it starts) [on a terminal].",
)
@url_option
def consume(
    queue: str,
    count: int | None,
    timeout: float | None,
    ack: bool,
    prefetch: int,
    as_json: bool,
    offset: str | None,
    group: str | None,
    progress: bool | None,
    url: str,
) -> None:
    """Print message bodies, one per line (or --json lines), acking each only once its
    line was written and flushed to stdout.

    A closed stdout (e.g. ``mq-cli consume -q jobs | head -2``) ends the command quietly
    with exit status 141 (as if killed by SIGPIPE); messages not printed are not acked
    and stay in the queue. For streams --json lines also carry "offset" and "timestamp"
    (ms since the epoch)."""
    if count is not None:
        prefetch = min(prefetch, count)
    out = sys.stdout.buffer
    if group is not None and not group:
        raise click.BadParameter("must not be empty", param_hint="--group")
    if group is not None and offset is None:
        offset = "first"  # where a new group starts (an existing one resumes)
    start = _stream_start(offset) if offset is not None else {}
    is_stream = offset is not None or group is not None
    bar: Any = None

    def emit(msgs: list[Any]) -> None:
        """Write and flush the lines; settle after that (a stream read with --no-ack is
        settled before: it cannot be redelivered anyway)."""
        if is_stream and not ack:
            for m in msgs:
                m.ack()
        out.write(
            b"".join(
                [
                    json.dumps(_as_json(m)).encode() + b"\n" if as_json else m.body + b"\n"
                    for m in msgs
                ]
            )
        )
        out.flush()  # raises BrokenPipeError if stdout is closed: nothing below is acked
        if ack:
            for m in msgs:
                m.ack()
        if bar is not None:
            bar.update(len(msgs))

    async def go() -> int:
        nonlocal bar
        async with await _connect(url) as conn:
            if progress or (progress is None and sys.stderr.isatty()):
                length = count
                if length is None:
                    length = next(
                        (
                            int(q.get("messages", 0))
                            for q in await conn.list("queues")
                            if q.get("name") == queue
                        ),
                        0,
                    )
                bar = click.progressbar(length=length, label=f"consuming {queue}", file=sys.stderr)
            try:
                return await consume_into(conn)
            finally:
                if bar is not None:
                    bar.render_finish()

    async def consume_into(conn: Any) -> int:
        got = 0
        if timeout == 0 and not is_stream:
            # What is ready now, pulled (GET): a push consumer's first deliveries
            # would race a zero wait.
            while count is None or got < count:
                want = prefetch if count is None else min(prefetch, count - got)
                msgs = await conn.get(queue, want, no_ack=not ack)
                if not msgs:
                    break
                emit(msgs)
                got += len(msgs)
            return got
        last: int | None = -1  # timeout 0 on a stream: stop at this offset
        if timeout == 0:
            last = await _stream_ready_last(conn, queue, group, start)
            if last is None:
                return 0
        consumer: Any
        if is_stream:
            consumer = await conn.stream(
                queue, prefetch=prefetch, group=group, auto_commit=False, **start
            )
        else:
            consumer = await conn.consume(queue, prefetch=prefetch, no_ack=not ack)
        wait = _STREAM_READY_WAIT if timeout == 0 else timeout
        while count is None or got < count:
            msgs = await consumer.get_batch(None if count is None else count - got, wait)
            if not msgs:
                break
            emit(msgs)
            got += len(msgs)
            if timeout == 0 and (msgs[-1].offset or 0) >= (last or 0):
                break
        await consumer.cancel()
        return got

    try:
        _run(go)
    except BrokenPipeError:
        _stdout_closed()


_STREAM_READY_WAIT = 5.0  # --timeout 0 on a stream: bound on waiting for a ready message


async def _stream_ready_last(
    conn: Any, queue: str, group: str | None, start: dict[str, Any]
) -> int | None:
    """--timeout 0 on a stream: the newest offset that is ready for this read now, or
    None if nothing is (only new messages, or a group with no lag)."""
    info = next((q for q in await conn.list("queues") if q.get("name") == queue), None)
    if info is None or info.get("type") != "stream":
        return -1  # let the consume fail with the broker's error
    head = int(info.get("head_offset", 0))
    first = int(info.get("first_offset", 0))
    groups = info.get("groups") or {}
    if group is not None and group in groups:
        return head - 1 if groups[group].get("lag", 0) > 0 else None
    if head <= first or (start.get("offset", "next") == "next" and "timestamp" not in start):
        return None
    return head - 1


def _stdout_closed() -> None:
    """stdout's reader went away: end quietly, with the status of a process killed by
    SIGPIPE (what ``cmd | head`` scripts expect), and without Python's complaint about
    flushing a broken pipe at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    sys.exit(141)


def _stream_start(text: str) -> dict[str, Any]:
    """--offset: first/last/next, an offset, or an ISO-8601 time (the timestamp argument)."""
    from datetime import datetime

    t = text.strip()
    if t in ("first", "last", "next"):
        return {"offset": t}
    if t.isdigit():
        return {"offset": int(t)}
    try:
        when = datetime.fromisoformat(t.replace("z", "Z"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not first, last, next, an offset or an ISO-8601 time",
            param_hint="--offset",
        ) from None
    return {"timestamp": when}


def _as_json(msg: Any) -> dict[str, Any]:
    try:
        body: str = msg.body.decode()
        encoding = "utf-8"
    except UnicodeDecodeError:
        body = base64.b64encode(msg.body).decode()
        encoding = "base64"
    out = {
        "body": body,
        "body_encoding": encoding,
        "exchange": msg.exchange,
        "routing_key": msg.routing_key,
        "redelivered": msg.redelivered,
        "delivery_count": msg.delivery_count,
        "properties": msg.properties,
    }
    if msg.offset is not None:  # streams; also in properties.headers
        out["offset"] = msg.offset
        out["timestamp"] = msg.timestamp
    if msg.deaths:  # also in properties.headers; lifted out so scripts need not dig
        out["x_death"] = msg.deaths
    return out


@cli.command("dlq-move")
@click.option("--from", "source", required=True, help="The dead-letter queue to empty.")
@click.option(
    "--to",
    "target",
    default=None,
    help="Queue to move to [each message's original queue, from its x-death].",
)
@click.option(
    "--count",
    "-n",
    type=click.IntRange(1),
    default=None,
    help="Take at most N messages from the DLQ.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="Stop once the DLQ has had no ready message for S seconds.",
)
@_json_flag
@url_option
def dlq_move(
    source: str, target: str | None, count: int | None, timeout: float, as_json: bool, url: str
) -> None:
    """Move dead letters back: republish each message (same body and properties) to --to,
    or to the queue it died in, via the default exchange; prints "moved N, skipped M".

    A message leaves the DLQ only once its republish is confirmed, so a failure at any
    point leaves it in the DLQ (at worst also in the target). Messages with no x-death
    record (without --to), whose target is the DLQ itself, or that the broker refuses go
    back to the DLQ and count as skipped; then the exit status is 1.
    """
    if target == source:
        raise click.BadParameter("must differ from --from", param_hint="--to")

    async def go() -> tuple[int, int, str]:
        async with await _connect(url) as conn:
            return await move_messages(
                conn, source, lambda m: target or _death_queue(m), count, timeout
            )

    moved, skipped, why = _run(go)
    _done(
        as_json,
        {"moved": moved, "skipped": skipped, "source": source},
        f"moved {moved}, skipped {skipped}",
    )
    if skipped:
        click.echo(f"mq-cli: {skipped} message(s) left in {source}: {why}", err=True)
        sys.exit(1)


def _death_queue(msg: Any) -> str | None:
    """The queue named by the message's newest x-death record, if any."""
    deaths = msg.deaths
    queue = deaths[0].get("queue") if deaths else None
    return queue if isinstance(queue, str) and queue else None


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]), default="bash")
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (commands, options, choices).

    \b
    bash: eval "$(_MQ_CLI_COMPLETE=bash_source mq-cli)"   (in ~/.bashrc)
          or: mq-cli completion bash > ~/.local/share/bash-completion/completions/mq-cli
    zsh:  eval "$(_MQ_CLI_COMPLETE=zsh_source mq-cli)"    (in ~/.zshrc)
    fish: _MQ_CLI_COMPLETE=fish_source mq-cli > ~/.config/fish/completions/mq-cli.fish
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # every choice above is one of click's
    click.echo(cls(cli, {}, "mq-cli", "_MQ_CLI_COMPLETE").source())


cli.add_command(gen_certs)
cli.add_command(token_group)
cli.add_command(stats_command)
cli.add_command(top_command)
cli.add_command(context_group)
for _cmd in (
    get_command,
    peek_command,
    queue_command,
    move_command,
    subscribe_command,
    request_command,
):
    cli.add_command(_cmd)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="mq-cli")


if __name__ == "__main__":
    main()
