"""Publisher confirms of one connection: sequence checks, the confirm ranges and nacks
gathered while an input batch is handled, and their CONFIRM frames once the batch's log
records are durable (group commit).

Kept apart from the session so the publish frame handlers stay thin; everything here is
per batch or per run of publishes, never a task or an await per message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from conveyor.protocol import Confirm, ConveyorError, InvalidArgument, ResourceError, encode_fields

_CONFIRM = Confirm.TYPE


class ConfirmBroker(Protocol):
    """What confirms need from the broker (counters, the log's group commit)."""

    def count_error(self, code: int, n: int = 1, *, nack: bool = False) -> None: ...

    def flush_journal(self) -> None: ...

    def commit(self, callback: Callable[[BaseException | None], None]) -> None: ...

    def mark_session(self, session: Any) -> None: ...

    def pump_soon(self) -> None: ...


class ConfirmSink(Protocol):
    """The connection CONFIRM frames are written to."""

    @property
    def closed(self) -> bool: ...

    @property
    def out(self) -> list[bytes]: ...


class Confirms:
    """Confirm bookkeeping for one connection; its session calls it from the publish
    handlers and once at the end of every input batch."""

    __slots__ = ("_broker", "_first", "_last", "_pending", "_sink", "last_seq")

    def __init__(self, broker: ConfirmBroker, sink: ConfirmSink) -> None:
        self._broker = broker
        self._sink = sink
        # Highest publish sequence number used so far: numbers must increase.
        self.last_seq = 0
        # The open range of consecutive acks (0: none open) and the closed ranges and
        # nacks of this batch, as CONFIRM fields [first, last, ok, code, message].
        self._first = 0
        self._last = 0
        self._pending: list[list[Any]] = []

    def check_seq(self, frame: str, first: int, n: int) -> None:
        """Sequence numbers strictly increase on a connection (spec/PROTOCOL.md 12): a
        number at or below one already used is refused whole (400, rid 0), so a
        publisher never gets a CONFIRM that goes backwards."""
        if first <= self.last_seq:
            raise InvalidArgument(
                f"{frame}: sequence number {first} is not above the last one used, "
                f"{self.last_seq}; nothing published",
                {"frame": frame, "seq": first, "last_seq": self.last_seq},
            )
        self.last_seq = first + n - 1

    def ack(self, first: int, last: int) -> None:
        """Sequence numbers ``first..last`` were published: extend the open range when
        they follow it, else close it and open a new one (one CONFIRM per range)."""
        if first == self._last + 1 and self._first:
            self._last = last
        else:
            self.close_range()
            self._first = first
            self._last = last

    def close_range(self) -> None:
        """End the open range of acks (a nack or the batch's end comes next)."""
        if self._first:
            self._pending.append([self._first, self._last, True, 0, ""])
            self._first = 0

    def nack(self, seq: int, exc: ConveyorError) -> None:
        """Publish ``seq`` was refused with ``exc``: its own negative CONFIRM, in order."""
        self._broker.count_error(exc.code, nack=True)
        self.close_range()
        self._pending.append([seq, seq, False, exc.code, exc.message])
        self._last = seq

    def end_batch(self) -> None:
        """Confirms wait until the batch's log records are durable (group commit)."""
        self.close_range()
        broker = self._broker
        broker.flush_journal()
        if self._pending:
            confirms = self._pending
            self._pending = []
            broker.commit(lambda err: self._send(confirms, err))

    def _send(self, confirms: list[list[Any]], err: BaseException | None) -> None:
        sink = self._sink
        if sink.closed:
            return
        broker = self._broker
        if err is not None:
            # Not on disk: every ack in this batch becomes a nack the publisher can retry.
            why = f"could not store the message: {err}"
            broker.count_error(
                ResourceError.code, nack=True, n=sum([c[1] - c[0] + 1 for c in confirms if c[2]])
            )
            confirms = [
                [c[0], c[1], False, ResourceError.code, why] if c[2] else c for c in confirms
            ]
        sink.out.extend([encode_fields(_CONFIRM, c) for c in confirms])
        broker.mark_session(sink)
        broker.pump_soon()
