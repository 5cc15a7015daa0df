"""`cachefs csi`, `cachefs mount`, `cachefs unmount`: volumes from the command line.

`csi` runs the Kubernetes node plugin; `mount` and `unmount` give the same FUSE mount
outside Kubernetes. Heavy modules (grpc, the FUSE server, the client) are imported inside the
handlers so `cachefs --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "csi", help="run the CSI node plugin (Kubernetes volumes)",
        description="Serve the CSI v1 Identity and Node services on a unix socket, so kubelet can mount "
                    "datasets into pods as read-only volumes. Reaches the cache cluster with "
                    "CACHEFS_ENDPOINT / CACHEFS_TOKEN (or the cluster file).")
    p.add_argument("--endpoint", dest="csi_endpoint", default=os.environ.get("CSI_ENDPOINT"),
                   help="unix socket to serve, e.g. unix:///csi/csi.sock (default: $CSI_ENDPOINT, "
                        "then the config)")
    p.add_argument("--node-id", default=None,
                   help="this node's name as Kubernetes knows it (e.g. $NODE_NAME)")
    p.add_argument("--state-dir", default=None, help="where mount records and logs live (default /var/lib/cachefs-csi)")
    p.add_argument("--driver-name", default=None,
                   help="CSI driver name (default cachefs.csi.io); must match the CSIDriver")
    p.add_argument("--kubelet-dir", default=None,
                   help="kubelet's root directory; target paths outside it are refused (default /var/lib/kubelet)")
    p.add_argument("--mount-timeout", type=float, default=None,
                   help="seconds a new mount may take to answer (default 30)")
    p.add_argument("--keeper-socket", default=None,
                   help="socket of `cachefs csi keeper`: mounts hand it their sessions and outlive their "
                        "process and this container (default: none)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_run_csi)
    sub = p.add_subparsers(dest="csi_command", metavar="{keeper}")
    k = sub.add_parser(
        "keeper", help="hold the mounts' FUSE sessions apart from the plugin (a container of its own)",
        description="Hold every mount's FUSE session, handed over by its mount process on a unix socket, and "
                    "start a new mount process on it when the last one dies: readers see a pause, never "
                    "ENOTCONN. A keeper started on a socket another keeper listens on takes its sessions over "
                    "(upgrades). Mount processes use it when the plugin runs with --keeper-socket.")
    k.add_argument("--socket", default=os.environ.get("CACHEFS_KEEPER_SOCKET", "/var/lib/cachefs-csi/keeper.sock"),
                   help="unix socket to listen on (default $CACHEFS_KEEPER_SOCKET or /var/lib/cachefs-csi/keeper.sock)")
    k.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    k.add_argument("--json", action="store_true", help="print the sessions taken over at start as JSON")
    k.set_defaults(func=_run_keeper)

    p = subparsers.add_parser(
        "mount", help="mount a dataset read-only with FUSE",
        description="Mount DATASET read-only at MOUNTPOINT. The mount runs in its own background process "
                    "and outlives this command; remove it with `cachefs unmount MOUNTPOINT`.")
    p.add_argument("dataset", metavar="DATASET", help="a registered dataset name")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="directory to mount on (created if missing)")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="serve in this process until unmounted or interrupted")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the mount to answer (default 30)")
    p.add_argument("--attr-timeout", type=float, default=None,
                   help="seconds the kernel may cache attributes and entries")
    p.add_argument("--op-timeout", type=float, default=None, help="seconds before a stuck read answers EIO")
    p.add_argument("--cache-bytes", type=int, default=None,
                   help="budget of the mount's chunk cache, shared by every open file (default 256 MiB)")
    p.add_argument("--serving-processes", type=int, default=None,
                   help="processes serving the mount; one that dies is replaced (default 1; 0: one per core)")
    p.add_argument("--keeper", default="", metavar="SOCKET",
                   help="hand the session to `cachefs csi keeper --socket SOCKET`: the mount then outlives "
                        "its process (a killed one is started again, readers only pause)")
    p.set_defaults(func=_run_mount)

    p = subparsers.add_parser(
        "unmount", help="unmount a dataset mounted with `cachefs mount`",
        description="Unmount MOUNTPOINT and wait for its mount process to exit.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", "-z", action="store_true", help="detach now even if files are open (fusermount3 -uz)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the mount process to exit")
    p.set_defaults(func=_run_unmount)


def _logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _stop_on_signals() -> threading.Event:
    """An event SIGTERM and SIGINT set, installed before anything slow happens (imports,
    adopting mounts), so a stop asked at any moment of start-up is kept (csi/server.py)."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        logging.getLogger("cachefs.csi.server").info("received %s; stopping (mounts stay up)",
                                                     signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stopping


def _run_csi(args: argparse.Namespace) -> int:
    stopping = _stop_on_signals()
    from cachefs.common.extras import require

    require("csi", "csi")
    from cachefs.config import ClientConfig
    from cachefs.common.settings import load
    from csi.catalog import ClusterCatalog
    from csi.config import CsiConfig, MountConfig
    from csi.server import run

    _logging(args.log_level)
    config = load(CsiConfig, {"csi_endpoint": args.csi_endpoint, "node_id": args.node_id,
                              "csi_state_dir": args.state_dir, "driver_name": args.driver_name,
                              "mount_timeout": args.mount_timeout, "kubelet_dir": args.kubelet_dir,
                              "keeper_socket": args.keeper_socket})
    catalog = ClusterCatalog(load(ClientConfig), timeout=config.lookup_timeout)
    code = run(config, load(MountConfig), catalog, stopping)
    # The process ends here, whatever RPC handlers still run (a publish waiting on a mount):
    # gRPC's worker threads are joined at interpreter exit, which would hold the stop for as
    # long as they take. Nothing is lost: mounts are processes of their own, state files are
    # written whole, and the next start adopts what a cut-short publish left.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_keeper(args: argparse.Namespace) -> int:
    import json

    from csi.keeper import Keeper

    _logging(args.log_level)
    keeper = Keeper(args.socket)
    try:
        taken = keeper.start()
    except OSError as e:
        logging.getLogger("cachefs.csi.keeper").error("the keeper cannot start on %s: %s", args.socket, e)
        keeper.close()
        return 1
    if args.json:
        print(json.dumps({"socket": keeper.path, "taken_over": taken}), flush=True)
    return keeper.run()


def _run_mount(args: argparse.Namespace) -> int:
    from cachefs.common.extras import require

    require("csi", "mount")
    from cachefs.config import ClientConfig
    from cachefs.common.settings import cachefs_home, load
    from cachefs.common.errors import ConfigError, NotFound
    from csi.catalog import ClusterCatalog
    from csi.config import MountConfig
    from csi.mounter import Mounter, mount_pids
    from csi.mounts import find_mount
    from csi.state import key_of

    target = os.path.abspath(args.mountpoint)
    if find_mount(target) is not None:
        if mount_pids(target):
            raise ConfigError(f"{target} is already a cachefs mount; run `cachefs unmount {target}` first")
        # Nobody serves it (its process and any keeper gone): "transport endpoint is not
        # connected". Detach it (files still open on it get errors, not a hang) and mount again.
        logging.getLogger("cachefs.csi.mounter").warning("%s is a dead cachefs mount; unmounting it lazily", target)
        Mounter().unmount(target, lazy=True, timeout=args.timeout)
    mount_config = load(MountConfig, {"attr_timeout": args.attr_timeout, "op_timeout": args.op_timeout,
                                      "cache_bytes": args.cache_bytes,
                                      "serving_processes": args.serving_processes})
    catalog = ClusterCatalog(load(ClientConfig))
    try:
        info = catalog.lookup(args.dataset)
    except FileNotFoundError:
        raise NotFound(f"dataset {args.dataset!r} is not registered; see `cachefs dataset list`") from None
    source = catalog.source(args.dataset)
    env = {**os.environ, **catalog.mount_env()}
    if args.foreground:
        from csi import mount_process

        os.environ.update(catalog.mount_env())
        os.makedirs(target, exist_ok=True)
        keeper = ["--keeper", os.path.abspath(args.keeper)] if args.keeper else []
        return mount_process.main(["--source", source, "--target", target, "--mtime", str(info.created),
                                   *mount_process.config_args(mount_config), *keeper])
    log_path = str(cachefs_home() / "logs" / f"mount-{key_of(target)}.log")
    pid = Mounter().start(source, target, log_path=log_path, env=env, config=mount_config,
                          mtime=info.created, timeout=args.timeout,
                          keeper=os.path.abspath(args.keeper) if args.keeper else "")
    print(f"mounted {args.dataset} ({info.files} files) read-only at {target} (process {pid}, log {log_path}); "
          f"unmount with `cachefs unmount {target}`")
    return 0


def _run_unmount(args: argparse.Namespace) -> int:
    from cachefs.common.errors import ConfigError
    from csi.mounter import Mounter, mount_pids
    from csi.mounts import find_mount

    target = os.path.abspath(args.mountpoint)
    if find_mount(target) is None:
        raise ConfigError(f"nothing of cachefs is mounted at {target}")
    pids = mount_pids(target)
    mounter = Mounter()
    mounter.unmount(target, lazy=args.lazy, timeout=args.timeout)
    for pid in pids:
        mounter.stop(target, pid, timeout=args.timeout)
    print(f"unmounted {target}")
    return 0
