"""``mq-cli server`` flags for the resource limits (one per ``broker.limits.SETTINGS`` entry).

Each flag is passed to ``broker.config.load`` under the setting's name, so the TOML file,
the flags and the validation stay one list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from conveyor.broker.limits import SETTINGS, Limits

F = TypeVar("F", bound=Callable[..., Any])


def limit_options(f: F) -> F:
    """Add ``--max-headers`` ... ``--max-consumers-per-connection`` (default: the config's)."""
    defaults = Limits()
    for name, help_ in reversed(SETTINGS):
        f = click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=int,
            default=None,
            help=f"{help_} [{getattr(defaults, name)}].",
        )(f)
    return click.option(
        "--handshake-timeout-ms",
        "handshake_timeout_ms",
        type=int,
        default=None,
        help="Close a connection that has not finished the handshake (preamble, AUTH) "
        "this long after connecting [10000].",
    )(f)
