"""The client's settings (cachefs/common/settings.py says where settings come from)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cachefs.common.errors import ConfigError
from cachefs.common.settings import format_size, given, load, parse_size
from cachefs.common.wire import MAX_BATCH_BYTES, MAX_BATCH_ITEMS


@dataclass(frozen=True)
class ClientConfig:
    """How a client (fsspec, CLI, FUSE) reaches the cluster."""

    SECTION = "client"
    USES_CLUSTER_FILE = True

    endpoint: str = ""  # one URL, or several separated by commas (any node answers metadata calls)
    token: str = ""  # the reader token: blocks, manifests, listings (what training pods get)
    admin_token: str = ""  # the admin token: datasets, warm-up, refresh (the CLI and the operator only)
    connect_timeout: float = 5.0  # a node that does not accept in 5 s is treated as down
    read_timeout: float = 60.0  # covers a cold block read from a slow origin
    retries: int = 3
    max_concurrency: int = 16  # requests in flight per filesystem
    node_requests: int = 4  # requests in flight per node; reads arriving meanwhile leave together in the next
    max_batch_items: int = 1024  # byte ranges in one request
    max_batch_bytes: int = 16 * 1024**2  # bytes asked in one request (larger reads are split)
    readahead_blocks: int = 2
    io_threads: int = 2  # event loops receiving block bytes in parallel (0: the filesystem's own loop)
    origin_fallback: bool = True  # read the origin directly when no cache node answers
    ca_bundle: str = ""  # PEM file of the CAs that sign https:// nodes' certificates; empty: the system's
    tls_server_name: str = ""  # the name every node's certificate is checked against; empty: each URL's host

    def __post_init__(self) -> None:
        for url in self.endpoints:
            if not re.match(r"^https?://[^\s/]+", url):
                raise ConfigError(f"endpoint {url!r} must be a URL starting with http:// or https://")
        for name in ("connect_timeout", "read_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_concurrency < 1 or self.retries < 0 or self.readahead_blocks < 0 or self.io_threads < 0:
            raise ConfigError("max_concurrency must be ≥ 1; retries, readahead_blocks and io_threads ≥ 0")
        if self.node_requests < 1 or not 1 <= self.max_batch_items <= MAX_BATCH_ITEMS:
            raise ConfigError(f"node_requests must be ≥ 1 and max_batch_items from 1 to {MAX_BATCH_ITEMS}")
        if not 4096 <= self.max_batch_bytes <= MAX_BATCH_BYTES:
            raise ConfigError(f"max_batch_bytes must be from 4 KiB to {MAX_BATCH_BYTES // 1024**2} MiB")

    @property
    def endpoints(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.endpoint.split(",") if u.strip()]

    def require_endpoint(self) -> None:
        if not self.endpoint:
            raise ConfigError(
                "no cachefs endpoint: run `cachefs up`, or set CACHEFS_ENDPOINT and CACHEFS_TOKEN, "
                "or pass endpoint= and token= as storage options"
            )


__all__ = ["ClientConfig", "load", "parse_size", "format_size", "given"]
