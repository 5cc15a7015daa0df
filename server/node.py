"""A cache node's domain logic: find a unit in a tier, or fetch it from the origin once.

Knows nothing of HTTP or Ray: `server/http_app.py` serves it, `server/node_actor.py` hosts
it. It learns datasets through a `Directory` (the coordinator, in production) and the
ring through `set_ring`. Reads come one block at a time (`read_block`, `read_pack`) or as
a batch of byte ranges (`read_ranges`) whose units are looked up, fetched and cut once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Sequence

import pyarrow as pa

from server.config import NodeConfig
from cachefs.common.errors import BadRequest, NotFound, RangeNotSatisfiable, SnapshotGone, StaleEpoch
from cachefs.common.manifest import Manifest, check_path, for_readers, from_ipc, to_ipc
from cachefs.common.origin import Origin
from cachefs.common.wire import OperationInfo
from server.batch import BatchReads
from server.metrics import NodeMetrics
from server.handover import previous_owner_urls, unit_name
from server.reads import (BlockRead, DatasetState, Directory, Found, OriginSpec, Piece, PreviousOwners, Want,
                          hole as _hole)
from server.rebalance import Rebalancer
from server.singleflight import Group
from server.stores import DiskStore, MemoryStore, StoredBlock, digest_of, read_ranges
from server.units import Unit, block_unit, of_snapshot, pack_unit, read_unit, transient, with_members
from server.warmup import Warmups
from shard import Ring, block_count

log = logging.getLogger(__name__)
LEASE_RECHECK = 30.0  # seconds a node serves a replaced snapshot before asking again whether a lease keeps it


KEEP_RINGS = 4  # earlier rings a node remembers: enough for a few changes in a row (a rolling upgrade)


def _open_manifest(ipc: bytes, snapshot: str) -> tuple[Manifest, bytes]:
    """The node's index of a snapshot, and the IPC readers load (built here, off the loop)."""
    manifest = Manifest(from_ipc(ipc), snapshot)
    _ = manifest.packs  # index the packs now
    return manifest, to_ipc(for_readers(manifest.table))


class CacheNode(BatchReads):
    """One cache node: its tiers, the datasets it knows (current and leased snapshots), the
    ring and the rings before it; the batch read is `server/batch.py`."""

    def __init__(self, node_id: str, config: NodeConfig, directory: Directory) -> None:
        self.node_id = node_id
        self.config = config
        self.directory = directory
        self.metrics = NodeMetrics(node_id)
        self.memory = MemoryStore(config.memory_bytes, config.eviction)
        self.disk = DiskStore(config.disk_dir, config.disk_bytes, config.eviction) \
            if config.disk_dir and config.disk_bytes else None
        self.ring = Ring()
        self._datasets: dict[str, DatasetState] = {}
        self._older: dict[tuple[str, str], tuple[DatasetState, float]] = {}  # replaced, leased: (state, recheck at)
        self._loads: Group[DatasetState] = Group()
        self._fetches: Group[Found] = Group()
        self.warmups = Warmups(self)
        self.started = time.time()
        # Membership changes (server/rebalance.py, server/peers.py): the rings before this
        # one, newest first, and who is asked for a moved unit before the origin.
        self.previous_rings: tuple[Ring, ...] = ()
        self.previous_owners: PreviousOwners | None = None
        self.dataset_names: Callable[[], Awaitable[list[str]]] = self._loaded_names
        self.rebalance = Rebalancer(self)
        self._pulls: Group[Found | None] = Group()
        self.peer_bytes = 0  # bytes of moved units that came from a previous owner rather than the origin
        self.requests = 0  # reads served (a batch counts once): CPU per request in the benches

    async def open(self) -> None:
        if self.disk is not None:
            await self.disk.open()

    async def close(self) -> None:
        self.warmups.cancel_all()
        self.rebalance.cancel()
        for state in self._datasets.values():
            await state.origin.close()

    # -- state pushed by the coordinator -------------------------------------------------
    def set_ring(self, ring: Ring, history: Sequence[Ring] = ()) -> bool:
        """Take `ring` if it is not older than ours; True if it is a newer epoch. The ring it
        replaces (and `history`, the coordinator's earlier rings, for a node that just
        started) are kept: they say who held a unit before (server/handover.py)."""
        if ring.epoch < self.ring.epoch:
            return False
        newer = ring.epoch > self.ring.epoch
        known = [r for r in (self.ring, *self.previous_rings, *history) if r.members and r.epoch < ring.epoch]
        by_epoch = {r.epoch: r for r in known}
        self.previous_rings = tuple(by_epoch[e] for e in sorted(by_epoch, reverse=True))[:KEEP_RINGS]
        self.ring = ring
        return newer

    async def change_ring(self, ring: Ring, history: Sequence[Ring] = ()) -> None:
        """A new ring from the coordinator: take it, and pull what moved here (server/rebalance.py)."""
        if self.set_ring(ring, history) and self.previous_rings and self.node_id in ring.node_ids \
                and self.config.handover:
            self.rebalance.start()

    async def _loaded_names(self) -> list[str]:
        return list(self._datasets)

    async def forget(self, name: str, keep_snapshot: str | None = None) -> None:
        """Drop a dataset's blocks (all, or those of older snapshots) and its cached state."""
        state = self._datasets.get(name)
        if state is not None and state.info.snapshot != keep_snapshot:
            del self._datasets[name]
            await state.origin.close()
        for key in [k for k in self._older if k[0] == name]:
            await self._older.pop(key)[0].origin.close()
        self.memory.purge(name, keep_snapshot)
        if self.disk is not None:
            await self.disk.purge(name, keep_snapshot)

    async def reload(self, name: str) -> None:
        """The dataset's settings changed in place: forget its state, keep its blocks."""
        state = self._datasets.pop(name, None)
        if state is not None:
            await state.origin.close()

    # -- datasets --------------------------------------------------------------------
    async def dataset(self, name: str, snapshot: str | None = None) -> DatasetState:
        """The dataset's state at `snapshot` (None: the current one). Reloaded when a reader
        names a snapshot newer than ours; an older one is served while a lease keeps it
        (asked again every LEASE_RECHECK s), else SnapshotGone (410), saying what to do."""
        state = self._datasets.get(name)
        if state is not None and (snapshot is None or snapshot == state.info.snapshot):
            return state
        older = self._older.get((name, snapshot)) if snapshot is not None else None
        if older is not None and older[1] > time.monotonic():
            return older[0]
        state = await self._loads.do(name, lambda: self._load(name))
        if snapshot is None or snapshot == state.info.snapshot:
            return state
        return await self._loads.do(f"{name}@{snapshot}", lambda: self._load_older(name, snapshot))

    async def _load_older(self, name: str, snapshot: str) -> DatasetState:
        try:
            info, manifest_ipc, spec = await self.directory.snapshot(name, snapshot)
        except (SnapshotGone, NotFound):
            gone = self._older.pop((name, snapshot), None)
            if gone is not None:
                await gone[0].origin.close()
            raise
        older = self._older.get((name, snapshot))
        if older is not None:  # still leased: keep the state, ask again later
            self._older[(name, snapshot)] = (older[0], time.monotonic() + min(LEASE_RECHECK, info.lease))
            return older[0]
        manifest, reader_ipc = await asyncio.to_thread(_open_manifest, manifest_ipc, info.snapshot)
        state = DatasetState(info, manifest, Origin(spec.url, spec.storage_options, self.config.origin_timeout),
                             manifest_ipc, reader_ipc)
        now = time.monotonic()
        for key in [k for k, (_, at) in self._older.items() if at < now - LEASE_RECHECK]:  # no reader for a while
            await self._older.pop(key)[0].origin.close()
        self._older[(name, snapshot)] = (state, now + min(LEASE_RECHECK, info.lease))
        return state

    async def lease(self, name: str, snapshot: str) -> float:
        """A reader loaded `snapshot` of `name`: the cluster keeps it readable for a while."""
        return await self.directory.lease(name, snapshot)

    async def _load(self, name: str) -> DatasetState:
        info, manifest_ipc, spec = await self.directory.dataset(name)
        old = self._datasets.get(name)
        if old is not None and old.info.snapshot == info.snapshot:
            return old
        manifest, reader_ipc = await asyncio.to_thread(_open_manifest, manifest_ipc, info.snapshot)
        state = DatasetState(info, manifest, Origin(spec.url, spec.storage_options, self.config.origin_timeout),
                             manifest_ipc, reader_ipc)
        self._datasets[name] = state
        if old is not None:  # a refresh: its blocks stay (keys name what bytes are, so unchanged files hit)
            await old.origin.close()
        return state

    def _check_epoch(self, epoch: int | None) -> None:
        if epoch is not None and epoch < self.ring.epoch:
            raise StaleEpoch(f"ring epoch {epoch} is stale; the current epoch is {self.ring.epoch}",
                             epoch=self.ring.epoch)

    # -- what an item names --------------------------------------------------------------
    @staticmethod
    def _file_block(state: DatasetState, path: str, index: int) -> tuple[Unit, int, int]:
        """(unit, start, end) of block `index` of a file; a packed file's one block is its
        range of its pack, so readers with an older manifest keep working."""
        entry = state.manifest.file(check_path(path))
        count = block_count(entry.size, state.info.block_size)
        if not 0 <= index < count:
            raise RangeNotSatisfiable(f"block {index} is outside {path!r}, which has {count} block(s)")
        if entry.packed:
            unit, _, _ = CacheNode._pack(state, entry.pack)
            return unit, entry.offset, entry.offset + entry.size
        unit = block_unit(state.info, entry, index)
        return unit, 0, unit.length

    @staticmethod
    def _pack(state: DatasetState, pack: int) -> tuple[Unit, int, int]:
        unit = state.packs.get(pack)
        if unit is None:
            try:
                unit = pack_unit(state.info, state.manifest, pack)
            except NotFound:
                raise RangeNotSatisfiable(f"pack {pack} is not in snapshot {state.info.snapshot}, "
                                          f"which has {state.manifest.packs} pack(s)") from None
            state.packs[pack] = unit
        return unit, 0, unit.length

    # -- one block (GET /v1/blocks) ------------------------------------------------------
    async def read_block(self, name: str, snapshot: str, path: str, index: int,
                         epoch: int | None = None, cached_only: bool = False) -> BlockRead:
        self._check_epoch(epoch)
        state = await self.dataset(name, snapshot)
        unit, start, end = self._file_block(state, path, index)
        return await self._read_one(state, unit, start, end, cached_only)

    async def read_pack(self, name: str, snapshot: str, pack: int, epoch: int | None = None,
                        cached_only: bool = False) -> BlockRead:
        self._check_epoch(epoch)
        state = await self.dataset(name, snapshot)
        unit, start, end = self._pack(state, pack)
        return await self._read_one(state, unit, start, end, cached_only)

    async def _read_one(self, state: DatasetState, unit: Unit, start: int, end: int,
                        cached_only: bool = False) -> BlockRead:
        """`cached_only`: a peer asking for a unit that moved (server/peers.py) gets it from
        a tier or a 404, never an origin read on its behalf."""
        self.requests += 1
        found = await (self.held(state, unit) if cached_only else self.unit(state, unit))
        block = found.block
        assert block is not None
        hole = _hole(block, start, end)
        if hole is not None:
            raise hole
        data = block.buffer if found.source != "disk" else None
        if cached_only and data is None:  # a peer gets the bytes in hand: measured, its fetch could stall on sendfile
            (raw,) = await asyncio.to_thread(read_ranges, [(block.path, 0, block.size)])
            data = pa.py_buffer(raw)
        return BlockRead(block, found.source, data, start, end)

    @staticmethod
    def _keys(state: DatasetState, unit: Unit) -> tuple[str, ...]:
        """Where a unit may be held: under its key, and (a pack) the copy its snapshot read
        with dead space in it (server/units.py `of_snapshot`), exact for this snapshot only."""
        return (unit.key, of_snapshot(unit.key, state.info.snapshot)) if unit.pack >= 0 else (unit.key,)

    def _find(self, state: DatasetState, unit: Unit) -> Found | None:
        """The unit in a tier, under any key it may be held by."""
        for key in self._keys(state, unit):
            hit = self._lookup(state.info.name, key)
            if hit is not None:
                return hit
        return None

    def _lookup(self, name: str, key: str) -> Found | None:
        block = self.memory.get(key)
        if block is not None:
            self.metrics.hit(name, "memory")
            return Found(block, "memory")
        if self.disk is not None:
            block = self.disk.get(key)  # possibly not verified yet: see _verified
            if block is not None:
                self.metrics.hit(name, "disk")
                return Found(block, "disk")
        return None

    # -- the tiers and the origin ----------------------------------------------------------
    async def unit(self, state: DatasetState, unit: Unit) -> Found:
        """The unit from memory, disk, or the origin (once, however many ask at the same time)."""
        hit = self._find(state, unit)
        if hit is not None and (hit.block.verified or await self._verified(hit.block.key) is not None):
            return hit
        return await self.fetch(state, unit)

    def fetch(self, state: DatasetState, unit: Unit) -> Awaitable[Found]:
        """The unit for a reader that missed it: one load per key at a time (single flight)."""
        return self._fetches.do(unit.key, lambda: self._load_missing(state, unit))

    async def _load_missing(self, state: DatasetState, unit: Unit) -> Found:
        """Inside the flight, the tiers are asked again: the reader looked them up before an
        await (a disk check, a dataset load), and a flight of the same key may have landed
        in between and left; reading the origin then would read it twice."""
        for key in self._keys(state, unit):
            block = self.memory.get(key)
            if block is not None:
                return Found(block, "memory")
            if self.disk is not None and self.disk.get(key) is not None:
                block = await self._verified(key)
                if block is not None:
                    return Found(block, "disk")
        return await self._fetch(state, unit)

    async def _verified(self, key: str) -> StoredBlock | None:
        """A disk block re-indexed on start, once its bytes match its digest (checked on its
        first read, server/stores.py); None if it was corrupt and is gone."""
        assert self.disk is not None
        return await self.disk.get_verified(key)

    async def _fetch(self, state: DatasetState, unit: Unit) -> Found:
        """Read the unit from a node that held it before (a membership change), else from
        the origin, and keep it (where it may be kept)."""
        pulled = await self._from_previous_owners(state, unit)
        if pulled is not None:
            return pulled
        data, holes = await read_unit(state.origin, with_members(unit, state.manifest))
        self.metrics.miss(state.info.name, len(data) - sum(h.end - h.start for h in holes))
        return await self._keep(state, unit, data, holes, "origin")

    async def _keep(self, state: DatasetState, unit: Unit, data: bytes | bytearray, holes: tuple,
                    source: str) -> Found:
        """Store a unit just read (unless its dataset moved on meanwhile) and say where from."""
        info = state.info
        buffer = pa.py_buffer(data)
        key = unit.key
        if holes and all(h.dead for h in holes):  # exact for this snapshot: kept where only its readers look
            key, holes = of_snapshot(unit.key, info.snapshot), ()
        block = StoredBlock(key, info.name, info.snapshot, len(data), digest_of(buffer), buffer=buffer,
                            holes=holes)
        served = self._datasets.get(info.name) is state or (info.name, info.snapshot) in self._older
        if not served or transient(holes):
            return Found(block, source)  # refreshed or removed meanwhile, or worth another try: serve, don't keep
        evicted = self.memory.put(block)
        if evicted:
            self.metrics.evicted(info.name, "memory", len(evicted))
        if self.disk is not None and not holes:  # holes live in memory only: the disk keeps whole blocks
            evicted = await self.disk.put(block, buffer)
            if evicted:
                self.metrics.evicted(info.name, "disk", len(evicted))
        return Found(block, source)

    # -- units that moved (a node joined, drained or restarted) ----------------------------
    async def held(self, state: DatasetState, unit: Unit) -> Found:
        """The unit from a tier, or NotFound: what a previous owner answers a peer."""
        hit = self._lookup(state.info.name, unit.key)
        if hit is not None and (hit.block.verified or await self._verified(unit.key) is not None):
            return hit
        raise NotFound(f"unit {unit.key} is not cached on node {self.node_id}")

    def holds(self, key: str) -> bool:
        return key in self.memory or (self.disk is not None and key in self.disk)

    async def _from_previous_owners(self, state: DatasetState, unit: Unit) -> Found | None:
        """The previous-owner seam of the miss path: the unit from a node that held it."""
        if self.previous_owners is None or not self.config.handover:
            return None
        urls = previous_owner_urls(self.node_id, self.previous_rings, unit.key, state.info.replicas)
        if not urls:
            return None
        data = await self.previous_owners.fetch(unit_name(state.info, unit), urls)
        if data is None or len(data) != unit.length:
            return None
        self.peer_bytes += len(data)
        return await self._keep(state, unit, data, (), "peer")

    async def pull(self, state: DatasetState, unit: Unit) -> Found | None:
        """A moved unit from its previous owners only (the rebalance); None if none has it
        (a reader then reads it from the origin, once, as for any miss)."""
        if self.holds(unit.key):
            return None
        return await self._pulls.do(unit.key, lambda: self._from_previous_owners(state, unit))

    # -- warm-up (server/warmup.py) ------------------------------------------------------
    async def warm(self, op_id: str, name: str, snapshot: str | None = None) -> OperationInfo:
        return await self.warmups.run(op_id, name, snapshot)

    def warm_progress(self, op_id: str) -> OperationInfo | None:
        return self.warmups.progress(op_id)

    def cancel_warm(self, op_id: str) -> None:
        self.warmups.cancel(op_id)

    # -- reporting -----------------------------------------------------------------------
    def cached_bytes(self) -> dict[str, int]:
        """Bytes held per dataset (a block in both tiers counts once), whether or not its
        state is loaded right now."""
        keys: dict[str, tuple[str, int]] = {}
        for store in (self.memory, self.disk):
            if store is not None:
                for b in store.blocks():
                    keys[b.key] = (b.dataset, b.size)
        out: dict[str, int] = {}
        for dataset, size in keys.values():
            out[dataset] = out.get(dataset, 0) + size
        return out

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
            "datasets": self.cached_bytes(),
            "uptime": time.time() - self.started,
            "requests": self.requests,
            "cpu_seconds": time.thread_time(),  # of the node's loop thread, where stats() runs (the benches)
            "settings": {k: getattr(self.config, k) for k in ("memory_bytes", "disk_bytes", "eviction",
                                                               "origin_timeout", "warm_concurrency", "nice")},
            **self.metrics.totals,
            "peer_bytes": self.peer_bytes,
            "rebalance": self.rebalance.progress.to_json(),
        }


__all__ = ["CacheNode", "BlockRead", "Piece", "Directory", "OriginSpec", "Want", "NotFound", "BadRequest"]
