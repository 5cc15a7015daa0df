"""Settings of the cache cluster: one node (`NodeConfig`, read on the node's own host) and
what `cachefs up` builds (`ClusterConfig`). Where they come from: cachefs/common/settings.py."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from cachefs.common.errors import ConfigError
from cachefs.common.settings import given
from cachefs.common.wire import DEFAULT_BLOCK_SIZE

# What `dataset add` may name by default: the object stores and the web. No file:// (a
# local root must be listed), and never chained URLs (simplecache::...).
DEFAULT_ALLOWED_ORIGINS = ("s3://", "gs://", "gcs://", "az://", "abfs://", "abfss://", "hf://", "http://", "https://")
_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


@dataclass(frozen=True)
class NodeConfig:
    """One cache node: budgets, where its disk tier lives, how it listens."""

    SECTION = "node"

    memory_bytes: int = 256 * 1024**2
    disk_bytes: int = 1024**3
    disk_dir: str = ""  # empty: memory tier only
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (several nodes on one machine)
    advertise_host: str = ""  # the address clients use; empty: host, or the Ray node IP
    block_size: int = DEFAULT_BLOCK_SIZE
    eviction: str = "lru"  # lru | sticky (keeps a stable resident set under shuffled epochs)
    origin_timeout: float = 60.0
    warm_concurrency: int = 8
    # After a ring change a node pulls the units it now owns from their previous owners
    # (server/rebalance.py), at most this fast and this many at once: readers come first.
    rebalance_bytes_per_s: int = 256 * 1024**2
    rebalance_concurrency: int = 4
    # Off: a unit whose owner changed is read from the origin, as before the hand-over
    # existed (for comparison: bench/membership.py runs both).
    handover: bool = True
    # Ray starts actors at nice 15: on a busy host (data-loading workers on every core) a
    # cache node would then answer last. A node raises itself to this priority when it may
    # (root or CAP_SYS_NICE); otherwise it keeps Ray's.
    nice: int = 0
    token: str = ""  # the reader token
    admin_token: str = ""
    tls_cert: str = ""  # PEM certificate (chain) and key: the node serves https:// (empty: http://)
    tls_key: str = ""

    def __post_init__(self) -> None:
        if self.memory_bytes < 0 or self.disk_bytes < 0:
            raise ConfigError("memory_bytes and disk_bytes must be ≥ 0")
        if self.memory_bytes == 0 and (self.disk_bytes == 0 or not self.disk_dir):
            raise ConfigError("a cache node needs a memory budget, or a disk budget and a disk_dir")
        if self.eviction not in ("lru", "sticky"):
            raise ConfigError(f"eviction must be 'lru' or 'sticky', not {self.eviction!r}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port {self.port} is outside 0..65535")
        if self.block_size < 4096:
            raise ConfigError("block_size must be at least 4 KiB")
        if self.rebalance_bytes_per_s <= 0 or self.rebalance_concurrency <= 0:
            raise ConfigError("rebalance_bytes_per_s and rebalance_concurrency must be positive")
        if not -20 <= self.nice <= 19:
            raise ConfigError(f"nice must be from -20 to 19, not {self.nice}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: give both for https://, or neither for http://")

    @property
    def capacity(self) -> int:
        """Bytes this node can hold: the disk tier includes the memory tier when both exist."""
        return max(self.memory_bytes, self.disk_bytes if self.disk_dir else 0)


@dataclass(frozen=True)
class ClusterConfig:
    """What `cachefs up` builds."""

    SECTION = "cluster"

    nodes: int = 0  # 0: one cache node per Ray node
    memory_bytes: int = 256 * 1024**2
    disk_bytes: int = 1024**3
    disk_root: str = ""  # each node gets DISK_ROOT/<node id>; empty: $CACHEFS_HOME/disk
    state_dir: str = ""  # coordinator state; empty: $CACHEFS_HOME/state
    address: str = ""  # Ray address; empty: RAY_ADDRESS, or start a local Ray cluster
    host: str = "127.0.0.1"
    port: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    eviction: str = "lru"
    namespace: str = "cachefs"
    # Origins that may be registered: bare protocols ("s3://"), URL prefixes
    # ("s3://bucket/sets/"), local roots ("file:///data/").
    # Enforced by the coordinator on add and refresh (server/origin_policy.py).
    allowed_origins: tuple[str, ...] = DEFAULT_ALLOWED_ORIGINS
    # Hosts (names, IPs, CIDRs) that http(s) origins and endpoint URLs may reach although
    # they are loopback, link-local or cloud metadata addresses (refused otherwise).
    allowed_origin_hosts: tuple[str, ...] = ()
    # TLS for the nodes' HTTP: paths as the cache nodes see them (on Kubernetes, a Secret
    # mounted into every worker). Empty: plain http://.
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self) -> None:

        if self.nodes < 0:
            raise ConfigError("nodes must be ≥ 0 (0 means one per Ray node)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: give both for https://, or neither for http://")
        for entry in self.allowed_origins:
            if "://" not in entry or "::" in entry.partition("://")[0]:
                raise ConfigError(f"allowed_origins entry {entry!r} must be a protocol or URL prefix such as s3:// "
                                  "or file:///data/")
        for host in self.allowed_origin_hosts:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                if not _HOST_RE.match(host):
                    raise ConfigError(f"allowed_origin_hosts entry {host!r} is not a lowercase host name, an IP "
                                      "address or a CIDR such as 10.0.0.0/8") from None

    def node_overrides(self, token: str, admin_token: str, disk_dir: str) -> dict[str, Any]:
        """What `up` decides for a node; every other NodeConfig field the node reads on its own
        host (its `[node]` table and CACHEFS_* variables, then defaults). Cluster settings
        count only where given: a default here must not hide a node's own setting."""
        chosen = given(self)
        out: dict[str, Any] = {"token": token, "admin_token": admin_token, "disk_dir": disk_dir}
        for name in ("memory_bytes", "disk_bytes", "host", "eviction", "tls_cert", "tls_key"):
            if chosen is None or name in chosen:
                out[name] = getattr(self, name)
        if chosen is None or "port" in chosen:
            out["port"] = self.port if self.nodes <= 1 else 0  # several nodes on one host: any free port
        return out


__all__ = ["NodeConfig", "ClusterConfig", "DEFAULT_ALLOWED_ORIGINS"]
