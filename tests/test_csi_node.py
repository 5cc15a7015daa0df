"""The CSI node plugin, driven as kubelet drives it: gRPC over its unix socket.

The plugin runs as a real process (`cachefs csi`) against the real cache cluster, and
every published volume is a real FUSE mount. Every wait is bounded; every test leaves no
mount and no process behind (the fixtures unmount lazily and kill what remains).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from csi_helpers import DATASET, NODE_ID, RPC_TIMEOUT, Plugin, publish_request
from fuse_helpers import cleanup_mounts, origin_files

from cachefs.common.procs import alive as pid_alive
from csi.mounts import find_mount
from csi.proto import csi_pb2 as pb

pytestmark = pytest.mark.timeout(180)

Mode = pb.VolumeCapability.AccessMode
# Datasets are registered under unique names (the cluster is shared by the session);
# tests and the tables below name them by these placeholders (DATASET: any namespace).
RESTRICTED = "@restricted"  # team-a only
CLOSED = "@closed"  # names no namespace: mounts nowhere
Code = grpc.StatusCode


# ---- the origin, as the reader must see it ------------------------------------------------


def mounted_files(mount: Path) -> dict[str, bytes]:
    """Walk a mount with os.walk and read every file with open(), as a training job would."""
    out = {}
    for dirpath, _dirs, files in os.walk(mount):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, mount)] = f.read()
    return out


# ---- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def datasets(cachefs_cluster, sample_origin) -> dict[str, object]:
    """Placeholder → DatasetInfo of the registered dataset."""
    origin = f"file://{sample_origin}"
    return {
        DATASET: cachefs_cluster.add_dataset(cachefs_cluster.unique("csi-sample"), origin, allowed_namespaces=["*"]),
        RESTRICTED: cachefs_cluster.add_dataset(cachefs_cluster.unique("csi-restricted"), origin,
                                                allowed_namespaces=["team-a"]),
        CLOSED: cachefs_cluster.add_dataset(cachefs_cluster.unique("csi-closed"), origin),
    }


@pytest.fixture(scope="module")
def plugin_root(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("csi")
    yield root
    cleanup_mounts(root)


@pytest.fixture(scope="module")
def plugin(plugin_root, cachefs_cluster, datasets) -> Iterator[Plugin]:
    """One plugin for the tests that do not kill it."""
    p = Plugin(plugin_root / "shared", cachefs_cluster, datasets)
    (plugin_root / "shared").mkdir()
    p.start()
    yield p
    p.stop()


@pytest.fixture
def pod(plugin_root, request) -> Iterator[Path]:
    """A pod's volume directory as kubelet lays it out; the plugin creates `mount` itself."""
    base = plugin_root / "pods" / request.node.name.replace("[", "-").replace("]", "")
    (base / "volumes" / "kubernetes.io~csi" / "data").mkdir(parents=True)
    yield base / "volumes" / "kubernetes.io~csi" / "data" / "mount"
    cleanup_mounts(base)


def assert_gone(target: Path, pid: int) -> None:
    assert not target.exists(), f"{target} was not removed"
    assert find_mount(str(target)) is None
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid), f"mount process {pid} is still running"


# ---- the happy path -----------------------------------------------------------------------

def test_inline_volume_shows_the_origin_bytes_and_unpublish_leaves_nothing(plugin, pod, sample_origin):
    plugin.publish(pod)
    pid = plugin.record(pod)["pid"]
    assert find_mount(str(pod)) is not None
    assert mounted_files(pod) == origin_files(sample_origin)

    plugin.unpublish(pod)
    assert_gone(pod, pid)


def test_static_volume_is_named_by_its_volume_id(plugin, pod, sample_origin):
    plugin.publish(pod, volume_id=DATASET, dataset=None, namespace=None, ephemeral=False,
                   mode=Mode.MULTI_NODE_READER_ONLY, readonly=False)
    assert (pod / "README.txt").read_bytes() == (sample_origin / "README.txt").read_bytes()
    plugin.unpublish(pod, volume_id=DATASET)
    assert not pod.exists()


def test_state_file_follows_the_written_contract(plugin, pod, datasets):
    plugin.publish(pod, namespace="team-b")
    record = plugin.record(pod)
    assert record["version"] == 1
    name = plugin.name(DATASET)
    assert (record["target"], record["dataset"], record["volume_id"]) == (str(pod), name, "csi-vol-1")
    assert record["endpoint"] == plugin.env["CACHEFS_ENDPOINT"] and record["source"] == f"cachefs://{name}"
    assert record["namespace"] == "team-b" and record["ephemeral"] is True
    assert record["files"] == datasets[DATASET].files and record["bytes"] == datasets[DATASET].bytes
    assert pid_alive(record["pid"]) and "token" not in json.dumps(record).lower()
    plugin.unpublish(pod)


def test_a_mount_outside_the_allowed_namespaces_is_denied_inside_them_allowed(plugin, pod):
    with pytest.raises(grpc.RpcError) as err:
        plugin.publish(pod, dataset=RESTRICTED, namespace="team-b")
    assert err.value.code() == Code.PERMISSION_DENIED
    assert "team-b" in err.value.details() and "team-a" in err.value.details()
    assert find_mount(str(pod)) is None and not pod.exists()

    plugin.publish(pod, dataset=RESTRICTED, namespace="team-a")
    assert (pod / "README.txt").exists()
    plugin.unpublish(pod)


# ---- every error code, as a table ---------------------------------------------------------

def _cap(access_type: str = "mount", mode: int = Mode.SINGLE_NODE_WRITER, **mount) -> pb.VolumeCapability:
    if access_type == "block":
        return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode))
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(**mount), access_mode=Mode(mode=mode))


PUBLISH_ERRORS = [
    # (case, publish keyword arguments, expected code, a word the message must contain)
    ("missing_volume_id", dict(volume_id=""), Code.INVALID_ARGUMENT, "volume_id"),
    ("missing_target_path", dict(target_path=""), Code.INVALID_ARGUMENT, "target_path"),
    ("relative_target_path", dict(target_path="pods/x/mount"), Code.INVALID_ARGUMENT, "absolute"),
    ("missing_capability", dict(volume_capability=None), Code.INVALID_ARGUMENT, "volume_capability"),
    ("block_access_type", dict(volume_capability=_cap("block")), Code.INVALID_ARGUMENT, "block"),
    ("writable_access_mode", dict(readonly=False), Code.INVALID_ARGUMENT, "read-only"),
    ("writable_multi_node_mode", dict(mode=Mode.MULTI_NODE_MULTI_WRITER, readonly=False), Code.INVALID_ARGUMENT,
     "MULTI_NODE_MULTI_WRITER"),
    ("unknown_access_mode", dict(volume_capability=_cap(mode=Mode.UNKNOWN)), Code.INVALID_ARGUMENT, "access_mode"),
    ("inline_volume_without_dataset", dict(dataset=None), Code.INVALID_ARGUMENT, "dataset"),
    ("malformed_dataset_name", dict(dataset="../etc"), Code.INVALID_ARGUMENT, "malformed"),
    ("misspelt_volume_attribute", dict(volume_context={"datset": "x"}), Code.INVALID_ARGUMENT, "datset"),
    ("unsupported_mount_flag", dict(volume_capability=_cap(mount_flags=["rw"])), Code.INVALID_ARGUMENT, "rw"),
    ("unsupported_fs_type", dict(volume_capability=_cap(fs_type="ext4")), Code.INVALID_ARGUMENT, "ext4"),
    ("unknown_dataset", dict(dataset="no-such-dataset"), Code.NOT_FOUND, "no-such-dataset"),
    ("namespace_not_allowed", dict(dataset=RESTRICTED, namespace="intruders"), Code.PERMISSION_DENIED, "intruders"),
    ("restricted_dataset_without_pod_info", dict(dataset=RESTRICTED, namespace=None), Code.PERMISSION_DENIED,
     "podInfoOnMount"),
    ("dataset_naming_no_namespace_mounts_nowhere", dict(dataset=CLOSED), Code.PERMISSION_DENIED, "--allow-namespace"),
    ("target_outside_the_kubelet_dir", dict(target_path="/tmp/not-kubelet/mount"), Code.INVALID_ARGUMENT,
     "outside kubelet's directory"),
    ("target_climbing_out_with_dot_dot", dict(target_path="{kubelet}/pods/../../../etc/mount"), Code.INVALID_ARGUMENT,
     "outside kubelet's directory"),
    ("target_through_a_symlink_out", dict(target_path="{kubelet}/escape/mount"), Code.INVALID_ARGUMENT,
     "outside kubelet's directory"),
]


@pytest.mark.parametrize("case,kwargs,code,word", PUBLISH_ERRORS, ids=[c[0] for c in PUBLISH_ERRORS])
def test_publish_refuses(plugin, pod, case, kwargs, code, word):
    kwargs = dict(kwargs)
    mode = kwargs.pop("mode", Mode.SINGLE_NODE_WRITER)
    no_capability = kwargs.get("volume_capability", ...) is None
    if no_capability:
        del kwargs["volume_capability"]
    if "target_path" in kwargs:
        (plugin.kubelet_dir / "escape").unlink(missing_ok=True)
        (plugin.kubelet_dir / "escape").symlink_to("/tmp")
        kwargs["target_path"] = kwargs["target_path"].format(kubelet=plugin.kubelet_dir)
    request = publish_request(pod, kwargs.pop("volume_id", "csi-vol-1"),
                              dataset=plugin.name(kwargs.pop("dataset", DATASET)),
                              namespace=kwargs.pop("namespace", "default"), ephemeral=True, mode=mode,
                              readonly=kwargs.pop("readonly", True), **kwargs)
    if no_capability:
        request.ClearField("volume_capability")
    with pytest.raises(grpc.RpcError) as err:
        plugin.node.NodePublishVolume(request, timeout=RPC_TIMEOUT)
    assert err.value.code() == code, err.value.details()
    assert word in err.value.details()
    assert find_mount(str(pod)) is None and not pod.exists()


def test_publish_on_a_target_that_is_a_file_fails_precondition(plugin, pod):
    pod.write_text("not a directory")
    with pytest.raises(grpc.RpcError) as err:
        plugin.publish(pod)
    assert err.value.code() == Code.FAILED_PRECONDITION and "not a directory" in err.value.details()
    assert pod.read_text() == "not a directory"


def test_publishing_the_same_volume_again_is_ok_and_keeps_the_mount(plugin, pod):
    plugin.publish(pod)
    pid = plugin.record(pod)["pid"]
    plugin.publish(pod)
    assert plugin.record(pod)["pid"] == pid
    plugin.unpublish(pod)


def test_publishing_another_dataset_on_a_used_target_already_exists(plugin, pod):
    plugin.publish(pod)
    with pytest.raises(grpc.RpcError) as err:
        plugin.publish(pod, volume_id="csi-vol-2", dataset=RESTRICTED, namespace="team-a")
    assert err.value.code() == Code.ALREADY_EXISTS and "csi-vol-1" in err.value.details()
    assert (pod / "README.txt").exists()  # the first volume is untouched
    plugin.unpublish(pod)


def test_unpublish_is_idempotent_and_ok_for_a_never_published_target(plugin, pod):
    plugin.publish(pod)
    plugin.unpublish(pod)
    plugin.unpublish(pod)
    plugin.unpublish(pod.parent / "never-published")


UNPUBLISH_ERRORS = [
    ("missing_volume_id", dict(target_path="/tmp/x/mount")),
    ("missing_target_path", dict(volume_id="v")),
    ("relative_target_path", dict(volume_id="v", target_path="x/mount")),
    ("target_outside_the_kubelet_dir", dict(volume_id="v", target_path="/tmp/not-kubelet/mount")),
]


@pytest.mark.parametrize("case,request_fields", UNPUBLISH_ERRORS, ids=[c[0] for c in UNPUBLISH_ERRORS])
def test_unpublish_refuses(plugin, case, request_fields):
    with pytest.raises(grpc.RpcError) as err:
        plugin.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(**request_fields), timeout=RPC_TIMEOUT)
    assert err.value.code() == Code.INVALID_ARGUMENT


def test_unsupported_rpcs_answer_unimplemented(plugin):
    calls = [
        (plugin.node.NodeStageVolume, pb.NodeStageVolumeRequest(volume_id="v", staging_target_path="/s")),
        (plugin.node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id="v", staging_target_path="/s")),
        (plugin.node.NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_id="v", volume_path="/s")),
        # A service we do not register at all: the Controller (we are node-only).
        (plugin.channel.unary_unary("/csi.v1.Controller/CreateVolume", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b), b""),
    ]
    for call, request in calls:
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=RPC_TIMEOUT)
        assert err.value.code() == Code.UNIMPLEMENTED


# ---- identity, node info, stats -----------------------------------------------------------

def test_identity_and_node_info_are_what_registrar_and_kubelet_expect(plugin):
    info = plugin.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=RPC_TIMEOUT)
    assert info.name == "cachefs.csi.io" and info.vendor_version
    assert plugin.identity.Probe(pb.ProbeRequest(), timeout=RPC_TIMEOUT).ready.value is True
    caps = plugin.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=RPC_TIMEOUT)
    assert not any(c.service.type == c.service.CONTROLLER_SERVICE for c in caps.capabilities)
    assert plugin.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=RPC_TIMEOUT).node_id == NODE_ID
    node_caps = plugin.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=RPC_TIMEOUT)
    kinds = {c.rpc.type for c in node_caps.capabilities}
    RPC = pb.NodeServiceCapability.RPC
    assert RPC.GET_VOLUME_STATS in kinds and RPC.STAGE_UNSTAGE_VOLUME not in kinds


def test_volume_stats_report_the_snapshot_size_and_a_healthy_condition(plugin, pod, datasets):
    plugin.publish(pod)
    stats = plugin.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id="csi-vol-1", volume_path=str(pod)), timeout=RPC_TIMEOUT)
    usage = {u.unit: u for u in stats.usage}
    assert usage[pb.VolumeUsage.BYTES].total == datasets[DATASET].bytes
    assert usage[pb.VolumeUsage.INODES].total == datasets[DATASET].files
    assert not stats.volume_condition.abnormal
    with pytest.raises(grpc.RpcError) as err:
        plugin.node.NodeGetVolumeStats(
            pb.NodeGetVolumeStatsRequest(volume_id="csi-vol-1", volume_path=str(pod.parent / "elsewhere")),
            timeout=RPC_TIMEOUT)
    assert err.value.code() == Code.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        plugin.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="csi-vol-1"), timeout=RPC_TIMEOUT)
    assert err.value.code() == Code.INVALID_ARGUMENT
    plugin.unpublish(pod)


# ---- restarts -----------------------------------------------------------------------------

@pytest.fixture
def own_plugin(plugin_root, cachefs_cluster, datasets, request) -> Iterator[Plugin]:
    """A plugin this test may kill and restart, with its own state dir and socket."""
    root = plugin_root / ("own-" + request.node.name)
    root.mkdir()
    p = Plugin(root, cachefs_cluster, datasets)
    yield p
    p.stop()


def test_killing_the_plugin_keeps_the_volume_readable_and_a_restart_can_unpublish(own_plugin, pod, sample_origin):
    own_plugin.start().publish(pod)
    pid = own_plugin.record(pod)["pid"]
    own_plugin.kill()

    assert mounted_files(pod) == origin_files(sample_origin)
    own_plugin.start()
    assert own_plugin.record(pod)["pid"] == pid  # adopted, not remounted
    own_plugin.publish(pod)  # still idempotent after the restart
    own_plugin.unpublish(pod)
    assert_gone(pod, pid)


def test_readers_see_no_error_while_the_plugin_restarts_and_a_serving_process_dies(own_plugin, pod, sample_origin):
    from cachefs.common import procs

    expected = origin_files(sample_origin)
    own_plugin.start().publish(pod)
    holder = own_plugin.record(pod)["pid"]
    stop, failures, reads = threading.Event(), [], [0]

    def reader() -> None:
        while not stop.is_set():
            for name, data in expected.items():
                try:
                    fd = os.open(pod / name, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # every read reaches the mount
                        got = os.read(fd, len(data) + 1)
                    finally:
                        os.close(fd)
                except OSError as e:
                    failures.append(f"{name}: {e}")
                    continue
                if got != data[:len(got)] or len(got) < min(len(data), 1):
                    failures.append(f"{name}: bytes differ")
                reads[0] += 1

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        own_plugin.kill()
        serving = [pid for pid, (ppid, _) in procs.processes().items() if ppid == holder]
        os.kill(serving[0], signal.SIGKILL)
        own_plugin.start()
        assert own_plugin.record(pod)["pid"] == holder  # adopted, not remounted
        before, deadline = reads[0], time.monotonic() + 30
        assert not failures
        while reads[0] < before + 50 and time.monotonic() < deadline:  # readers go on after both
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert failures == [] and reads[0] >= before + 50
    own_plugin.unpublish(pod)
    assert_gone(pod, holder)


def test_a_restarted_plugin_repairs_a_mount_whose_process_died(own_plugin, pod, sample_origin):
    own_plugin.start().publish(pod)
    old_pid = own_plugin.record(pod)["pid"]
    own_plugin.kill()
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(old_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(OSError) as err:
        os.listdir(pod)
    # "transport endpoint is not connected" (ECONNABORTED while the kernel tears the connection down)
    assert err.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)

    own_plugin.start()
    new_pid = own_plugin.record(pod)["pid"]
    assert new_pid != old_pid and pid_alive(new_pid)
    assert mounted_files(pod) == origin_files(sample_origin)
    own_plugin.unpublish(pod)
    assert_gone(pod, new_pid)


def test_an_unreachable_cluster_answers_unavailable_in_bounded_time(plugin_root, cachefs_cluster, datasets, pod):
    """kubelet retries UNAVAILABLE with backoff; a hang would block the pod's start forever."""
    root = plugin_root / "unreachable"
    root.mkdir()
    p = Plugin(root, cachefs_cluster, datasets)
    p.env.update(CACHEFS_ENDPOINT="http://127.0.0.1:9", CACHEFS_CONNECT_TIMEOUT="2", CACHEFS_RETRIES="0")
    try:
        p.start()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            p.publish(pod)
        assert err.value.code() == Code.UNAVAILABLE and "127.0.0.1:9" in err.value.details()
        assert time.monotonic() - started < 20
        assert find_mount(str(pod)) is None
    finally:
        p.stop()
