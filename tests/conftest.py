from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.broker_process import BrokerProcess


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Start brokers with extra CLI flags; every one is stopped at teardown."""
    started: list[BrokerProcess] = []

    def start(*extra: str, name: str = "data") -> BrokerProcess:
        b = BrokerProcess(tmp_path / f"{name}{len(started)}", *extra).start()
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One broker shared by a module's tests (each test uses its own queue names)."""
    b = BrokerProcess(tmp_path_factory.mktemp("broker") / "data").start()
    yield b
    b.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """A fresh broker for one test."""
    return broker_factory()
