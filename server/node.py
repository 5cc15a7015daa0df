"""A cache node's domain logic: find a block in a tier, or fetch it from the origin once.

Knows nothing of HTTP or Ray: `server/http_app.py` serves it, `server/node_actor.py` hosts
it. It learns datasets through a `Directory` (the coordinator, in production) and the
ring through `set_ring`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from cachefs.config import NodeConfig
from cachefs.errors import (CachefsError, Cancelled, NotFound, RangeNotSatisfiable, SnapshotGone, StaleEpoch)
from cachefs.manifest import FileEntry, Manifest, check_path, from_ipc
from cachefs.wire import DatasetInfo, OperationInfo
from server.metrics import NodeMetrics
from cachefs.origin import Origin
from server.singleflight import Group
from server.stores import DiskStore, MemoryStore, StoredBlock, digest_of
from shard import Ring, block_bounds, block_count, block_key

log = logging.getLogger(__name__)

KEEP_WARMS = 100  # warm-up reports kept per node, for the coordinator to collect


@dataclass(frozen=True)
class OriginSpec:
    url: str
    storage_options: dict[str, Any]


class Directory(Protocol):
    """Where a node learns what a dataset is: its info, manifest and origin."""

    async def dataset(self, name: str) -> tuple[DatasetInfo, bytes, OriginSpec]: ...


@dataclass
class DatasetState:
    info: DatasetInfo
    manifest: Manifest
    origin: Origin
    manifest_ipc: bytes


@dataclass
class Warm:
    task: asyncio.Task[Any] | None
    progress: OperationInfo
    cancelled: bool = False


@dataclass
class BlockRead:
    """What the HTTP layer sends: bytes in memory, or a file to sendfile."""

    block: StoredBlock
    source: str  # memory | disk | origin
    data: pa.Buffer | None = None


class CacheNode:
    def __init__(self, node_id: str, config: NodeConfig, directory: Directory) -> None:
        self.node_id = node_id
        self.config = config
        self.directory = directory
        self.metrics = NodeMetrics(node_id)
        self.memory = MemoryStore(config.memory_bytes, config.eviction)
        self.disk = DiskStore(config.disk_dir, config.disk_bytes, config.eviction) if config.disk_dir else None
        self.ring = Ring()
        self._datasets: dict[str, DatasetState] = {}
        self._loads: Group[DatasetState] = Group()
        self._fetches: Group[BlockRead] = Group()
        self._warms: dict[str, Warm] = {}
        self.started = time.time()

    async def open(self) -> None:
        if self.disk is not None:
            await self.disk.open()

    async def close(self) -> None:
        for w in self._warms.values():
            if w.task is not None:
                w.task.cancel()
        for state in self._datasets.values():
            await state.origin.close()

    # -- state pushed by the coordinator -------------------------------------------------
    def set_ring(self, ring: Ring) -> None:
        if ring.epoch >= self.ring.epoch:
            self.ring = ring

    async def forget(self, name: str, keep_snapshot: str | None = None) -> None:
        """Drop a dataset's blocks (all, or those of older snapshots) and its cached state."""
        state = self._datasets.get(name)
        if state is not None and state.info.snapshot != keep_snapshot:
            del self._datasets[name]
            await state.origin.close()
        self.memory.purge(name, keep_snapshot)
        if self.disk is not None:
            await self.disk.purge(name, keep_snapshot)

    # -- datasets --------------------------------------------------------------------
    async def dataset(self, name: str, snapshot: str | None = None) -> DatasetState:
        """The dataset's state; reloaded when a reader names a snapshot newer than ours."""
        state = self._datasets.get(name)
        if state is not None and (snapshot is None or snapshot == state.info.snapshot):
            return state
        state = await self._loads.do(name, lambda: self._load(name))
        if snapshot is not None and snapshot != state.info.snapshot:
            raise SnapshotGone(f"snapshot {snapshot} of dataset {name!r} is no longer served "
                               f"(the current one is {state.info.snapshot}); reopen the file to read it")
        return state

    async def _load(self, name: str) -> DatasetState:
        info, manifest_ipc, spec = await self.directory.dataset(name)
        old = self._datasets.get(name)
        if old is not None and old.info.snapshot == info.snapshot:
            return old
        state = DatasetState(info, Manifest(from_ipc(manifest_ipc), info.snapshot),
                             Origin(spec.url, spec.storage_options, self.config.origin_timeout), manifest_ipc)
        self._datasets[name] = state
        if old is not None:
            await self.forget(name, keep_snapshot=info.snapshot)
            self._datasets[name] = state
        return state

    # -- blocks --------------------------------------------------------------------------
    async def read_block(self, name: str, snapshot: str, path: str, index: int,
                         epoch: int | None = None) -> BlockRead:
        if epoch is not None and epoch < self.ring.epoch:
            raise StaleEpoch(f"ring epoch {epoch} is stale; the current epoch is {self.ring.epoch}",
                             epoch=self.ring.epoch)
        state = await self.dataset(name, snapshot)
        entry = state.manifest.file(check_path(path))
        count = block_count(entry.size, state.info.block_size)
        if not 0 <= index < count:
            raise RangeNotSatisfiable(f"block {index} is outside {path!r}, which has {count} block(s)")
        return await self._block(state, entry, index)

    async def _block(self, state: DatasetState, entry: FileEntry, index: int) -> BlockRead:
        info = state.info
        key = block_key(info.name, info.snapshot, entry.path, entry.version, index)
        block = self.memory.get(key)
        if block is not None:
            self.metrics.hit(info.name, "memory")
            return BlockRead(block, "memory", block.buffer)
        if self.disk is not None:
            block = await self.disk.get_verified(key)  # a block re-indexed on start is checked on its first read
            if block is not None:
                self.metrics.hit(info.name, "disk")
                return BlockRead(block, "disk")
        return await self._fetches.do(key, lambda: self._fetch(state, entry, index, key))

    async def _fetch(self, state: DatasetState, entry: FileEntry, index: int, key: str) -> BlockRead:
        info = state.info
        start, end = block_bounds(index, entry.size, info.block_size)
        data = await state.origin.read(entry, start, end)
        self.metrics.miss(info.name, len(data))
        buffer = pa.py_buffer(data)
        block = StoredBlock(key, info.name, info.snapshot, len(data), digest_of(data), buffer=buffer)
        if self._datasets.get(info.name) is not state:
            return BlockRead(block, "origin", buffer)  # refreshed or removed meanwhile: serve, don't keep
        evicted = self.memory.put(block)
        if evicted:
            self.metrics.evicted(info.name, "memory", len(evicted))
        if self.disk is not None:
            evicted = await self.disk.put(block, buffer)
            if evicted:
                self.metrics.evicted(info.name, "disk", len(evicted))
        return BlockRead(block, "origin", buffer)

    # -- warm-up -------------------------------------------------------------------------
    def owned_blocks(self, state: DatasetState) -> list[tuple[FileEntry, int]]:
        """The (file, block index) pairs this node holds a replica of under the current ring."""
        info, ring, me = state.info, self.ring, self.node_id
        mine = []
        for entry in state.manifest.files.values():
            for index in range(block_count(entry.size, info.block_size)):
                key = block_key(info.name, info.snapshot, entry.path, entry.version, index)
                if me in ring.owners(key, info.replicas):
                    mine.append((entry, index))
        return mine

    async def warm(self, op_id: str, name: str) -> OperationInfo:
        """Fetch every block this node owns; failures are counted by file, never raised."""
        progress = OperationInfo(op_id, "warm", name, started=time.time())
        warm = self._warms[op_id] = Warm(None, progress)
        while len(self._warms) > KEEP_WARMS:  # the oldest reports go first
            del self._warms[next(iter(self._warms))]
        try:
            state = await self.dataset(name)
            owned = self.owned_blocks(state)
            bs = state.info.block_size
            progress.total_files = len({e.path for e, _ in owned})
            progress.total_bytes = sum(min(bs, e.size - i * bs) for e, i in owned)
            left_per_file: dict[str, int] = {}
            for e, _ in owned:
                left_per_file[e.path] = left_per_file.get(e.path, 0) + 1
            todo = iter(owned)

            async def worker() -> None:
                # a few workers pulling from one iterator: memory stays flat however many blocks
                for entry, index in todo:
                    if warm.cancelled:
                        return
                    try:
                        got = await self._block(state, entry, index)
                        progress.done_bytes += got.block.size
                    except CachefsError as e:
                        progress.failures[entry.path] = str(e)
                    left_per_file[entry.path] -= 1
                    if left_per_file[entry.path] == 0:
                        progress.done_files += 1

            warm.task = asyncio.ensure_future(asyncio.gather(*(worker() for _ in range(self.config.warm_concurrency))))
            await warm.task
            progress.state = "cancelled" if warm.cancelled else ("failed" if progress.failures else "succeeded")
        except asyncio.CancelledError:
            progress.state = "cancelled"
        except CachefsError as e:
            progress.state, progress.message = "failed", str(e)
        progress.finished = time.time()
        return progress

    def warm_progress(self, op_id: str) -> OperationInfo | None:
        w = self._warms.get(op_id)
        return w.progress if w else None

    def cancel_warm(self, op_id: str) -> None:
        w = self._warms.get(op_id)
        if w is not None:
            w.cancelled = True
            if w.task is not None:
                w.task.cancel()

    # -- reporting -----------------------------------------------------------------------
    def cached_bytes(self, name: str) -> int:
        keys: dict[str, int] = {}
        for store in (self.memory, self.disk):
            if store is not None:
                for b in store.blocks():
                    if b.dataset == name:
                        keys[b.key] = b.size
        return sum(keys.values())

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "epoch": self.ring.epoch,
            "memory_used": self.memory.used,
            "memory_budget": self.memory.budget,
            "memory_blocks": len(self.memory),
            "disk_used": self.disk.used if self.disk else 0,
            "disk_budget": self.disk.budget if self.disk else 0,
            "disk_blocks": len(self.disk) if self.disk else 0,
            "evictions": self.memory.evictions + (self.disk.evictions if self.disk else 0),
            "datasets": {name: self.cached_bytes(name) for name in self._datasets},
            "uptime": time.time() - self.started,
            **self.metrics.totals,
        }


__all__ = ["CacheNode", "BlockRead", "Directory", "OriginSpec", "Cancelled", "NotFound"]
