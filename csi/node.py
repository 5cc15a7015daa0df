"""CSI Node service: thin handlers that check arguments and call csi.volumes.

Checking arguments is the first step of every RPC (INVALID_ARGUMENT); the rest of the
order (look up, check state, already done?, act, record) is VolumeManager's.
"""

from __future__ import annotations

import os

import grpc

from cachefs.common.wire import DATASET_NAME_RE
from csi import errors
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as pb_grpc
from csi.rpc import rpc
from csi.volumes import PublishRequest, VolumeManager

Mode = pb.VolumeCapability.AccessMode
READER_MODES = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})

# volume_context keys. Kubernetes adds its own under csi.storage.k8s.io/ (pod info,
# ephemeral flag); keys with another prefix belong to other tools and are ignored. A
# bare key we do not know is refused, so a misspelt "datset" fails loudly.
DATASET_KEY = "dataset"
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
NAMESPACE_KEY = "csi.storage.k8s.io/pod.namespace"
KNOWN_KEYS = frozenset({DATASET_KEY})

# Mount flags a PV may carry that are harmless on a read-only FUSE mount.
ACCEPTED_MOUNT_FLAGS = frozenset({"ro", "nosuid", "nodev", "noexec", "noatime", "relatime"})
ACCEPTED_FS_TYPES = frozenset({"", "fuse", "cachefs", "fuse.cachefs"})


def _require_path(value: str, name: str) -> str:
    if not value:
        raise errors.InvalidArgument(f"{name} is required")
    if not os.path.isabs(value) or "\x00" in value:
        raise errors.InvalidArgument(f"{name} {value!r} must be an absolute path")
    return os.path.normpath(value)


def _confined(value: str, name: str, kubelet_dir: str) -> str:
    """A target path, refused unless it lies under kubelet's directory ('..' and symlinks
    resolved). Only the parent is resolved: the target itself may be a hung mount."""
    path = _require_path(value, name)
    root = os.path.realpath(kubelet_dir)
    where = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    if not where.startswith(root.rstrip("/") + "/"):
        raise errors.InvalidArgument(
            f"{name} {value!r} is outside kubelet's directory {kubelet_dir}, where every volume of a pod lies; "
            "if kubelet runs with another --root-dir, give the plugin the same one (--kubelet-dir, "
            "CACHEFS_KUBELET_DIR, or the chart's csi.kubeletDir)")
    return path


def parse_publish(req: pb.NodePublishVolumeRequest, kubelet_dir: str) -> PublishRequest:
    if not req.volume_id:
        raise errors.InvalidArgument("volume_id is required")
    target = _confined(req.target_path, "target_path", kubelet_dir)
    if not req.HasField("volume_capability"):
        raise errors.InvalidArgument("volume_capability is required")
    cap = req.volume_capability
    if cap.WhichOneof("access_type") != "mount":
        raise errors.InvalidArgument(
            "cachefs volumes are filesystems: use access type mount (volumeMode: Filesystem), not block")
    mode = cap.access_mode.mode
    if mode == Mode.UNKNOWN:
        raise errors.InvalidArgument("volume_capability.access_mode is required")
    if mode not in READER_MODES and not req.readonly:
        raise errors.InvalidArgument(
            f"cachefs volumes are read-only, but access mode {Mode.Mode.Name(mode)} asks for a writable volume: "
            "use accessModes [ReadOnlyMany] on the PersistentVolume, or set readOnly: true on the volume")
    if cap.mount.fs_type not in ACCEPTED_FS_TYPES:
        raise errors.InvalidArgument(f"fs_type {cap.mount.fs_type!r} is not supported; leave it empty")
    bad_flags = sorted(set(cap.mount.mount_flags) - ACCEPTED_MOUNT_FLAGS)
    if bad_flags:
        raise errors.InvalidArgument(
            f"mount flags {bad_flags} are not supported; accepted: {sorted(ACCEPTED_MOUNT_FLAGS)}")

    ctx = dict(req.volume_context)
    unknown = sorted(k for k in ctx if "/" not in k and k not in KNOWN_KEYS)
    if unknown:
        raise errors.InvalidArgument(f"unknown volume attributes {unknown}; known: {sorted(KNOWN_KEYS)}")
    ephemeral = ctx.get(EPHEMERAL_KEY, "").lower() == "true"
    # A static PV names its dataset by volumeHandle; an inline volume's id is made up by
    # kubelet, so it must say which dataset in volumeAttributes.
    dataset = ctx.get(DATASET_KEY) or ("" if ephemeral else req.volume_id)
    if not dataset:
        raise errors.InvalidArgument("an inline cachefs volume needs volumeAttributes: {dataset: NAME}")
    if not DATASET_NAME_RE.match(dataset):
        raise errors.InvalidArgument(
            f"dataset name {dataset!r} is malformed: lowercase letters, digits, '.', '_', '-'; at most 63 characters")
    return PublishRequest(volume_id=req.volume_id, target=target, dataset=dataset,
                          namespace=ctx.get(NAMESPACE_KEY, ""), ephemeral=ephemeral)


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, volumes: VolumeManager, node_id: str, kubelet_dir: str, max_volumes_per_node: int = 0) -> None:
        self.volumes = volumes
        self.node_id = node_id
        self.kubelet_dir = kubelet_dir
        self.max_volumes_per_node = max_volumes_per_node

    @rpc
    def NodePublishVolume(self, request: pb.NodePublishVolumeRequest,
                          context: grpc.ServicerContext) -> pb.NodePublishVolumeResponse:
        self.volumes.publish(parse_publish(request, self.kubelet_dir))
        return pb.NodePublishVolumeResponse()

    @rpc
    def NodeUnpublishVolume(self, request: pb.NodeUnpublishVolumeRequest,
                            context: grpc.ServicerContext) -> pb.NodeUnpublishVolumeResponse:
        if not request.volume_id:
            raise errors.InvalidArgument("volume_id is required")
        target = _confined(request.target_path, "target_path", self.kubelet_dir)
        self.volumes.unpublish(request.volume_id, target)
        return pb.NodeUnpublishVolumeResponse()

    @rpc
    def NodeGetVolumeStats(self, request: pb.NodeGetVolumeStatsRequest,
                           context: grpc.ServicerContext) -> pb.NodeGetVolumeStatsResponse:
        if not request.volume_id:
            raise errors.InvalidArgument("volume_id is required")
        if not request.volume_path:
            raise errors.InvalidArgument("volume_path is required")
        # Any other path is looked up as given: one we never published at (relative, outside
        # kubelet's directory) answers NOT_FOUND, as the spec and csi-sanity expect.
        stats = self.volumes.stats(request.volume_id, request.volume_path)
        # A snapshot is full by definition: everything used, nothing available.
        return pb.NodeGetVolumeStatsResponse(
            usage=[pb.VolumeUsage(unit=pb.VolumeUsage.BYTES, total=stats.bytes, used=stats.bytes, available=0),
                   pb.VolumeUsage(unit=pb.VolumeUsage.INODES, total=stats.files, used=stats.files, available=0)],
            volume_condition=pb.VolumeCondition(abnormal=stats.abnormal, message=stats.message),
        )

    @rpc
    def NodeGetCapabilities(self, request: pb.NodeGetCapabilitiesRequest,
                            context: grpc.ServicerContext) -> pb.NodeGetCapabilitiesResponse:
        RPC = pb.NodeServiceCapability.RPC
        return pb.NodeGetCapabilitiesResponse(capabilities=[
            pb.NodeServiceCapability(rpc=RPC(type=RPC.GET_VOLUME_STATS)),
            pb.NodeServiceCapability(rpc=RPC(type=RPC.VOLUME_CONDITION)),
        ])

    @rpc
    def NodeGetInfo(self, request: pb.NodeGetInfoRequest, context: grpc.ServicerContext) -> pb.NodeGetInfoResponse:
        return pb.NodeGetInfoResponse(node_id=self.node_id, max_volumes_per_node=self.max_volumes_per_node)

    # ---- not offered: no STAGE_UNSTAGE_VOLUME, no EXPAND_VOLUME capability ---------------

    @rpc
    def NodeStageVolume(self, request: pb.NodeStageVolumeRequest,
                        context: grpc.ServicerContext) -> pb.NodeStageVolumeResponse:
        raise errors.Unimplemented(
            "cachefs does not stage volumes (no STAGE_UNSTAGE_VOLUME capability); call NodePublishVolume")

    @rpc
    def NodeUnstageVolume(self, request: pb.NodeUnstageVolumeRequest,
                          context: grpc.ServicerContext) -> pb.NodeUnstageVolumeResponse:
        raise errors.Unimplemented("cachefs does not stage volumes (no STAGE_UNSTAGE_VOLUME capability)")

    @rpc
    def NodeExpandVolume(self, request: pb.NodeExpandVolumeRequest,
                         context: grpc.ServicerContext) -> pb.NodeExpandVolumeResponse:
        raise errors.Unimplemented("cachefs volumes are read-only snapshots and cannot be expanded")
