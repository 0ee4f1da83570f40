"""Ownership: no module reads or writes another object's underscore attributes.

An attribute ``<expr>._name`` (one leading underscore, or two without the trailing
pair) is private to the object that owns it. It may be used through ``self``, ``cls``,
``super()`` or a class defined in the same module (``_Protocol._deliver`` in that
module's own dispatch table); anything else couples a module to another's internals,
so a change of representation there breaks it silently. A line that truly must do it
says why with ``# owner-ok: <why>``; those are few and each is listed here as allowed.

Imports of ``protocol._generated`` / ``protocol._checks`` / ``_unpack_body`` from outside
``protocol/`` are checked by tests/unit/test_protocol_connection.py
(test_nothing_outside_protocol_imports_its_internals).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("broker", "protocol", "client", "cli")
MARK = "# owner-ok:"
MAX_MARKS = 5  # "a handful": more means the design, not the line, needs fixing


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(source: str, rel: str) -> list[str]:
    """``rel:line:expr`` for each foreign underscore attribute access in ``source``
    (lines marked ``# owner-ok: <why>`` with a non-empty why excepted)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    out: list[str] = []
    for n in ast.walk(tree):
        if not isinstance(n, ast.Attribute) or not _private(n.attr):
            continue
        v = n.value
        if isinstance(v, ast.Name) and (v.id in ("self", "cls") or v.id in classes):
            continue
        if (
            isinstance(v, ast.Call)
            and isinstance(v.func, ast.Name)
            and v.func.id == "super"
            and not v.args
        ):
            continue
        line = lines[n.lineno - 1]
        if MARK in line and line.split(MARK, 1)[1].strip():
            continue
        out.append(f"{rel}:{n.lineno}:{ast.unparse(n)}")
    return out


def _where(v: str) -> tuple[str, int]:
    rel, line, _ = v.split(":", 2)
    return rel, int(line)


def _sources() -> list[tuple[str, str]]:
    return [
        (p.relative_to(ROOT).as_posix(), p.read_text())
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
    ]


def test_no_module_uses_another_objects_underscore_attributes() -> None:
    found = [v for rel, src in _sources() for v in violations(src, rel)]
    assert not found, (
        f"{len(found)} access(es) to another object's underscore attribute "
        "(add a method or property to the owner):\n" + "\n".join(sorted(found, key=_where))
    )


def test_owner_ok_marks_are_few_and_say_why() -> None:
    marks = [
        (rel, i + 1, ln)
        for rel, src in _sources()
        for i, ln in enumerate(src.splitlines())
        if MARK in ln
    ]
    for rel, no, ln in marks:
        assert ln.split(MARK, 1)[1].strip(), f"{rel}:{no}: {MARK} without a reason"
    assert len(marks) <= MAX_MARKS, "\n".join(f"{r}:{n}: {ln.strip()}" for r, n, ln in marks)


def test_the_check_can_fail() -> None:
    src = (
        "class _Local:\n"
        "    x = 1\n"
        "class A:\n"
        "    def f(self, other):\n"
        "        self._a = other._b\n"  # line 5: other._b
        "        cls = type(self); cls._c\n"
        "        super()._d\n"
        "        _Local._e\n"
        "        self.conn._f\n"  # line 9: self.conn._f
        "        other.__dict__\n"
        "        other.__mangled\n"  # line 11
        "        other._g  # owner-ok: a reason\n"
        "        other._h  # owner-ok:\n"  # line 13: no reason given
        "        Imported._i\n"  # line 14
        "        f()._j\n"  # line 15
    )
    assert violations(src, "m.py") == [
        "m.py:5:other._b",
        "m.py:9:self.conn._f",
        "m.py:11:other.__mangled",
        "m.py:13:other._h",
        "m.py:14:Imported._i",
        "m.py:15:f()._j",
    ]
