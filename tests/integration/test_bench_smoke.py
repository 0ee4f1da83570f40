"""Smoke tests for bench/throughput.py: every scenario runs end to end on a tiny load.

Each test runs the bench as a subprocess (it starts and stops its own broker) and checks
the exit status and the sanity of its JSON. Nothing here asserts a speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "throughput.py"

pytestmark = pytest.mark.timeout(90)

# scenario -> extra flags (small loads keep the whole module well under a minute)
SCENARIOS: dict[str, list[str]] = {
    "transient": ["--messages", "1000"],
    "durable": ["--messages", "1000"],
    "fanout": ["--messages", "1000"],
    "competing": ["--messages", "1000"],
    "latency": ["--messages", "300"],
    "publishers": ["--messages", "256", "--publishers", "1,4,16"],
    "many-queues": ["--messages", "2000", "--queues", "200"],
    "large": ["--messages", "200"],
}
COPIES = {"fanout": 4}


def run_bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def check_result(res: dict[str, Any], scenario: str, messages: int) -> None:
    assert res["scenario"] == scenario
    assert res["backend"] == "conveyor"
    assert res["messages"] == messages
    assert res["deliveries"] == messages * COPIES.get(scenario, 1)
    assert res["size"] >= 16
    assert res["publish_rate"] > 0
    assert res["e2e_rate"] > 0
    lat = res["latency_ms"]
    assert 0 <= lat["p50"] <= lat["p99"] <= lat["max"]
    assert res["broker_cpu_s"] is not None and res["broker_cpu_s"] >= 0
    assert res["broker_rss_mb"] is not None and res["broker_rss_mb"] > 0
    assert res["client_cpu_s"] >= 0
    assert res["duplicates"] == 0
    settings = res["settings"]
    for key in ("batch", "prefetch", "runs", "processes", "python", "uvloop"):
        assert key in settings, key
    assert len(res["runs"]) == settings["runs"]
    assert all(r["messages"] == messages for r in res["runs"])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario(scenario: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    extra = SCENARIOS[scenario]
    p = run_bench(
        "--scenario", scenario, "--runs", "1", "--json", str(out), "--time-limit", "40", *extra
    )
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    check_result(res, scenario, int(extra[1]))
    if scenario == "publishers":
        assert [lv["publishers"] for lv in res["levels"]] == [1, 4, 16]
        for lv in res["levels"]:
            assert lv["messages"] == 256 and lv["publish_rate"] > 0
    if scenario == "latency":
        assert res["settings"]["batch"] == 1 and res["settings"]["window"] == 1
    assert "end-to-end" in p.stdout


@pytest.mark.parametrize("scenario", ["transient", "fanout", "latency"])
def test_consumer_process_and_batches(scenario: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    p = run_bench(
        "--scenario",
        scenario,
        "--messages",
        "500",
        "--runs",
        "2",
        "--batch",
        "50",
        "--processes",
        "--json",
        str(out),
        "--time-limit",
        "40",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    check_result(res, scenario, 500)
    assert res["settings"]["processes"] is True
    assert len(res["runs"]) == 2
    assert res["median_run"] in (1, 2)


def test_unreachable_broker_fails_cleanly(tmp_path: Path) -> None:
    p = run_bench(
        "--scenario",
        "transient",
        "--messages",
        "10",
        "--runs",
        "1",
        "--url",
        "mq://127.0.0.1:1",
        "--timeout",
        "5",
        timeout=30,
    )
    assert p.returncode == 1
    assert "FAILED" in p.stderr and "Traceback" not in p.stderr


def test_time_limit_fails_with_counts() -> None:
    p = run_bench(
        "--scenario",
        "transient",
        "--messages",
        "5000000",
        "--runs",
        "1",
        "--time-limit",
        "3",
        timeout=60,
    )
    assert p.returncode == 1
    assert "time limit of 3 s reached" in p.stderr and "missing" in p.stderr, p.stderr


def test_compare_without_aio_pika_exits_2(tmp_path: Path) -> None:
    # A module that fails to import stands in for a missing aio-pika.
    (tmp_path / "aio_pika.py").write_text("raise ImportError('hidden for this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    p = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--scenario",
            "transient",
            "--compare",
            "rabbitmq",
            "--amqp-url",
            "amqp://guest:guest@127.0.0.1:1/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=REPO,
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install aio-pika" in lines[0]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_the_broker(sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(BENCH),
            "--scenario",
            "transient",
            "--messages",
            "50000000",
            "--runs",
            "1",
            "--window",
            "100",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "bench: broker pid N on URL ..."
        assert line.startswith("bench: broker pid"), line
        broker_pid = int(line.split()[3])
        time.sleep(1.0)  # let it publish for a moment
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode in (130, 143), err
        deadline = time.monotonic() + 10
        while _alive(broker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(broker_pid), "the bench left its broker running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
