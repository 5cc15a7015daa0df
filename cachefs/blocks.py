"""Reading slices: route each to its owner, batch per node, fall back along the ring.

Owner order comes from the ring: the key's replicas first, then the next nodes clockwise
(the ones that take over the key if a replica dies). Slices for one node travel together
(cachefs/batching.py); a stale epoch refreshes the ring; an unreachable node is skipped
for a few seconds and its slices go to their next owner; a slice no node can serve is
read from the origin directly (if allowed and the client can reach it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Collection

from cachefs.common import wire
from cachefs.batching import NodeQueue
from cachefs.config import ClientConfig
from cachefs.common.errors import (CachefsError, IntegrityError, NodeUnavailable, OriginUnavailable, SnapshotGone,
                            StaleEpoch, Unavailable)
from cachefs.ioloops import IOLoops
from cachefs.common.manifest import FileEntry, Manifest, from_ipc
from cachefs.common.origin import Origin
from cachefs.plan import Moved, Outcome, Slice, Stale
from cachefs.transport import Endpoints, Transport
from cachefs.common.wire import DatasetInfo
from shard import Ring

log = logging.getLogger(__name__)

DOWN_FOR = 5.0  # seconds an unreachable node is skipped before it is tried again
EXTRA_CANDIDATES = 2  # nodes past the replicas tried before giving up on the cluster
IO_LOOP_BYTES = 1024 * 1024  # requests this large receive on an IO loop (another core); smaller stay here


@dataclass(frozen=True)
class DatasetView:
    """One snapshot as a reader sees it: pinned for as long as a file stays open."""

    info: DatasetInfo
    manifest: Manifest


@dataclass(frozen=True)
class _Routes:
    ring: Ring
    urls: dict[str, str]  # node id → URL (Ring.member is a scan)


class BlockReader:
    def __init__(self, config: ClientConfig, transport: Transport,
                 origin_options: dict[str, Any] | None = None) -> None:
        self.config = config
        self.transport = transport
        self.endpoints = Endpoints(config.endpoints)
        self.io = IOLoops(config, config.io_threads) if config.io_threads else None
        self.origin_options = origin_options
        self.ring: Ring | None = None
        self._routes: _Routes | None = None
        self._down: dict[str, float] = {}
        self._gate: asyncio.Semaphore | None = None
        self._ring_lock: asyncio.Lock | None = None
        self._queues: dict[tuple[str, str, str], NodeQueue] = {}
        self._origins: dict[str, Origin] = {}
        self._full: dict[str, Manifest] = {}  # snapshot → its manifest with version tokens (origin reads)
        self.origin_reads = 0  # slices this client had to read from the origin itself

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
                self._routes = _Routes(ring, {m.id: m.url for m in ring.members})
            return self.ring

    # -- slices --------------------------------------------------------------------------
    async def read(self, view: DatasetView, slices: list[Slice]) -> list[CachefsError | None]:
        """Fill the slices' `dest`s; per slice, None (served) or its error (failed). Raises
        only for the whole read (SnapshotGone: the caller reloads the dataset and starts again)."""
        results: list[CachefsError | None] = [None] * len(slices)
        tried: dict[int, set[str]] = {}  # slice index → nodes that failed it
        pending = [i for i, s in enumerate(slices) if len(s.dest)]
        exhausted: list[int] = []
        rounds = self.config.retries + view.info.replicas + EXTRA_CANDIDATES + 2
        for _ in range(rounds):
            if not pending:
                break
            await self.get_ring()
            routes = self._routes
            assert routes is not None
            groups: dict[str, list[int]] = defaultdict(list)
            for i in pending:
                node = self._pick(routes, slices[i].key, tried.get(i, ()), view.info.replicas)
                if node is None:
                    exhausted.append(i)
                else:
                    groups[node].append(i)
            if len(groups) == 1:  # the common case of a small read: no task per group
                (node, group), = groups.items()
                answers = [await self._queue(view, node, routes.urls[node]).read([slices[i] for i in group])]
            else:
                answers = await asyncio.gather(*(self._queue(view, n, routes.urls[n]).read([slices[i] for i in g])
                                                 for n, g in groups.items()))
            pending, stale = [], 0
            for group, outcomes in zip(groups.values(), answers, strict=True):
                for i, outcome in zip(group, outcomes, strict=True):
                    if outcome is None:
                        continue
                    if isinstance(outcome, Moved):
                        tried.setdefault(i, set()).add(outcome.node)
                        pending.append(i)
                    elif isinstance(outcome, Stale):
                        stale = max(stale, outcome.epoch)
                        pending.append(i)
                    else:
                        results[i] = outcome
            if stale:
                await self.refresh_ring(stale)
            if exhausted and not pending:  # every candidate failed: maybe the ring moved on without us
                before = routes.ring.epoch
                try:
                    ring = await self.refresh_ring(before + 1)
                except NodeUnavailable:
                    break
                if ring.epoch > before:
                    for i in exhausted:
                        tried.pop(i, None)
                    pending, exhausted = exhausted, []
        exhausted += pending  # rounds used up (a ring that keeps moving): last resort as well
        if exhausted:
            failed = await self._read_origin(view, [slices[i] for i in exhausted])
            for i, error in zip(exhausted, failed, strict=True):
                results[i] = error
        gone = next((e for e in results if isinstance(e, SnapshotGone)), None)
        if gone is not None:  # the snapshot was replaced: the whole read is, not slice by slice
            raise gone
        return results

    def _pick(self, routes: _Routes, key: str, tried: Collection[str], replicas: int) -> str | None:
        """The first owner of a unit that has not failed it, preferring nodes that are not
        marked down (when all are, try them anyway: they may be back)."""
        prefs = [n for n in routes.ring.owners(key, replicas + EXTRA_CANDIDATES) if n not in tried]
        if not prefs:
            return None
        now = time.monotonic()
        for n in prefs:
            if self._down.get(routes.urls[n], 0.0) <= now:
                return n
        return prefs[0]

    @property
    def routes(self) -> object:
        """The routing table held now: a new object whenever the ring changes (what a
        caller caching a route compares against)."""
        return self._routes

    def is_down(self, url: str) -> bool:
        return self._down.get(url, 0.0) > time.monotonic()

    def mark_down(self, url: str) -> None:
        """Skip `url` for a while (any thread may say so: one assignment, atomic)."""
        self._down[url] = time.monotonic() + DOWN_FOR

    def owner(self, key: str, replicas: int) -> tuple[str, int] | None:
        """(URL, ring epoch) of a key's first live owner, from the ring already held; None
        without a ring or when that owner is marked down. Safe from any thread: it only
        reads references the loop replaces whole (cachefs/direct.py uses it)."""
        routes = self._routes
        if routes is None:
            return None
        owners = routes.ring.owners(key, 1)
        url = routes.urls[owners[0]] if owners else None
        if url is None or self._down.get(url, 0.0) > time.monotonic():
            return None
        return url, routes.ring.epoch

    def _queue(self, view: DatasetView, node: str, url: str) -> NodeQueue:
        key = (url, view.info.name, view.info.snapshot)
        queue = self._queues.get(key)
        if queue is None:
            c = self.config

            async def send(url: str, chunk: list[Slice]) -> list[Outcome]:
                return await self._send(view, node, url, chunk)

            queue = self._queues[key] = NodeQueue(url, send, c.node_requests, c.max_batch_items, c.max_batch_bytes)
        return queue

    async def _send(self, view: DatasetView, node: str, url: str, chunk: list[Slice]) -> list[Outcome]:
        """One request for `chunk`: each slice's outcome (never raises for them)."""
        info = view.info
        body = wire.read_body(info.snapshot, [s.item for s in chunk])
        dests = [s.dest for s in chunk]
        epoch = self.ring.epoch if self.ring else 0
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.config.max_concurrency)
        try:
            async with self._gate:
                if self.io is not None and sum(len(d) for d in dests) >= IO_LOOP_BYTES:
                    results = await self.io.run(lambda t: t.read_frames(url, info.name, body, epoch, dests))
                else:
                    results = await self.transport.read_frames(url, info.name, body, epoch, dests)
        except StaleEpoch as e:
            return [Stale(max(e.epoch, epoch + 1))] * len(chunk)
        except (NodeUnavailable, IntegrityError) as e:  # the node, or its answer, is broken: next owner
            self.mark_down(url)
            log.debug("%s failed a batch of %d: %s", url, len(chunk), e)
            return [Moved(node)] * len(chunk)
        except CachefsError as e:  # the node's answer for the whole request: token, dataset, snapshot
            return [e] * len(chunk)
        # a bad copy on that node (IntegrityError): try the next one
        return [Moved(node) if isinstance(r, IntegrityError) else r for r in results]

    async def _read_origin(self, view: DatasetView, slices: list[Slice]) -> list[CachefsError | None]:
        """The slices no node could serve, from the origin itself: per slice, None or its error."""
        name = view.info.name
        if not self.config.origin_fallback:
            return [Unavailable(f"cannot read {name}/{s.entry.path}: no cache node answered "
                                "(origin fallback is off)") for s in slices]
        try:
            entries = await self._versioned(view, [s.entry for s in slices])
        except CachefsError as e:
            return [Unavailable(f"cannot read {name}/{s.entry.path}: no cache node answered, and the origin "
                                f"cannot be read without the snapshot's version tokens ({e})") for s in slices]
        origin = self._origins.get(name)
        if origin is None:
            origin = self._origins[name] = Origin(view.info.origin, self.origin_options, self.config.read_timeout)
        results = await origin.read_many([(e, s.file_start, s.file_start + len(s.dest)) for e, s in zip(entries, slices)])
        out: list[CachefsError | None] = []
        for s, got in zip(slices, results, strict=True):
            if isinstance(got, CachefsError):
                reason = "the cache cluster failed and so did the origin"
                out.append(Unavailable(f"cannot read {name}/{s.entry.path}: {reason} ({got})")
                           if isinstance(got, OriginUnavailable) else got)
            else:
                s.dest[:] = got
                out.append(None)
                self.origin_reads += 1
        log.warning("read %d slice(s) of %s from the origin: no cache node could serve them", len(slices), name)
        return out

    async def _versioned(self, view: DatasetView, entries: list[FileEntry]) -> list[FileEntry]:
        """The entries with their version tokens (which the origin is checked against): a
        reader's manifest leaves them out, so the full one is asked for the first time."""
        if all(e.version for e in entries) or view.manifest.has_versions:
            return entries
        full = self._full.get(view.info.snapshot)
        if full is None:
            body, headers = await self.endpoints.call(self.transport, "GET",
                                                      wire.route(wire.DATASET_MANIFEST, name=view.info.name)
                                                      + f"?snapshot={view.info.snapshot}", raw=True)
            if headers.get(wire.SNAPSHOT_HEADER, view.info.snapshot) != view.info.snapshot:
                raise SnapshotGone(f"snapshot {view.info.snapshot} of {view.info.name!r} is no longer served")
            full = self._full[view.info.snapshot] = Manifest(from_ipc(body), view.info.snapshot)
        return [full.file(e.path) for e in entries]

    async def close(self) -> None:
        if self.io is not None:
            io, self.io = self.io, None
            try:
                await asyncio.to_thread(io.close)
            except RuntimeError:  # interpreter shutdown: no thread to hand it to, close from here
                io.close()
        for origin in self._origins.values():
            await origin.close()
        self._origins.clear()
