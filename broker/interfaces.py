"""Small interfaces the broker model is written against, so that the model (queues,
streams) does not import what drives it (the event loop, the broker)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Scheduler(Protocol):
    """Where deferred work runs. Stream code calls this instead of reaching for the
    running loop itself; outside a loop (recovery, tools) work is done in place."""

    def running(self) -> bool:
        """Whether callbacks and executor jobs can be scheduled now."""
        ...

    def call_soon(self, fn: Callable[..., object], *args: Any) -> bool:
        """Run ``fn(*args)`` on the next loop turn; False (nothing scheduled) outside a loop."""
        ...

    def run_in_executor(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run blocking ``fn(*args)`` off the loop (only when ``running()``)."""
        ...
