"""Reading blocks: route each to its owner, fall back along the ring, check the digest.

Owner order comes from the ring: the key's replicas first, then the next nodes clockwise
(the ones that take over the key if a replica dies). A stale epoch refreshes the ring;
an unreachable node is skipped for a few seconds; when no node answers, the origin is
read directly (if allowed and the client can reach it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from cachefs import wire
from cachefs.config import ClientConfig
from cachefs.errors import (IntegrityError, NodeUnavailable, OriginUnavailable, StaleEpoch,
                            Unavailable)
from cachefs.manifest import FileEntry, Manifest
from cachefs.ioloops import IOLoops
from cachefs.origin import Origin
from cachefs.transport import Endpoints, Transport
from cachefs.wire import DatasetInfo
from shard import Ring, block_bounds, block_key

log = logging.getLogger(__name__)

DOWN_FOR = 5.0  # seconds an unreachable node is skipped before it is tried again
EXTRA_CANDIDATES = 2  # nodes past the replicas tried before giving up on the cluster


@dataclass(frozen=True)
class DatasetView:
    """One snapshot as a reader sees it: pinned for as long as a file stays open."""

    info: DatasetInfo
    manifest: Manifest


class BlockReader:
    def __init__(self, config: ClientConfig, transport: Transport,
                 origin_options: dict[str, Any] | None = None) -> None:
        self.config = config
        self.transport = transport
        self.endpoints = Endpoints(config.endpoints)
        self.io = IOLoops(config, config.io_threads, transport.pool) if config.io_threads else None
        self.origin_options = origin_options
        self.ring: Ring | None = None
        self._down: dict[str, float] = {}
        self._gate: asyncio.Semaphore | None = None
        self._ring_lock: asyncio.Lock | None = None
        self._origins: dict[str, Origin] = {}
        self.origin_reads = 0  # blocks this client had to read from the origin itself

    # -- ring ----------------------------------------------------------------------------
    async def get_ring(self) -> Ring:
        if self.ring is None:
            await self.refresh_ring()
        assert self.ring is not None
        return self.ring

    async def refresh_ring(self, at_least: int = 0) -> Ring:
        """Fetch the ring, unless one of epoch `at_least` or newer is already here."""
        if self._ring_lock is None:
            self._ring_lock = asyncio.Lock()
        async with self._ring_lock:
            if at_least and self.ring is not None and self.ring.epoch >= at_least:
                return self.ring  # someone refreshed while we waited
            ring = Ring.from_json(await self.endpoints.call(self.transport, "GET", wire.RING))
            self.endpoints.learn([m.url for m in ring.members])
            if self.ring is None or ring.epoch >= self.ring.epoch:
                self.ring = ring
            return self.ring

    # -- blocks --------------------------------------------------------------------------
    async def read(self, view: DatasetView, entry: FileEntry, index: int) -> memoryview | bytes:
        """Block `index` of `entry`, in a pooled buffer: copy out what you need, then `release` it."""
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.config.max_concurrency)
        async with self._gate:
            return await self._read(view, entry, index)

    def release(self, block: memoryview | bytes) -> None:
        if isinstance(block, memoryview):
            self.transport.pool.give(block)

    async def _read(self, view: DatasetView, entry: FileEntry, index: int) -> memoryview | bytes:
        info = view.info
        start, end = block_bounds(index, entry.size, info.block_size)
        key = block_key(info.name, info.snapshot, entry.path, entry.version, index)
        params = {"snapshot": info.snapshot, "path": entry.path, "index": str(index)}
        failures: list[str] = []
        for _attempt in range(self.config.retries + 1):
            ring = await self.get_ring()
            prefs = ring.owners(key, info.replicas + EXTRA_CANDIDATES)  # the head of its preference list
            now = time.monotonic()
            live = [n for n in prefs if self._down.get(ring.member(n).url, 0) <= now] or prefs
            for node in live:
                url = ring.member(node).url
                try:
                    return await self._fetch(url, info.name, params, ring.epoch, end - start)
                except StaleEpoch as e:
                    await self.refresh_ring(e.epoch)
                    break
                except NodeUnavailable as e:
                    self._down[url] = time.monotonic() + DOWN_FOR
                    failures.append(str(e))
                except IntegrityError as e:  # a bad copy on that node: try the next one
                    failures.append(str(e))
            else:
                try:  # every candidate failed: maybe the ring moved on without us
                    await self.refresh_ring(ring.epoch + 1)
                except NodeUnavailable as e:
                    failures.append(str(e))
                    break
        return await self._read_origin(view, entry, index, failures)

    async def _fetch(self, url: str, name: str, params: dict[str, str], epoch: int, length: int) -> memoryview:
        if self.io is None:
            return await self.transport.read_block(url, name, params, epoch, length)
        return await self.io.run(lambda t: t.read_block(url, name, params, epoch, length))

    async def _read_origin(self, view: DatasetView, entry: FileEntry, index: int,
                           failures: list[str]) -> bytes:
        reason = failures[-1] if failures else "no cache node answered"
        if not self.config.origin_fallback:
            raise Unavailable(f"cannot read {view.info.name}/{entry.path}: {reason} "
                              "(origin fallback is off)")
        origin = self._origins.get(view.info.name)
        if origin is None:
            origin = self._origins[view.info.name] = Origin(view.info.origin, self.origin_options,
                                                            self.config.read_timeout)
        start, end = block_bounds(index, entry.size, view.info.block_size)
        try:
            data = await origin.read(entry, start, end)
        except OriginUnavailable as e:
            raise Unavailable(f"cannot read {view.info.name}/{entry.path}: the cache cluster failed ({reason}) "
                              f"and so did the origin ({e})") from e
        self.origin_reads += 1
        log.warning("read block %d of %s/%s from the origin: %s", index, view.info.name, entry.path, reason)
        return data

    async def close(self) -> None:
        if self.io is not None:
            io, self.io = self.io, None
            await asyncio.to_thread(io.close)
        for origin in self._origins.values():
            await origin.close()
        self._origins.clear()
