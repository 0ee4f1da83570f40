"""Who a connection is and what it may do.

``Principal`` is the interface the rest of the broker uses: sessions check permissions
through it and flow control reads its publish rate. Token verification (Ed25519-signed
tokens) builds one from AUTH; an anonymous connection gets ``ANONYMOUS``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated subject. Rates of None mean the broker's per-connection default."""

    subject: str
    anonymous: bool = False
    rate_messages: float | None = None  # publishes per second
    rate_bytes: float | None = None  # published body bytes per second
    burst_messages: int | None = None  # token-bucket depth (messages)

    def can(self, action: str, name: str) -> bool:
        """May this principal ``action`` ("configure", "write", "read") on ``name``?"""
        return True


ANONYMOUS = Principal("anonymous", anonymous=True)
