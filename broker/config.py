"""Broker settings: defaults, an optional TOML file, then command-line flags.

The TOML file uses the same names as the flags (dashes or underscores), at top level or
under a ``[server]`` table::

    host = "127.0.0.1"
    port = 5680
    data_dir = "./conveyor-data"
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import DEFAULT_PORT
from protocol._generated import (
    HEARTBEAT_MS_DEFAULT,
    MAX_FRAME_SIZE_CEILING,
    MAX_FRAME_SIZE_DEFAULT,
    MAX_FRAME_SIZE_FLOOR,
)


class ConfigError(ValueError):
    """A setting is unknown or out of range (reported as one line, exit status 2)."""


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: str = "./conveyor-data"
    max_frame_size: int = MAX_FRAME_SIZE_DEFAULT
    max_message_size: int = 0  # 0 = max_frame_size - 8192
    heartbeat_ms: int = HEARTBEAT_MS_DEFAULT
    handshake_timeout_ms: int = 10000
    shutdown_grace_ms: int = 5000
    log_level: str = "info"
    # durability (broker.wal)
    fsync: str = "always"
    fsync_interval_ms: int = 100
    segment_bytes: int = 64 << 20
    snapshot_bytes: int = 64 << 20
    snapshot_interval_ms: int = 300000
    repair: bool = False
    # Bytes of ready message bodies kept in memory; the rest wait in page files.
    memory_budget: int = 256 << 20

    def effective_max_message_size(self) -> int:
        limit = self.max_frame_size - 8192
        return min(self.max_message_size, limit) if self.max_message_size else limit

    def validate(self) -> Config:
        if not MAX_FRAME_SIZE_FLOOR * 4 <= self.max_frame_size <= MAX_FRAME_SIZE_CEILING:
            raise ConfigError(
                f"max_frame_size must be {MAX_FRAME_SIZE_FLOOR * 4}..{MAX_FRAME_SIZE_CEILING}")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be 0..65535")
        if self.heartbeat_ms < 0 or self.handshake_timeout_ms <= 0:
            raise ConfigError("heartbeat_ms must be >= 0 and handshake_timeout_ms > 0")
        if self.max_message_size < 0:
            raise ConfigError("max_message_size must be >= 0")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be debug, info, warning or error")
        if self.fsync not in ("always", "interval", "never"):
            raise ConfigError("fsync must be always, interval or never")
        if self.fsync_interval_ms < 1 or self.segment_bytes < 4096 or self.snapshot_bytes < 4096:
            raise ConfigError("fsync_interval_ms >= 1, segment_bytes and snapshot_bytes >= 4096")
        if self.memory_budget < 1 << 20:
            raise ConfigError("memory_budget must be >= 1048576 (1 MiB)")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def load(path: str | None = None, **overrides: Any) -> Config:
    """Defaults, then the TOML file (if any), then non-None ``overrides`` (CLI flags)."""
    values: dict[str, Any] = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        table = raw.get("server", raw)
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            values[name] = value
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
    for name, value in values.items():
        want = FIELDS[name].type
        if (want == "int" and type(value) is not int) or (
            want == "str" and type(value) is not str) or (
            want == "bool" and type(value) is not bool
        ):
            raise ConfigError(f"setting {name!r} must be {want}, got {value!r}")
    return Config(**values).validate()
