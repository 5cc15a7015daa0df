"""Small files laid end to end into block-sized packs, decided once per snapshot.

A dataset of 110 KB images would otherwise be a million tiny blocks: a million keys to
place, warm, evict and request. Packed, it is a few thousand block-sized units, and a
read of one small file is a byte range of its pack. Files are packed in path order, so
files read together (one directory) tend to share packs. Pure: sizes in, layout out.
"""

from __future__ import annotations

from typing import Iterable

NOT_PACKED = -1


def default_threshold(block_size: int) -> int:
    """Files below 1 MiB (or a quarter block, if blocks are small) are packed: above that a
    file fills enough of a block on its own, and a pack still holds at least four files."""
    return min(1024 * 1024, block_size // 4)


def pack_layout(sizes: Iterable[int], block_size: int, threshold: int) -> tuple[list[int], list[int], int]:
    """(pack of each file, offset in its pack, number of packs), files in the order given.

    A file of 1 byte to `threshold - 1` bytes joins the current pack, or opens the next one
    when it would not fit. Empty files need no bytes and larger files keep blocks of their
    own: both get NOT_PACKED and offset 0.
    """
    sizes = list(sizes)
    packs, offsets, made = repack(sizes, [None] * len(sizes), block_size, threshold, 0)
    return packs, offsets, len(made)


SPARSE = 0.5  # a pack whose live members fill less than this share of a block is sparse
SPARSE_PACKS_ALLOWED = 2  # ... and sparse packs are merged once more than this (or 5% of packs) are


def repack(sizes: list[int], kept: list[tuple[int, int] | None], block_size: int, threshold: int,
           next_pack: int) -> tuple[list[int], list[int], set[int]]:
    """The layout of a refreshed snapshot: (pack of each file, offset, packs made new).

    `kept[i]` is where file i lay in the previous snapshot when it is unchanged there (same
    path, size and version) and packed, else None. Unchanged files stay where they are, so
    their packs keep their ids and their cached bytes; new and changed small files go to new
    packs numbered from `next_pack`, in the order given (path order). A pack that lost
    members keeps their bytes as dead space; once more than a few packs are sparse (live
    members under half a block), all sparse ones are merged into new packs (compaction), so
    packs stay dense however many refreshes pass, at the cost of re-reading a few half
    packs.
    """
    live: dict[int, int] = {}
    for size, where in zip(sizes, kept, strict=True):
        if where is not None:
            live[where[0]] = live.get(where[0], 0) + size
    sparse = {p for p, n in live.items() if n < SPARSE * block_size}
    if len(sparse) <= max(SPARSE_PACKS_ALLOWED, len(live) // 20):
        sparse = set()
    packs: list[int] = []
    offsets: list[int] = []
    count, fill = next_pack, block_size  # starting "full" opens pack `next_pack` on demand
    for size, where in zip(sizes, kept, strict=True):
        if where is not None and where[0] not in sparse:
            packs.append(where[0])
            offsets.append(where[1])
            continue
        if not 0 < size < threshold:
            packs.append(NOT_PACKED)
            offsets.append(0)
            continue
        if fill + size > block_size:
            count, fill = count + 1, 0
        packs.append(count - 1)
        offsets.append(fill)
        fill += size
    return packs, offsets, set(range(next_pack, count))
