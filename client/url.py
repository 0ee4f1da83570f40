"""Parse ``mq://[token@]host[:port][/]`` and ``mqs://`` (TLS) URLs."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from conveyor.protocol import DEFAULT_PORT

DEFAULT_TLS_PORT = 5681  # mqs:// without a port (the broker's default tls_port)


@dataclass(frozen=True)
class URL:
    host: str
    port: int
    tls: bool = False
    token: str = ""

    def __str__(self) -> str:
        scheme = "mqs" if self.tls else "mq"
        return f"{scheme}://{self.host}:{self.port}"


def parse_url(url: str) -> URL:
    """Split a broker URL; raises ValueError with a readable message if it is not one."""
    parts = urlsplit(url)
    if parts.scheme not in ("mq", "mqs"):
        raise ValueError(f"unsupported URL scheme in {url!r}: use mq://host:port")
    if not parts.hostname:
        raise ValueError(f"no host in URL {url!r}")
    try:
        port = parts.port or (DEFAULT_TLS_PORT if parts.scheme == "mqs" else DEFAULT_PORT)
    except ValueError:
        raise ValueError(f"bad port in URL {url!r}") from None
    token = unquote(parts.username or "")
    return URL(parts.hostname, port, parts.scheme == "mqs", token)
