"""One owner per state: readers of queues and deliveries go through their owners' methods.

The HTTP gateway, the management API, metrics, the slow-consumer check and
``Broker.list`` must not write a session's deliveries or read a queue's containers or
another object's private attributes, and must not branch on ``isinstance(q, Stream)``
(a Stream answers ``statistics()``/``waiting()`` itself). Checked on the source's syntax
tree, so a regression fails here with the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READERS = [
    "broker/http/gateway.py",
    "broker/http/management.py",
    "broker/metrics.py",
    "broker/slow.py",
]
# State that only Deliveries (tags, deadlines) or Queue (containers) may touch.
PRIVATE = {
    "_next_tag",
    "_unacked",
    "_min_deadline",
    "_timed_out",
    "_requeued",
    "_lanes",
    "_ready",
    "_paged",
    "_delayed",
    "_count",
}
OWNED = {"unacked", "min_deadline", "timed_out"}  # a session's deliveries, read-only outside


def _violations(tree: ast.AST) -> list[str]:
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            out.append(f"line {node.lineno}: reads .{node.attr}")
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign | ast.Delete):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for t in targets:
            base = t.value if isinstance(t, ast.Subscript) else t
            if isinstance(base, ast.Attribute) and base.attr in OWNED:
                out.append(f"line {t.lineno}: writes .{base.attr}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "isinstance"
            and len(node.args) == 2
            and isinstance(node.args[1], ast.Name)
            and node.args[1].id == "Stream"
        ):
            out.append(f"line {node.lineno}: isinstance(..., Stream)")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == "q"
        ):
            out.append(f"line {node.lineno}: getattr on a queue")
    return out


@pytest.mark.parametrize("path", READERS)
def test_readers_use_owner_methods(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text(), path)
    assert _violations(tree) == [], path


def test_broker_list_reads_queue_statistics() -> None:
    tree = ast.parse((ROOT / "broker/core.py").read_text())
    [fn] = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "list"]
    assert _violations(fn) == []
    calls = {
        n.func.attr
        for n in ast.walk(fn)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    }
    assert "statistics" in calls


def test_the_check_finds_what_it_forbids() -> None:
    """The checker itself: each forbidden form is reported (so an empty result means
    something)."""
    src = (
        "s.unacked[1] = x\ndel s.unacked[2]\ns.min_deadline = 3\nt = s._next_tag\n"
        "isinstance(q, Stream)\nq._requeued\ngetattr(q, 'ready')\n"
    )
    assert len(_violations(ast.parse(src))) == 7
