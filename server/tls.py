"""TLS for the nodes' HTTP: the server's context, from a certificate and key (clients:
cachefs/common/tls.py)."""

from __future__ import annotations

import ssl

from cachefs.common.errors import ConfigError


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context; a bad certificate or key fails at start with its paths."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS certificate {cert} with key {key}: {e}") from e
    return ctx
