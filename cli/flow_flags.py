"""``mq-cli server`` flags for publisher flow control (one per ``broker.flow.SETTINGS`` entry).

Each flag is passed to ``broker.config.load`` under the setting's name, so the TOML file,
the flags and the validation stay one list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from conveyor.broker.flow import SETTINGS

F = TypeVar("F", bound=Callable[..., Any])


def flow_options(f: F) -> F:
    """Add ``--publish-credit-messages`` ... ``--disk-free-limit``."""
    for name, help_ in reversed(SETTINGS):
        f = click.option(
            f"--{name.replace('_', '-')}", name, type=int, default=None, help=f"{help_}."
        )(f)
    return f
