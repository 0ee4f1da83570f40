"""Storage seam: the queue model emits commands, a Store makes them durable.

Every state change of a durable queue is one of a small set of commands (declare,
enqueue, ack, requeue, purge, delete ...). The model hands them to ``Store.append`` in
order and asks ``Store.commit`` to call back once everything appended so far is durable;
publisher confirms wait for that callback. Recovery replays the same commands, and a
replicated deployment can ship them to followers unchanged.

``MemoryStore`` keeps nothing durable and commits immediately: it is the store for
transient deployments and for tests of the model. The write-ahead log implements the
same interface.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

# A command record: a tuple whose first element names the command (broker.journal).
Record = tuple[Any, ...]


class Store(Protocol):
    # The write error while the store cannot write (the broker refuses publishes), else None.
    failed: BaseException | None

    def append(self, records: Iterable[Record]) -> None:
        """Queue records for durability, in order."""

    def commit(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback(None)`` once every record appended so far is durable, or
        ``callback(error)`` if it could not be written."""

    def write_through(self) -> None:
        """Hand the records appended so far to the OS now (no fsync): the broker calls
        it before deliveries go out, so a process crash keeps their records."""

    def close(self) -> None:
        """Flush and release resources."""


class MemoryStore:
    """Non-durable store: commits immediately. ``keep=True`` records commands for tests."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.records: list[Record] = []
        self.failed: BaseException | None = None

    def append(self, records: Iterable[Record]) -> None:
        if self.keep:
            self.records.extend(records)

    def commit(self, callback: Callable[[BaseException | None], None]) -> None:
        callback(None)

    def write_through(self) -> None:
        return None

    def close(self) -> None:
        self.records.clear()
