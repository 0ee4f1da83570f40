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

from conveyor.broker import flow, limits
from conveyor.protocol import DEFAULT_PORT
from conveyor.protocol.limits import (
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
    log_format: str = "text"  # or "json": one object per line (broker.logfmt)
    # durability (broker.wal)
    fsync: str = "always"
    fsync_interval_ms: int = 100
    segment_bytes: int = 64 << 20
    snapshot_bytes: int = 64 << 20
    snapshot_interval_ms: int = 300000
    repair: bool = False
    # Bytes of ready message bodies kept in memory; the rest wait in page files.
    memory_budget: int = 256 << 20
    # Security (broker.tls, broker.auth). A TLS listener starts when tls_cert and tls_key
    # are set; tls_ca makes client certificates mandatory (mTLS). Empty string = unset.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_port: int = 5681
    # mTLS: a TLS client's certificate common name is its identity when it AUTHs without a
    # token; tls_identities (TOML) gives each name its permissions (unset: all rights).
    tls_client_subject_identity: bool = False
    tls_identities: str = ""
    plain: bool = True  # the plain-TCP listener on `port`
    allow_anonymous: bool = False  # anonymous from any address (default: loopback only)
    require_auth: bool = False  # a token from every connection, loopback included
    # Wire compression (spec "Compressed frames"): a client that asks for zstd in AUTH gets
    # it unless this is false. Off for a connection until the client asks.
    wire_compression: bool = True
    # HTTP listener (broker.http: management API, REST gateway, /metrics, dashboard) on
    # `host`: -1 = off, 0 = any free port (printed as "conveyor http listening on ...").
    http_port: int = -1
    # Host names (comma-separated) anonymous HTTP callers may use besides localhost,
    # 127.0.0.1 and [::1] (broker.http.common.check_anonymous: DNS rebinding).
    http_allowed_hosts: str = ""
    # Serve HTTP over TLS with tls_cert/tls_key (and tls_ca: client certificates).
    http_tls: bool = False
    # Resource limits (broker.limits; each refusal is a typed error, see spec "Limits").
    max_headers: int = limits.DEFAULT_MAX_HEADERS
    max_header_bytes: int = limits.DEFAULT_MAX_HEADER_BYTES
    max_connections: int = limits.DEFAULT_MAX_CONNECTIONS
    max_connections_per_subject: int = limits.DEFAULT_MAX_CONNECTIONS_PER_SUBJECT
    max_queues: int = limits.DEFAULT_MAX_QUEUES
    max_queues_per_subject: int = limits.DEFAULT_MAX_QUEUES_PER_SUBJECT
    max_consumers_per_connection: int = limits.DEFAULT_MAX_CONSUMERS_PER_CONNECTION
    max_bindings_per_exchange: int = limits.DEFAULT_MAX_BINDINGS_PER_EXCHANGE
    max_bindings_per_queue: int = limits.DEFAULT_MAX_BINDINGS_PER_QUEUE
    max_binding_words: int = limits.DEFAULT_MAX_BINDING_WORDS
    max_binding_wildcards: int = limits.DEFAULT_MAX_BINDING_WILDCARDS
    max_unacked_bytes_per_consumer: int = limits.DEFAULT_MAX_UNACKED_BYTES_PER_CONSUMER
    max_unauthenticated: int = limits.DEFAULT_MAX_UNAUTHENTICATED
    max_unauthenticated_per_ip: int = limits.DEFAULT_MAX_UNAUTHENTICATED_PER_IP
    # Publisher flow control (broker.flow; spec section 12 "Publisher flow control").
    publish_credit_messages: int = flow.DEFAULT_CREDIT_MESSAGES
    publish_credit_bytes: int = flow.DEFAULT_CREDIT_BYTES
    publish_rate_messages: int = 0  # per connection without a token rate; 0 = unlimited
    publish_rate_bytes: int = 0
    publish_burst_messages: int = 0  # 0 = one second of the rate
    memory_high_watermark: int = 0  # bytes of resident memory; 0 = 40% of physical memory
    disk_free_limit: int = flow.DEFAULT_DISK_FREE_LIMIT  # 0 = off

    def effective_max_message_size(self) -> int:
        limit = self.max_frame_size - 8192
        return min(self.max_message_size, limit) if self.max_message_size else limit

    def validate(self) -> Config:
        if not MAX_FRAME_SIZE_FLOOR * 4 <= self.max_frame_size <= MAX_FRAME_SIZE_CEILING:
            raise ConfigError(
                f"max_frame_size must be {MAX_FRAME_SIZE_FLOOR * 4}..{MAX_FRAME_SIZE_CEILING}"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be 0..65535")
        if self.heartbeat_ms < 0 or self.handshake_timeout_ms <= 0:
            raise ConfigError("heartbeat_ms must be >= 0 and handshake_timeout_ms > 0")
        if self.max_message_size < 0:
            raise ConfigError("max_message_size must be >= 0")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be debug, info, warning or error")
        if self.log_format not in ("text", "json"):
            raise ConfigError("log_format must be text or json")
        if self.fsync not in ("always", "interval", "never"):
            raise ConfigError("fsync must be always, interval or never")
        if self.fsync_interval_ms < 1 or self.segment_bytes < 4096 or self.snapshot_bytes < 4096:
            raise ConfigError("fsync_interval_ms >= 1, segment_bytes and snapshot_bytes >= 4096")
        if self.memory_budget < 1 << 20:
            raise ConfigError("memory_budget must be >= 1048576 (1 MiB)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key must be given together")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError("tls_ca (client certificates) needs tls_cert and tls_key")
        if not 0 <= self.tls_port <= 65535:
            raise ConfigError("tls_port must be 0..65535")
        if not self.plain and not self.tls_cert:
            raise ConfigError("no listener left: plain = false needs tls_cert and tls_key")
        if self.plain and self.tls_cert and self.port and self.port == self.tls_port:
            raise ConfigError(f"port and tls_port are both {self.port}")
        if not -1 <= self.http_port <= 65535:
            raise ConfigError("http_port must be -1 (off) or 0..65535")
        if self.http_port > 0 and self.http_port in (
            self.port if self.plain else -1,
            self.tls_port if self.tls_cert else -1,
        ):
            raise ConfigError(f"http_port {self.http_port} is also a broker port")
        if (self.tls_client_subject_identity or self.tls_identities) and not self.tls_ca:
            raise ConfigError(
                "tls_client_subject_identity and tls_identities need tls_ca "
                "(verified client certificates)"
            )
        if self.http_tls and not self.tls_cert:
            raise ConfigError("http_tls needs tls_cert and tls_key")
        if self.allow_anonymous and self.require_auth:
            raise ConfigError("allow_anonymous and require_auth contradict each other")
        bad_limit = limits.validate(self)
        if bad_limit:
            raise ConfigError(bad_limit)
        bad_flow = flow.validate(self)
        if bad_flow:
            raise ConfigError(bad_flow)
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
        if (
            (want == "int" and type(value) is not int)
            or (want == "str" and type(value) is not str)
            or (want == "bool" and type(value) is not bool)
        ):
            raise ConfigError(f"setting {name!r} must be {want}, got {value!r}")
    return Config(**values).validate()
