"""Hosting on Ray: start or join a Ray cluster, place the coordinator and the cache nodes.

`up` is idempotent: it creates what is missing and leaves what runs. With nodes=0 it
places one cache node on each Ray node (only on those advertising the `cachefs_node`
resource, when any does: the KubeRay worker group), and with `watch` it keeps doing so
as Ray nodes come and go. With nodes=N it runs N nodes wherever Ray puts them (several
on one machine for a local cluster).
"""

from __future__ import annotations

import json
import logging
import re
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cachefs.common import procs
from cachefs.common.files import write_atomically
from cachefs.common.settings import cachefs_home, cluster_file, load, read_cluster_file
from server.config import ClusterConfig, NodeConfig
from cachefs.common.errors import CachefsError, ConfigError, Unavailable
from server.coordinator import Coordinator
from server.node_actor import CacheNodeActor
from server.origin_policy import OriginPolicy
from server.ray_auth import RayAuth

log = logging.getLogger(__name__)

COORDINATOR = "cachefs-coordinator"
NODE_PREFIX = "cachefs-"  # actor name = NODE_PREFIX + node id ("node-…")
START_TIMEOUT = 120.0
CALL_TIMEOUT = 30.0  # one control call to the coordinator
NODE_RESOURCE = "cachefs_node"  # a Ray node that should host a cache node (the KubeRay worker group)
HOST_RESOURCE_PREFIX = "cachefs_host_"  # + the Kubernetes node's name: where a disk tier outlives its pod
COORDINATOR_RESOURCE = "cachefs_coordinator"  # the Ray node that keeps the coordinator's state (the head)


@dataclass(frozen=True)
class Tokens:
    """The cluster's two bearer tokens: `reader` for pods and clients (blocks, manifests,
    listings), `admin` for the CLI and the operator (datasets, warm-up, refresh)."""

    reader: str
    admin: str

    def __post_init__(self) -> None:
        if not self.reader or not self.admin:
            raise ConfigError("a cluster needs both a reader token and an admin token")
        if self.reader == self.admin:
            raise ConfigError("CACHEFS_ADMIN_TOKEN must differ from CACHEFS_TOKEN: with one token for both, "
                              "every training pod could register and remove datasets")


@dataclass(frozen=True)
class ClusterHandle:
    """What `up` reports and records in the cluster file."""

    endpoint: str
    endpoints: tuple[str, ...]
    token: str
    admin_token: str
    ray_address: str
    namespace: str
    started_ray: bool
    ray_auth: str = "disabled"  # how `down` and the next `up` must connect to that Ray

    def to_json(self) -> dict[str, Any]:
        # every node, so that a client whose first node is gone asks the next
        return {"endpoint": ",".join(self.endpoints), "endpoints": list(self.endpoints), "token": self.token,
                "admin_token": self.admin_token, "ray_address": self.ray_address, "namespace": self.namespace,
                "started_ray": self.started_ray, "ray_auth": self.ray_auth}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_temp_dir(port: int) -> str:
    # short on purpose: Ray puts unix sockets under it (a path limit of ~107 bytes)
    return f"/tmp/cachefs-ray-{port}"


def start_local_ray(auth: RayAuth, num_cpus: int | None = None) -> str:
    """`ray start --head` in the background, with a temp dir of its own and the auth mode
    decided for it; returns its address. A failed start leaves no process behind."""
    port = _free_port()
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
           f"--temp-dir={_ray_temp_dir(port)}", "--disable-usage-stats", "--include-dashboard=false",
           "--node-ip-address=127.0.0.1"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    address = f"127.0.0.1:{port}"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, **auth.env()})
    except subprocess.TimeoutExpired as e:
        stop_local_ray(address)
        raise Unavailable("a local Ray cluster did not start within 180 s; see `ray status`") from e
    if proc.returncode != 0:
        stop_local_ray(address)
        raise Unavailable(f"could not start a local Ray cluster: {proc.stderr.strip()[-800:]}")
    return address


def _local_ray_pids(port: int) -> list[int]:
    """Processes of the Ray cluster `start_local_ray` started on `port`, and their children.

    `ray stop` would stop every Ray cluster on the machine; this stops only ours.
    """
    marks = (_ray_temp_dir(port).encode(), f":{port}".encode())
    table = procs.processes()
    ours = procs.with_descendants((pid for pid, (_, cmd) in table.items() if any(m in cmd for m in marks)), table)
    ours.discard(os.getpid())
    return sorted(ours)


def stop_local_ray(address: str) -> None:
    port = int(address.rsplit(":", 1)[1])
    procs.terminate(_local_ray_pids(port), grace=10.0)
    shutil.rmtree(_ray_temp_dir(port), ignore_errors=True)


def _reachable(address: str, timeout: float = 2.0) -> bool:
    """Is anything listening at host:port? (ray.init spends 20 s retrying a dead address)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def connect(address: str, namespace: str, auth: RayAuth) -> None:
    """Connect this process to Ray at `address` in the auth mode decided for it."""
    if ray.is_initialized():
        return
    auth.apply()
    try:
        ray.init(address=address, namespace=namespace, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        hint = ("it may require Ray's token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"
                if auth.mode != "token" else
                "check that the token in RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token) is the cluster's")
        raise Unavailable(f"cannot connect to the Ray cluster at {address}: {e}; {hint}") from e


def _actor(name: str, namespace: str) -> Any | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def coordinator(config: ClusterConfig, env: Mapping[str, str]) -> Any:
    state_dir = config.state_dir or str(cachefs_home(env) / "state")
    remote_cls = ray.remote(Coordinator)
    if any(n.get("Resources", {}).get(COORDINATOR_RESOURCE) for n in ray.nodes() if n.get("Alive")):
        # its state dir is mounted there only: never anywhere else
        placement: dict[str, Any] = {"resources": {COORDINATOR_RESOURCE: 0.01}}
    else:
        placement = {"scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True)}
    return remote_cls.options(
        name=COORDINATOR, namespace=config.namespace, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_concurrency=1000, **placement,
    ).remote(state_dir, config.block_size, origin_policy(config))


def origin_policy(config: ClusterConfig) -> OriginPolicy:
    return OriginPolicy(config.allowed_origins, config.allowed_origin_hosts)


def _placements(config: ClusterConfig) -> dict[str, Any]:
    """node id → scheduling strategy for every cache node that should exist."""
    if config.nodes > 0:
        return {f"node-{i}": "SPREAD" for i in range(config.nodes)}
    alive = [n for n in ray.nodes() if n.get("Alive")]
    tagged = [n for n in alive if n.get("Resources", {}).get(NODE_RESOURCE)]
    if not tagged:  # no worker advertises itself yet: any node but a dedicated coordinator node
        tagged = [n for n in alive if not n.get("Resources", {}).get(COORDINATOR_RESOURCE)]
    return {node_id_of(n): NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in (tagged or alive)}


def node_id_of(ray_node: Mapping[str, Any]) -> str:
    """A cache node's id on a Ray node: its host's, when the Ray node names the host whose
    disk it uses (resource cachefs_host_<name>, the chart's hostPath tier), so that a pod
    restarted there comes back as the same node with the same disk directory; else the
    Ray node's own id (new at every restart)."""
    for resource in ray_node.get("Resources", {}):
        if resource.startswith(HOST_RESOURCE_PREFIX) and len(resource) > len(HOST_RESOURCE_PREFIX):
            host = re.sub(r"[^a-z0-9]+", "-", resource[len(HOST_RESOURCE_PREFIX):].lower()).strip("-")
            if host:
                return f"node-{host[:48]}"
    return f"node-{ray_node['NodeID'][:10]}"


def ensure_nodes(config: ClusterConfig, tokens: Tokens, env: Mapping[str, str]) -> list[str]:
    """Create the missing cache nodes and start all; returns their URLs."""
    disk_root = Path(config.disk_root or cachefs_home(env) / "disk")
    remote_cls = ray.remote(CacheNodeActor)
    actors = []
    for node_id, strategy in sorted(_placements(config).items()):
        name = NODE_PREFIX + node_id
        actor = _actor(name, config.namespace)
        if actor is None:
            node_config = config.node_overrides(tokens.reader, tokens.admin, str(disk_root / node_id))
            load(NodeConfig, node_config, env)  # refused here, with its reason, rather than in a dying actor
            actor = remote_cls.options(
                name=name, namespace=config.namespace, lifetime="detached", get_if_exists=True,
                num_cpus=0, max_concurrency=10_000, scheduling_strategy=strategy,
            ).remote(node_id, node_config, COORDINATOR, config.namespace)
        actors.append(actor)
    starts = [a.start.remote() for a in actors]
    ready, late = ray.wait(starts, num_returns=len(starts), timeout=START_TIMEOUT)
    if late:
        log.warning("%d cache node(s) did not start within %.0f s", len(late), START_TIMEOUT)
    if not ready and starts:
        raise Unavailable(f"cache nodes did not start within {START_TIMEOUT:.0f} s; "
                          "check `ray status` for resources and the Ray logs")
    urls = []
    for ref in ready:  # one node that is stopping (a drain that just ended) must not fail the others
        try:
            urls.append(ray.get(ref))
        except ray.exceptions.RayError as e:
            log.warning("a cache node did not start: %s", e)
    if starts and not urls:
        raise Unavailable("no cache node could start; check `ray status` and the Ray logs")
    return urls


def resolve_tokens(env: Mapping[str, str]) -> Tokens:
    """CACHEFS_TOKEN / CACHEFS_ADMIN_TOKEN, else the ones `up` recorded, else new random ones.

    A cluster file from before the admin token existed keeps its token as the reader token
    and gets a new admin token."""
    recorded = read_cluster_file(env)
    return Tokens(env.get("CACHEFS_TOKEN") or recorded.get("token") or secrets.token_urlsafe(32),
                  env.get("CACHEFS_ADMIN_TOKEN") or recorded.get("admin_token") or secrets.token_urlsafe(32))


def up(config: ClusterConfig, env: Mapping[str, str] = os.environ,
       say: Callable[[str], None] = lambda s: None) -> ClusterHandle:
    """Bring the cache cluster up (or complete it); record endpoint and tokens (0600).

    If this call started a local Ray and then fails, it stops that Ray again: a failed
    `up` leaves no process behind.
    """
    tokens = resolve_tokens(env)
    address = config.address or env.get("RAY_ADDRESS", "")
    started = reused = False
    auth: RayAuth | None = None
    if not address and not ray.is_initialized():
        previous = read_cluster_file(env)
        if previous.get("started_ray") and previous.get("ray_address") and _reachable(previous["ray_address"]):
            auth = RayAuth.decide(env, starting=False, recorded=previous.get("ray_auth", ""))
            try:
                connect(previous["ray_address"], config.namespace, auth)
                address, reused = previous["ray_address"], True
            except Unavailable as e:
                log.warning("not reusing the local Ray cluster at %s: %s", previous["ray_address"], e)
        if not address:
            say("starting a local Ray cluster")
            auth = RayAuth.decide(env, starting=True)
            address = start_local_ray(auth)
            started = True
    auth = auth or RayAuth.decide(env, starting=False)
    try:
        connect(address, config.namespace, auth)
        say("starting the coordinator")
        coord = coordinator(config, env)
        ray.get(coord.set_origin_policy.remote(origin_policy(config)), timeout=START_TIMEOUT)
        say("starting cache nodes")
        urls = ensure_nodes(config, tokens, env)
        if not urls:
            raise CachefsError("no Ray node can host a cache node; check `ray status`")
    except BaseException:
        if started:
            say("stopping the local Ray cluster this attempt started")
            ray.shutdown()
            stop_local_ray(address)
        raise
    handle = ClusterHandle(urls[0], tuple(urls), tokens.reader, tokens.admin, address if address != "auto" else
                           ray.get_runtime_context().gcs_address, config.namespace, started or reused, auth.mode)
    write_cluster_file(handle, env)
    return handle


def watch(config: ClusterConfig, env: Mapping[str, str] = os.environ, interval: float = 15.0,
          rounds: int | None = None) -> None:
    """Keep one cache node per eligible Ray node (for nodes=0 on Kubernetes)."""
    tokens = resolve_tokens(env)
    n = 0
    while rounds is None or n < rounds:
        time.sleep(interval)
        try:
            ensure_nodes(config, tokens, env)
        except (CachefsError, ray.exceptions.RayError) as e:
            log.warning("could not complete the cache nodes: %s", e)
        n += 1


def write_cluster_file(handle: ClusterHandle, env: Mapping[str, str] = os.environ) -> Path:
    path = cluster_file(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(handle.to_json()).encode())  # 0600: it holds the tokens
    return path


def down(env: Mapping[str, str] = os.environ, namespace: str = "cachefs",
         say: Callable[[str], None] = lambda s: None) -> bool:
    """Stop every cache node and the coordinator (state on disk is kept); True if anything ran."""
    previous = read_cluster_file(env)
    address = previous.get("ray_address") or env.get("RAY_ADDRESS", "")
    namespace = previous.get("namespace", namespace)
    if not address and not ray.is_initialized():
        return False
    found = False
    try:
        if previous.get("started_ray") and not _reachable(address):
            raise ConnectionError(f"nothing listens at {address} any more")
        connect(address, namespace, RayAuth.decide(env, starting=False, recorded=previous.get("ray_auth", "")))
        nodes = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == namespace and a["name"].startswith(NODE_PREFIX + "node-")]
        for entry in nodes:
            actor = _actor(entry["name"], namespace)
            if actor is not None:
                found = True
                say(f"stopping {entry['name']}")
                try:
                    ray.get(actor.stop.remote(), timeout=30)
                except ray.exceptions.RayError:
                    pass
                ray.kill(actor, no_restart=True)
        coord = _actor(COORDINATOR, namespace)
        if coord is not None:
            found = True
            ray.kill(coord, no_restart=True)
    except (ConnectionError, Unavailable) as e:
        say(f"could not reach Ray: {e}")
    if previous.get("started_ray"):
        say("stopping the local Ray cluster")
        ray.shutdown()
        stop_local_ray(previous["ray_address"])
    cluster_file(env).unlink(missing_ok=True)
    return found


def drain_here(address: str, namespace: str, deadline: float, addresses: set[str],
               env: Mapping[str, str] = os.environ, say: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Drain the cache node(s) of this machine through Ray (the chart's preStop hook).

    Runs in the worker pod, which is a Ray node of the cluster: it reaches the coordinator
    over Ray, as `up` does, so no admin token has to be given to the workers. A node is
    this machine's when its URL's host is one of `addresses` (the pod IP). Returns each
    drain's OperationInfo as JSON; waits at most `deadline` + a minute per node."""
    from server.coordinator import cachefs_error_or_raise

    connect(address, namespace, RayAuth.decide(env, starting=False))
    coord = _actor(COORDINATOR, namespace)
    if coord is None:
        raise Unavailable(f"no cachefs coordinator in Ray namespace {namespace!r} at {address}: nothing to drain")
    try:
        nodes = ray.get(coord.list_nodes.remote(), timeout=CALL_TIMEOUT)
        mine = [n["id"] for n in nodes if n["state"] == "serving" and urlsplit(n["url"]).hostname in addresses]
        reports = []
        for node_id in mine:
            op = ray.get(coord.drain_node.remote(node_id, {"deadline": deadline}), timeout=CALL_TIMEOUT)
            end = time.monotonic() + deadline + 60
            while op["state"] == "running" and time.monotonic() < end:
                say(f"draining {node_id}: {op['done_bytes']}/{op['total_bytes']} unit(s) handed over")
                time.sleep(0.5)
                op = ray.get(coord.operation.remote(op["id"]), timeout=CALL_TIMEOUT)
            reports.append(op)
        return reports
    except ray.exceptions.RayTaskError as e:
        raise cachefs_error_or_raise(e) from None
