"""The Helm chart's wiring, proved without a Kubernetes cluster.

The chart is rendered offline and its containers' commands run as local processes with
the rendered arguments and environment (tests/pod_processes.py stands in for kubelet and
KubeRay): the Ray head, the bootstrap loop, three workers, the CSI plugin. The workers are
then scaled the way KubeRay does it (one more worker; a worker stopped through its preStop
hook then SIGTERM; a worker given SIGTERM alone, which must drain too), while a reader
holding the reader token from the rendered Secret reads a dataset throughout: no read
fails, every byte equals the origin's, and what was cached stays cached.

Its own Ray cluster (another GCS port, its own /tmp/ray per pod): the session's shared
cluster (tests/conftest.py) is never touched; every process is killed at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import wait_until, write_tree
from helm_render import CHART_DIR, RELEASE, render
from pod_processes import Pod, free_port, kuberay_start_command, machine_ip, remove_made, secrets_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
                                reason="pods are PID and mount namespaces: needs root, unshare and nsenter")

DRAIN = 30  # drainDeadlineSeconds
MiB = 1024 * 1024


def _files() -> dict[str, bytes]:
    import random

    rng = random.Random(17)
    return {f"part-{i}.bin": rng.randbytes(MiB + i * 4099) for i in range(6)}


class ChartProcesses:
    def __init__(self, root: Path) -> None:
        import helm_python as helm

        self.root = root
        self.files = _files()
        self.origin = write_tree(root / "origin", self.files)
        self.port, self.gcs = free_port(), free_port()
        values = {
            # hostPath: a worker's id is its Kubernetes node's name, passed as $(CACHEFS_HOST_ID)
            "cache": {"port": self.port, "memory": "64MiB", "disk": "256MiB",
                      "diskTier": {"type": "hostPath", "hostPath": {"path": "/mnt/cachefs"}}},
            "origins": {"allowed": [f"file://{self.origin}/"]},
            "operator": {"enabled": False},  # needs a Kubernetes API (tests/test_reconciler_kube.py)
            "ray": {"head": {"rayStartParams": {"port": str(self.gcs), "include-dashboard": "false", "dashboard-port": str(free_port()),
                                                "ray-client-server-port": str(free_port())}},
                    "workers": {"replicas": 3, "maxReplicas": 4, "drainDeadlineSeconds": DRAIN}},
        }
        with helm.Chart.load(CHART_DIR) as chart:
            self.rendered = render(chart, values)
        self.secrets = secrets_of(self.rendered.docs)
        self.logs = root / "logs"
        self.logs.mkdir()
        self.pods: list[Pod] = []
        self.next_ip = 2  # worker pods: 127.0.0.2, .3, ...
        self.head_ip = machine_ip()

    def _pod(self, name: str, spec: dict[str, Any], ip: str, kuberay_env: dict[str, str]) -> Pod:
        pod = Pod(name, spec, ip, self.root / name, self.secrets, kuberay_env)
        self.pods.append(pod)
        return pod

    def ray_node_ports(self) -> dict[str, str]:
        """Ports that would not collide between pods, but do between processes of one machine."""
        return {"dashboard-agent-listen-port": str(free_port()), "metrics-export-port": str(free_port()),
                "disable-usage-stats": "true"}

    def start_head(self) -> None:
        group = self.rendered.ray_cluster["spec"]["headGroupSpec"]
        cmd = kuberay_start_command(group["rayStartParams"], head=True, gcs="",
                                    extra={"node-ip-address": self.head_ip, **self.ray_node_ports()})
        pod = self._pod("head", group["template"], self.head_ip, {"KUBERAY_GEN_RAY_START_CMD": cmd})
        pod.start("ray-head", self.logs)
        pod.start("cachefs", self.logs)

    def start_worker(self) -> Pod:
        group = self.rendered.worker_group
        ip = f"127.0.0.{self.next_ip}"
        self.next_ip += 1
        cmd = kuberay_start_command(group["rayStartParams"], head=False, gcs=f"{self.head_ip}:{self.gcs}",
                                    extra={"node-ip-address": ip, **self.ray_node_ports()})
        pod = self._pod(f"worker-{ip.rsplit('.', 1)[1]}", group["template"], ip,
                        {"KUBERAY_GEN_RAY_START_CMD": cmd, "FQ_RAY_IP": self.head_ip, "RAY_IP": self.head_ip})
        pod.start("ray-worker", self.logs)
        return pod

    def start_csi(self) -> Pod:
        pod = self._pod("csi", self.rendered.csi_pod, "127.0.0.1", {})
        pod.start("cachefs-csi", self.logs)
        return pod

    def url(self, pod: Pod) -> str:
        return f"http://{pod.ip}:{self.port}"

    def token(self, component: str) -> str:
        (value,) = [v for (name, _), v in self.secrets.items() if name == f"{RELEASE}-cachefs-{component}"]
        return value

    def admin(self, endpoints: list[str]):  # -> AdminClient
        from cachefs.admin import AdminClient
        from cachefs.config import ClientConfig

        return AdminClient(ClientConfig(endpoint=",".join(endpoints), token=self.token("token"),
                                        admin_token=self.token("admin-token")))

    def call(self, endpoints: list[str], name: str, *args: Any) -> Any:
        async def go() -> Any:
            async with self.admin(endpoints) as a:
                return await a.call(name, *args)

        return asyncio.run(go())

    def logs_tail(self) -> str:
        return "\n".join(f"--- {c.log.name}\n{c.tail()[-1500:]}" for p in self.pods for c in p.containers.values())

    def kill_all(self) -> None:
        for pod in reversed(self.pods):
            for c in pod.containers.values():
                c.kill()
        remove_made([d for pod in self.pods for d in pod.made])


@pytest.fixture(scope="module")
def chart_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartProcesses]:
    cp = ChartProcesses(tmp_path_factory.mktemp("chart-pods"))
    try:
        yield cp
    finally:
        cp.kill_all()


def _serving(cp: ChartProcesses, endpoints: list[str]) -> dict[str, str]:
    try:
        nodes = cp.call(endpoints, "list_nodes")
    except Exception:  # noqa: BLE001 - not up yet: any failure means "ask again"
        return {}
    return {n["url"]: n["id"] for n in nodes if n["state"] == "serving"}


def _settled(cp: ChartProcesses, endpoints: list[str], urls: set[str]) -> bool:
    try:
        status = cp.call(endpoints, "status")
    except Exception:  # noqa: BLE001
        return False
    nodes = {n["url"]: n for n in status["nodes"]}
    return set(_serving(cp, endpoints)) == urls and not any(
        (n.get("rebalance") or {}).get("state") == "running" for n in nodes.values())


class Reader(threading.Thread):
    """Reads every file again and again with the reader token; counts failures and wrong bytes."""

    def __init__(self, cp: ChartProcesses, endpoints: list[str], dataset: str) -> None:
        super().__init__(daemon=True)
        self.cp, self.endpoints, self.dataset = cp, endpoints, dataset
        self.stop = threading.Event()
        self.rounds = self.reads = 0
        self.failures: list[str] = []

    def run(self) -> None:
        from cachefs.filesystem import CachefsFileSystem

        fs = CachefsFileSystem(endpoint=",".join(self.endpoints), token=self.cp.token("token"),
                               skip_instance_cache=True)
        while not self.stop.is_set():
            for rel, data in self.cp.files.items():
                try:
                    got = fs.cat_file(f"{self.dataset}/{rel}")
                    if got != data:
                        self.failures.append(f"{rel}: wrong bytes")
                except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                    self.failures.append(f"{rel}: {type(e).__name__}: {e}")
                self.reads += 1
            self.rounds += 1

    def rounds_from(self, start: int, more: int, timeout: float = 60) -> None:
        wait_until(lambda: self.rounds >= start + more or not self.is_alive(), timeout=timeout, what="reader rounds")


def test_the_chart_runs_as_processes_and_scales_without_losing_reads(chart_processes: ChartProcesses) -> None:
    cp = chart_processes
    # the reader token the pods get is the rendered Secret's
    reader_token = cp.token("token")
    assert reader_token and reader_token != cp.token("admin-token")

    cp.start_head()
    workers = [cp.start_worker() for _ in range(3)]
    csi = cp.start_csi()
    endpoints = [cp.url(w) for w in workers]
    try:
        wait_until(lambda: set(_serving(cp, endpoints)) == set(endpoints), timeout=240,
                   what="three cache nodes serving, placed by the bootstrap loop")
    except AssertionError:
        pytest.fail(f"the cache did not come up:\n{cp.logs_tail()}")
    # each cache node is named after its Kubernetes node (hostPath tier: it comes back as itself)
    assert set(_serving(cp, endpoints).values()) == {f"node-k8s-{w.name}" for w in workers}
    # the CSI plugin answers on its rendered endpoint (the plugin-dir volume)
    sock = csi.volume_dir("plugin-dir") / "csi.sock"
    wait_until(lambda: sock.exists() or not csi.containers["cachefs-csi"].alive(), timeout=60, what="the CSI socket")
    assert sock.exists(), csi.containers["cachefs-csi"].tail()

    async def register() -> None:
        async with cp.admin(endpoints) as a:
            op = await a.wait(await a.add_dataset("chart-data", f"file://{cp.origin}"), timeout=60)
            assert op.state == "succeeded", op
            op = await a.wait(await a.warm_dataset("chart-data"), timeout=120)
            assert op.state == "succeeded", op

    asyncio.run(register())

    def origin_bytes() -> dict[str, int]:
        return {n["id"]: n["origin_bytes"] for n in cp.call(endpoints, "status")["nodes"]}

    def fetched_since(then: dict[str, int]) -> int:
        """Origin bytes read since `then` by the nodes serving now (a node gone takes its counter along)."""
        return sum(v - then.get(k, 0) for k, v in origin_bytes().items())

    reader = Reader(cp, list(endpoints), "chart-data")
    reader.start()
    try:
        reader.rounds_from(0, 1)
        before = origin_bytes()
        total = sum(len(d) for d in cp.files.values())
        figures: dict[str, int] = {}

        # scale up: KubeRay starts one more worker pod; the bootstrap's --watch places a node there
        new = cp.start_worker()
        endpoints.append(cp.url(new))
        wait_until(lambda: _settled(cp, endpoints, set(endpoints)), timeout=90, what="the fourth node serving")
        reader.rounds_from(reader.rounds, 1)
        figures["join"] = fetched_since(before)
        before = origin_bytes()

        # scale down as kubelet stops a pod: the preStop hook, then SIGTERM
        gone = workers[1].containers["ray-worker"]
        hook = gone.pre_stop(timeout=DRAIN + 60)
        assert hook.returncode == 0, hook.stdout + hook.stderr
        gone.sigterm()
        gone.wait(timeout=DRAIN + 30)
        endpoints.remove(cp.url(workers[1]))
        wait_until(lambda: _settled(cp, endpoints, set(endpoints)), timeout=60, what="three nodes after the preStop")
        reader.rounds_from(reader.rounds, 1)
        figures["prestop"] = fetched_since(before)
        before = origin_bytes()

        # SIGTERM alone (no preStop): the worker's command drains before it stops Ray
        sig = workers[2].containers["ray-worker"]
        sig.sigterm()
        sig.wait(timeout=DRAIN + 30)
        said = sig.log.read_text(errors="replace")
        assert "drain node-" in said and ": succeeded" in said, said[-3000:]  # the SIGTERM trap drained
        endpoints.remove(cp.url(workers[2]))
        wait_until(lambda: _settled(cp, endpoints, set(endpoints)), timeout=60, what="two nodes after SIGTERM")
        reader.rounds_from(reader.rounds, 2)
        figures["sigterm"] = fetched_since(before)
    finally:
        reader.stop.set()
        reader.join(timeout=60)
    print(f"\norigin bytes per event (dataset {total} B): {figures}; reads {reader.reads}, "
          f"failed {len(reader.failures)}")
    assert not reader.failures, reader.failures[:5]
    assert reader.reads > 0
    # what was cached stays cached: each event refetches at most a small share of the dataset
    for event, fetched in figures.items():
        assert fetched <= 0.1 * total, (event, fetched, total, cp.logs_tail())
