"""Print the import cycles among broker modules, counting imports made only under
``if TYPE_CHECKING:`` (a cycle there still ties the modules' types together).

Usage: python tools/import_cycles.py [--runtime-only]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "broker"
PREFIX = "conveyor.broker."


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts)


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, runtime_only: bool) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child) and runtime_only:
                for c in child.orelse:
                    visit(c)
                continue
            if isinstance(child, ast.ImportFrom) and child.module:
                mod = child.module
                if mod == "conveyor.broker":
                    found.update(a.name for a in child.names)
                elif mod.startswith(PREFIX):
                    found.add(mod[len(PREFIX) :])
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith(PREFIX):
                        found.add(a.name[len(PREFIX) :])
            visit(child)

    visit(tree)
    return found


def graph(runtime_only: bool = False) -> dict[str, set[str]]:
    """Module -> broker modules it imports."""
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    return {
        m: {d for d in _imports(ast.parse(p.read_text()), runtime_only) if d in mods and d != m}
        for m, p in mods.items()
    }


def components(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def main() -> None:
    runtime_only = "--runtime-only" in sys.argv
    g = graph(runtime_only)
    comps = components(g)
    if not comps:
        print("no import cycles")
    for comp in comps:
        print("cycle members:", ", ".join(comp))
        for m in comp:
            print(f"  {m} -> {', '.join(sorted(g[m] & set(comp)))}")


if __name__ == "__main__":
    main()
