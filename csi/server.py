"""Wiring: the Identity and Node services on a gRPC server bound to a unix socket.

Start-up order matters: recorded mounts are re-adopted (and broken ones repaired)
before the socket exists, so a kubelet that can connect sees a plugin that knows every
volume it published before a restart. Stopping the plugin never unmounts anything.
"""

from __future__ import annotations

import logging
import os
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


STOP_GRACE = 5.0  # seconds the RPCs in flight get once a stop is asked (docs/csi.md)
STOP_POLL = 0.1  # how often the main thread looks at the stop flag


def run(config: CsiConfig, mount_config: MountConfig, catalog: Catalog, stopping: threading.Event) -> int:
    """Serve until `stopping` is set (SIGTERM or SIGINT, csi/cli.py); returns the exit code.

    Start-up (re-adopting mounts, which may wait a mount timeout for each) runs on a
    thread of its own, and the main thread only watches `stopping`, waking every
    STOP_POLL seconds. Why: the kernel hands a process's signal to any of its threads;
    when that is not the main thread (gRPC's, an adoption's), Python runs the handler
    only once the main thread next runs Python code, which a main thread blocked in
    `Event.wait()` without a timeout, or in a long adoption, does not do. A stop during
    start-up leaves the adoption where it stands: the mounts are processes of their own,
    and the next start adopts them.
    """
    if stopping.is_set():
        return 0
    started: dict[str, object] = {}

    def start() -> None:
        try:
            store = StateStore(config.csi_state_dir)
            volumes = VolumeManager(store, Mounter(), catalog, config, mount_config)
            adopted, repaired, dropped = volumes.recover()
            log.info("state %s: adopted %d mounts, repaired %d, dropped %d", store.dir, adopted, repaired, dropped)
            if stopping.is_set():
                return
            server = build_server(config, volumes)
            bind_unix(server, config.socket_path)
            server.start()
            started["server"] = server
            log.info("CSI plugin %s serving node %s on %s (cache cluster %s)",
                     config.driver_name, config.node_id, config.csi_endpoint, catalog.endpoint)
        except BaseException as e:  # handed to the main thread, which raises it
            started["error"] = e
            stopping.set()

    threading.Thread(target=start, name="csi-start", daemon=True).start()
    while not stopping.wait(STOP_POLL):
        pass
    error = started.get("error")
    if isinstance(error, BaseException):
        raise error
    server = started.get("server")
    if isinstance(server, grpc.Server):
        server.stop(grace=STOP_GRACE).wait(STOP_GRACE + 5.0)
    return 0
