"""Wiring: the Identity and Node services on a gRPC server bound to a unix socket.

Start-up order matters: recorded mounts are re-adopted (and broken ones repaired)
before the socket exists, so a kubelet that can connect sees a plugin that knows every
volume it published before a restart. Stopping the plugin never unmounts anything.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from csi.catalog import Catalog
from csi.config import CsiConfig, MountConfig
from csi.controller import ControllerService
from csi.identity import IdentityService
from csi.mounter import Mounter
from csi.node import NodeService
from csi.proto import csi_pb2_grpc as pb_grpc
from csi.state import StateStore
from csi.volumes import VolumeManager

log = logging.getLogger("cachefs.csi.server")


def build_server(config: CsiConfig, volumes: VolumeManager, max_workers: int = 8) -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="csi-rpc"))
    pb_grpc.add_IdentityServicer_to_server(IdentityService(config.driver_name), server)
    pb_grpc.add_NodeServicer_to_server(
        NodeService(volumes, config.node_id, config.kubelet_dir, config.max_volumes_per_node), server)
    pb_grpc.add_ControllerServicer_to_server(ControllerService(), server)
    return server


def bind_unix(server: grpc.Server, path: str) -> None:
    """Bind to `path`, replacing a stale socket left by a previous run (never another file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    server.add_insecure_port(f"unix://{path}")


def run(config: CsiConfig, mount_config: MountConfig, catalog: Catalog) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code."""
    store = StateStore(config.csi_state_dir)
    volumes = VolumeManager(store, Mounter(), catalog, config, mount_config)
    adopted, repaired, dropped = volumes.recover()
    log.info("state %s: adopted %d mounts, repaired %d, dropped %d", store.dir, adopted, repaired, dropped)

    server = build_server(config, volumes)
    bind_unix(server, config.socket_path)
    server.start()
    log.info("CSI plugin %s serving node %s on %s (cache cluster %s)",
             config.driver_name, config.node_id, config.csi_endpoint, catalog.endpoint)

    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("received %s; stopping (mounts stay up)", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    server.stop(grace=5.0).wait(10.0)
    return 0
