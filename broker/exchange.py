"""Exchanges: route a routing key to a set of queue names.

Bindings are stored per exchange type in the structure that makes routing cheap: a dict
key -> queues for direct, a set for fanout, a word trie for topic (never a regex per
binding). The default exchange is not an object here: the core routes "" to the queue
named by the routing key.
"""

from __future__ import annotations

from typing import Any

from conveyor.broker.topic import TopicTrie

EXCHANGE_TYPES = ("direct", "fanout", "topic")


class Exchange:
    """Common state; subclasses implement bind/unbind/route."""

    type = ""

    def __init__(
        self,
        name: str,
        *,
        durable: bool = True,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
        builtin: bool = False,
    ) -> None:
        self.name = name
        self.durable = durable
        self.auto_delete = auto_delete
        self.arguments: dict[str, Any] = arguments or {}
        self.builtin = builtin
        # (routing_key, queue) pairs, for listings, if-unused and queue deletion.
        self.bindings: set[tuple[str, str]] = set()

    def bind(self, key: str, queue: str) -> bool:
        if (key, queue) in self.bindings:
            return False
        self.bindings.add((key, queue))
        self._add(key, queue)
        return True

    def unbind(self, key: str, queue: str) -> bool:
        if (key, queue) not in self.bindings:
            return False
        self.bindings.discard((key, queue))
        self._remove(key, queue)
        return True

    def route(self, routing_key: str) -> set[str] | frozenset[str]:
        raise NotImplementedError

    def _add(self, key: str, queue: str) -> None:
        raise NotImplementedError

    def _remove(self, key: str, queue: str) -> None:
        raise NotImplementedError


_EMPTY: frozenset[str] = frozenset()


class DirectExchange(Exchange):
    type = "direct"

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name, **kw)
        self._table: dict[str, set[str]] = {}

    def _add(self, key: str, queue: str) -> None:
        self._table.setdefault(key, set()).add(queue)

    def _remove(self, key: str, queue: str) -> None:
        qs = self._table.get(key)
        if qs is not None:
            qs.discard(queue)
            if not qs:
                del self._table[key]

    def route(self, routing_key: str) -> set[str] | frozenset[str]:
        return self._table.get(routing_key, _EMPTY)


class FanoutExchange(Exchange):
    type = "fanout"

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name, **kw)
        self._queues: dict[str, int] = {}  # queue -> number of bindings (keys ignored)

    def _add(self, key: str, queue: str) -> None:
        self._queues[queue] = self._queues.get(queue, 0) + 1

    def _remove(self, key: str, queue: str) -> None:
        n = self._queues.get(queue, 0) - 1
        if n <= 0:
            self._queues.pop(queue, None)
        else:
            self._queues[queue] = n

    def route(self, routing_key: str) -> set[str] | frozenset[str]:
        return self._queues.keys()  # type: ignore[return-value]


ROUTE_CACHE = 1024  # routing keys whose topic match is remembered per exchange


class TopicExchange(Exchange):
    """Topic routing through a word trie (broker.topic), with the queues of the last
    ROUTE_CACHE distinct routing keys remembered until the bindings change: publishers
    mostly reuse a few keys, and a key whose match is costly costs it once."""

    type = "topic"

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name, **kw)
        self._trie: TopicTrie[str] = TopicTrie()
        self._cache: dict[str, set[str]] = {}

    def _add(self, key: str, queue: str) -> None:
        self._trie.add(key, queue)
        self._cache.clear()

    def _remove(self, key: str, queue: str) -> None:
        self._trie.remove(key, queue)
        self._cache.clear()

    def route(self, routing_key: str) -> set[str] | frozenset[str]:
        got = self._cache.get(routing_key)
        if got is None:
            got = self._trie.match(routing_key)
            if len(self._cache) >= ROUTE_CACHE:
                self._cache.clear()
            self._cache[routing_key] = got
        return got


def make_exchange(etype: str, name: str, **kw: Any) -> Exchange:
    cls = {"direct": DirectExchange, "fanout": FanoutExchange, "topic": TopicExchange}[etype]
    return cls(name, **kw)
