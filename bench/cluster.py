"""cachefs for the benches: a cluster on a Ray of the bench's own, and FUSE mounts made with
the CLI as a user makes them. Both stop what they started, with bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import MiB


class Cluster:
    """A cachefs cluster of `nodes` cache nodes with `budget` bytes each, on the Ray this
    process started (`ray.init(address="local")`); stopped (nodes and coordinator) on exit."""

    def __init__(self, work: Path, nodes: int, budget: int, eviction: str, block_size: int,
                 namespace: str) -> None:
        from server.config import ClusterConfig
        from server import hosting

        self.nodes, self.budget, self.eviction, self.namespace = nodes, budget, eviction, namespace
        self.env = {**os.environ}
        # Inclusive tiers: the disk tier holds the budget, memory a hot quarter of it.
        config = ClusterConfig(nodes=nodes, memory_bytes=max(budget // 4, MiB), disk_bytes=budget,
                               disk_root=str(work / f"disk-{namespace}"), state_dir=str(work / f"state-{namespace}"),
                               block_size=block_size, eviction=eviction, namespace=namespace,
                               allowed_origin_hosts=("127.0.0.1",))  # the origins are S3 servers on loopback
        try:
            self.handle = hosting.up(config, self.env)
        except BaseException:
            hosting.down(self.env, namespace=namespace)  # whatever part of it started
            raise
        self.endpoint, self.token = self.handle.endpoint, self.handle.token
        self.admin_token = self.handle.admin_token

    def _admin(self) -> Any:
        from cachefs.admin import AdminClient
        from cachefs.config import ClientConfig

        return AdminClient(ClientConfig(endpoint=self.endpoint, token=self.token, admin_token=self.admin_token))

    def register(self, name: str, origin: str, storage_options: dict[str, Any], pack_threshold: int | None = None) -> Any:
        async def go() -> Any:
            async with self._admin() as a:
                op = await a.wait(await a.add_dataset(name, origin, storage_options, pack_threshold=pack_threshold),
                                  timeout=300)
                if op.state != "succeeded":
                    raise RuntimeError(f"registering {name} failed: {op.message or op.failures}")
                return op

        return asyncio.run(go())

    def warm(self, name: str) -> Any:
        async def go() -> Any:
            async with self._admin() as a:
                op = await a.wait(await a.warm_dataset(name), timeout=600)
                if op.state != "succeeded":
                    raise RuntimeError(f"warming {name} failed: {op.message or op.failures}")
                return op

        return asyncio.run(go())

    def remove(self, name: str) -> None:
        async def go() -> None:
            async with self._admin() as a:
                await a.remove_dataset(name)

        asyncio.run(go())

    def status(self) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            async with self._admin() as a:
                return await a.status()

        return asyncio.run(go())

    def counters(self, name: str) -> dict[str, int]:
        """Cluster-wide: origin bytes and block hits/misses so far, bytes of `name` held."""
        st = self.status()
        held = sum(d.get("cached_bytes", 0) for d in st["datasets"] if d["name"] == name)
        return {"origin_bytes": sum(n["origin_bytes"] for n in st["nodes"]),
                "hits": sum(n["hits"] for n in st["nodes"]), "misses": sum(n["misses"] for n in st["nodes"]),
                "held_bytes": held}

    def stop(self) -> None:
        from server import hosting

        hosting.down(self.env, namespace=self.namespace)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def local_ray() -> Iterator[None]:
    """A Ray of our own (never another one running on the machine), shut down on exit."""
    import logging

    import ray

    ray.init(address="local", namespace="cachefs-bench", logging_level=logging.ERROR, log_to_driver=False,
             include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


class MountUnavailable(RuntimeError):
    """`cachefs mount` failed; the message carries its stderr."""


@contextlib.contextmanager
def mounted(dataset: str, mountpoint: Path, timeout: float = 120.0) -> Iterator[Path]:
    """`cachefs mount DATASET MOUNTPOINT` (the CLI, as a user runs it); unmounted on exit."""
    cli = [sys.executable, "-m", "cachefs.cli.main"]
    done = subprocess.run([*cli, "mount", dataset, str(mountpoint)], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise MountUnavailable(f"`cachefs mount {dataset}` failed: {done.stderr.strip()[-2000:]}")
    try:
        yield mountpoint
    finally:
        done = subprocess.run([*cli, "unmount", str(mountpoint)], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            subprocess.run([*cli, "unmount", "--lazy", str(mountpoint)], capture_output=True, text=True, timeout=60)
