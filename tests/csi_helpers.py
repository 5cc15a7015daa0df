"""The CSI plugin as kubelet drives it, for tests/test_csi_*.py: one real `cachefs csi`
process on a unix socket, and the requests kubelet sends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as pb_grpc

Mode = pb.VolumeCapability.AccessMode
RPC_TIMEOUT = 60.0  # a publish lists the snapshot and waits for the mount
START_TIMEOUT = 60.0
NODE_ID = "node-under-test"
DATASET = "@sample"  # the placeholder of the dataset every namespace may mount


class Plugin:
    """One `cachefs csi` process and stubs to call it; start/kill/stop as a test needs.

    Its kubelet directory is `kubelet_dir` (default: root's parent): targets lie under it."""

    def __init__(self, root: Path, cluster, datasets: dict[str, object], kubelet_dir: Path | None = None) -> None:
        self.root = root
        self.kubelet_dir = kubelet_dir or root.parent
        self.names = {placeholder: info.name for placeholder, info in datasets.items()}
        # A unix socket path has at most 107 bytes: pytest's tmp paths are too long.
        self.socket = Path(tempfile.mkdtemp(prefix="csi-", dir="/tmp")) / "csi.sock"
        self.state_dir = root / "state"
        self.log = root / "plugin.log"
        self.env = {**os.environ, "CACHEFS_ENDPOINT": cluster.endpoint, "CACHEFS_TOKEN": cluster.token,
                    "CACHEFS_HOME": str(root / "home"), "CACHEFS_CONFIG": str(root / "no-config.toml"),
                    "CACHEFS_KUBELET_DIR": str(self.kubelet_dir)}
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> "Plugin":
        argv = [sys.executable, "-m", "cachefs.cli.main", "csi", "--endpoint", f"unix://{self.socket}",
                "--node-id", NODE_ID, "--state-dir", str(self.state_dir), "--mount-timeout", "45"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket.exists():
            assert self.proc.poll() is None, f"plugin exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"plugin did not serve in time: {self.log.read_text()[-2000:]}"
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=START_TIMEOUT)
        self.identity = pb_grpc.IdentityStub(self.channel)
        self.node = pb_grpc.NodeStub(self.channel)
        self.controller = pb_grpc.ControllerStub(self.channel)
        return self

    def kill(self) -> None:
        """SIGKILL: the plugin gets no chance to clean up, as in a crash."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.socket.parent, ignore_errors=True)

    # kubelet's side of the conversation
    def publish(self, target: Path, volume_id: str = "csi-vol-1", *, dataset: str | None = DATASET,
                namespace: str | None = "default", ephemeral: bool = True, mode: int = Mode.SINGLE_NODE_WRITER,
                readonly: bool = True, **overrides) -> pb.NodePublishVolumeResponse:
        return self.node.NodePublishVolume(
            publish_request(target, self.name(volume_id), dataset=self.name(dataset), namespace=namespace,
                            ephemeral=ephemeral, mode=mode, readonly=readonly, **overrides), timeout=RPC_TIMEOUT)

    def unpublish(self, target: Path, volume_id: str = "csi-vol-1") -> pb.NodeUnpublishVolumeResponse:
        return self.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=self.name(volume_id), target_path=str(target)), timeout=RPC_TIMEOUT)

    def name(self, value):
        """A placeholder (@sample, @restricted) → the registered dataset name; anything else as is."""
        if isinstance(value, dict):
            return {k: self.name(v) for k, v in value.items()}
        return self.names.get(value, value)

    def record(self, target: Path) -> dict:
        """The state file of `target` (the plugin's on-disk contract)."""
        from csi.state import key_of

        return json.loads((self.state_dir / "volumes" / f"{key_of(str(target))}.json").read_text())


def publish_request(target: Path, volume_id: str, *, dataset: str | None, namespace: str | None, ephemeral: bool,
                    mode: int, readonly: bool, **overrides) -> pb.NodePublishVolumeRequest:
    """What kubelet sends for an inline volume (ephemeral) or a static PV (volume_id = dataset)."""
    context = {}
    if dataset is not None:
        context["dataset"] = dataset
    if ephemeral:
        context["csi.storage.k8s.io/ephemeral"] = "true"
    if namespace is not None:
        context.update({"csi.storage.k8s.io/pod.namespace": namespace, "csi.storage.k8s.io/pod.name": "trainer-0",
                        "csi.storage.k8s.io/pod.uid": "1234", "csi.storage.k8s.io/serviceAccount.name": "default"})
    fields = dict(volume_id=volume_id, target_path=str(target), readonly=readonly, volume_context=context,
                  volume_capability=pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                                                        access_mode=Mode(mode=mode)))
    fields.update(overrides)
    return pb.NodePublishVolumeRequest(**fields)
