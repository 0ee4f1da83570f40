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

__all__ = ["TopicTrie", "split_words", "topic_matches"]

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


class _Node(Generic[T]):
    """One trie node: the word edges below it and the destinations bound exactly here."""

    __slots__ = ("children", "dests", "is_hash")

    def __init__(self, is_hash: bool) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.dests: set[T] = set()
        # Reached through a '#' edge: such a node may also absorb further key words.
        self.is_hash = is_hash


class TopicTrie(Generic[T]):
    """Bindings ``(pattern, dest)`` indexed by pattern words for fast topic routing.

    Not thread-safe; the broker mutates and queries it from one event loop.
    """

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root: _Node[T] = _Node(is_hash=False)
        self._count = 0

    def __len__(self) -> int:
        """Number of distinct ``(pattern, dest)`` bindings."""
        return self._count

    def add(self, pattern: str, dest: T) -> bool:
        """Bind ``dest`` under ``pattern``; False if that exact pair was already bound."""
        node = self._root
        for word in split_words(pattern):
            child = node.children.get(word)
            if child is None:
                child = _Node(is_hash=word == HASH)
                node.children[word] = child
            node = child
        if dest in node.dests:
            return False
        node.dests.add(dest)
        self._count += 1
        return True

    def remove(self, pattern: str, dest: T) -> bool:
        """Unbind the pair; False if absent. Prunes nodes left with no bindings or children."""
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for word in split_words(pattern):
            child = node.children.get(word)
            if child is None:
                return False
            path.append((node, word))
            node = child
        if dest not in node.dests:
            return False
        node.dests.discard(dest)
        self._count -= 1
        # Prune bottom-up so that dead branches don't cost anything at match time.
        for parent, word in reversed(path):
            child = parent.children[word]
            if child.dests or child.children:
                break
            del parent.children[word]
        return True

    def match(self, routing_key: str) -> set[T]:
        """Return every destination whose pattern matches ``routing_key`` (each once).

        Walks states (node, key word index). A '#' node is entered without consuming a word
        and may then consume one more word while staying put, which models "zero or more"
        with O(1) transitions per state. Each state is visited at most once per call, so the
        cost is bounded by trie nodes x (words + 1) even for patterns like ``#.#.#.#``.
        """
        words = split_words(routing_key)
        n = len(words)
        result: set[T] = set()
        seen: set[tuple[int, int]] = set()
        stack: list[tuple[_Node[T], int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            state = (id(node), i)
            if state in seen:
                continue
            seen.add(state)
            children = node.children
            if i == n:
                result.update(node.dests)
            else:
                word = words[i]
                literal = children.get(word)
                if literal is not None:
                    stack.append((literal, i + 1))
                star = children.get(STAR)
                if star is not None and star is not literal:
                    stack.append((star, i + 1))
                if node.is_hash:
                    stack.append((node, i + 1))
            hash_child = children.get(HASH)
            if hash_child is not None:
                stack.append((hash_child, i))
        return result
