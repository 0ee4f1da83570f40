"""``mq-cli stats`` (one table) and ``mq-cli top`` (the same, redrawn every second).

Both read the broker over the binary protocol (LIST queues and LIST connections through
the client library), so they work without the HTTP listener. Rates come from the queues'
counters (published / delivered / acked) in two samples ``--interval`` seconds apart.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from conveyor.cli.security import client_options
from conveyor.protocol import DEFAULT_PORT

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen

_url_flag = click.option(
    "--url",
    envvar="CONVEYOR_URL",
    default=f"mq://127.0.0.1:{DEFAULT_PORT}",
    show_default=True,
    help="Broker URL: mq://[TOKEN@]host:port, or mqs:// for TLS (env CONVEYOR_URL).",
)


def _url_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return client_options(_url_flag(f))


@dataclass
class Sample:
    at: float
    queues: list[dict[str, Any]]
    connections: list[dict[str, Any]] = field(default_factory=list)


async def sample(conn: Any) -> Sample:
    queues = await conn.list("queues")
    connections = await conn.list("connections")
    return Sample(time.monotonic(), queues, connections)


def _rates(prev: Sample | None, cur: Sample) -> dict[str, tuple[float, float, float]]:
    """Per queue: (publish/s, deliver/s, ack/s) between two samples (0 without one)."""
    out: dict[str, tuple[float, float, float]] = {}
    before = {q["name"]: q for q in prev.queues} if prev is not None else {}
    dt = cur.at - prev.at if prev is not None else 0.0
    for q in cur.queues:
        p = before.get(q["name"])
        if p is None or dt <= 0:
            out[q["name"]] = (0.0, 0.0, 0.0)
            continue
        pub, dlv, ack = (
            max(0.0, (q.get(k, 0) - p.get(k, 0)) / dt) for k in ("published", "delivered", "acked")
        )
        out[q["name"]] = (pub, dlv, ack)
    return out


def _fmt_rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 10 or v == 0 else f"{v:.1f}"


def render(prev: Sample | None, cur: Sample, *, limit: int = 0) -> str:
    """The overview line(s) and the queue table as text."""
    rates = _rates(prev, cur)
    conns = cur.connections
    blocked = [c for c in conns if c.get("blocked")]
    ready = sum(q.get("messages", 0) for q in cur.queues)
    unacked = sum(q.get("unacked", 0) for q in cur.queues)
    consumers = sum(q.get("consumers", 0) for q in cur.queues)
    pub = sum(r[0] for r in rates.values())
    dlv = sum(r[1] for r in rates.values())
    ack = sum(r[2] for r in rates.values())
    lines = [
        f"connections {len(conns)} (blocked {len(blocked)})   queues {len(cur.queues)}   "
        f"consumers {consumers}   ready {ready}   unacked {unacked}",
        f"publish {_fmt_rate(pub)}/s   deliver {_fmt_rate(dlv)}/s   ack {_fmt_rate(ack)}/s"
        + ("" if prev is not None else "   (rates need two samples)"),
        "",
    ]
    cols = ["QUEUE", "READY", "UNACKED", "CONSUMERS", "PUBLISH/S", "DELIVER/S", "ACK/S"]
    queues = sorted(cur.queues, key=lambda q: (-q.get("messages", 0), q["name"]))
    if limit:
        queues = queues[:limit]
    rows = [
        [
            q["name"],
            str(q.get("messages", 0)),
            str(q.get("unacked", 0)),
            str(q.get("consumers", 0)),
            *(_fmt_rate(r) for r in rates[q["name"]]),
        ]
        for q in queues
    ]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]

    def line(vals: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(vals, widths, strict=True))
        )

    lines.append(line(cols))
    lines.extend(line(r) for r in rows)
    if blocked:
        lines.append("")
        lines.append(
            "blocked publishers: "
            + ", ".join(f"{c.get('id')} ({c.get('blocked')})" for c in blocked[:10])
            + (f" and {len(blocked) - 10} more" if len(blocked) > 10 else "")
        )
    return "\n".join(lines)


def _as_json(prev: Sample | None, cur: Sample) -> dict[str, Any]:
    rates = _rates(prev, cur)
    return {
        "connections": cur.connections,
        "queues": [
            dict(
                q,
                publish_rate=rates[q["name"]][0],
                deliver_rate=rates[q["name"]][1],
                ack_rate=rates[q["name"]][2],
            )
            for q in cur.queues
        ],
    }


@click.command("stats")
@click.option(
    "--interval",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="Seconds between the two samples rates come from; 0 = no rates.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object (queues, connections, rates) instead of the table.",
)
@_url_option
def stats(interval: float, as_json: bool, url: str) -> None:
    """Overview and per-queue ready, unacked, consumers and publish/deliver/ack rates."""
    from conveyor.cli.main import _connect, _run

    async def go() -> tuple[Sample | None, Sample]:
        async with await _connect(url) as conn:
            first = await sample(conn)
            if not interval:
                return None, first
            await asyncio.sleep(interval)
            return first, await sample(conn)

    prev, cur = _run(go)
    if as_json:
        click.echo(json.dumps(_as_json(prev, cur), indent=1))
        return
    click.echo(render(prev, cur))


@click.command("top")
@click.option(
    "--interval",
    type=click.FloatRange(0.1),
    default=1.0,
    show_default=True,
    help="Seconds between redraws.",
)
@click.option(
    "--iterations",
    "-n",
    type=click.IntRange(1),
    default=None,
    help="Stop after N redraws [run until Ctrl-C].",
)
@click.option(
    "--limit",
    type=click.IntRange(0),
    default=0,
    help="Show at most this many queues (deepest first); 0 = all.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Each frame as one JSON line (as `stats --json`, on one line).",
)
@_url_option
def top(interval: float, iterations: int | None, limit: int, as_json: bool, url: str) -> None:
    """Live view of the broker: the `stats` table redrawn every --interval seconds
    (Ctrl-C to quit)."""
    from conveyor.cli.main import _connect, _run

    clear = sys.stdout.isatty()

    async def go() -> None:
        async with await _connect(url) as conn:
            prev: Sample | None = None
            n = 0
            while iterations is None or n < iterations:
                if prev is not None:
                    await asyncio.sleep(max(0.0, prev.at + interval - time.monotonic()))
                cur = await sample(conn)
                if as_json:
                    click.echo(json.dumps(_as_json(prev, cur)))
                    prev = cur
                    n += 1
                    continue
                text = render(prev, cur, limit=limit)
                stamp = time.strftime("%H:%M:%S")
                # ANSI clear on a terminal; a blank line between frames when piped.
                click.echo((CLEAR if clear else "\n") + f"conveyor {url}   {stamp}\n{text}")
                prev = cur
                n += 1

    try:
        _run(go)
    except SystemExit as exc:
        if exc.code != 130:  # _run's exit status for Ctrl-C: quitting top is no failure
            raise
