"""Prometheus metrics, built from the broker's own counters when ``/metrics`` is scraped.

Nothing on a message path touches ``prometheus_client`` (its metric objects take a lock
per update): queues, sessions, the write-ahead log and the broker keep plain ints
(``Queue.published`` ..., ``Broker.errors``, ``Broker.latency``, ``WalStore.fsync_hist``)
that the hot paths bump once per batch, and :class:`BrokerCollector` turns them into
metric families at scrape time, on a dedicated ``CollectorRegistry`` per broker (plus the
standard ``process_*`` metrics). The HTTP listener's ``GET /metrics`` calls
:func:`render_metrics`.

Metric names (labels in braces):

Broker-wide counters (they never go down: a deleted queue's counts are kept)
  conveyor_messages_published_total        publishes received (refused ones included)
  conveyor_messages_enqueued_total         messages put on queues (one per queue routed to)
  conveyor_messages_delivered_total        deliveries (redeliveries included)
  conveyor_messages_acked_total            acknowledged (or delivered no-ack)
  conveyor_messages_redelivered_total      requeued to be delivered again (nack/reject
                                           with requeue, ack timeout, connection lost)
  conveyor_messages_dead_lettered_total    republished to a dead-letter exchange
  conveyor_messages_expired_total          removed by TTL
  conveyor_messages_dead_letter_dropped_total  dropped instead of dead-lettered (an
                                           automatic dead-letter cycle, or a failure)
  conveyor_errors_total{code,name,kind}    ERROR frames (kind="error") and publish nacks
                                           (kind="nack") sent, by the spec's error code
  conveyor_connections_opened_total        connections that completed the handshake
Per queue ({queue})
  conveyor_queue_published_total / _delivered_total / _acked_total / _redelivered_total /
  _dead_lettered_total / _expired_total / _dead_letter_dropped_total
  conveyor_queue_messages_ready            depth: ready to deliver
  conveyor_queue_messages_unacked          delivered, not yet acknowledged
  conveyor_queue_messages_delayed          waiting for their delay
  conveyor_queue_messages_paged            ready, bodies paged out to disk
  conveyor_queue_ready_bytes               bytes of ready bodies (+ headers)
  conveyor_queue_consumers                 subscribed consumers
  conveyor_queue_consumer_lag_seconds      consumer lag: age of the oldest ready message
                                           (now - its publish time); 0 = nothing waits
  conveyor_stream_group_lag{queue,group}   stream consumer groups: head offset - committed
Gauges
  conveyor_queues, conveyor_consumers, conveyor_connections (open, past the handshake),
  conveyor_publishers_blocked{reason}      connections whose publish credit is withheld
                                           (memory, disk, queue-full, rate)
  conveyor_resource_alarm{resource}        1 while the memory / disk watermark blocks
                                           publishers
  conveyor_memory_resident_bytes, conveyor_memory_high_watermark_bytes,
  conveyor_disk_free_bytes, conveyor_disk_free_limit_bytes (when the watermarks are on)
  conveyor_pager_resident_bytes, conveyor_pager_budget_bytes (ready bodies in memory)
  conveyor_wal_write_failing               1 while writes to the log fail
  conveyor_start_time_seconds, conveyor_build_info{version}
Histograms
  conveyor_delivery_latency_seconds        publish -> delivery (end-to-end in the broker;
                                           a redelivery counts from the first publish, a
                                           delayed message includes its delay)
  conveyor_wal_fsync_duration_seconds      one fdatasync of the log (a group commit)
Counters of the log
  conveyor_wal_records_written_total
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from conveyor.broker.core import RETIRED_COUNTERS
from conveyor.broker.counters import Buckets
from conveyor.broker.queue import QueueStatistics
from conveyor.protocol.errors import error_for_code

if TYPE_CHECKING:
    from conveyor.broker.core import Broker
    from conveyor.broker.server import BrokerServer

VERSION = "0.1.0"

# (QueueStatistics field, per-queue metric, broker-wide metric, help)
_COUNTERS = (
    (
        "published",
        "conveyor_queue_published",
        "conveyor_messages_enqueued",
        "Messages put on the queue (one per queue a publish was routed to).",
    ),
    (
        "delivered",
        "conveyor_queue_delivered",
        "conveyor_messages_delivered",
        "Messages delivered to consumers or GET (redeliveries included).",
    ),
    (
        "acked",
        "conveyor_queue_acked",
        "conveyor_messages_acked",
        "Deliveries acknowledged (or delivered no-ack).",
    ),
    (
        "redelivered",
        "conveyor_queue_redelivered",
        "conveyor_messages_redelivered",
        "Messages requeued to be delivered again (nack/reject with requeue, ack timeout, "
        "lost connection).",
    ),
    (
        "dead_lettered",
        "conveyor_queue_dead_lettered",
        "conveyor_messages_dead_lettered",
        "Messages republished to the queue's dead-letter exchange.",
    ),
    ("expired", "conveyor_queue_expired", "conveyor_messages_expired", "Messages removed by TTL."),
    (
        "dead_letter_dropped",
        "conveyor_queue_dead_letter_dropped",
        "conveyor_messages_dead_letter_dropped",
        "Messages dropped instead of dead-lettered: an automatic dead-letter cycle (the "
        "cycle guard) or a message that could not be dead-lettered.",
    ),
)
assert {c[0] for c in _COUNTERS} == set(RETIRED_COUNTERS)

_GAUGES = (
    ("ready", "conveyor_queue_messages_ready", "Messages ready for delivery (queue depth)."),
    ("unacked", "conveyor_queue_messages_unacked", "Delivered messages not yet acknowledged."),
    ("delayed", "conveyor_queue_messages_delayed", "Messages waiting for their delay."),
    ("paged", "conveyor_queue_messages_paged", "Ready messages whose bodies are paged out."),
    ("ready_bytes", "conveyor_queue_ready_bytes", "Bytes of ready message bodies and headers."),
)

# Every per-queue value is read from Queue.statistics(), never from the queue itself.
assert {c[0] for c in (*_COUNTERS, *_GAUGES)} <= set(QueueStatistics.__dataclass_fields__)

BLOCK_REASONS = ("memory", "disk", "queue-full", "rate")


def _histogram(name: str, doc: str, hist: Buckets, scale: float = 1.0) -> Metric:
    cum = hist.cumulative()
    buckets: list[tuple[str, float]] = [
        (_le(b * scale), float(c)) for b, c in zip(hist.bounds, cum, strict=False)
    ]
    buckets.append(("+Inf", float(cum[-1])))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=hist.sum * scale)


def _le(v: float) -> str:
    return repr(float(v))


class BrokerCollector(Collector):
    """Yields the broker's metric families from its current state (scrape time only)."""

    def __init__(self, broker: Broker, server: BrokerServer | None = None) -> None:
        self.broker = broker
        self.server = server

    def collect(self) -> Iterator[Metric]:
        b = self.broker
        now_ms = b.clock()
        queues = [q.statistics() for q in sorted(b.queues.values(), key=lambda q: q.name)]
        # (QueueStatistics snapshots: what every per-queue metric reads)
        sessions = list(b.sessions.values())

        info = GaugeMetricFamily("conveyor_build_info", "Broker version.", labels=["version"])
        info.add_metric([VERSION], 1)
        yield info
        yield GaugeMetricFamily(
            "conveyor_start_time_seconds", "When the broker started (Unix time).", value=b.started
        )

        # ---- per-queue counters and broker-wide totals
        for attr, qname, total_name, doc in _COUNTERS:
            fam = CounterMetricFamily(qname, doc, labels=["queue"])
            total = b.retired[attr]
            for st in queues:
                v = getattr(st, attr)
                total += v
                fam.add_metric([st.name], v)
            yield fam
            yield CounterMetricFamily(
                total_name, doc + " All queues, deleted ones included.", value=total
            )
        published = b.retired_published + sum([s.published for s in sessions])
        yield CounterMetricFamily(
            "conveyor_messages_published",
            "Publishes received from clients (refused ones included).",
            value=published,
        )

        # ---- per-queue gauges
        for attr, name, doc in _GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["queue"])
            for st in queues:
                gauge.add_metric([st.name], getattr(st, attr))
            yield gauge
        cons = GaugeMetricFamily(
            "conveyor_queue_consumers", "Consumers subscribed.", labels=["queue"]
        )
        lag = GaugeMetricFamily(
            "conveyor_queue_consumer_lag_seconds",
            "Consumer lag: age of the oldest ready message (0 when none is ready).",
            labels=["queue"],
        )
        consumers = 0
        for st in queues:
            n = st.consumers
            consumers += n
            cons.add_metric([st.name], n)
            head = st.head_ts
            lag.add_metric([st.name], max(0.0, (now_ms - head) / 1000) if head else 0.0)
        yield cons
        yield lag
        stream_lag = GaugeMetricFamily(
            "conveyor_stream_group_lag",
            "Stream consumer groups: messages after the group's committed offset.",
            labels=["queue", "group"],
        )
        for st in queues:
            if st.stream is not None:
                for gname, g in st.stream["groups"].items():
                    stream_lag.add_metric([st.name, gname], g["lag"])
        yield stream_lag
        yield GaugeMetricFamily("conveyor_queues", "Queues.", value=len(queues))
        yield GaugeMetricFamily("conveyor_consumers", "Consumers on all queues.", value=consumers)

        # ---- connections and publisher flow control
        yield GaugeMetricFamily(
            "conveyor_connections",
            "Open client connections (past the handshake).",
            value=len(sessions),
        )
        yield CounterMetricFamily(
            "conveyor_connections_opened",
            "Connections that completed the handshake.",
            value=b.connections_opened,
        )
        if self.server is not None:
            yield GaugeMetricFamily(
                "conveyor_tcp_connections",
                "TCP connections, including ones still in the handshake.",
                value=len(self.server.protocols),
            )
        blocked = dict.fromkeys(BLOCK_REASONS, 0)
        for s in sessions:
            why = s.flow.blocked
            if why:
                blocked[why] = blocked.get(why, 0) + 1
        blocked_fam = GaugeMetricFamily(
            "conveyor_publishers_blocked",
            "Connections whose publish credit is withheld, by reason.",
            labels=["reason"],
        )
        for why, n in blocked.items():
            blocked_fam.add_metric([why], n)
        yield blocked_fam
        yield from self._resources()

        # ---- errors
        errs = CounterMetricFamily(
            "conveyor_errors",
            "ERROR frames (kind=error) and publish nacks (kind=nack) sent, by error code.",
            labels=["code", "name", "kind"],
        )
        for kind, counts in (("error", b.errors), ("nack", b.nacks)):
            for code, n in sorted(counts.items()):
                errs.add_metric([str(code), _error_name(code), kind], n)
        yield errs

        # ---- latency and the log
        yield _histogram(
            "conveyor_delivery_latency_seconds",
            "Publish to delivery latency inside the broker.",
            b.latency,
            0.001,
        )
        store: Any = b.store
        hist = getattr(store, "fsync_hist", None)
        if isinstance(hist, Buckets):
            yield _histogram(
                "conveyor_wal_fsync_duration_seconds",
                "Duration of one fdatasync of the write-ahead log (group commit).",
                hist,
            )
            yield CounterMetricFamily(
                "conveyor_wal_records_written",
                "Record batches written to the write-ahead log.",
                value=store.records_written,
            )
            yield GaugeMetricFamily(
                "conveyor_wal_write_failing",
                "1 while writes to the write-ahead log fail.",
                value=0 if store.failed is None else 1,
            )

    def _resources(self) -> Iterator[Metric]:
        b = self.broker
        wm = b.flow.watermarks
        alarm = GaugeMetricFamily(
            "conveyor_resource_alarm",
            "1 while a resource watermark blocks all publishers.",
            labels=["resource"],
        )
        reason = wm.reason(time.monotonic()) if wm is not None else ""
        for res in ("memory", "disk"):
            alarm.add_metric([res], 1 if reason == res else 0)
        yield alarm
        if wm is not None:
            if wm.memory_high_watermark:
                yield GaugeMetricFamily(
                    "conveyor_memory_resident_bytes",
                    "Resident memory at the last watermark check.",
                    value=wm.rss,
                )
                yield GaugeMetricFamily(
                    "conveyor_memory_high_watermark_bytes",
                    "Resident memory above which publishers are blocked.",
                    value=wm.memory_high_watermark,
                )
            if wm.disk_free_limit:
                if wm.free is not None:
                    yield GaugeMetricFamily(
                        "conveyor_disk_free_bytes",
                        "Free disk space of the data directory.",
                        value=wm.free,
                    )
                yield GaugeMetricFamily(
                    "conveyor_disk_free_limit_bytes",
                    "Free disk space below which publishers are blocked.",
                    value=wm.disk_free_limit,
                )
        pager = b.pager
        if pager is not None:
            yield GaugeMetricFamily(
                "conveyor_pager_resident_bytes",
                "Ready message bodies held in memory.",
                value=pager.resident,
            )
            yield GaugeMetricFamily(
                "conveyor_pager_budget_bytes",
                "Memory budget for ready bodies (the rest is paged).",
                value=pager.budget,
            )


_NAMES: dict[int, str] = {}


def _error_name(code: int) -> str:
    name = _NAMES.get(code)
    if name is None:
        name = _NAMES[code] = error_for_code(code).name
    return name


_REGISTRIES: weakref.WeakKeyDictionary[Broker, tuple[CollectorRegistry, BrokerCollector]] = (
    weakref.WeakKeyDictionary()
)


def registry_for(
    broker: Broker, server: BrokerServer | None = None, *, process: bool = True
) -> CollectorRegistry:
    """The broker's dedicated registry (created once per broker): its collector and, with
    ``process``, the standard process_* metrics (CPU, memory, open files)."""
    got = _REGISTRIES.get(broker)
    if got is None:
        registry = CollectorRegistry(auto_describe=False)
        collector = BrokerCollector(broker, server)
        registry.register(collector)
        if process:
            ProcessCollector(registry=registry)
        _REGISTRIES[broker] = got = (registry, collector)
    if server is not None:
        got[1].server = server
    return got[0]


def render_metrics(
    broker: Broker, server: BrokerServer | None = None, accept: str | None = None
) -> tuple[bytes, str]:
    """The ``/metrics`` response: (body, Content-Type). ``accept`` is the request's Accept
    header: OpenMetrics if it asks for it, else the Prometheus text format."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry_for(broker, server)), content_type


def metrics_text(broker: Broker, server: BrokerServer | None = None) -> str:
    """The Prometheus text format as a str (for callers that only want the body)."""
    return render_metrics(broker, server)[0].decode()
