"""Client-side TLS settings for ``mqs://`` URLs."""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> ssl.SSLContext:
    """A context that verifies the broker's certificate and host name.

    ``ca``: PEM file of the CA that signed the broker's certificate (default: the system's
    trusted CAs). ``cert``/``key``: this client's certificate and key, for brokers that
    require client certificates (mTLS); ``key`` may be omitted if ``cert`` holds both.
    Raises OSError (ssl.SSLError, FileNotFoundError) if a file cannot be used.
    """
    if key is not None and cert is None:
        raise ValueError("a TLS client key needs a certificate (cert=...)")
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca is not None else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    return ctx


def tls_context(
    url_is_tls: bool,
    ssl_context: ssl.SSLContext | None = None,
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
) -> ssl.SSLContext | None:
    """The context a connection uses: None for ``mq://``; for ``mqs://`` the given
    ``ssl_context`` or one built from ``ca``/``cert``/``key``. TLS options with an
    ``mq://`` URL are an error rather than a silently unencrypted connection."""
    given = ssl_context is not None or ca is not None or cert is not None or key is not None
    if not url_is_tls:
        if given:
            raise ValueError("TLS options need an mqs:// URL (mq:// is plain TCP)")
        return None
    if ssl_context is not None:
        if ca is not None or cert is not None or key is not None:
            raise ValueError("give either ssl_context or ca/cert/key, not both")
        return ssl_context
    return client_context(ca, cert, key)
