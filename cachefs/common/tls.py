"""TLS for clients of the nodes' HTTP: a context from a CA bundle (the nodes' own context,
from a certificate and key, is server/tls.py). Optional: without a certificate the nodes
speak plain HTTP.

On Kubernetes clients reach cache nodes by pod IP (the ring's URLs), which no
certificate names; `tls_server_name` lets a client check every node against the one
name the certificate was issued for (such as the Service's DNS name) instead.
"""

from __future__ import annotations

import ssl

from cachefs.common.errors import ConfigError


def client_context(ca_bundle: str = "") -> ssl.SSLContext:
    """Verifies servers against `ca_bundle` (a PEM file), or the system's CAs when empty."""
    try:
        ctx = ssl.create_default_context(cafile=ca_bundle or None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the CA bundle {ca_bundle}: {e}") from e
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
