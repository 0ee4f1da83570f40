"""Operations against a real broker process: JSON log lines, mq-cli stats / top, and the
Prometheus scrape of GET /metrics on the HTTP listener."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable

import pytest

from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect, take, wait_until

pytestmark = pytest.mark.timeout(90)

CLI = [sys.executable, "-m", "conveyor.cli.main"]


def cli(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("CONVEYOR_URL", None)
    return subprocess.run(
        [*CLI, *args, "--url", broker.url],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


async def _traffic(broker: BrokerProcess, queue: str, n: int, consume: int) -> None:
    async with await connect(broker.url) as conn:
        await conn.declare_queue(queue, durable=False)
        await conn.publish_batch([b"m"] * n, routing_key=queue)
        if consume:
            consumer = await conn.consume(queue, prefetch=consume)
            for m in await take(consumer, consume):
                m.ack()
            await consumer.cancel()


async def test_json_logs_have_connection_open_and_close(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    b = broker_factory("--log-format", "json")
    await _traffic(b, "jq", 3, 0)
    lines: list[dict[str, object]] = []

    def closed_logged() -> bool:
        lines[:] = [json.loads(ln) for ln in b.log_text().splitlines() if ln.strip()]
        return any(ln.get("event") == "connection.close" for ln in lines)

    await wait_until(closed_logged, WAIT)
    b.stop()
    lines = [json.loads(ln) for ln in b.log_text().splitlines() if ln.strip()]  # all JSON
    for ln in lines:
        assert {"ts", "level", "logger", "msg"} <= ln.keys(), ln
    opened = [ln for ln in lines if ln.get("event") == "connection.open"]
    closed = [ln for ln in lines if ln.get("event") == "connection.close"]
    assert opened and closed
    assert opened[0]["level"] == "INFO" and opened[0]["logger"] == "conveyor.server"
    assert opened[0]["peer"] and opened[0]["id"] == closed[0]["id"]
    assert opened[0]["subject"]
    assert isinstance(closed[0]["duration"], float) and closed[0]["reason"]
    assert any(ln.get("event") == "queue.declared" and ln.get("queue") == "jq" for ln in lines)


async def test_stats_table_and_json(broker: BrokerProcess) -> None:
    await _traffic(broker, "st-q", 5, 2)
    r = await asyncio.to_thread(cli, broker, "stats", "--interval", "0.2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("connections ") and "queues 1" in lines[0]
    assert "publish" in lines[1] and "deliver" in lines[1]
    header = next(i for i, ln in enumerate(lines) if ln.startswith("QUEUE"))
    row = lines[header + 1].split()
    assert row[:4] == ["st-q", "3", "0", "0"]  # ready, unacked, consumers
    r = await asyncio.to_thread(cli, broker, "stats", "--interval", "0", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (q,) = [q for q in doc["queues"] if q["name"] == "st-q"]
    assert (q["messages"], q["published"], q["delivered"], q["acked"]) == (3, 5, 2, 2)
    assert q["publish_rate"] == 0.0


async def test_stats_rates_from_two_samples(broker: BrokerProcess) -> None:
    async with await connect(broker.url) as conn:
        await conn.declare_queue("rate-q", durable=False)
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [*CLI, "stats", "--interval", "1", "--json", "--url", broker.url],
            stdout=subprocess.PIPE,
            text=True,
        )
        # 100 messages/s until the command is done (however long it takes to start)
        while proc.poll() is None:
            await conn.publish_batch([b"r"] * 10, routing_key="rate-q")
            await asyncio.sleep(0.1)
        out, _ = await asyncio.to_thread(proc.communicate, None, 30)
    assert proc.returncode == 0
    (q,) = [q for q in json.loads(out)["queues"] if q["name"] == "rate-q"]
    assert 20 < q["publish_rate"] < 500, q


async def test_top_redraws_n_times(broker: BrokerProcess) -> None:
    await _traffic(broker, "top-q", 4, 0)
    r = await asyncio.to_thread(cli, broker, "top", "--iterations", "3", "--interval", "0.2")
    assert r.returncode == 0, r.stderr
    frames = [ln for ln in r.stdout.splitlines() if ln.startswith("conveyor mq://")]
    assert len(frames) == 3
    assert r.stdout.count("top-q") == 3
    assert r.stdout.count("(rates need two samples)") == 1  # the first frame only


def _has_http_listener() -> bool:
    from conveyor.cli.main import server

    return any(p.name == "http_port" for p in server.params) and hasattr(
        BrokerProcess(__import__("pathlib").Path("/nonexistent")), "http_port"
    )


@pytest.mark.skipif(
    not _has_http_listener(),
    reason="the HTTP listener (--http-port) that serves GET /metrics is not in this tree yet",
)
async def test_metrics_scrape_over_http(broker_factory: Callable[..., BrokerProcess]) -> None:
    b = broker_factory("--http-port", "0")
    assert b.http_port
    await _traffic(b, "scrape-q", 4, 2)

    def get() -> tuple[str, str]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{b.http_port}/metrics", timeout=WAIT
        ) as resp:
            return resp.read().decode(), resp.headers.get("Content-Type", "")

    body, ctype = await asyncio.to_thread(get)
    if "conveyor_delivery_latency_seconds" not in body:
        pytest.skip("GET /metrics is not wired to broker.metrics.render_metrics yet")
    assert ctype.startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
    }
    assert samples[("conveyor_queue_messages_ready", (("queue", "scrape-q"),))] == 2
    assert samples[("conveyor_queue_published_total", (("queue", "scrape-q"),))] == 4
    assert samples[("conveyor_queue_acked_total", (("queue", "scrape-q"),))] == 2
    assert samples[("conveyor_delivery_latency_seconds_count", ())] >= 2
    assert samples[("conveyor_wal_fsync_duration_seconds_count", ())] >= 0
    assert any(name == "process_resident_memory_bytes" for name, _ in samples)
