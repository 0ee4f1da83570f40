"""A walkthrough of mq-cli's inspection and messaging commands: the CLI run as a subprocess
against real broker processes, every command with --json and its output parsed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conveyor import client
from tests.broker_process import BrokerProcess
from tests.integration.helpers import WAIT, connect, wait_until

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "conveyor.cli.main"]


def _env(config: Path | None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    for k in ("CONVEYOR_URL", "CONVEYOR_TOKEN", "MQ_TOKEN", "CONVEYOR_TLS_CA"):
        env.pop(k, None)
    # Never the real ~/.config: a context there would redirect every command.
    env["CONVEYOR_CONFIG"] = str(config) if config else "/nonexistent/contexts.toml"
    return env


def mq(
    *args: str, config: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, timeout=timeout, env=_env(config), check=False
    )


async def amq(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(mq, *args, config=config)


def ok(p: subprocess.CompletedProcess[bytes]) -> str:
    assert p.returncode == 0, (p.returncode, p.stderr.decode())
    assert b"Traceback" not in p.stderr
    return p.stdout.decode()


def one(p: subprocess.CompletedProcess[bytes]) -> Any:
    """The single JSON object a --json command prints."""
    lines = ok(p).splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def lines(p: subprocess.CompletedProcess[bytes]) -> list[Any]:
    return [json.loads(line) for line in ok(p).splitlines()]


async def test_walkthrough(broker: BrokerProcess) -> None:
    u = ["--url", broker.url]
    assert one(await amq("declare-queue", "work", *u, "--json")) == {
        "queue": "work",
        "messages": 0,
        "consumers": 0,
    }
    assert (
        one(await amq("declare-queue", "parked", "--max-priority", "5", *u, "--json"))["queue"]
        == "parked"
    )
    assert one(
        await amq(
            "publish",
            "job",
            "-k",
            "work",
            "-n",
            "3",
            "--message-id",
            "m-7",
            "--header",
            "tenant=acme",
            "--content-type",
            "text/plain",
            *u,
            "--json",
        )
    ) == {"published": 3, "unrouted": 0, "exchange": "", "routing_key": "work"}

    # peek: all three with their properties, none taken.
    peeked = lines(await amq("peek", "work", "-n", "10", *u, "--json"))
    assert len(peeked) == 3
    for m in peeked:
        assert m["body"] == "job" and m["routing_key"] == "work"
        assert m["properties"]["message_id"] == "m-7"
        assert m["properties"]["headers"] == {"tenant": "acme"}
        assert m["properties"]["content_type"] == "text/plain"
    details = one(await amq("queue", "work", "--interval", "0", *u, "--json"))
    assert (details["messages"], details["unacked"], details["type"]) == (3, 0, "classic")

    # get 1: taken and acked.
    [got] = lines(await amq("get", "work", *u, "--json"))
    assert got["redelivered"] is True and got["delivery_count"] == 2  # the peek was one
    # move 2 to another queue, properties kept.
    assert one(await amq("move", "work", "parked", "-n", "2", *u, "--json")) == {
        "moved": 2,
        "skipped": 0,
        "source": "work",
        "target": "parked",
    }
    parked = lines(await amq("peek", "parked", *u, "--json"))
    assert [m["properties"]["message_id"] for m in parked] == ["m-7", "m-7"]
    assert parked[0]["properties"]["headers"] == {"tenant": "acme"}

    queues = {q["name"]: q for q in json.loads(ok(await amq("queues", *u, "--json")))}
    assert (queues["work"]["messages"], queues["parked"]["messages"]) == (0, 2)
    table = ok(await amq("queues", *u)).splitlines()
    assert table[0].split()[:3] == ["NAME", "TYPE", "MESSAGES"]
    assert {r.split()[0]: r.split()[1:3] for r in table[1:]} == {
        "parked": ["priority", "2"],
        "work": ["classic", "0"],
    }

    # queue details and consumers with a live consumer (and counters moving).
    async with await connect(broker.url) as conn:
        consumer = await conn.consume("parked", prefetch=1)
        await wait_until(lambda: consumer.get(0.05))
        d = one(await amq("queue", "parked", "--interval", "0.3", *u, "--json"))
        assert (d["messages"], d["unacked"], d["consumers"], d["type"]) == (1, 1, 1, "priority")
        assert d["arguments"] == {"max_priority": 5}
        assert d["published"] == 2 and d["delivered"] >= 1
        assert set(d["rates"]) == {"publish", "deliver", "ack"}
        [c] = d["consumer_list"]
        assert (c["queue"], c["unacked"]) == ("parked", 1)
        listed = json.loads(ok(await amq("consumers", *u, "--json")))
        assert [(x["queue"], x["consumer_tag"]) for x in listed] == [("parked", c["consumer_tag"])]
        await consumer.cancel()  # its unacked message goes back

    assert one(await amq("purge", "parked", *u, "--json")) == {"queue": "parked", "purged": 2}
    assert one(await amq("delete-queue", "parked", *u, "--json")) == {
        "queue": "parked",
        "deleted": True,
        "messages": 0,
    }


async def test_subscribe_receives_a_topic_publish(broker: BrokerProcess) -> None:
    proc = subprocess.Popen(
        [
            *CLI,
            "subscribe",
            "amq.topic",
            "orders.*",
            "--count",
            "2",
            "--timeout",
            "20",
            "--json",
            "--url",
            broker.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(None),
    )
    try:
        async with await connect(broker.url) as conn:

            async def bound() -> bool:
                return any(
                    b["exchange"] == "amq.topic" and b["routing_key"] == "orders.*"
                    for b in await conn.list("bindings")
                )

            await wait_until(bound, timeout=WAIT * 2)
            [tmp] = [q for q in await conn.list("queues")]
            assert tmp["exclusive"] and tmp["auto_delete"] and not tmp["durable"]
            await conn.publish("amq.topic", "audit.x", b"not for us", mandatory=False)
            await conn.publish("amq.topic", "orders.new", b"first")
            await conn.publish(
                "amq.topic", "orders.paid", b"second", properties={"message_id": "o-2"}
            )
            out, err = await asyncio.to_thread(proc.communicate, timeout=30)
            assert proc.returncode == 0, err
            got = [json.loads(line) for line in out.decode().splitlines()]
            assert [(m["routing_key"], m["body"]) for m in got] == [
                ("orders.new", "first"),
                ("orders.paid", "second"),
            ]
            assert got[1]["properties"]["message_id"] == "o-2"
            # The temporary queue went with the connection.
            await wait_until(lambda: _no_queues(conn))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def _no_queues(conn: client.Connection) -> bool:
    return not await conn.list("queues")


async def test_subscribe_timeout_ends_quietly(broker: BrokerProcess) -> None:
    started = time.monotonic()
    p = await amq("subscribe", "amq.fanout", "--timeout", "0.3", "--url", broker.url)
    assert (p.returncode, p.stdout) == (0, b""), p.stderr
    assert time.monotonic() - started < 25


async def test_request_gets_a_reply_from_a_responder(broker: BrokerProcess) -> None:
    async with await connect(broker.url) as conn:
        await conn.declare_queue("rpc.upper", durable=False)
        consumer = await conn.consume("rpc.upper", prefetch=10)

        async def responder() -> None:
            async for msg in consumer:
                await conn.publish(
                    "",
                    msg.reply_to or "",
                    msg.body.upper(),
                    properties={
                        "correlation_id": msg.correlation_id,
                        "headers": {"served-by": "test"},
                    },
                )
                msg.ack()

        task = asyncio.create_task(responder())
        try:
            p = await amq("request", "", "rpc.upper", "hello", "--url", broker.url)
            assert ok(p) == "HELLO\n"
            reply = one(
                await amq("request", "", "rpc.upper", "json", "--json", "--url", broker.url)
            )
            assert reply["body"] == "JSON"
            assert reply["properties"]["headers"] == {"served-by": "test"}
        finally:
            task.cancel()
            await consumer.cancel()
    # No one listens: exit 4 (timeout); no queue at all: exit 5 (no route).
    async with await connect(broker.url) as conn:
        await conn.declare_queue("rpc.deaf", durable=False)
        p = await amq("request", "", "rpc.deaf", "x", "--timeout", "0.5", "--url", broker.url)
        assert p.returncode == 4 and b"timed out" in p.stderr, p.stderr
    p = await amq("request", "", "rpc.nobody", "x", "--url", broker.url)
    assert p.returncode == 5 and b"no route" in p.stderr and b"Traceback" not in p.stderr


def test_contexts_switch_url(tmp_path: Path, broker_factory: Callable[..., BrokerProcess]) -> None:
    a, b = broker_factory(), broker_factory("--require-auth")  # b: the context's token
    token = ok(
        mq(
            "token",
            "create",
            "--subject",
            "ops",
            "--configure",
            "*",
            "--write",
            "*",
            "--read",
            "*",
            "--data-dir",
            str(b.data_dir),
        )
    ).strip()
    assert mq("queues", "--url", b.url).returncode == 1  # anonymous: refused
    cfg = tmp_path / "conf" / "contexts.toml"
    assert (
        one(mq("context", "add", "alpha", "--url", a.url, "--json", config=cfg))["current"] is True
    )  # the first one added
    assert (
        one(mq("context", "add", "beta", "--url", b.url, "--token", token, "--json", config=cfg))[
            "current"
        ]
        is False
    )
    assert cfg.stat().st_mode & 0o777 == 0o600
    ls = json.loads(ok(mq("context", "ls", "--json", config=cfg)))
    assert [(c["name"], c["url"], c["current"], c["token"]) for c in ls] == [
        ("alpha", a.url, True, False),
        ("beta", b.url, False, True),
    ]
    assert token not in ok(mq("context", "ls", config=cfg))

    ok(mq("declare-queue", "only-on-alpha", config=cfg))  # the current context: alpha
    assert "only-on-alpha" in _names(mq("queues", "--json", config=cfg))
    # --context picks another for one command; `use` switches.
    assert _names(mq("queues", "--json", "--context", "beta", config=cfg)) == set()
    assert one(mq("context", "use", "beta", "--json", config=cfg))["context"] == "beta"
    assert _names(mq("queues", "--json", config=cfg)) == set()
    ok(mq("declare-queue", "on-beta", config=cfg))
    assert _names(mq("queues", "--json", "--context", "alpha", config=cfg)) == {"only-on-alpha"}
    # An explicit --url wins over the current context.
    assert _names(mq("queues", "--json", "--url", a.url, config=cfg)) == {"only-on-alpha"}
    p = mq("queues", "--context", "gamma", config=cfg)
    assert p.returncode == 2 and b"no context 'gamma'" in p.stderr
    assert b"Traceback" not in p.stderr


def _names(p: subprocess.CompletedProcess[bytes]) -> set[str]:
    return {q["name"] for q in json.loads(ok(p))}


def test_every_mutating_command_prints_one_line(broker: BrokerProcess) -> None:
    u = ["--url", broker.url]
    cmds: list[tuple[list[str], dict[str, Any]]] = [
        (
            ["declare-exchange", "ev", "--type", "topic"],
            {"exchange": "ev", "type": "topic", "durable": True, "auto_delete": False},
        ),
        (["declare-queue", "evq"], {"queue": "evq", "messages": 0, "consumers": 0}),
        (
            ["bind", "-e", "ev", "-q", "evq", "-k", "a.#"],
            {"bound": True, "exchange": "ev", "queue": "evq", "routing_key": "a.#"},
        ),
        (
            ["publish", "x", "-e", "ev", "-k", "a.b"],
            {"published": 1, "unrouted": 0, "exchange": "ev", "routing_key": "a.b"},
        ),
        (
            ["unbind", "-e", "ev", "-q", "evq", "-k", "a.#"],
            {"unbound": True, "exchange": "ev", "queue": "evq", "routing_key": "a.#"},
        ),
        (["purge", "evq"], {"queue": "evq", "purged": 1}),
        (["delete-exchange", "ev"], {"exchange": "ev", "deleted": True}),
        (["delete-queue", "evq"], {"queue": "evq", "deleted": True, "messages": 0}),
    ]
    for args, want in cmds:
        assert one(mq(*args, *u, "--json")) == want, args
    for args, _ in cmds[:4]:  # again, as text: one line each
        out = ok(mq(*args, *u))
        assert out.count("\n") == 1 and out.strip(), (args, out)


def test_completion_script() -> None:
    p = mq("completion", "bash")
    assert "_MQ_CLI_COMPLETE=bash_complete" in ok(p)
    env = _env(None, _MQ_CLI_COMPLETE="bash_complete", COMP_WORDS="mq-cli pe", COMP_CWORD="1")
    p2 = subprocess.run([*CLI], capture_output=True, env=env, timeout=30, check=False)
    # click's bash protocol: one "type,value" line per candidate.
    assert "plain,peek" in p2.stdout.decode().splitlines()


def test_client_queue_info_messages_alias(broker: BrokerProcess) -> None:
    async def go() -> None:
        async with await connect(broker.url) as conn:
            await conn.declare_queue("alias")
            await conn.publish("", "alias", b"x")
            info = await conn.declare_queue("alias")
            assert (info.messages, info.message_count, info.consumers) == (1, 1, 0)

    asyncio.run(go())


def test_json_on_the_other_commands(tmp_path: Path, broker: BrokerProcess) -> None:
    made = one(
        mq(
            "token",
            "create",
            "-s",
            "ci",
            "--read",
            "*",
            "--json",
            "--data-dir",
            str(tmp_path / "d"),
        )
    )
    assert made["subject"] == "ci" and made["token"].startswith("cvy1.") and made["jti"]
    assert one(
        mq("token", "revoke", "--jti", made["jti"], "--json", "--data-dir", str(tmp_path / "d"))
    ) == {"revoked": made["jti"]}
    files = one(mq("gen-certs", "--out", str(tmp_path / "certs"), "--json"))["files"]
    assert {Path(f).name for f in files} >= {"ca.pem", "server.pem", "client.pem"}
    frames = lines(mq("top", "--json", "-n", "2", "--interval", "0.1", "--url", broker.url))
    assert len(frames) == 2 and all(set(f) == {"connections", "queues"} for f in frames)
    for q in ("dl", "dl2"):
        ok(mq("declare-queue", q, "--url", broker.url))
    ok(mq("publish", "x", "-k", "dl", "--url", broker.url))
    assert one(
        mq(
            "dlq-move",
            "--from",
            "dl",
            "--to",
            "dl2",
            "--timeout",
            "0.2",
            "--json",
            "--url",
            broker.url,
        )
    ) == {"moved": 1, "skipped": 0, "source": "dl"}


def test_queue_details_of_a_stream(broker: BrokerProcess) -> None:
    u = ["--url", broker.url]
    ok(mq("declare-queue", "events", "--type", "stream", *u))
    ok(mq("publish", "e", "-k", "events", "-n", "5", *u))
    assert ok(mq("consume", "-q", "events", "--group", "billing", "-n", "2", *u)) == "e\ne\n"
    d = one(mq("queue", "events", "--interval", "0", "--json", *u))
    assert (d["type"], d["first_offset"], d["head_offset"]) == ("stream", 0, 5)
    assert d["groups"]["billing"]["lag"] == 3 and d["bytes"] > 0
    text = ok(mq("queue", "events", "--interval", "0", *u))
    assert "offsets: first=0 head=5" in text and "group billing:" in text
    # A stream is read by offset: get/peek/move on it are refused with a typed error.
    for args in (["peek", "events"], ["get", "events"], ["move", "events", "x"]):
        p = mq(*args, *u)
        assert p.returncode == 1 and b"invalid-argument (400)" in p.stderr, (args, p.stderr)
        assert b"Traceback" not in p.stderr


def test_get_into_a_closed_pipe_takes_nothing(broker: BrokerProcess) -> None:
    u = ["--url", broker.url]
    ok(mq("declare-queue", "piped", *u))
    ok(mq("publish", "m", "-k", "piped", "-n", "200", *u))
    for cmd in ("get", "peek"):
        p = subprocess.run(
            f"{' '.join(CLI)} {cmd} piped -n 200 --url {broker.url} | head -1",
            shell=True,
            capture_output=True,
            timeout=30,
            env=_env(None),
            executable="/bin/bash",
            check=False,
        )
        assert p.stdout.startswith(b"#1 ") and b"Traceback" not in p.stderr, p.stderr
    d = one(mq("queue", "piped", "--interval", "0", "--json", *u))
    assert (d["messages"], d["unacked"]) == (200, 0)


def test_env_url_beats_the_current_context_but_not_context_flag(
    tmp_path: Path, broker_factory: Callable[..., BrokerProcess]
) -> None:
    a, b = broker_factory(), broker_factory()
    cfg = tmp_path / "contexts.toml"
    ok(mq("context", "add", "alpha", "--url", a.url, config=cfg))
    ok(mq("declare-queue", "on-a", config=cfg))
    env = dict(_env(cfg), CONVEYOR_URL=b.url)

    def names(*args: str) -> set[str]:
        p = subprocess.run(
            [*CLI, "queues", "--json", *args], capture_output=True, timeout=30, env=env, check=False
        )
        return _names(p)

    assert names() == set()  # $CONVEYOR_URL: b
    assert names("--context", "alpha") == {"on-a"}
    cfg.write_text("contexts = 3\n")
    p = mq("queues", config=cfg)
    assert p.returncode == 2 and b"contexts file" in p.stderr and b"Traceback" not in p.stderr
