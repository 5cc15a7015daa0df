"""What bytes a read needs from which cached unit, and where each byte goes.

A file range becomes slices: byte ranges of units (a block of the file, or the file's
range of its pack), each with a destination view into the caller's buffer. The read
path routes, batches and retries slices; it never copies a byte a second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union

from cachefs.common import wire
from cachefs.common.errors import CachefsError
from cachefs.common.manifest import FileEntry
from cachefs.common.wire import DatasetInfo
from shard import block_key, blocks_for_range, identity, pack_key


@dataclass(frozen=True, slots=True, eq=False)
class Slice:
    """Bytes a reader wants from one unit: `item` on the wire, landing in `dest`."""

    key: str  # the unit's key: routes the slice to its owner
    item: list  # the wire.READ item
    dest: memoryview
    entry: FileEntry  # for the origin fallback: the file, and ...
    file_start: int  # ... the offset in it of dest[0]


class Moved(NamedTuple):
    """The node could not serve the slice (unreachable, or its copy was bad): try the next owner."""

    node: str


class Stale(NamedTuple):
    """The node routes by a newer ring epoch: refresh the ring, then route the slice again."""

    epoch: int


# What one send did with one slice: None (served: its bytes are in `dest`), Moved, Stale,
# or the slice's own error (failed).
Outcome = Union[None, Moved, Stale, CachefsError]


def plan(info: DatasetInfo, entry: FileEntry, start: int, end: int, dest: memoryview) -> list[Slice]:
    """Slices that fill `dest` (end - start bytes) with bytes [start, end) of `entry`."""
    if entry.packed:
        item = [wire.ITEM_PACK, entry.pack, entry.offset + start, entry.offset + end]
        return [Slice(pack_key(info.name, identity(info.snapshot, entry.unit), entry.pack), item, dest, entry, start)]
    bs = info.block_size
    out = []
    for index in blocks_for_range(start, end, entry.size, bs):
        first = index * bs
        lo, hi = max(start, first), min(end, first + bs)
        item = [wire.ITEM_BLOCK, entry.path, index, lo - first, hi - first]
        key = block_key(info.name, identity(info.snapshot, entry.unit), entry.path, index)
        out.append(Slice(key, item, dest[lo - start:hi - start], entry, lo))
    return out
