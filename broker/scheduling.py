"""The broker's hookup of the model's Scheduler interface to the asyncio loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class LoopScheduler:
    """conveyor.broker.interfaces.Scheduler on whichever asyncio loop is running at the call."""

    def running(self) -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def call_soon(self, fn: Callable[..., object], *args: Any) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_soon(fn, *args)
        return True

    def run_in_executor(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(None, fn, *args)
