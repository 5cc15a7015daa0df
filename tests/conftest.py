"""Shared fixtures: one real Ray cluster (3 nodes) with cachefs on it per test session,
a local origin and an S3 origin (moto's server on 127.0.0.1).

Tests share the cluster, so each registers datasets under its own name. Blocks are
1 MiB here (8 MiB in production) so that small test files span several blocks.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MiB = 1024 * 1024
NODE_MEMORY = 24 * MiB
NODE_DISK = 48 * MiB
BLOCK = 1 * MiB
NAMESPACE = "cachefs-test"


@dataclass
class TestCluster:
    """The session's cache cluster, as tests and the helpers' tests use it."""

    token: str  # the reader token
    admin_token: str
    home: Path
    env: dict[str, str]
    config: Any  # ClusterConfig
    ray_cluster: Any
    endpoints: tuple[str, ...] = ()
    names: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        """Every node, comma-separated: clients fail over when one is gone."""
        return ",".join(self.endpoints)

    @property
    def client_config(self):  # -> ClientConfig
        from cachefs.config import ClientConfig

        return ClientConfig(endpoint=self.endpoint, token=self.token, admin_token=self.admin_token)

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)

    def admin(self):  # -> AdminClient
        from cachefs.admin import AdminClient

        return AdminClient(self.client_config)

    def add_dataset(self, name: str, origin_url: str, **kw: Any):  # -> DatasetInfo
        """Register (waiting for the listing) and return the DatasetInfo."""
        from cachefs.common.wire import DatasetInfo

        async def go():
            async with self.admin() as a:
                op = await a.wait(await a.add_dataset(name, origin_url, **kw), timeout=60)
                assert op.state == "succeeded", op
                return DatasetInfo.from_json(op.result)

        return self.run(go())

    def warm(self, name: str):  # -> OperationInfo
        async def go():
            async with self.admin() as a:
                return await a.wait(await a.warm_dataset(name), timeout=120)

        return self.run(go())

    def remove_dataset(self, name: str) -> None:
        async def go():
            async with self.admin() as a:
                await a.remove_dataset(name)

        self.run(go())

    def status(self) -> dict[str, Any]:
        async def go():
            async with self.admin() as a:
                return await a.status()

        return self.run(go())

    def totals(self, key: str) -> int:
        return sum(n[key] for n in self.status()["nodes"])

    def fs(self, **kw: Any):  # -> CachefsFileSystem
        from cachefs.filesystem import CachefsFileSystem

        return CachefsFileSystem(endpoint=self.endpoint, token=self.token, skip_instance_cache=True, **kw)

    def ensure_nodes(self) -> list[str]:
        """Bring back any cache node a test killed."""
        from server import hosting

        urls = hosting.ensure_nodes(self.config, hosting.Tokens(self.token, self.admin_token), self.env)
        self.endpoints = tuple(urls)
        return urls

    def dataset_of(self, files: dict[str, bytes], root: Path, prefix: str) -> str:
        """`files` written under `root` and registered under a fresh name (returned)."""
        origin = write_tree(root, files)
        name = self.unique(prefix)
        self.add_dataset(name, f"file://{origin}")
        return name

    def kill_a_node_while(self, read: Any, victim: str) -> list[BaseException]:
        """Run `read()` over and over on a thread; kill node `victim` during it, and keep
        reading for two more rounds. The errors the reads raised (none, in a good cluster)."""
        import threading

        import ray

        errors: list[BaseException] = []
        killed = threading.Event()

        done = [0]

        def rounds() -> None:
            try:
                after = 0
                while after < 2:
                    after += killed.is_set()
                    read()
                    done[0] += 1
            except BaseException as e:  # noqa: BLE001 - reported to the test
                errors.append(e)

        reader = threading.Thread(target=rounds)
        reader.start()
        wait_until(lambda: done[0] >= 1 or not reader.is_alive(), 60, 0.01, "a first read before the kill")
        handle = ray.get_actor(f"cachefs-{victim}", namespace=NAMESPACE)
        ray.kill(handle, no_restart=True)  # returns before the process is gone: the rounds must come after

        def dead() -> bool:
            try:
                ray.get(handle.stats.remote(), timeout=5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return True
            return False

        wait_until(dead, timeout=60, what=f"node {victim} to die")
        killed.set()
        reader.join(timeout=120)
        assert not reader.is_alive(), "the reads did not end within 120 s of the kill"
        return errors

    def unique(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.names.append(name)
        return name


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def sample_files(seed: int = 1) -> dict[str, bytes]:
    """Nested folders, empty and tiny files, files that end on and across block edges."""
    rnd = __import__("random").Random(seed)
    files = {
        "README.txt": b"a small dataset for tests\n",
        "empty.bin": b"",
        "train/cats/001.jpg": rnd.randbytes(70_000),
        "train/cats/002.jpg": rnd.randbytes(1),
        "train/dogs/001.jpg": rnd.randbytes(150_000),
        "train/dogs/deep/er/x.bin": rnd.randbytes(BLOCK),  # exactly one block
        "val/big.bin": rnd.randbytes(3 * BLOCK + 12345),  # four blocks, last one partial
        "val/name with spaces & ünïcode.txt": b"odd names are fine\n",
    }
    for i in range(20):
        files[f"train/many/{i:03d}.bin"] = rnd.randbytes(rnd.randint(1000, 40_000))
    return files


@pytest.fixture(scope="session")
def sample_origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local directory tree (origin URL: 'file://' + str(path))."""
    return write_tree(tmp_path_factory.mktemp("origin"), sample_files())


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes(timeout=60)
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def cachefs_cluster(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCluster]:
    """cachefs on the 3-node Ray cluster: one cache node per Ray node."""
    from server.config import ClusterConfig, DEFAULT_ALLOWED_ORIGINS
    from server import hosting

    home = tmp_path_factory.mktemp("cachefs-home")
    # Local origins live under pytest's temporary directories and the S3 servers on
    # loopback: both are refused by default, so this cluster allows them explicitly (in
    # the environment too, so that a `cachefs up` run by a test keeps the same allowlist).
    allowed = (*DEFAULT_ALLOWED_ORIGINS, f"file://{tmp_path_factory.getbasetemp().resolve()}/")
    hosts = ("127.0.0.1",)
    env = {**os.environ, "CACHEFS_HOME": str(home), "CACHEFS_ALLOWED_ORIGINS": ",".join(allowed),
           "CACHEFS_ALLOWED_ORIGIN_HOSTS": ",".join(hosts)}
    env.pop("CACHEFS_TOKEN", None)
    env.pop("CACHEFS_ADMIN_TOKEN", None)
    config = ClusterConfig(nodes=0, memory_bytes=NODE_MEMORY, disk_bytes=NODE_DISK, disk_root=str(home / "disk"),
                           state_dir=str(home / "state"), address=ray_cluster.address, block_size=BLOCK,
                           namespace=NAMESPACE, allowed_origins=allowed, allowed_origin_hosts=hosts)
    handle = hosting.up(config, env)
    assert len(handle.endpoints) == 3
    cluster = TestCluster(handle.token, handle.admin_token, home, env, config, ray_cluster, handle.endpoints)
    try:
        yield cluster
    finally:
        hosting.down(env, namespace=NAMESPACE)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """moto's S3 server on 127.0.0.1; yields the storage options s3fs needs."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    try:
        yield options
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_origin(s3_server: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, bytes]]:
    """A bucket holding the sample files: (origin URL, storage options, files)."""
    import boto3
    import s3fs

    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                 **s3_server["client_kwargs"]).create_bucket(Bucket="datasets")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server)
    files = sample_files(seed=2)
    for rel, data in files.items():
        fs.pipe_file(f"datasets/imagenet/{rel}", data)
    return "s3://datasets/imagenet", s3_server, files


@pytest.fixture
def fresh_origin(tmp_path: Path) -> Path:
    """A per-test local origin, for tests that change or break their origin."""
    return write_tree(tmp_path / "origin", sample_files(seed=3))


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    """The Helm chart, loaded once per test module (the helm tests)."""
    import helm_python as helm
    from helm_render import CHART_DIR

    with helm.Chart.load(CHART_DIR) as c:
        yield c


@pytest.fixture(scope="module")
def default(chart: Any) -> Any:
    """The chart rendered with its default values."""
    from helm_render import render

    return render(chart, {})


async def http_call(method: str, url: str, headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, Any]:
    """One raw HTTP request to a node: (status, JSON body or raw bytes)."""
    import json

    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, headers=headers, **kw) as r:
            body = await r.read()
            try:
                return r.status, json.loads(body)
            except ValueError:
                return r.status, body


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run `cachefs ARGS` as a user would, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "cachefs.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


async def until(predicate: Any, what: str, timeout: float = 10.0) -> Any:
    """Wait in an event loop for `predicate()` to be truthy, within `timeout` seconds
    (it is checked every few milliseconds, between the loop's other work)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)
    return value


def quiet() -> bool:
    """No task but the caller's is still running (what was started has finished or is parked)."""
    me = asyncio.current_task()
    return all(t.done() for t in asyncio.all_tasks() if t is not me)


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.2, what: str = "condition") -> Any:
    """cachefs's own bounded wait, failing the test with what it waited for."""
    from cachefs.common.waiting import wait_until as wait

    value = wait(predicate, timeout, interval)
    if not value:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    return value


__all__ = ["TestCluster", "write_tree", "sample_files", "run_cli", "wait_until", "until", "quiet", "shutil", "MiB", "BLOCK"]
