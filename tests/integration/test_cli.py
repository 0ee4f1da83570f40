"""mq-cli end to end: subprocesses against a real broker process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import client
from tests.broker_process import LISTEN_RE, BrokerProcess
from tests.integration.helpers import WAIT, connect, take, wait_until

pytestmark = pytest.mark.timeout(90)

CLI = [sys.executable, "-m", "conveyor.cli.main"]
MQ_CLI = str(Path(sys.executable).parent / "mq-cli")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("CONVEYOR_URL", None)
    env["CONVEYOR_CONFIG"] = "/nonexistent/contexts.toml"  # no context redirects a command
    return env


def run(
    broker: BrokerProcess | None, *args: str, stdin: bytes | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    url = ["--url", broker.url] if broker is not None else []
    return subprocess.run(
        [*CLI, *args, *url],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env=_env(),
        check=False,
    )


async def arun(
    broker: BrokerProcess, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``run`` without blocking the event loop (for tests that hold a connection open)."""
    return await asyncio.to_thread(run, broker, *args, stdin=stdin)


def ok(p: subprocess.CompletedProcess[bytes]) -> str:
    assert p.returncode == 0, (p.returncode, p.stderr.decode())
    assert p.stderr == b""
    return p.stdout.decode()


def one_error_line(p: subprocess.CompletedProcess[bytes]) -> str:
    err = p.stderr.decode()
    assert p.returncode != 0
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert p.stdout == b""
    return err


def queues_json(broker: BrokerProcess) -> dict[str, dict[str, Any]]:
    return {q["name"]: q for q in json.loads(ok(run(broker, "queues", "--json")))}


# ---------------------------------------------------------------------- messaging
def test_declare_publish_stdin_and_consume_in_order(broker: BrokerProcess) -> None:
    assert ok(run(broker, "declare-queue", "lines")) == "lines\tmessages=0\tconsumers=0\n"
    lines = [f"line {i} {'x' * (i % 37)}" for i in range(10_000)]
    data = ("\n".join(lines) + "\n").encode()
    assert (
        ok(run(broker, "publish", "-k", "lines", stdin=data))
        == "published 10000 messages to exchange '' with key 'lines' (all confirmed)\n"
    )
    assert queues_json(broker)["lines"]["messages"] == 10_000
    assert ok(run(broker, "declare-queue", "lines")) == "lines\tmessages=10000\tconsumers=0\n"

    out = ok(run(broker, "consume", "-q", "lines", "--count", "10000"))
    assert out.splitlines() == lines
    q = queues_json(broker)["lines"]
    assert (q["messages"], q["unacked"], q["consumers"]) == (0, 0, 0)


def test_publish_body_count_and_consume(broker: BrokerProcess) -> None:
    ok(run(broker, "declare-queue", "five"))
    assert (
        ok(run(broker, "publish", "hello world", "-k", "five", "--count", "5"))
        == "published 5 messages to exchange '' with key 'five' (all confirmed)\n"
    )
    assert queues_json(broker)["five"]["messages"] == 5
    out = ok(run(broker, "consume", "-q", "five", "--count", "3"))
    assert out == "hello world\n" * 3
    out = ok(run(broker, "consume", "-q", "five", "--timeout", "1"))
    assert out == "hello world\n" * 2
    assert queues_json(broker)["five"]["messages"] == 0


def test_consume_timeout_on_empty_queue(broker: BrokerProcess) -> None:
    ok(run(broker, "declare-queue", "empty"))
    t0 = time.monotonic()
    p = run(broker, "consume", "-q", "empty", "--timeout", "1")
    assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")
    assert 0.9 <= time.monotonic() - t0 < 10


def test_consume_json_shows_properties(broker: BrokerProcess) -> None:
    ok(run(broker, "declare-queue", "props"))
    ok(
        run(
            broker,
            "publish",
            "payload",
            "-k",
            "props",
            "--content-type",
            "text/plain",
            "--message-id",
            "id-1",
            "--correlation-id",
            "corr-1",
            "--reply-to",
            "back",
            "--header",
            "a=1",
            "--header",
            "b=x=y",
            "--priority",
            "3",
            "--ttl",
            "60000",
            "--transient",
        )
    )
    ok(run(broker, "publish", "plain", "-k", "props"))
    out = ok(run(broker, "consume", "-q", "props", "--count", "2", "--json"))
    first, second = (json.loads(line) for line in out.splitlines())
    assert first == {
        "body": "payload",
        "body_encoding": "utf-8",
        "exchange": "",
        "routing_key": "props",
        "redelivered": False,
        "delivery_count": 1,
        "properties": {
            "persistent": False,
            "content_type": "text/plain",
            "message_id": "id-1",
            "correlation_id": "corr-1",
            "reply_to": "back",
            "priority": 3,
            "ttl": 60000,
            "headers": {"a": "1", "b": "x=y"},
        },
    }
    assert second["body"] == "plain"
    assert second["properties"] == {"persistent": True}


async def test_consume_json_binary_body(broker: BrokerProcess) -> None:
    conn = await connect(broker.url)
    try:
        await conn.declare_queue("bin")
        await conn.publish("", "bin", b"\xff\x00\xfe")
    finally:
        await conn.close()
    out = ok(await arun(broker, "consume", "-q", "bin", "--count", "1", "--json"))
    msg = json.loads(out)
    assert (msg["body"], msg["body_encoding"]) == ("/wD+", "base64")


def test_exchange_bind_publish_consume(broker: BrokerProcess) -> None:
    assert (
        ok(run(broker, "declare-exchange", "events", "--type", "topic"))
        == "declared exchange events (topic)\n"
    )
    ok(run(broker, "declare-queue", "ev-orders"))
    ok(run(broker, "declare-queue", "ev-all"))
    assert (
        ok(run(broker, "bind", "-e", "events", "-q", "ev-orders", "-k", "order.*"))
        == "bound queue ev-orders to exchange events with key 'order.*'\n"
    )
    ok(run(broker, "bind", "-e", "events", "-q", "ev-all", "-k", "#"))
    ok(run(broker, "publish", "o1", "-e", "events", "-k", "order.created"))
    ok(run(broker, "publish", "u1", "-e", "events", "-k", "user.created"))
    ok(run(broker, "publish", "o2", "-e", "events", "-k", "order.paid", "--mandatory"))
    assert ok(run(broker, "consume", "-q", "ev-orders", "--timeout", "0.5")) == "o1\no2\n"
    assert ok(run(broker, "consume", "-q", "ev-all", "--timeout", "0.5")) == "o1\nu1\no2\n"
    bindings = json.loads(ok(run(broker, "bindings", "--json")))
    assert sorted((b["exchange"], b["queue"], b["routing_key"]) for b in bindings) == [
        ("events", "ev-all", "#"),
        ("events", "ev-orders", "order.*"),
    ]
    assert (
        ok(run(broker, "unbind", "-e", "events", "-q", "ev-orders", "-k", "order.*"))
        == "unbound queue ev-orders from exchange events with key 'order.*'\n"
    )
    ok(run(broker, "publish", "o3", "-e", "events", "-k", "order.created"))
    assert ok(run(broker, "consume", "-q", "ev-orders", "--timeout", "0.5")) == ""
    assert ok(run(broker, "consume", "-q", "ev-all", "--timeout", "0.5")) == "o3\n"


async def test_queue_and_exchange_listings(broker: BrokerProcess) -> None:
    conn = await connect(broker.url)
    try:
        await conn.declare_exchange("fx", "fanout")
        await conn.declare_queue("busy")
        await conn.declare_queue("idle", durable=False, auto_delete=True)
        await conn.bind("fx", "busy")
        await conn.bind("fx", "idle")
        await conn.publish_batch([b"m%d" % i for i in range(5)], routing_key="busy")
        consumer = await conn.consume("busy", prefetch=2)
        held = await take(consumer, 2)

        async def settled() -> bool:
            return [c["unacked"] for c in await conn.list("consumers")] == [2]

        await wait_until(settled)

        rows = json.loads(ok(await arun(broker, "queues", "--json")))
        assert [r["name"] for r in rows] == ["busy", "idle"]
        busy, idle = rows
        assert {
            k: busy[k]
            for k in ("messages", "unacked", "consumers", "durable", "exclusive", "auto_delete")
        } == {
            "messages": 3,
            "unacked": 2,
            "consumers": 1,
            "durable": True,
            "exclusive": False,
            "auto_delete": False,
        }
        assert {
            k: idle[k] for k in ("messages", "unacked", "consumers", "durable", "auto_delete")
        } == {"messages": 0, "unacked": 0, "consumers": 0, "durable": False, "auto_delete": True}

        table = ok(await arun(broker, "queues")).splitlines()
        assert table[0].split() == [
            "NAME",
            "TYPE",
            "MESSAGES",
            "UNACKED",
            "CONSUMERS",
            "DURABLE",
            "EXCLUSIVE",
            "AUTO_DELETE",
        ]
        assert [line.split() for line in table[1:]] == [
            ["busy", "classic", "3", "2", "1", "True", "False", "False"],
            ["idle", "classic", "0", "0", "0", "False", "False", "True"],
        ]

        exchanges = {
            e["name"]: e for e in json.loads(ok(await arun(broker, "exchanges", "--json")))
        }
        assert set(exchanges) == {"amq.direct", "amq.fanout", "amq.topic", "fx"}
        assert (exchanges["fx"]["type"], exchanges["fx"]["bindings"]) == ("fanout", 2)
        assert exchanges["amq.topic"]["bindings"] == 0
        table = ok(await arun(broker, "exchanges")).splitlines()
        assert table[0].split() == ["NAME", "TYPE", "DURABLE", "AUTO_DELETE", "BINDINGS"]
        assert ["fx", "fanout", "True", "False", "2"] in [line.split() for line in table[1:]]

        for m in held:
            m.ack()
        await consumer.cancel()
        busy = {q["name"]: q for q in json.loads(ok(await arun(broker, "queues", "--json")))}[
            "busy"
        ]
        assert (busy["messages"], busy["unacked"], busy["consumers"]) == (3, 0, 0)
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


def test_purge_and_delete_queue(broker: BrokerProcess) -> None:
    ok(run(broker, "declare-queue", "trash"))
    ok(run(broker, "publish", "x", "-k", "trash", "-n", "7"))
    assert ok(run(broker, "purge", "trash")) == "purged trash: 7 messages\n"
    assert queues_json(broker)["trash"]["messages"] == 0
    ok(run(broker, "publish", "y", "-k", "trash", "-n", "2"))
    assert ok(run(broker, "delete-queue", "trash")) == "deleted trash: 2 messages\n"
    assert "trash" not in queues_json(broker)
    err = one_error_line(run(broker, "delete-queue", "trash"))
    assert "not-found (404)" in err
    ok(run(broker, "declare-exchange", "gone"))
    assert ok(run(broker, "delete-exchange", "gone")) == "deleted exchange gone\n"
    assert "gone" not in {e["name"] for e in json.loads(ok(run(broker, "exchanges", "--json")))}


# ---------------------------------------------------------------------- errors
def test_errors_are_one_line_with_exit_status(broker: BrokerProcess) -> None:
    p = run(broker, "consume", "-q", "missing", "--timeout", "1")
    assert p.returncode == 1
    err = one_error_line(p)
    assert err.startswith("mq-cli: ") and "not-found (404)" in err and "missing" in err

    p = run(broker, "publish", "x", "-e", "no-such-exchange", "-k", "k")
    assert p.returncode == 1 and "not-found (404)" in one_error_line(p)

    p = run(broker, "publish", "x", "-k", "nobody-home", "--mandatory")
    assert p.returncode == 1 and "no-route (312)" in one_error_line(p)

    p = run(broker, "declare-queue", "amq.reserved")
    assert p.returncode == 1 and "access-refused (403)" in one_error_line(p)

    ok(run(broker, "declare-queue", "settled"))
    p = run(broker, "declare-queue", "settled", "--transient")
    assert p.returncode == 1 and "precondition-failed (406)" in one_error_line(p)

    p = run(broker, "bind", "-e", "nope", "-q", "settled")
    assert p.returncode == 1 and "not-found (404)" in one_error_line(p)

    # Usage errors exit 2 (click's usage message).
    p = run(broker, "consume")
    assert p.returncode == 2 and b"Traceback" not in p.stderr
    p = run(broker, "publish", "x", "-k", "settled", "--header", "no-equals-sign")
    assert p.returncode == 2 and b"Traceback" not in p.stderr
    assert queues_json(broker)["settled"]["messages"] == 0


def test_publish_unroutable_says_published_but_not_routed(broker: BrokerProcess) -> None:
    p = run(broker, "publish", "x", "-k", "nobody-home", "--count", "3")
    assert p.returncode == 5 and p.stdout == b""
    err = one_error_line(p)
    assert err == (
        "mq-cli: published but not routed: 3 of 3 message(s) matched no queue "
        "(exchange '', routing key 'nobody-home'); 0 stored\n"
    )
    ok(run(broker, "declare-exchange", "fan", "--type", "fanout"))
    p = run(broker, "publish", "-e", "fan", stdin=b"a\nb\n")
    assert p.returncode == 5 and "2 of 2 message(s) matched no queue" in one_error_line(p)
    # Routed: exit 0, nothing said.
    ok(run(broker, "declare-queue", "fanned"))
    ok(run(broker, "bind", "-e", "fan", "-q", "fanned"))
    assert ok(run(broker, "publish", "-e", "fan", stdin=b"a\nb\n")).startswith("published 2 ")
    assert queues_json(broker)["fanned"]["messages"] == 2


def test_partly_refused_stdin_publish_says_how_many_got_in(broker: BrokerProcess) -> None:
    ok(run(broker, "declare-queue", "tiny", "--max-length", "1", "--overflow", "reject-publish"))
    p = run(broker, "publish", "-k", "tiny", stdin=b"1\n2\n3\n4\n5\n")
    assert p.returncode == 1
    err = one_error_line(p)
    assert err.startswith("mq-cli: queue-full (409): ")
    assert (
        "(1 of 5 message(s) sent were confirmed stored before this; publishing stopped)" in err
    ), err
    assert queues_json(broker)["tiny"]["messages"] == 1
    out = ok(run(broker, "consume", "-q", "tiny", "--count", "1"))
    assert out == "1\n"


def _read_line(stream: Any, timeout: float = WAIT) -> bytes:
    """One line from a subprocess pipe, or b"" if none comes within ``timeout``."""
    import select

    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(stream.fileno(), 1)
        if not chunk:
            break
        data += chunk
    return data


def test_consume_into_a_closed_pipe_ends_quietly_and_acks_only_printed(
    broker: BrokerProcess,
) -> None:
    ok(run(broker, "declare-queue", "piped"))
    ok(run(broker, "publish", "first", "-k", "piped"))
    env = _env()
    env.pop("PYTHONUNBUFFERED")  # stdout buffered, as in a real pipeline
    proc = subprocess.Popen(
        [*CLI, "consume", "-q", "piped", "--url", broker.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert _read_line(proc.stdout) == b"first\n"  # flushed as it came, then acked
        proc.stdout.close()  # the reader goes away, as `| head -1` does
        ok(run(broker, "publish", "second", "-k", "piped"))
        assert proc.wait(timeout=WAIT) == 141
        assert proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # "second" could not be written: it was not acked and is back in the queue.
    assert ok(run(broker, "consume", "-q", "piped", "--timeout", "0")) == "second\n"


def test_consume_timeout_0_prints_ready_messages_then_exits(broker: BrokerProcess) -> None:
    ok(run(broker, "declare-queue", "ready"))
    assert ok(run(broker, "consume", "-q", "ready", "--timeout", "0")) == ""
    ok(run(broker, "publish", "-k", "ready", stdin=b"r1\nr2\nr3\n"))
    assert ok(run(broker, "consume", "-q", "ready", "--timeout", "0", "-n", "2")) == "r1\nr2\n"
    assert ok(run(broker, "consume", "-q", "ready", "--timeout", "0")) == "r3\n"
    assert queues_json(broker)["ready"]["messages"] == 0
    # Streams: the messages there are now, for the read's start.
    ok(run(broker, "declare-queue", "ready-s", "--type", "stream"))
    assert ok(run(broker, "consume", "-q", "ready-s", "--offset", "first", "--timeout", "0")) == ""
    ok(run(broker, "publish", "-k", "ready-s", stdin=b"s1\ns2\ns3\n"))
    assert (
        ok(run(broker, "consume", "-q", "ready-s", "--offset", "first", "--timeout", "0"))
        == "s1\ns2\ns3\n"
    )
    assert ok(run(broker, "consume", "-q", "ready-s", "--offset", "next", "--timeout", "0")) == ""


def test_consume_new_group_starts_at_first_retained_message(broker: BrokerProcess) -> None:
    ok(run(broker, "declare-queue", "events", "--type", "stream"))
    ok(run(broker, "publish", "-k", "events", stdin=b"e1\ne2\ne3\n"))
    # A new group reads what the stream holds (before: it waited at "next" forever).
    assert (
        ok(run(broker, "consume", "-q", "events", "--group", "billing", "-n", "2", timeout=20))
        == "e1\ne2\n"
    )
    # The same group resumes after its committed offset.
    assert (
        ok(run(broker, "consume", "-q", "events", "--group", "billing", "--timeout", "0")) == "e3\n"
    )
    assert ok(run(broker, "consume", "-q", "events", "--group", "billing", "--timeout", "0")) == ""
    # An explicit --offset still chooses where a new group starts.
    assert (
        ok(
            run(
                broker,
                "consume",
                "-q",
                "events",
                "--group",
                "audit",
                "--offset",
                "last",
                "-n",
                "1",
                timeout=20,
            )
        )
        == "e3\n"
    )
    assert "auto.offset.reset=earliest" in ok(run(None, "consume", "--help"))


def test_closed_port_exits_3() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port any more.
    for args in (["queues"], ["publish", "x", "-k", "q"], ["consume", "-q", "q"]):
        p = subprocess.run(
            [*CLI, *args, "--url", f"mq://127.0.0.1:{port}"],
            capture_output=True,
            timeout=30,
            env=_env(),
            check=False,
        )
        assert p.returncode == 3, (args, p.stderr)
        err = one_error_line(p)
        assert "cannot connect" in err and str(port) in err


def test_url_from_environment(broker: BrokerProcess) -> None:
    env = dict(_env(), CONVEYOR_URL=broker.url)
    p = subprocess.run(
        [*CLI, "declare-queue", "from-env"], capture_output=True, timeout=30, env=env, check=False
    )
    assert (p.returncode, p.stdout, p.stderr) == (0, b"from-env\tmessages=0\tconsumers=0\n", b"")


# ---------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(cmd: list[str], cwd: Path) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=_env()
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = LISTEN_RE.search(line)
        if m:
            return proc, int(m.group(2))
        if not line:
            break
    proc.kill()
    proc.wait(5)
    raise AssertionError(f"server did not start: {proc.stderr.read() if proc.stderr else ''!r}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def test_server_config_file(tmp_path: Path) -> None:
    port = _free_port()
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(
        f'host = "127.0.0.1"\nport = {port}\ndata_dir = "{tmp_path / "data"}"\nheartbeat-ms = 0\n'
    )
    proc, bound = _start_server([*CLI, "server", "--config", str(cfg)], tmp_path)
    try:
        assert bound == port
        p = subprocess.run(
            [*CLI, "declare-queue", "cfg", "--url", f"mq://127.0.0.1:{port}"],
            capture_output=True,
            timeout=30,
            env=_env(),
            check=False,
        )
        assert p.returncode == 0 and p.stdout.startswith(b"cfg\t")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert (tmp_path / "data").is_dir()
    finally:
        _stop(proc)


def test_server_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('port = "not a number"\n')
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 1\n")
    for cfg in (bad, unknown, tmp_path / "missing.toml"):
        p = subprocess.run(
            [*CLI, "server", "--config", str(cfg)],
            capture_output=True,
            timeout=30,
            env=_env(),
            cwd=tmp_path,
            check=False,
        )
        assert p.returncode == 2, (cfg, p.stderr)
        one_error_line(p)
    # Port already in use: one line, status 1.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run(
            [*CLI, "server", "--port", str(port)],
            capture_output=True,
            timeout=30,
            env=_env(),
            cwd=tmp_path,
            check=False,
        )
    assert p.returncode == 1
    assert re.search(r"cannot start the broker", p.stderr.decode())
    assert b"Traceback" not in p.stderr


async def test_server_sigterm_with_connected_client(tmp_path: Path) -> None:
    proc, port = await asyncio.to_thread(
        _start_server,
        [MQ_CLI, "server", "--port", "0", "--data-dir", str(tmp_path / "d")],
        tmp_path,
    )
    try:
        conn = await connect(f"mq://127.0.0.1:{port}")
        try:
            await conn.declare_queue("during-shutdown")
            consumer = await conn.consume("during-shutdown")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(client.ConnectionClosed) as info:
                await asyncio.wait_for(consumer.__anext__(), WAIT)
            assert info.value.details.get("code") == 320  # connection-forced
            assert not conn.is_open
            rc = await asyncio.to_thread(proc.wait, 10)
            assert rc == 0
            assert time.monotonic() - t0 < 4
        finally:
            await asyncio.wait_for(conn.close(), WAIT)
    finally:
        _stop(proc)


def test_progress_bars_only_when_asked_or_on_a_terminal(broker: BrokerProcess) -> None:
    ok(run(broker, "declare-queue", "bars"))
    ok(run(broker, "publish", "p", "-k", "bars", "-n", "40"))
    # Not a terminal: no bar, stderr stays empty (ok() checks).
    assert ok(run(broker, "consume", "-q", "bars", "-n", "10")) == "p\n" * 10
    p = run(broker, "consume", "-q", "bars", "-n", "10", "--progress")
    assert (p.returncode, p.stdout) == (0, b"p\n" * 10)
    # click draws a bar only on a terminal; elsewhere a forced one is its label line.
    assert p.stderr == b"consuming bars\n"
    ok(run(broker, "declare-queue", "bars2"))
    p = run(broker, "move", "bars", "bars2", "--progress")
    assert p.returncode == 0 and p.stdout == b"moved 20 messages from bars to bars2\n"
    assert p.stderr == b"moving bars -> bars2\n"
