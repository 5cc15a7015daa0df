"""Configuration of the two csi components: the node plugin and one FUSE mount.

Both load like every cachefs component (flags → `CACHEFS_<FIELD>` env → `[csi]` / `[mount]`
tables of the config file → defaults; see cachefs.config.load). How to reach the cluster
(endpoint, token, client timeouts) is the client's own ClientConfig, not repeated here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cachefs.common.errors import ConfigError

DRIVER_NAME = "cachefs.csi.io"  # must equal the CSIDriver object's name in the Helm chart
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes, with the terminating NUL
_DRIVER_NAME_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9.-]{0,61}[a-zA-Z0-9])?$")


FOREVER = 10 * 365 * 24 * 3600.0  # seconds; the kernel keeps what it caches for as long as the mount lives
MiB = 1024 * 1024


@dataclass(frozen=True)
class MountConfig:
    """How one FUSE mount behaves; the mount process gets these as flags."""

    SECTION = "mount"

    # How long the kernel may keep entries, attributes and misses. A snapshot never
    # changes and the mount's tree is built once, so nothing it caches can go stale:
    # the default is "for as long as the mount lives".
    attr_timeout: float = FOREVER
    # Upper bound on one fetch: a FUSE request that never answers blocks the reader,
    # so the mount answers EIO instead of hanging.
    op_timeout: float = 120.0
    # Kernel readahead of the mount's backing device: large sequential reads become few
    # large requests (1 MiB each, FUSE's largest), many in flight.
    readahead_bytes: int = 8 * MiB
    # The mount's one chunk cache, shared by every open file: block-sized chunks of big
    # files, whole small files. The kernel page cache sits in front of it; this holds
    # what the kernel dropped, readahead, and files being read by several processes.
    cache_bytes: int = 256 * MiB
    # Chunks (blocks) fetched ahead of a sequential reader of a big file.
    readahead_chunks: int = 2
    # Processes serving the mount's FUSE session, each on its own clone of it; one that
    # dies is replaced while readers wait. 0: one per core, at most 8. The default is 1:
    # each process has its own chunk cache, and with two on a 2-core node a read misses
    # in one what the other holds (half the files/s; docs/benchmarks.md).
    serving_processes: int = 1
    # A small file read for the first time is fetched with up to this many small files
    # after it in its directory (and this many bytes), in one batched read: per file, the
    # request's CPU and round trip are most of the cost. 1: one file at a time.
    batch_files: int = 32
    batch_bytes: int = 8 * MiB

    def __post_init__(self) -> None:
        if self.attr_timeout < 0 or self.op_timeout <= 0:
            raise ConfigError("attr_timeout must be ≥ 0 and op_timeout > 0 (seconds)")
        if self.readahead_bytes < 0 or self.readahead_chunks < 0:
            raise ConfigError("readahead_bytes and readahead_chunks must be ≥ 0")
        if self.batch_files < 1 or self.batch_bytes < 0:
            raise ConfigError("batch_files must be ≥ 1 and batch_bytes ≥ 0")
        if not 0 <= self.serving_processes <= 64:
            raise ConfigError("serving_processes must be between 0 (one per core) and 64")
        if self.cache_bytes < 16 * MiB:
            raise ConfigError("cache_bytes must be at least 16 MiB (a few blocks)")


@dataclass(frozen=True)
class CsiConfig:
    """The node plugin: where it listens, who it is, where it keeps state, how long it waits."""

    SECTION = "csi"

    csi_endpoint: str = "unix:///csi/csi.sock"
    node_id: str = ""
    csi_state_dir: str = "/var/lib/cachefs-csi"
    driver_name: str = DRIVER_NAME
    mount_timeout: float = 30.0  # a mount that does not answer by then is torn down
    lookup_timeout: float = 15.0  # asking the cluster about a dataset
    stop_timeout: float = 10.0  # a mount process that does not exit by then is killed
    max_volumes_per_node: int = 0  # 0: let the CO decide
    # Target paths must lie under it: the plugin is privileged and would otherwise mount
    # on (and remove) any directory of the host that a request names.
    kubelet_dir: str = "/var/lib/kubelet"
    # The keeper's socket (`cachefs csi keeper`): mounts hand it their sessions, so they
    # outlive their mount process and the plugin's container (docs/csi.md). "": no keeper.
    keeper_socket: str = ""

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ConfigError("the CSI plugin needs a node id: pass --node-id or set CACHEFS_NODE_ID "
                              "(the Kubernetes node name)")
        socket_path(self.csi_endpoint)  # validates it
        if not _DRIVER_NAME_RE.match(self.driver_name):
            raise ConfigError(f"driver_name {self.driver_name!r} is not a DNS-style name of at most 63 characters")
        for name in ("mount_timeout", "lookup_timeout", "stop_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive (seconds)")
        if self.max_volumes_per_node < 0:
            raise ConfigError("max_volumes_per_node must be ≥ 0")
        if not self.kubelet_dir.startswith("/") or self.kubelet_dir.rstrip("/") == "":
            raise ConfigError(f"kubelet_dir {self.kubelet_dir!r} must be an absolute directory other than /, "
                              "such as /var/lib/kubelet")

        if self.keeper_socket:
            socket_path(self.keeper_socket)  # validates it

    @property
    def socket_path(self) -> str:
        return socket_path(self.csi_endpoint)


def socket_path(endpoint: str) -> str:
    """'unix:///csi/csi.sock' or '/csi/csi.sock' → '/csi/csi.sock'."""
    path = endpoint[len("unix://"):] if endpoint.startswith("unix://") else endpoint
    if not path.startswith("/"):
        raise ConfigError(f"endpoint {endpoint!r} must name an absolute socket path (unix:///path)")
    if len(path.encode()) > _MAX_SOCKET_PATH:
        raise ConfigError(f"socket path {path!r} is longer than the {_MAX_SOCKET_PATH} bytes a unix socket allows")
    return path
