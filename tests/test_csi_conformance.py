"""CSI conformance: the Identity and Node specs of kubernetes-csi's csi-sanity.

`csi-sanity` itself (a Go binary) runs against `cachefs csi` when it is on PATH or in the
workplace's ../shared/bin (its Identity and Node specs). Specs it cannot run on a
node-only plugin are ported here too, one row per spec named as csi-sanity names it, over
real gRPC on the plugin's unix socket. Specs that
need a Controller (CreateVolume) are ported with a registered dataset as the volume.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest

from csi_helpers import DATASET, RPC_TIMEOUT, Plugin, publish_request
from fuse_helpers import cleanup_mounts

from csi.proto import csi_pb2 as pb

pytestmark = pytest.mark.timeout(300)

Code = grpc.StatusCode
Mode = pb.VolumeCapability.AccessMode
RPC = pb.NodeServiceCapability.RPC
SANITY_VOLUME_ID = "sanity-volume-4b1f"  # what IDGen.GenerateUniqueValidVolumeID would give: unknown here


@pytest.fixture(scope="module")
def kubelet(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("kubelet")
    yield root
    cleanup_mounts(root)


@pytest.fixture(scope="module")
def plugin(kubelet, cachefs_cluster, sample_origin) -> Iterator[Plugin]:
    info = cachefs_cluster.add_dataset(cachefs_cluster.unique("sanity"), f"file://{sample_origin}",
                                       allowed_namespaces=["*"])
    (kubelet / "plugin").mkdir()
    p = Plugin(kubelet / "plugin", cachefs_cluster, {DATASET: info}, kubelet_dir=kubelet).start()
    yield p
    p.stop()


@pytest.fixture
def target(kubelet, request) -> Iterator[Path]:
    """sc.TargetPath + "/target": a fresh mount directory under kubelet's root."""
    base = kubelet / "pods" / re.sub(r"\W", "-", request.node.name)
    base.mkdir(parents=True)
    yield base / "target"
    cleanup_mounts(base)


def _capability() -> pb.VolumeCapability:
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))


# ---- Identity Service ---------------------------------------------------------------------

def plugin_capabilities_are_known_kinds(p: Plugin, target: Path) -> None:
    res = p.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=RPC_TIMEOUT)
    Service, Expansion = pb.PluginCapability.Service, pb.PluginCapability.VolumeExpansion
    for cap in res.capabilities:
        kind = cap.WhichOneof("type")
        assert kind in ("service", "volume_expansion"), cap
        if kind == "service":
            assert cap.service.type in (Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)
        else:
            assert cap.volume_expansion.type in (Expansion.ONLINE, Expansion.OFFLINE)


def probe_answers(p: Plugin, target: Path) -> None:
    res = p.identity.Probe(pb.ProbeRequest(), timeout=RPC_TIMEOUT)
    assert not res.HasField("ready") or res.ready.value in (True, False)


def plugin_info_names_the_driver(p: Plugin, target: Path) -> None:
    res = p.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=RPC_TIMEOUT)
    assert 0 < len(res.name) <= 63
    assert re.match(r"^[a-zA-Z][A-Za-z0-9-\.\_]{0,61}[a-zA-Z]$", res.name)


# ---- Node Service -------------------------------------------------------------------------

def node_capabilities_are_known_kinds(p: Plugin, target: Path) -> None:
    # csi-sanity asks the Controller's capabilities before every Node spec: a node-only
    # plugin answers a non-empty list that enables nothing, not UNIMPLEMENTED.
    controller = p.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(), timeout=RPC_TIMEOUT)
    assert controller.capabilities
    assert {c.rpc.type for c in controller.capabilities} == {pb.ControllerServiceCapability.RPC.UNKNOWN}
    res = p.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=RPC_TIMEOUT)
    known = {RPC.UNKNOWN, RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.EXPAND_VOLUME, RPC.VOLUME_CONDITION,
             RPC.SINGLE_NODE_MULTI_WRITER, RPC.VOLUME_MOUNT_GROUP}
    assert res.capabilities and all(c.HasField("rpc") and c.rpc.type in known for c in res.capabilities)


def node_info_has_an_id(p: Plugin, target: Path) -> None:
    res = p.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=RPC_TIMEOUT)
    assert res.node_id and res.max_volumes_per_node >= 0


def unpublish_removes_the_target_path(p: Plugin, target: Path) -> None:
    p.publish(target, volume_id=DATASET, dataset=None, namespace="default", ephemeral=False)
    assert target.is_dir()
    p.unpublish(target, volume_id=DATASET)
    assert not target.exists()


def stats_of_a_volume_elsewhere_is_not_found(p: Plugin, target: Path) -> None:
    p.publish(target, volume_id=DATASET, dataset=None, namespace="default", ephemeral=False)
    try:
        with pytest.raises(grpc.RpcError) as err:
            p.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=p.name(DATASET), volume_path="some/path"),
                                      timeout=RPC_TIMEOUT)
        assert err.value.code() == Code.NOT_FOUND
        stats = p.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=p.name(DATASET),
                                                                       volume_path=str(target)), timeout=RPC_TIMEOUT)
        assert stats.usage  # "should work": the published volume has stats
    finally:
        p.unpublish(target, volume_id=DATASET)


def stage_and_expand_are_not_offered(p: Plugin, target: Path) -> None:
    """csi-sanity skips NodeStage/Unstage/Expand specs for a plugin without the capability."""
    kinds = {c.rpc.type for c in p.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(),
                                                             timeout=RPC_TIMEOUT).capabilities}
    assert not kinds & {RPC.STAGE_UNSTAGE_VOLUME, RPC.EXPAND_VOLUME}


BEHAVIOUR: list[tuple[str, Callable[[Plugin, Path], None]]] = [
    ("Identity GetPluginCapabilities should return appropriate capabilities", plugin_capabilities_are_known_kinds),
    ("Identity Probe should return appropriate information", probe_answers),
    ("Identity GetPluginInfo should return appropriate information", plugin_info_names_the_driver),
    ("Node NodeGetCapabilities should return appropriate capabilities", node_capabilities_are_known_kinds),
    ("Node NodeGetInfo should return appropriate values", node_info_has_an_id),
    ("Node NodeUnpublishVolume should remove target path", unpublish_removes_the_target_path),
    ("Node NodeGetVolumeStats should fail when volume does not exist on the specified path",
     stats_of_a_volume_elsewhere_is_not_found),
    ("Node NodeStageVolume, NodeUnstageVolume, NodeExpandVolume are skipped", stage_and_expand_are_not_offered),
]


@pytest.mark.parametrize("spec", BEHAVIOUR, ids=[b[0] for b in BEHAVIOUR])
def test_sanity_spec(plugin, target, spec) -> None:
    spec[1](plugin, target)


# (csi-sanity's spec, RPC, request fields ({target} is sc.TargetPath + "/target"), code)
REFUSALS: list[tuple[str, str, dict[str, Any], Code]] = [
    ("NodePublishVolume should fail when no volume id is provided", "NodePublishVolume", {}, Code.INVALID_ARGUMENT),
    ("NodePublishVolume should fail when no target path is provided", "NodePublishVolume",
     {"volume_id": SANITY_VOLUME_ID}, Code.INVALID_ARGUMENT),
    ("NodePublishVolume should fail when no volume capability is provided", "NodePublishVolume",
     {"volume_id": SANITY_VOLUME_ID, "target_path": "{target}"}, Code.INVALID_ARGUMENT),
    ("NodeUnpublishVolume should fail when no volume id is provided", "NodeUnpublishVolume", {},
     Code.INVALID_ARGUMENT),
    ("NodeUnpublishVolume should fail when no target path is provided", "NodeUnpublishVolume",
     {"volume_id": SANITY_VOLUME_ID}, Code.INVALID_ARGUMENT),
    ("NodeGetVolumeStats should fail when no volume id is provided", "NodeGetVolumeStats",
     {"volume_path": "some/path"}, Code.INVALID_ARGUMENT),
    ("NodeGetVolumeStats should fail when no volume path is provided", "NodeGetVolumeStats",
     {"volume_id": SANITY_VOLUME_ID}, Code.INVALID_ARGUMENT),
    ("NodeGetVolumeStats should fail when volume is not found", "NodeGetVolumeStats",
     {"volume_id": SANITY_VOLUME_ID, "volume_path": "some/path"}, Code.NOT_FOUND),
    ("NodeGetVolumeStats of an unknown volume at an absolute path is not found", "NodeGetVolumeStats",
     {"volume_id": SANITY_VOLUME_ID, "volume_path": "{target}"}, Code.NOT_FOUND),
]


@pytest.mark.parametrize("spec", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_sanity_refusal(plugin, target, spec) -> None:
    _, method, fields, code = spec
    fields = {k: v.format(target=target) for k, v in fields.items()}
    request = getattr(pb, f"{method}Request")(**fields)
    with pytest.raises(grpc.RpcError) as err:
        getattr(plugin.node, method)(request, timeout=RPC_TIMEOUT)
    assert err.value.code() == code, err.value.details()
    assert err.value.details()  # a message that says what was wrong


def test_a_publish_that_would_succeed_needs_every_argument(plugin, target) -> None:
    """The refusals above fail for the reason they name: with every argument, it mounts."""
    plugin.node.NodePublishVolume(publish_request(target, plugin.name(DATASET), dataset=None, namespace="default",
                                                  ephemeral=False, mode=Mode.SINGLE_NODE_WRITER, readonly=True),
                                  timeout=RPC_TIMEOUT)
    assert (target / "README.txt").exists()
    plugin.unpublish(target, volume_id=DATASET)


def csi_sanity() -> str | None:
    """The kubernetes-csi conformance binary: on PATH, or in the workplace's shared/bin
    beside this repository (where CI finds it)."""
    beside = Path(__file__).resolve().parents[2] / "shared" / "bin" / "csi-sanity"
    return shutil.which("csi-sanity") or (str(beside) if os.access(beside, os.X_OK) else None)


@pytest.mark.skipif(csi_sanity() is None, reason="the csi-sanity binary is neither on PATH nor in ../shared/bin")
def test_csi_sanity_identity_and_node_specs_pass(plugin, kubelet) -> None:
    """The real suite, when present. Specs needing CreateVolume cannot run on a node-only
    plugin; they are ported above with a registered dataset instead."""
    mount_dir = kubelet / "csi-sanity"
    mount_dir.mkdir(parents=True, exist_ok=True)  # csi-sanity makes its mount and staging dirs, not their parent
    result = subprocess.run(
        [csi_sanity(), f"--csi.endpoint=unix://{plugin.socket}", f"--csi.mountdir={mount_dir}/mount",
         f"--csi.stagingdir={mount_dir}/staging", "--ginkgo.focus=Identity|Node",
         "--ginkgo.skip=should remove target path|does not exist on the specified path"],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
