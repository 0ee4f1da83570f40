"""The logged commands as types (broker.commands): op codes pinned, the apply table
complete, records built only through the constructors, and the on-disk format unchanged.

The format is checked against ``tests/data/commands_wal``, written by the code from before
the commands were typed (see tests/data/make_commands_fixture.py): the same session script
run now must frame the same bytes, and recovering that old data dir (in process, and by a
real broker process read over TCP) must give the state the old code recovered."""

from __future__ import annotations

import ast
import asyncio
import shutil
from pathlib import Path
from typing import Any

import msgpack
import pytest

from conveyor.broker import commands
from conveyor.broker.commands import APPLY, Op
from conveyor.broker.config import Config
from conveyor.broker.durability import Durability
from conveyor.broker.journal import Replay, snapshot_dict
from conveyor.broker.message import Message
from conveyor.broker.wal import recover, seg_name
from tests.broker_process import BrokerProcess
from tests.data.make_commands_fixture import drive
from tests.integration.helpers import WAIT, connect, drain

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "data" / "commands_wal"
SEGMENT = FIXTURE / "wal" / seg_name(1)

# Every op code and its letters, as written in logs since the first version: a rename,
# a new value or a removal must fail here (logs already on disk would not replay).
PINNED = {
    "EXCHANGE_DECLARE": "xd",
    "EXCHANGE_DELETE": "xr",
    "QUEUE_DECLARE": "qd",
    "QUEUE_DELETE": "qr",
    "QUEUE_PURGE": "qp",
    "BIND": "b",
    "UNBIND": "u",
    "PUBLISH": "p",
    "DELIVER": "d",
    "ACK": "a",
    "REQUEUE": "r",
}


def packb(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def test_op_values_are_pinned() -> None:
    assert {m.name: m.value for m in Op} == PINNED
    assert [m.value for m in Op] == list(PINNED.values())  # order: append-only too


def test_apply_table_has_one_function_per_op() -> None:
    assert set(APPLY) == set(Op)
    assert len(set(APPLY.values())) == len(Op)
    with pytest.raises(ValueError, match="unknown log command 'zz'"):
        Replay().apply([["zz", "q"]])


# The records as core, session and the gateway wrote them before this module existed.
_props: dict[str, Any] = {"headers": {"h": 1}, "message_id": "m"}
CASES: list[tuple[Any, tuple[Any, ...]]] = [
    (
        commands.exchange_declare("x", "topic", False, {"a": 1}),
        ("xd", "x", "topic", False, {"a": 1}),
    ),
    (commands.exchange_delete("x"), ("xr", "x")),
    (commands.queue_declare("q", True, {"max_length": 5}), ("qd", "q", True, {"max_length": 5})),
    (commands.queue_delete("q"), ("qr", "q")),
    (commands.queue_purge("q", 1_700_000_000_123), ("qp", "q", 1_700_000_000_123)),
    (commands.bind("x", "q", "a.#"), ("b", "x", "q", "a.#")),
    (commands.unbind("x", "q", "a.#"), ("u", "x", "q", "a.#")),
    (
        commands.publish(7, ["q1", "q2"], "x", "k", _props, b"\x00body", 1_700_000_000_001),
        ("p", 7, ["q1", "q2"], "x", "k", _props, b"\x00body", 1_700_000_000_001),
    ),
    (commands.publish(8, ["q"], "", "q", {}, b"", 5), ("p", 8, ["q"], "", "q", {}, b"", 5)),
    (commands.deliver("q", [1, 2]), ("d", "q", [1, 2])),
    (commands.ack("q", [3]), ("a", "q", [3])),
    (commands.requeue("q", [4, 5]), ("r", "q", [4, 5])),
    *[
        (r, ("p", 4 + i, ["q1"], "x", "k", {}, b"b%d" % i, 9))
        for i, r in enumerate(
            commands.publish_run(
                4, ["q1"], [Message("x", "k", {}, b"b%d" % i, ts=9) for i in range(2)]
            )
        )
    ],
]


@pytest.mark.parametrize(("new", "old"), CASES, ids=[c[1][0] for c in CASES])
def test_constructors_give_the_old_records(new: Any, old: tuple[Any, ...]) -> None:
    assert new == old
    assert type(new) is tuple
    assert type(new[0]) is str  # the plain value, never an Op instance
    assert packb(new) == packb(old)


def test_every_op_has_a_constructor_case() -> None:
    assert {c[1][0] for c in CASES} == set(PINNED.values())


def test_stream_records_are_the_old_ones() -> None:
    m = Message("x", "k", {"h": 1}, b"body", ts=123)
    assert commands.stream_entry(m) == (123, "x", "k", {"h": 1}, b"body")
    m.body = None  # no body: appended as empty bytes, as before
    assert commands.stream_entry(m)[4] == b""
    assert packb(commands.group_offsets([("g1", 4), ("g2", 0)])) == packb({"g1": 4, "g2": 0})


def test_the_fixture_has_every_op() -> None:
    """The committed WAL is a meaningful reference: it holds each command at least once."""
    batches: list[list[list[Any]]] = []
    recover(FIXTURE / "wal", on_snapshot=lambda *a: None, on_batch=batches.append)
    assert {c[0] for b in batches for c in b} == set(PINNED.values())


def test_the_same_sessions_write_the_same_bytes() -> None:
    """The fixture's script through today's core, session and journal frames a WAL byte for
    byte equal to the one the old code wrote."""
    _broker, store = drive()
    assert b"".join(store.frames) == SEGMENT.read_bytes()


def _state_of(data_dir: Path) -> dict[str, Any]:
    """What recovery of ``data_dir`` builds, as plain data; bindings sorted (recovery keeps
    them in a set: their order follows the string hash seed, not the log)."""
    d = Durability(Config(data_dir=str(data_dir)))
    try:
        state: dict[str, Any] = unpackb(packb(snapshot_dict(d.open())))
    finally:
        d.close()
    state["bindings"].sort()
    return state


def test_recovery_of_an_old_data_dir_gives_the_old_state(tmp_path: Path) -> None:
    shutil.copytree(FIXTURE / "wal", tmp_path / "data" / "wal")
    state = _state_of(tmp_path / "data")
    expected = unpackb((FIXTURE / "state.msgpack").read_bytes())
    expected["bindings"].sort()
    assert state == expected
    assert len(state["entries"]) == 8 and len(state["queues"]) == 5  # not an empty state


async def test_a_broker_serves_an_old_data_dir(tmp_path: Path) -> None:
    """A real broker process started on the old data dir delivers what the old code
    recovered: fx.work's two earlier deliveries come back redelivered, the purge kept only
    the delayed message, the deleted queue and exchange stay gone."""
    data = tmp_path / "data"
    shutil.copytree(FIXTURE / "wal", data / "wal")
    b = BrokerProcess(data).start()
    try:
        conn = await connect(b.url)
        try:
            names = {q["name"] for q in await conn.list("queues")}
            assert {"fx.work", "fx.dead", "fx.retry", "fx.dedup", "fx.purged"} <= names
            assert "fx.deleted" not in names
            exchanges = {e["name"] for e in await conn.list("exchanges")}
            assert {"fx.topic", "fx.dlx"} <= exchanges and "fx.gone" not in exchanges
            consumer = await conn.consume("fx.work", prefetch=100, no_ack=True)
            got = await drain(consumer, quiet=0.5, limit=100)
            assert [m.body for m in got] == [
                b"work-1",
                b"work-2",
                b"work-3",
                b"work-4",
                b"work-5",
                b"props",
            ]
            assert [m.delivery_count for m in got] == [2, 2, 1, 1, 1, 1]  # this one counted
            assert [m.redelivered for m in got] == [True, True, False, False, False, False]
            assert got[-1].properties.get("headers") == {"h": [1, "two"]}
            dedup = await conn.get("fx.dedup", 10, no_ack=True)
            assert [m.body for m in dedup] == [b"once"]
        finally:
            await asyncio.wait_for(conn.close(), WAIT)
    finally:
        b.stop()


_OPS = frozenset(PINNED.values())
# Calls that take records: the journal's and the store's appends, Broker._log, log_ids.
_SINKS = frozenset({"append", "extend", "_log", "log_ids"})


def _is_record(node: ast.AST) -> bool:
    """A tuple or list literal opening with an op code string: a record built by hand."""
    return (
        isinstance(node, (ast.Tuple, ast.List))
        and len(node.elts) >= 2
        and isinstance(node.elts[0], ast.Constant)
        and node.elts[0].value in _OPS
    )


def _hand_built(tree: ast.AST) -> list[int]:
    lines: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if name not in _SINKS:
                continue
            if (
                name == "log_ids"
                and node.args
                and any(
                    isinstance(n, ast.Constant) and n.value in _OPS for n in ast.walk(node.args[0])
                )
            ):
                lines.append(node.lineno)  # log_ids("a", ...): a bare letter
            for arg in node.args:
                items = (
                    arg.elts
                    if isinstance(arg, (ast.List, ast.Tuple)) and not _is_record(arg)
                    else [arg]
                )
                lines.extend(node.lineno for item in items if _is_record(item))
    return sorted(lines)


def test_records_are_built_only_in_commands() -> None:
    """Every record the broker logs comes from a broker.commands constructor: no op-code
    literal passed to a journal/store append, Broker._log or log_ids outside it."""
    found: list[str] = []
    for path in sorted((ROOT / "broker").rglob("*.py")):
        if path.name == "commands.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        found += [f"{path.relative_to(ROOT)}:{n}" for n in _hand_built(tree)]
    assert found == []


def test_the_record_check_sees_hand_built_records() -> None:
    """The check above is not blind: each way a record used to be written is caught (and
    a tuple that only looks like one, such as flow's rate keys, is not)."""
    old = """
self._log([("xd", name, etype, auto_delete, arguments)])
self.journal.append(("p", mid, logged, message.exchange, message.routing_key,
                     message.properties, message.body, message.ts))
self.log_ids("a", q, qms)
broker.log_ids("a" if no_ack else "d", queue, batch)
rate = ("b", subject, rate_b, seconds)
self.store.append([("qr", name), ("b", "x", "q", "k")])
"""
    assert _hand_built(ast.parse(old)) == [2, 3, 5, 6, 8, 8]
