"""Topic-exchange matching with RabbitMQ's AMQP topic semantics.

Keys and binding patterns are split on ``.`` exactly as RabbitMQ's ``split_topic_key`` does:
the empty string is zero words, every other string is ``str.split(".")`` (so empty words
count). In a pattern, a whole word ``*`` matches exactly one word (possibly empty) and a
whole word ``#`` matches zero or more words; ``*``/``#`` inside a longer word are literal.

Bindings live in a trie so that routing cost depends on the key and the trie's shape rather
than on the number of bindings, which is what makes topic exchanges with many bindings cheap.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["TopicTrie", "normalize", "split_words", "topic_matches"]

T = TypeVar("T", bound=Hashable)

STAR = "*"
HASH = "#"


def split_words(key: str) -> list[str]:
    """Split a routing key or pattern into words the way RabbitMQ does.

    ``""`` is zero words (not one empty word), so pattern ``""`` only matches key ``""`` and
    ``*`` does not match ``""``; otherwise empty words are kept (``"a."`` is two words).
    """
    if not key:
        return []
    return key.split(".")


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Return whether one binding pattern matches one routing key.

    A plain dynamic programme over (pattern word, key word) positions, for callers that check
    a single pair and as an oracle for the trie. Runs in O(len(pattern) * len(key)), so
    patterns like ``#.#.#.#`` cannot cause exponential backtracking.
    """
    pw = split_words(pattern)
    kw = split_words(routing_key)
    n = len(kw)
    # ok[j]: the pattern suffix pw[i:] matches the key suffix kw[j:]; built for i from the end.
    ok = [False] * n + [True]
    for word in reversed(pw):
        new = [False] * (n + 1)
        if word == HASH:
            # '#' consumes zero words (ok[j]) or one more word and stays ('#' at j + 1).
            new[n] = ok[n]
            for j in range(n - 1, -1, -1):
                new[j] = ok[j] or new[j + 1]
        else:
            for j in range(n):
                new[j] = ok[j + 1] and (word == STAR or word == kw[j])
        ok = new
    return ok[0]


def normalize(words: list[str]) -> list[str]:
    """The canonical form of a pattern's words: in every run of wildcards, the ``*`` words
    first and at most one ``#`` after them.

    A run of k ``*`` and at least one ``#`` matches "k or more words" whatever the order,
    so ``#.#`` is ``#`` and ``#.*.#`` is ``*.#``. Equivalent patterns share one trie path,
    which keeps a trie of wildcard-heavy patterns small.
    """
    out: list[str] = []
    stars = 0
    hashed = False
    for word in words:
        if word == STAR:
            stars += 1
        elif word == HASH:
            hashed = True
        else:
            if stars or hashed:
                out.extend([STAR] * stars)
                if hashed:
                    out.append(HASH)
                stars, hashed = 0, False
            out.append(word)
    out.extend([STAR] * stars)
    if hashed:
        out.append(HASH)
    return out


class _Node(Generic[T]):
    """One trie node: the word edges below it and the destinations bound exactly here
    (with how many bound patterns normalise to this node for each)."""

    __slots__ = ("children", "dests")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.dests: dict[T, int] = {}


class TopicTrie(Generic[T]):
    """Bindings ``(pattern, dest)`` indexed by normalised pattern words for topic routing.

    Not thread-safe; the broker mutates and queries it from one event loop.
    """

    __slots__ = ("_pairs", "_root")

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._pairs: set[tuple[str, T]] = set()

    def __len__(self) -> int:
        """Number of distinct ``(pattern, dest)`` bindings."""
        return len(self._pairs)

    def add(self, pattern: str, dest: T) -> bool:
        """Bind ``dest`` under ``pattern``; False if that exact pair was already bound."""
        if (pattern, dest) in self._pairs:
            return False
        self._pairs.add((pattern, dest))
        node = self._root
        for word in normalize(split_words(pattern)):
            child = node.children.get(word)
            if child is None:
                child = node.children[word] = _Node()
            node = child
        node.dests[dest] = node.dests.get(dest, 0) + 1
        return True

    def remove(self, pattern: str, dest: T) -> bool:
        """Unbind the pair; False if absent. Prunes nodes left with no bindings or children."""
        if (pattern, dest) not in self._pairs:
            return False
        self._pairs.discard((pattern, dest))
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for word in normalize(split_words(pattern)):
            path.append((node, word))
            node = node.children[word]
        n = node.dests[dest] - 1
        if n:
            node.dests[dest] = n
        else:
            del node.dests[dest]
        # Prune bottom-up so that dead branches don't cost anything at match time.
        for parent, word in reversed(path):
            child = parent.children[word]
            if child.dests or child.children:
                break
            del parent.children[word]
        return True

    def match(self, routing_key: str) -> set[T]:
        """Return every destination whose pattern matches ``routing_key`` (each once).

        Each trie node is visited at most once, carrying the set of key positions (a bit
        mask over 0..words) at which a prefix of the key has matched the path to it: a
        literal edge keeps the positions whose word is that literal and shifts them by
        one, ``*`` shifts every position below the end, ``#`` fills every position from
        the lowest one up. A node is left unvisited when its mask is empty, and below a
        node only the literal edges that are words of the key are followed. So a publish
        costs O(visited nodes) word-mask operations, never (nodes x words) states; the
        trie's size is what broker.limits bounds (bindings per exchange, words and
        wildcards per pattern).
        """
        words = split_words(routing_key)
        n = len(words)
        positions: dict[str, int] = {}
        for i, word in enumerate(words):
            positions[word] = positions.get(word, 0) | (1 << i)
        positions.pop(STAR, None)  # a key word "*" or "#" is a literal: no pattern has it
        positions.pop(HASH, None)
        before_end = (1 << n) - 1  # positions where one more word can be consumed
        full = (1 << (n + 1)) - 1
        end = 1 << n
        result: set[T] = set()
        stack: list[tuple[_Node[T], int]] = [(self._root, 1)]
        pop, push = stack.pop, stack.append
        while stack:
            node, mask = pop()
            if mask & end and node.dests:
                result.update(node.dests)
            children = node.children
            if not children:
                continue
            star = children.get(STAR)
            if star is not None:
                m = (mask & before_end) << 1
                if m:
                    push((star, m))
            hash_child = children.get(HASH)
            if hash_child is not None:
                push((hash_child, full & ~((mask & -mask) - 1)))
            if len(children) <= len(positions):
                for word, child in children.items():
                    pos = positions.get(word)
                    if pos is not None:
                        m = (mask & pos) << 1
                        if m:
                            push((child, m))
            else:
                for word, pos in positions.items():
                    found = children.get(word)
                    if found is not None:
                        m = (mask & pos) << 1
                        if m:
                            push((found, m))
        return result

    def nodes(self) -> int:
        """Trie nodes below the root (what a publish may have to visit)."""
        total = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            total += len(node.children)
            stack.extend(node.children.values())
        return total
