"""`cachefs operator`: keep cachefs' datasets in step with CachedDataset resources.

Imports of the Kubernetes client and of the admin client happen in the handler, so
`cachefs --help` stays fast and works in builds without them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

from cachefs.common.errors import ConfigError

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "operator",
        help="run the Kubernetes operator for CachedDataset resources",
        description="Watch CachedDataset resources (cachefs.io/v1alpha1) and register, refresh, "
        "warm and remove the matching cachefs datasets through the cluster's HTTP admin API. "
        "A resource NAME in namespace NS becomes the dataset NS.NAME. Reaches cachefs through "
        "CACHEFS_ENDPOINT and CACHEFS_ADMIN_TOKEN; reaches Kubernetes through the pod's service "
        "account, or --kubeconfig.",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", "-n", action="append", metavar="NS",
        help="watch this namespace (repeat for several); default: the pod's own namespace",
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    p.add_argument("--endpoint", help="cachefs endpoint (default: CACHEFS_ENDPOINT)")
    p.add_argument("--kubeconfig", default="", help="kubeconfig file (default: in-cluster service account)")
    p.add_argument("--context", default="", help="kubeconfig context")
    p.add_argument("--workers", type=int, default=4, help="resources reconciled at once (default: 4)")
    p.add_argument(
        "--resync", type=float, default=60.0,
        help="seconds between full passes over every resource (default: 60)",
    )
    p.add_argument(
        "--op-timeout", type=float, default=600.0,
        help="longest wait, in seconds, for registering or refreshing a dataset (default: 600)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def namespaces_of(args: argparse.Namespace, env: dict[str, str] | None = None) -> list[str] | None:
    """The namespaces to watch; None means all of them."""
    if args.all_namespaces:
        return None
    if args.namespace:
        return list(dict.fromkeys(args.namespace))
    env = dict(os.environ) if env is None else env
    own = env.get("POD_NAMESPACE", "")
    if not own and SERVICE_ACCOUNT_NAMESPACE.exists():
        own = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    if not own:
        raise ConfigError("no namespace to watch: pass --namespace NS or --all-namespaces")
    return [own]


def run(args: argparse.Namespace) -> int:
    from cachefs.common.extras import require

    require("operator", "operator")
    if args.workers < 1 or args.resync <= 0 or args.op_timeout <= 0:
        raise ConfigError("--workers must be ≥ 1, --resync and --op-timeout positive")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args, namespaces_of(args)))
    return 0


async def _serve(args: argparse.Namespace, namespaces: list[str] | None) -> None:
    from cachefs import config
    from cachefs.admin import AdminClient
    from server.k8s.controller import Controller
    from server.k8s.kube import KubeApi, KubeError
    from server.k8s.reconciler import Reconciler
    from server.k8s.workqueue import WorkQueue

    client_config = config.load(config.ClientConfig, overrides={"endpoint": args.endpoint})
    client_config.require_endpoint()
    if not client_config.admin_token:
        raise ConfigError("the operator registers and removes datasets, which needs the admin token: "
                          "set CACHEFS_ADMIN_TOKEN (the chart does, from its admin token Secret)")
    try:
        kube = await KubeApi.connect(args.kubeconfig, args.context)
    except KubeError as e:
        raise ConfigError(str(e)) from e
    admin = AdminClient(client_config)
    queue: WorkQueue = WorkQueue()
    reconciler = Reconciler(kube, admin, on_change=queue.add, op_timeout=args.op_timeout)
    controller = Controller(kube, reconciler, queue, namespaces, workers=args.workers, resync=args.resync)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # a pod stop is a clean exit
    logging.getLogger("cachefs.operator").info(
        "watching CachedDatasets in %s; cachefs at %s",
        ", ".join(namespaces) if namespaces else "all namespaces", client_config.endpoint,
    )
    try:
        await controller.run()
    except asyncio.CancelledError:
        pass
    finally:
        await admin.close()
        await kube.close()
