"""Tests for broker.topic: RabbitMQ topic-exchange semantics, trie maintenance, and
agreement between the trie, the DP matcher and an independent naive reference."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# The repo root is not on sys.path under plain `pytest` (no conftest, no install); drop this
# once the project configures `pythonpath` for pytest.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from conveyor.broker.topic import TopicTrie, normalize, split_words, topic_matches  # noqa: E402

# --------------------------------------------------------------------------- splitting

SPLIT_CASES: list[tuple[str, list[str]]] = [
    ("", []),
    ("a", ["a"]),
    ("a.b", ["a", "b"]),
    ("a.", ["a", ""]),
    (".a", ["", "a"]),
    ("a..b", ["a", "", "b"]),
    (".", ["", ""]),
    ("..", ["", "", ""]),
    ("#", ["#"]),
    ("*.#", ["*", "#"]),
    ("a*.#b", ["a*", "#b"]),
    ("stock.usd.nyse", ["stock", "usd", "nyse"]),
]


@pytest.mark.parametrize(("key", "expected"), SPLIT_CASES)
def test_split_words(key: str, expected: list[str]) -> None:
    assert split_words(key) == expected


# --------------------------------------------------------------------------- match table

MATCH_CASES: list[tuple[str, str, bool]] = [
    # empty key / empty pattern: "" is zero words
    ("", "", True),
    ("", "a", False),
    ("", ".", False),
    ("a", "", False),
    ("*", "", False),
    ("#", "", True),
    ("#.#", "", True),
    ("*.#", "", False),
    ("#.*", "", False),
    # '#' alone matches everything
    ("#", "a", True),
    ("#", "a.b.c", True),
    ("#", ".", True),
    ("#", "..", True),
    ("#", "#", True),
    # '#.#'
    ("#.#", "a", True),
    ("#.#", "a.b.c.d", True),
    ("#.#", ".", True),
    # '*.#': at least one word
    ("*.#", "a", True),
    ("*.#", "a.b.c", True),
    ("*.#", ".", True),
    # '#.*': at least one word
    ("#.*", "a", True),
    ("#.*", "a.b", True),
    ("#.*", "a.", True),
    # '*' is exactly one word, which may be empty
    ("*", "a", True),
    ("*", "a.b", False),
    ("*", ".", False),
    ("*", "*", True),
    ("*", "#", True),
    ("*.*", ".", True),
    ("*.*", "a.", True),
    ("*.*", ".a", True),
    ("*.*", "a", False),
    ("*.*", "a.b.c", False),
    ("a.*", "a.", True),
    ("a.*", "a", False),
    ("*.a", ".a", True),
    ("a.*.b", "a..b", True),
    # literal words
    ("a", "a", True),
    ("a", "b", False),
    ("a", "a.b", False),
    ("a.b", "a.b", True),
    ("a.b", "a", False),
    ("a.b", "b.a", False),
    ("stock.usd.nyse", "stock.usd.nyse", True),
    ("stock.usd.nyse", "stock.eur.nyse", False),
    # empty words are real words: consecutive, leading, trailing dots
    ("a..b", "a..b", True),
    ("a..b", "a.b", False),
    ("a.b", "a..b", False),
    ("a.", "a.", True),
    ("a.", "a", False),
    ("a", "a.", False),
    (".a", ".a", True),
    (".a", "a", False),
    (".", ".", True),
    (".", "", False),
    ("..", ".", False),
    ("a.#", "a.", True),
    ("#.a", ".a", True),
    ("#..#", "a..b", True),
    ("#..#", "a.b", False),
    # 'a.#' / '#.a' / 'a.#.b'
    ("a.#", "a", True),
    ("a.#", "a.b", True),
    ("a.#", "a.b.c", True),
    ("a.#", "b", False),
    ("a.#", "b.a", False),
    ("a.#", "", False),
    ("#.a", "a", True),
    ("#.a", "x.y.a", True),
    ("#.a", "a.x", False),
    ("#.a", "", False),
    ("a.#.b", "a.b", True),
    ("a.#.b", "a.x.b", True),
    ("a.#.b", "a.x.y.z.b", True),
    ("a.#.b", "a.b.c", False),
    ("a.#.b", "a", False),
    ("#.a.#", "a", True),
    ("#.a.#", "x.a.y", True),
    ("#.a.#", "x.b.y", False),
    # 'a.*.#' requires at least two words
    ("a.*.#", "a", False),
    ("a.*.#", "a.b", True),
    ("a.*.#", "a.b.c.d", True),
    ("a.*.#", "a.", True),
    ("a.*.#", "b.c", False),
    # stacked wildcards
    ("#.#.#.#", "", True),
    ("#.#.#.#", "a.b.c", True),
    ("#.*.#", "", False),
    ("#.*.#", "a", True),
    ("*.*.#", "a", False),
    ("*.*.#", "a.b", True),
    ("#.*.*", "a", False),
    ("#.*.*", "a.b.c", True),
    ("#.b.#.b.#", "b.b", True),
    ("#.b.#.b.#", "a.b.a", False),
    # '*' / '#' embedded in a longer word are literal
    ("a*", "a*", True),
    ("a*", "ab", False),
    ("a*", "a", False),
    ("*a", "ba", False),
    ("#a", "#a", True),
    ("#a", "a", False),
    ("#a", "x.a", False),
    ("a#", "a", False),
    ("a#", "a.b", False),
    ("a.b#", "a.b#", True),
    ("**", "a", False),
    ("**", "**", True),
    ("##", "a.b", False),
    ("##", "", False),
    ("##", "##", True),
    # wildcard characters in a key are just ordinary words
    ("a", "*", False),
    ("a", "#", False),
    ("#", "*.#", True),
    ("a.#", "a.#", True),
    ("a.b", "a.#", False),
    ("*.b", "#.b", True),
    # tutorial examples from the RabbitMQ docs
    ("*.orange.*", "quick.orange.rabbit", True),
    ("*.*.rabbit", "quick.orange.rabbit", True),
    ("lazy.#", "lazy.orange.male.rabbit", True),
    ("*.orange.*", "quick.orange.male.rabbit", False),
    ("*.orange.*", "orange", False),
    ("*.*.rabbit", "lazy.orange.male.rabbit", False),
]


def test_match_table_is_large() -> None:
    assert len(MATCH_CASES) >= 60
    assert len({(p, k) for p, k, _ in MATCH_CASES}) == len(MATCH_CASES)


@pytest.mark.parametrize(("pattern", "key", "expected"), MATCH_CASES)
def test_topic_matches_table(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


@pytest.mark.parametrize(("pattern", "key", "expected"), MATCH_CASES)
def test_reference_matches_table(pattern: str, key: str, expected: bool) -> None:
    assert naive_matches(pattern, key) is expected


@pytest.mark.parametrize(("pattern", "key", "expected"), MATCH_CASES)
def test_trie_single_binding_table(pattern: str, key: str, expected: bool) -> None:
    trie: TopicTrie[str] = TopicTrie()
    assert trie.add(pattern, "q")
    assert trie.match(key) == ({"q"} if expected else set())


def test_trie_all_table_bindings_at_once() -> None:
    """Every table pattern bound to its own queue in one trie; shared prefixes must not leak."""
    trie: TopicTrie[str] = TopicTrie()
    patterns = sorted({p for p, _, _ in MATCH_CASES})
    for p in patterns:
        assert trie.add(p, f"q:{p}")
    assert len(trie) == len(patterns)
    for _, key, _ in MATCH_CASES:
        expected = {f"q:{p}" for p in patterns if naive_matches(p, key)}
        assert trie.match(key) == expected, key


# --------------------------------------------------------------------------- trie maintenance


def _node_count(trie: TopicTrie[Any]) -> int:
    """Count trie nodes below the root (white-box check that removal prunes)."""
    total = 0
    stack = [trie._root]
    while stack:
        node = stack.pop()
        total += len(node.children)
        stack.extend(node.children.values())
    return total


def test_empty_trie() -> None:
    trie: TopicTrie[str] = TopicTrie()
    assert len(trie) == 0
    assert trie.match("") == set()
    assert trie.match("a.b") == set()
    assert not trie.remove("a", "q")


def test_duplicate_add() -> None:
    trie: TopicTrie[str] = TopicTrie()
    assert trie.add("a.*", "q1")
    assert not trie.add("a.*", "q1")
    assert len(trie) == 1
    assert trie.add("a.*", "q2")
    assert trie.add("a.#", "q1")
    assert len(trie) == 3
    assert trie.match("a.b") == {"q1", "q2"}


def test_dest_reported_once_across_patterns() -> None:
    trie: TopicTrie[str] = TopicTrie()
    for p in ("#", "a.#", "*.b", "a.b", "#.b", "#.#"):
        trie.add(p, "q")
    assert trie.match("a.b") == {"q"}
    assert len(trie) == 6


def test_remove_and_prune() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add("a.b.c", "q1")
    trie.add("a.b", "q2")
    trie.add("a.#", "q3")
    assert _node_count(trie) == 4  # a, a.b, a.b.c, a.#
    assert trie.remove("a.b.c", "q1")
    assert not trie.remove("a.b.c", "q1")
    assert _node_count(trie) == 3  # a.b.c pruned, a.b kept (has q2)
    assert trie.match("a.b.c") == {"q3"}
    assert trie.remove("a.b", "q2")
    assert _node_count(trie) == 2
    assert trie.remove("a.#", "q3")
    assert _node_count(trie) == 0
    assert len(trie) == 0
    assert trie.match("a") == set()


def test_remove_keeps_interior_node_with_children() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add("a", "q1")
    trie.add("a.b", "q2")
    assert trie.remove("a", "q1")
    assert _node_count(trie) == 2
    assert trie.match("a") == set()
    assert trie.match("a.b") == {"q2"}


def test_remove_missing() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add("a.b", "q1")
    assert not trie.remove("a.b", "q2")  # wrong dest
    assert not trie.remove("a", "q1")  # interior node, not bound
    assert not trie.remove("a.b.c", "q1")  # path absent
    assert not trie.remove("a.*", "q1")  # wildcard is not a key
    assert len(trie) == 1
    assert _node_count(trie) == 2


def test_remove_one_of_several_dests() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add("#", "q1")
    trie.add("#", "q2")
    assert trie.remove("#", "q1")
    assert trie.match("x") == {"q2"}
    assert _node_count(trie) == 1


def test_empty_pattern_binds_at_root() -> None:
    trie: TopicTrie[str] = TopicTrie()
    assert trie.add("", "q")
    assert trie.match("") == {"q"}
    assert trie.match(".") == set()
    assert trie.match("a") == set()
    assert _node_count(trie) == 0
    assert trie.remove("", "q")
    assert trie.match("") == set()


def test_readd_after_remove() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add("a.*", "q")
    trie.remove("a.*", "q")
    assert trie.add("a.*", "q")
    assert trie.match("a.x") == {"q"}


def test_non_string_destinations() -> None:
    trie: TopicTrie[tuple[str, int]] = TopicTrie()
    trie.add("a.#", ("q", 1))
    trie.add("a.#", ("q", 2))
    assert trie.match("a.b") == {("q", 1), ("q", 2)}


def test_many_bindings() -> None:
    trie: TopicTrie[str] = TopicTrie()
    regions = [f"r{i}" for i in range(20)]
    kinds = [f"k{j}" for j in range(20)]
    for r in regions:
        for k in kinds:
            trie.add(f"{r}.{k}", f"{r}-{k}")
        trie.add(f"{r}.#", f"all-{r}")
    for k in kinds:
        trie.add(f"*.{k}", f"any-{k}")
    trie.add("#", "firehose")
    assert len(trie) == 20 * 20 + 20 + 20 + 1
    assert trie.match("r3.k7") == {"r3-k7", "all-r3", "any-k7", "firehose"}
    assert trie.match("r3.k7.extra") == {"all-r3", "firehose"}
    assert trie.match("r3") == {"all-r3", "firehose"}
    assert trie.match("zz.k1") == {"any-k1", "firehose"}
    assert trie.match("") == {"firehose"}
    for r in regions:
        for k in kinds:
            assert trie.remove(f"{r}.{k}", f"{r}-{k}")
    assert len(trie) == 41
    assert trie.match("r3.k7") == {"all-r3", "any-k7", "firehose"}


def test_stacked_hashes_do_not_blow_up() -> None:
    """Memoised states keep '#.#.#...' patterns polynomial against long keys."""
    trie: TopicTrie[str] = TopicTrie()
    trie.add(".".join(["#"] * 30) + ".z", "never")
    trie.add(".".join(["#"] * 30), "always")
    trie.add(".".join(["#", "*"] * 15), "some")
    key = ".".join(["a"] * 200)
    start = time.perf_counter()
    assert trie.match(key) == {"always", "some"}
    assert not topic_matches(".".join(["#"] * 30) + ".z", key)
    assert time.perf_counter() - start < 5.0


def test_long_key_no_recursion_limit() -> None:
    trie: TopicTrie[str] = TopicTrie()
    long_pattern = ".".join(["*"] * 3000)
    trie.add(long_pattern, "q")
    assert trie.match(".".join(["x"] * 3000)) == {"q"}
    assert trie.match(".".join(["x"] * 2999)) == set()
    assert trie.remove(long_pattern, "q")
    assert _node_count(trie) == 0


# --------------------------------------------------------------------------- properties


def naive_matches(pattern: str, key: str) -> bool:
    """Independent reference: the textbook recursion over split_words, no memo, no regex."""

    def go(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        head, rest = p[0], p[1:]
        if head == "#":
            return any(go(rest, k[i:]) for i in range(len(k) + 1))
        if not k:
            return False
        return (head == "*" or head == k[0]) and go(rest, k[1:])

    return go(split_words(pattern), split_words(key))


PATTERN_WORDS = ["", "*", "#", "a", "b"]
KEY_WORDS = ["", "*", "#", "a", "b"]

patterns = st.lists(st.sampled_from(PATTERN_WORDS), max_size=6).map(".".join)
keys = st.lists(st.sampled_from(KEY_WORDS), max_size=6).map(".".join)


@given(pattern=patterns, key=keys)
@settings(max_examples=500, deadline=None)
def test_topic_matches_agrees_with_reference(pattern: str, key: str) -> None:
    assert topic_matches(pattern, key) is naive_matches(pattern, key)


@given(pattern=patterns, key=keys)
@settings(max_examples=500, deadline=None)
def test_single_binding_trie_agrees(pattern: str, key: str) -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add(pattern, "q")
    assert (trie.match(key) == {"q"}) is topic_matches(pattern, key)


@given(bindings=st.lists(patterns, max_size=12), key_list=st.lists(keys, min_size=1, max_size=8))
@settings(max_examples=300, deadline=None)
def test_multi_binding_trie_agrees(bindings: list[str], key_list: list[str]) -> None:
    trie: TopicTrie[int] = TopicTrie()
    for i, p in enumerate(bindings):
        trie.add(p, i)
    for key in key_list:
        expected = {i for i, p in enumerate(bindings) if topic_matches(p, key)}
        assert trie.match(key) == expected


@given(
    bindings=st.lists(st.tuples(patterns, st.integers(0, 3)), max_size=15),
    data=st.data(),
)
@settings(max_examples=300, deadline=None)
def test_add_remove_model(bindings: list[tuple[str, int]], data: st.DataObject) -> None:
    """The trie behaves like a plain set of (pattern, dest) pairs under add/remove."""
    trie: TopicTrie[int] = TopicTrie()
    model: set[tuple[str, int]] = set()
    for p, d in bindings:
        assert trie.add(p, d) is ((p, d) not in model)
        model.add((p, d))
    to_remove = data.draw(st.lists(st.tuples(patterns, st.integers(0, 3)), max_size=15))
    to_remove += data.draw(st.permutations(sorted(model)))[: len(model) // 2]
    for p, d in to_remove:
        assert trie.remove(p, d) is ((p, d) in model)
        model.discard((p, d))
        assert len(trie) == len(model)
    for key in data.draw(st.lists(keys, min_size=1, max_size=5)):
        assert trie.match(key) == {d for p, d in model if topic_matches(p, key)}
    for p, d in sorted(model):
        assert trie.remove(p, d)
    assert len(trie) == 0
    assert _node_count(trie) == 0  # full removal prunes everything


# --------------------------------------------------------------------------- hostile tries


def test_wildcard_runs_normalise_to_one_path() -> None:
    """Runs of wildcards are reordered ('*' first, one '#'): equivalent patterns share a
    path, so thousands of '*'/'#'-only patterns make a trie of a few dozen nodes."""
    assert normalize(split_words("#.#.*.#.a.*.#.*")) == ["*", "#", "a", "*", "*", "#"]
    trie: TopicTrie[str] = TopicTrie()
    import random

    rng = random.Random(3)
    patterns = {".".join(rng.choice("*#") for _ in range(rng.randint(1, 16))) for _ in range(3000)}
    for p in patterns:
        trie.add(p, "q")
    assert len(trie) == len(patterns)
    assert _node_count(trie) <= 2 * 17  # '*' x k, optionally followed by '#'
    for n in (0, 1, 5, 16, 17, 127):
        key = ".".join(["a"] * n) if n else ""
        expected = {"q"} if any(naive_matches(p, key) for p in patterns) else set()
        assert trie.match(key) == expected, n
    for p in patterns:  # equivalent patterns are counted per pair: removal is exact
        assert trie.remove(p, "q")
    assert len(trie) == 0 and _node_count(trie) == 0


@given(
    bindings=st.lists(st.lists(st.sampled_from(["*", "#", "a", "b"]), max_size=8), max_size=12),
    key=st.lists(st.sampled_from(["a", "b", "*"]), max_size=10),
)
@settings(max_examples=300, deadline=None)
def test_wildcard_heavy_trie_agrees(bindings: list[list[str]], key: list[str]) -> None:
    trie: TopicTrie[int] = TopicTrie()
    pats = [".".join(w) for w in bindings]
    for i, p in enumerate(pats):
        trie.add(p, i)
    k = ".".join(key)
    assert trie.match(k) == {i for i, p in enumerate(pats) if naive_matches(p, k)}


def test_topic_exchange_route_cache_follows_binding_changes() -> None:
    from conveyor.broker.exchange import ROUTE_CACHE, TopicExchange

    ex = TopicExchange("t")
    ex.bind("a.*", "q1")
    assert ex.route("a.b") == {"q1"}
    ex.bind("#", "q2")  # a cached key sees the new binding
    assert ex.route("a.b") == {"q1", "q2"}
    ex.unbind("a.*", "q1")
    assert ex.route("a.b") == {"q2"}
    for i in range(ROUTE_CACHE * 2):  # bounded: old keys fall out, answers stay right
        assert ex.route(f"k{i}") == {"q2"}
    assert len(ex._cache) <= ROUTE_CACHE
