"""conveyor.broker.metrics over a broker driven by direct calls (no sockets), the plain counters
behind it, the monitoring files' metric names, slow-consumer log lines and JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.broker.core import Broker
from conveyor.broker.counters import LATENCY_BOUNDS_MS, LatencyHistogram
from conveyor.broker.flow import Watermarks
from conveyor.broker.logfmt import JsonFormatter
from conveyor.broker.message import Message, QueuedMessage
from conveyor.broker.metrics import render_metrics
from conveyor.broker.pager import Pager
from conveyor.broker.slow import SlowConsumers
from conveyor.broker.wal import WalStore
from conveyor.protocol import Ack, Credit, Nack, Publish, QueueDeclare
from tests.unit.test_broker_model import Conn

T0 = 1_700_000_000_000
ROOT = Path(__file__).resolve().parents[2]


def _broker(**kw: Any) -> tuple[Broker, list[int]]:
    now = [T0]
    b = Broker(**kw)
    b.clock = lambda: now[0]
    return b, now


def scrape(broker: Broker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    body, ctype = render_metrics(broker)
    assert ctype.startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def q(name: str) -> tuple[tuple[str, str], ...]:
    return (("queue", name),)


def test_counters_gauges_latency_and_errors() -> None:
    b, now = _broker()
    c = Conn(b)
    c.declare_queue("work")
    c.declare_queue("idle")
    c.publish_to_queue("work", [b"a", b"b", b"c"])
    c.publish_to_queue("idle", [b"x"])
    now[0] = T0 + 40  # published at T0 + 1: delivered 39 ms later
    _tag, frames = c.consume("work", credit=2)
    assert len(frames) == 1  # one DELIVER_BATCH of two
    c.send(Ack(1, False))
    c.send(Nack(2, False, True))  # requeued (the consumer has no credit left for it)
    now[0] = T0 + 5001
    m = scrape(b)
    assert m[("conveyor_queue_published_total", q("work"))] == 3
    assert m[("conveyor_queue_delivered_total", q("work"))] == 2
    assert m[("conveyor_queue_acked_total", q("work"))] == 1
    assert m[("conveyor_queue_redelivered_total", q("work"))] == 1
    assert m[("conveyor_queue_messages_ready", q("work"))] == 2
    assert m[("conveyor_queue_messages_unacked", q("work"))] == 0
    assert m[("conveyor_queue_consumers", q("work"))] == 1
    assert m[("conveyor_messages_published_total", ())] == 4
    assert m[("conveyor_messages_enqueued_total", ())] == 4
    assert m[("conveyor_connections", ())] == 1
    assert m[("conveyor_consumers", ())] == 1
    assert m[("conveyor_queues", ())] == 2
    # consumer lag: the oldest ready message's age (idle: published at T0 + 1)
    assert m[("conveyor_queue_consumer_lag_seconds", q("idle"))] == 5.0
    # latency: two deliveries 39 ms after their publish
    assert m[("conveyor_delivery_latency_seconds_count", ())] == 2
    assert m[("conveyor_delivery_latency_seconds_bucket", (("le", "0.025"),))] == 0
    assert m[("conveyor_delivery_latency_seconds_bucket", (("le", "0.05"),))] == 2
    assert m[("conveyor_delivery_latency_seconds_sum", ())] == pytest.approx(0.078)

    # errors by code: a bad queue argument (ERROR 400), an unknown exchange (nack 404)
    c.send(QueueDeclare(9, "bad", True, False, False, False, {"no_such_arg": 1}))
    c.send(Publish(1, "missing", "k", {}, b"x", False))
    m = scrape(b)
    errs = {(lbl, v) for (name, lbl), v in m.items() if name == "conveyor_errors_total"}
    assert ((("code", "400"), ("kind", "error"), ("name", "invalid-argument")), 1) in errs
    assert ((("code", "404"), ("kind", "nack"), ("name", "not-found")), 1) in errs
    assert m[("conveyor_messages_published_total", ())] == 5


def test_totals_survive_deleting_queues_and_closing_connections() -> None:
    b, _now = _broker()
    c = Conn(b)
    c.declare_queue("gone")
    c.publish_to_queue("gone", [b"1", b"2"])
    b.delete_queue(None, "gone")
    c.session.close()
    m = scrape(b)
    assert m[("conveyor_messages_enqueued_total", ())] == 2
    assert m[("conveyor_messages_published_total", ())] == 2
    assert m[("conveyor_connections", ())] == 0
    assert m[("conveyor_connections_opened_total", ())] == 1
    assert not any(lbl == q("gone") for _n, lbl in m)


def test_latency_histogram_one_bucket_per_batch_and_spanning_batches() -> None:
    h = LatencyHistogram()

    def qm(ts: int) -> QueuedMessage:
        return QueuedMessage(1, Message("", "q", {}, b"", ts=ts))

    h.observe_batch([qm(1000), qm(1001), qm(1002)], 1003)  # 3, 2, 1 ms: same bucket? no
    assert h.count == 3 and h.sum == 6
    h.observe_batch([qm(990), qm(991)], 1000)  # 10 and 9 ms: both le 10
    assert h.counts[LATENCY_BOUNDS_MS.index(10)] == 2
    h.observe_batch([qm(2000)], 1990)  # clock behind: counted as 0
    assert h.counts[0] == 2 and h.count == 6


async def test_wal_fsync_histogram(tmp_path: Path) -> None:
    store = WalStore(tmp_path, 1, fsync="always")
    b, _now = _broker(store=store, durable=True)
    done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    store.append([("qd", "q", False, {})])
    store.commit(done.set_result)
    assert await asyncio.wait_for(done, 5) is None
    m = scrape(b)
    assert m[("conveyor_wal_fsync_duration_seconds_count", ())] >= 1
    assert m[("conveyor_wal_fsync_duration_seconds_bucket", (("le", "+Inf"),))] >= 1
    assert m[("conveyor_wal_write_failing", ())] == 0
    store.close()


def _all_metric_names(tmp_path: Path) -> set[str]:
    """Sample names of a scrape with every optional part present (log, pager,
    watermarks, a queue, an error)."""
    (tmp_path / "wal").mkdir()
    store = WalStore(tmp_path / "wal", 1, fsync="never")
    b, _now = _broker(store=store, durable=True, pager=Pager(tmp_path / "pages", 1 << 20))
    b.flow.watermarks = Watermarks(1 << 50, 1, str(tmp_path))
    b.declare_queue(None, "q")
    b.count_error(404)
    names = {name for name, _lbl in scrape(b)}
    store.close()
    return names


def test_monitoring_files_use_exported_metric_names(tmp_path: Path) -> None:
    names = _all_metric_names(tmp_path)
    alerts = (ROOT / "monitoring" / "alerts.yml").read_text()
    try:
        import yaml
    except ImportError:
        exprs = re.findall(r"^\s*expr:\s*(.+)$", alerts, re.M)
    else:
        doc = yaml.safe_load(alerts)
        exprs = [r["expr"] for g in doc["groups"] for r in g["rules"]]
        assert all(
            r.get("alert") and r.get("annotations") for g in doc["groups"] for r in g["rules"]
        )
    assert len(exprs) >= 5
    dash = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    assert dash["panels"] and dash["title"]
    targets = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    targets += [
        v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)
    ]
    used: set[str] = set()
    for expr in exprs + targets:
        used |= set(re.findall(r"\b(conveyor_[a-z0-9_]+)", expr))
    unknown = sorted(used - names)
    assert not unknown, f"not exported by broker.metrics: {unknown}"
    # the alert rules cover what the runbook promises
    for must in (
        "conveyor_queue_messages_ready",
        "conveyor_queue_consumer_lag_seconds",
        "conveyor_queue_consumers",
        "conveyor_resource_alarm",
        "conveyor_publishers_blocked",
        "conveyor_wal_fsync_duration_seconds_bucket",
    ):
        assert must in " ".join(exprs), must


def test_slow_consumer_logged_once_then_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    b, _now = _broker()
    c = Conn(b)
    c.declare_queue("slowq")
    t = [0.0]
    watch = SlowConsumers(b, stall_seconds=5, repeat_seconds=60, clock=lambda: t[0])
    tag, _frames = c.consume("slowq", credit=1)
    c.send(
        Publish(0, "", "slowq", {}, b"1", False),  # delivered: credit 0
        *[Publish(0, "", "slowq", {}, b"w", False)] * 2,
    )  # wait
    caplog.set_level(logging.INFO, "conveyor.consumers")
    assert watch.check() == []
    t[0] = 6
    assert len(watch.check()) == 1
    rec = [r for r in caplog.records if getattr(r, "event", "") == "consumer.slow"]
    assert len(rec) == 1 and rec[0].queue == "slowq"  # type: ignore[attr-defined]
    t[0] = 7
    assert len(watch.check()) == 1
    assert len([r for r in caplog.records if getattr(r, "event", "") == "consumer.slow"]) == 1
    # settling and granting credit brings the next delivery: the stall clock restarts
    out = c.send(Ack(1, False), Credit(tag, 1))
    assert len(out) == 1 and b.queues["slowq"].ready == 1
    t[0] = 8
    assert watch.check() == []


def test_json_formatter_fields() -> None:
    rec = logging.LogRecord(
        "conveyor.server", logging.INFO, __file__, 1, "connection %s open", ("c-1",), None
    )
    rec.event = "connection.open"
    rec.peer = "127.0.0.1:1"
    line = json.loads(JsonFormatter().format(rec))
    assert line["msg"] == "connection c-1 open"
    assert (line["level"], line["logger"], line["event"], line["peer"]) == (
        "INFO",
        "conveyor.server",
        "connection.open",
        "127.0.0.1:1",
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
