"""A node's batch read (`POST /v1/datasets/{name}/read`): many byte ranges of blocks and
packs in one request, each item resolved to its unit and range, units shared by items read
once, each item answered with its bytes or its own error. Mixed into `CacheNode`, whose
tiers, single flight and origin it uses.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import xxhash

from cachefs.common import wire
from cachefs.common.errors import BadRequest, CachefsError, RangeNotSatisfiable
from server.reads import Ask, DatasetState, Found, Piece, Want, as_error, hole
from server.stores import read_ranges
from server.units import Unit, with_members


class BatchReads:
    """The batch read of `CacheNode` (server/node.py): its methods use the node's tiers
    (`_find`, `_verified`, `memory`, `disk`), single flight (`fetch`, `_fetches`), the
    dataset states (`dataset`, `_pack`, `_file_block`) and metrics."""

    # -- many ranges (POST /v1/datasets/{name}/read) -------------------------------------
    async def read_ranges(self, name: str, snapshot: str, wants: Sequence[Want],
                          epoch: int | None = None) -> list[Piece]:
        """Every item's bytes or its own error; units shared by items are read once.

        The hot loop of a node: hits are found without awaiting anything, and only misses
        (fetched together, single-flighted) cost a task."""
        self.requests += 1
        self._check_epoch(epoch)
        state = await self.dataset(name, snapshot)
        asked = [self._resolve(state, want) for want in wants]
        found, partial = await self._units(state, {a.unit.key: a.unit for a in asked if a.unit is not None})
        if partial:
            await self._members(state, [a for a in asked if a.unit is not None and a.unit.key in partial])
        await self._cut(asked, found)
        pieces: list[Piece] = []
        served = 0
        digest = xxhash.xxh3_64_intdigest
        for a in asked:
            if a.error is not None:
                pieces.append(Piece.failed(a.error))
            else:
                pieces.append(Piece(200, a.payload, digest(a.payload)))  # type: ignore[arg-type]
                served += a.end - a.start
        self.metrics.served(name, served)
        return pieces

    async def _units(self, state: DatasetState, units: dict[str, Unit]) -> tuple[dict[str, Found], set[str]]:
        """Each unit from a tier or the origin (misses fetched together), and the keys of
        packs to read file by file instead (`_partial`)."""
        found: dict[str, Found] = {}
        misses: dict[str, Unit] = {}
        for key, unit in units.items():
            hit = self._find(state, unit)
            if hit is None:
                misses[key] = unit
            else:
                found[key] = hit
        for key in [k for k, v in found.items() if not v.block.verified]:
            if await self._verified(found[key].block.key) is None:  # corrupt on disk: fetched again
                del found[key]
                misses[key] = units[key]
        if not misses:
            return found, set()
        partial = {k for k, u in misses.items() if self._partial(u)}
        fetch = [u for k, u in misses.items() if k not in partial]
        got = await asyncio.gather(*(self.fetch(state, u) for u in fetch), return_exceptions=True)
        for unit, result in zip(fetch, got, strict=True):
            found[unit.key] = Found(None, "origin", as_error(result)) if isinstance(result, BaseException) \
                else result
        return found, partial

    async def _cut(self, asked: list[Ask], found: dict[str, Found]) -> None:
        """Give each item still without an outcome its bytes (a view of a block in memory;
        disk ranges read in one thread hop) or its unit's error."""
        disk: list[Ask] = []
        for a in asked:
            if a.error is not None or a.payload is not None:
                continue
            f = found[a.unit.key]  # type: ignore[union-attr]
            if f.error is not None:
                a.error = f.error
            elif (f.block.holes or a.end > f.block.size) and (missing := hole(f.block, a.start, a.end)) is not None:  # type: ignore[union-attr]
                a.error = missing
            elif f.source == "disk":
                disk.append(a)
            else:
                a.payload = memoryview(f.block.buffer)[a.start:a.end]  # type: ignore[union-attr,arg-type]
        if disk:
            data = await asyncio.to_thread(read_ranges, [(found[a.unit.key].block.path, a.start, a.end)  # type: ignore
                                                         for a in disk])
            for a, d in zip(disk, data, strict=True):
                a.payload = d

    def _resolve(self, state: DatasetState, want: Want) -> Ask:
        """The bytes of a unit an item asks for, or the item's error."""
        try:
            if want[0] == wire.ITEM_PACK:
                unit, lo, hi = self._pack(state, want[1])
                start, end = want[2], want[3]
            else:
                unit, lo, hi = self._file_block(state, want[1], want[2])
                start, end = want[3], want[4]
            if not 0 <= start <= end <= hi - lo:
                raise RangeNotSatisfiable(f"range [{start}, {end}) is outside the {hi - lo} bytes of that block")
        except CachefsError as e:
            return Ask(None, 0, 0, e)
        return Ask(unit, lo + start, lo + end)

    def _partial(self, unit: Unit) -> bool:
        """Is this a pack that is not here and would not be kept if fetched? Then only the
        files asked for are read from the origin: fetching all of it would read every
        member for nothing (a Sticky cache that is full, a pack larger than the budget)."""
        if unit.pack < 0 or unit.key in self.memory or unit.key in self._fetches:
            return False
        if self.disk is not None and (unit.key in self.disk or self.disk.would_keep(unit.length)):
            return False
        return not self.memory.would_keep(unit.length)

    async def _members(self, state: DatasetState, asked: list[Ask]) -> None:
        """The files that ranges of packs name, read from the origin (not kept)."""
        reads = []
        wanted: list[Ask] = []
        for a in asked:
            unit = with_members(a.unit, state.manifest)  # type: ignore[arg-type]
            member = next((m for m in unit.members if m.offset == a.start and m.offset + m.size == a.end), None)
            if member is None:
                a.error = BadRequest(f"[{a.start}, {a.end}) is not one file of pack {unit.pack}; "
                                     "ask for whole files, or for the pack when it can be cached")
                continue
            reads.append((member, 0, member.size))
            wanted.append(a)
        if reads:
            results = await state.origin.read_many(reads)
            for a, got in zip(wanted, results, strict=True):
                if isinstance(got, CachefsError):
                    a.error = got
                else:
                    a.payload = got
                    self.metrics.miss(state.info.name, len(got))
