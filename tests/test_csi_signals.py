"""`cachefs csi` stops on SIGTERM at any moment of its start-up, within the bound
docs/csi.md states: while Python starts, while it re-adopts mounts (each waiting on a
mount that never answers), and once it serves its socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from cachefs.common import procs
from conftest import wait_until

STOP_BOUND = 10.0  # docs/csi.md: "stops within 10 s of SIGTERM or SIGINT, whenever it arrives"


class BlackHole:
    """A cache-cluster endpoint that takes connections and never answers them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []

    def called(self) -> bool:
        """Has anyone connected (and is now waiting for an answer that never comes)?"""
        try:
            self.held.append(self.sock.accept()[0])
        except BlockingIOError:
            pass
        return bool(self.held)

    def close(self) -> None:
        for s in [*self.held, self.sock]:
            s.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


def plugin(root: Path, endpoint: str, stuck_mounts: int) -> tuple[subprocess.Popen, Path, Path]:
    """A `cachefs csi` with `stuck_mounts` recorded volumes to repair at start-up; each
    repair waits on a mount process that waits on `endpoint`."""
    from csi.state import StateStore, VolumeRecord

    kubelet = root / "kubelet"
    state = root / "state"
    store = StateStore(str(state))
    for i in range(stuck_mounts):
        target = kubelet / "pods" / f"pod{i}" / "volumes" / "mount"
        target.parent.mkdir(parents=True)
        store.put(VolumeRecord(volume_id=f"vol-{i}", target=str(target), dataset="ds", source="cachefs://ds",
                               endpoint=endpoint, pid=2 ** 22 + i))
    sock = Path(tempfile.mkdtemp(prefix="csi-sig-", dir="/tmp")) / "csi.sock"
    env = {**os.environ, "CACHEFS_ENDPOINT": endpoint, "CACHEFS_TOKEN": "t", "CACHEFS_HOME": str(root / "home"),
           "CACHEFS_CONFIG": str(root / "no-config.toml")}
    log = root / "plugin.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cachefs.cli.main", "csi", "--endpoint", f"unix://{sock}",
                                 "--node-id", "n1", "--state-dir", str(state), "--kubelet-dir", str(kubelet),
                                 "--mount-timeout", "120"], stdout=out, stderr=out, env=env,
                                start_new_session=True)
    return proc, sock, log


def mount_processes(root: Path) -> list[int]:
    """The mount processes the plugin started (detached; their targets lie under root)."""
    kubelet = str(root / "kubelet").encode()
    return [pid for pid, (_, cmd) in procs.processes().items() if kubelet in cmd and b"cachefs.cli.main" not in cmd]


def stop_leftovers(root: Path) -> None:
    assert procs.terminate(mount_processes(root), grace=5.0) == []


def sigterm_and_time(proc: subprocess.Popen) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_BOUND)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError(f"the plugin was still running {STOP_BOUND} s after SIGTERM") from None
    return time.monotonic() - t0


@pytest.mark.parametrize("moment", ["starting python", "adopting its first mount", "adopting, a while in"])
def test_sigterm_during_start_up_stops_the_plugin(tmp_path: Path, black_hole: BlackHole, moment: str) -> None:
    proc, sock, log = plugin(tmp_path, black_hole.url, stuck_mounts=2)
    try:
        if moment == "starting python":
            pass  # at once: the interpreter is still importing
        else:
            wait_until(lambda: mount_processes(tmp_path) or proc.poll() is not None, 60, 0.02,
                       "the plugin to start a mount process for its first repair")
            assert proc.poll() is None, log.read_text()[-2000:]
            if moment == "adopting, a while in":
                wait_until(black_hole.called, 60, 0.02, "the repair's mount process to ask the cluster")
        sigterm_and_time(proc)
        assert proc.returncode in (0, -signal.SIGTERM), log.read_text()[-2000:]
        if moment != "starting python":
            assert proc.returncode == 0 and b"received SIGTERM" in log.read_bytes()
            assert not sock.exists()  # it never served: start-up was cut short
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        stop_leftovers(tmp_path)
        sock.parent.rmdir() if sock.parent.exists() and not any(sock.parent.iterdir()) else None


def test_sigterm_right_after_it_serves_stops_the_plugin(tmp_path: Path, black_hole: BlackHole) -> None:
    proc, sock, log = plugin(tmp_path, black_hole.url, stuck_mounts=0)
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, 60, 0.01, "the plugin to serve its socket")
        assert proc.poll() is None, log.read_text()[-2000:]
        sigterm_and_time(proc)
        assert proc.returncode == 0 and b"received SIGTERM" in log.read_bytes()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for p in (sock, sock.parent):
            if p.exists():
                p.unlink() if p.is_socket() else p.rmdir()


def test_sigterm_with_a_publish_in_flight_stops_the_plugin(tmp_path: Path, black_hole: BlackHole) -> None:
    """The publish waits on a cluster that never answers; the stop does not wait for it."""
    import grpc

    from csi.proto import csi_pb2_grpc as pb_grpc
    from csi_helpers import Mode, publish_request

    proc, sock, log = plugin(tmp_path, black_hole.url, stuck_mounts=0)
    channel = None
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, 60, 0.01, "the plugin to serve its socket")
        channel = grpc.insecure_channel(f"unix://{sock}")
        target = tmp_path / "kubelet" / "pods" / "p" / "volumes" / "mount"
        target.parent.mkdir(parents=True)
        call = pb_grpc.NodeStub(channel).NodePublishVolume.future(publish_request(
            target, "vol", dataset="ds", namespace="default", ephemeral=True, mode=Mode.SINGLE_NODE_WRITER,
            readonly=True), timeout=120)
        wait_until(lambda: black_hole.called() or call.done(), 30, 0.02, "the publish to ask the cluster")
        assert not call.done()
        took = sigterm_and_time(proc)
        assert proc.returncode == 0 and took < STOP_BOUND
    finally:
        if channel is not None:
            channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        stop_leftovers(tmp_path)
        for p in (sock, sock.parent):
            if p.exists():
                p.unlink() if p.is_socket() else p.rmdir()

