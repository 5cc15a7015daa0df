"""What one cached block is made of, and how it is read from the origin.

A unit is what a key names and a tier stores: either one block of one large file, or a
pack (small files laid end to end, shard/packing.py). A pack is read from the origin
member by member; a member that is gone or changed leaves a *hole* carrying its error, so
the other members are still served and only readers of that file see the failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from cachefs.common.errors import CachefsError, OriginChanged, OriginUnavailable
from cachefs.common.manifest import FileEntry, Manifest
from cachefs.common.origin import Origin
from cachefs.common.wire import DatasetInfo
from shard import block_bounds, block_count, block_key, identity, pack_key


@dataclass(frozen=True)
class Hole:
    """Bytes [start, end) of a pack that could not be read: a reader of them gets `error`."""

    start: int
    end: int
    error: CachefsError
    dead: bool = False  # dead space: older members no file of the fetching snapshot covers


def of_snapshot(key: str, snapshot: str) -> str:
    """Where a copy of a pack with dead space is kept: it is exact for the snapshot that read
    it (its files are the live members), and only that snapshot's readers look there."""
    return xxhash.xxh3_64_hexdigest(f"{key}@{snapshot}".encode())


@dataclass(frozen=True)
class Unit:
    key: str
    length: int
    members: tuple[FileEntry, ...] = ()  # the file (a block) or the pack's files, in offset order;
    #                                      a pack's are filled only when needed (`with_members`)
    start: int = 0  # a file block's first byte in its file
    pack: int = -1


def block_unit(info: DatasetInfo, entry: FileEntry, index: int) -> Unit:
    start, end = block_bounds(index, entry.size, info.block_size)
    return Unit(block_key(info.name, identity(info.snapshot, entry.unit), entry.path, index), end - start, (entry,),
                start)


def pack_unit(info: DatasetInfo, manifest: Manifest, pack: int) -> Unit:
    """A pack as a reader's request names it: key and length, no members (serving a hit
    needs no more, and building 75 entries per request was the node's hottest loop)."""
    return Unit(pack_key(info.name, identity(info.snapshot, manifest.pack_unit(pack)), pack), manifest.pack_size(pack),
                (), 0, pack)


def with_members(unit: Unit, manifest: Manifest) -> Unit:
    """The unit with its pack's files, for reading it from the origin."""
    if unit.pack < 0 or unit.members:
        return unit
    return Unit(unit.key, unit.length, tuple(manifest.pack_members(unit.pack)), 0, unit.pack)


def all_units(info: DatasetInfo, manifest: Manifest) -> list[Unit]:
    """Every unit of a snapshot: its packs, then the blocks of files with blocks of their own.
    O(files): run it off the event loop."""
    units = [with_members(pack_unit(info, manifest, p), manifest) for p in manifest.pack_numbers()]
    for row in range(len(manifest)):
        entry = manifest.at(row)
        if not entry.packed:
            units += [block_unit(info, entry, i) for i in range(block_count(entry.size, info.block_size))]
    return units


async def read_unit(origin: Origin, unit: Unit) -> tuple[bytes | bytearray, tuple[Hole, ...]]:
    """The unit's bytes from the origin, and the holes of members that failed.

    A file block fails as a whole (raises). A pack fails only if every member failed.
    """
    if unit.pack < 0:
        (entry,) = unit.members
        return await origin.read(entry, unit.start, unit.start + unit.length), ()
    buf = bytearray(unit.length)
    holes: list[Hole] = []
    results = await origin.read_many([(m, 0, m.size) for m in unit.members])
    for member, got in zip(unit.members, results, strict=True):
        if isinstance(got, CachefsError):
            holes.append(Hole(member.offset, member.offset + member.size, got))
        else:
            buf[member.offset:member.offset + member.size] = got
    if holes and len(holes) == len(unit.members):
        raise holes[0].error
    return buf, tuple(holes) + dead_space(unit)


def dead_space(unit: Unit) -> tuple[Hole, ...]:
    """The ranges of a pack no member of this snapshot covers: members of older snapshots
    that changed or left. The pack's key (its id) names its bytes as first laid out, and a
    reader of an older snapshot may share this copy: it must get an error there, never the
    zeros this copy holds."""
    holes, at = [], 0
    for m in unit.members:
        if m.offset > at:
            holes.append(Hole(at, m.offset, OriginChanged(
                f"bytes [{at}, {m.offset}) of pack {unit.pack} belong to files of an older snapshot that changed "
                "at the origin since; read the current snapshot"), dead=True))
        at = max(at, m.offset + m.size)
    return tuple(holes)


def transient(holes: tuple[Hole, ...]) -> bool:
    """Holes that a later read may fill (the origin was down), as opposed to files that are
    gone or changed for the rest of this snapshot."""
    return any(isinstance(h.error, OriginUnavailable) for h in holes)
