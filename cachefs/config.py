"""Configuration: one frozen object per component, read from flags, env and a file.

Precedence, highest first: explicit values (flags, storage options) → `CACHEFS_<FIELD>`
environment variables → the config file (`$CACHEFS_HOME/config.toml`, one table per
component) → the cluster file that `cachefs up` writes (endpoint and tokens) → defaults.
Every object is validated when built, so a bad value fails at start with its name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar, get_type_hints

from cachefs.errors import ConfigError
from cachefs.wire import DEFAULT_BLOCK_SIZE, DEFAULT_PORT, MAX_BATCH_BYTES, MAX_BATCH_ITEMS

T = TypeVar("T")

# What `dataset add` may name by default: the object stores and the web. No file:// (a
# local root must be listed), and never chained URLs (simplecache::...).
DEFAULT_ALLOWED_ORIGINS = ("s3://", "gs://", "gcs://", "az://", "abfs://", "abfss://", "hf://", "http://", "https://")
_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.I)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(value: str | int) -> int:
    """'256MiB', '1G', '4096' → bytes. Decimal units (MB) are 1000-based, binary (MiB) 1024."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"cannot read {value!r} as a size: use a number with an optional unit, like 256MiB or 2GiB")
    number, unit, suffix = m.groups()
    base = 1000 if suffix.lower() == "b" else 1024  # MB is decimal; M, Mi and MiB are binary
    return int(float(number) * base ** _UNITS[unit.lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cachefs_home(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("CACHEFS_HOME") or Path.home() / ".cachefs")


def cluster_file(env: Mapping[str, str] = os.environ) -> Path:
    """Where `cachefs up` records the endpoint and token (mode 0600)."""
    return cachefs_home(env) / "cluster.json"


def read_cluster_file(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    path = cluster_file(env)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}; run `cachefs up` again or delete the file") from e


def _coerce(name: str, kind: Any, value: Any) -> Any:
    if value is None:
        return None
    try:
        if kind is bool or kind == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{value!r} is not a boolean (use true or false)")
        if kind is int or kind == "int":
            return parse_size(value) if name.endswith(("_bytes", "block_size")) else int(value)
        if kind is float or kind == "float":
            return float(value)
        if kind is str or kind == "str":
            return str(value)
        if kind == tuple[str, ...]:
            if isinstance(value, str):
                return tuple(x for x in (p.strip() for p in value.split(",")) if x)
            return tuple(str(x) for x in value)
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"bad value for {name}: {e}") from e
    return value


def load(
    cls: type[T],
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] = os.environ,
    config_path: Path | None = None,
) -> T:
    """Build `cls` (a frozen dataclass with a SECTION name) from all configuration sources."""
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if getattr(cls, "USES_CLUSTER_FILE", False):
        values.update({k: v for k, v in read_cluster_file(env).items() if k in fields})
    path = config_path or Path(env.get("CACHEFS_CONFIG") or cachefs_home(env) / "config.toml")
    if path.exists():
        try:
            section = tomllib.loads(path.read_text()).get(cls.SECTION, {})  # type: ignore[attr-defined]
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        unknown = set(section) - fields
        if unknown:
            raise ConfigError(f"unknown keys in [{cls.SECTION}] of {path}: {sorted(unknown)}; known: {sorted(fields)}")  # type: ignore[attr-defined]
        values.update(section)
    for name in fields:
        key = f"CACHEFS_{name.upper()}"
        if key in env:
            values[name] = env[key]
    for name, value in (overrides or {}).items():
        if name not in fields:
            raise ConfigError(f"unknown option {name!r}; known: {sorted(fields)}")
        if value is not None:
            values[name] = value
    coerced = {k: _coerce(k, hints[k], v) for k, v in values.items()}
    config = cls(**coerced)
    object.__setattr__(config, "_given", frozenset(values))  # which fields some source set (see `given`)
    return config


def given(config: Any) -> frozenset[str] | None:
    """The fields of a loaded config that a flag, variable or file set (not defaults); None
    for a config built in code, where every field counts as given."""
    return getattr(config, "_given", None)


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
        import ipaddress

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


__all__ = ["ClientConfig", "NodeConfig", "ClusterConfig", "load", "parse_size", "format_size", "DEFAULT_PORT",
           "DEFAULT_ALLOWED_ORIGINS"]
