"""TLS for the broker's second listener (``tls_cert`` + ``tls_key``; ``tls_ca`` = mTLS)."""

from __future__ import annotations

import ssl

from conveyor.broker.config import Config


def server_context(config: Config) -> ssl.SSLContext | None:
    """The listener's SSL context, or None when no certificate is configured.

    TLS 1.2 or newer. With ``tls_ca`` every client must present a certificate signed by
    that CA (mutual TLS); otherwise client certificates are not asked for.
    Raises OSError (ssl.SSLError, FileNotFoundError) if a file cannot be used.
    """
    if not (config.tls_cert and config.tls_key):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_ca:
        ctx.load_verify_locations(cafile=config.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx
