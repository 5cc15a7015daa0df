"""TLS contexts for the nodes' HTTP: the server's from a certificate and key, the
client's from a CA bundle. Optional: without a certificate the nodes speak plain HTTP.

On Kubernetes clients reach cache nodes by pod IP (the ring's URLs), which no
certificate names; `tls_server_name` lets a client check every node against the one
name the certificate was issued for (such as the Service's DNS name) instead.
"""

from __future__ import annotations

import ssl

from cachefs.errors import ConfigError


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context; a bad certificate or key fails at start with its paths."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS certificate {cert} with key {key}: {e}") from e
    return ctx


def client_context(ca_bundle: str = "") -> ssl.SSLContext:
    """Verifies servers against `ca_bundle` (a PEM file), or the system's CAs when empty."""
    try:
        ctx = ssl.create_default_context(cafile=ca_bundle or None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the CA bundle {ca_bundle}: {e}") from e
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
