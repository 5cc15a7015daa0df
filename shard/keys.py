"""Block keys and block arithmetic: which blocks a byte range touches, and their names.

A key names one block of one file of one snapshot. The snapshot id already hashes every
file's version token, so the key does not repeat it: readers can then find blocks without
holding version tokens (the widest column of a manifest).
"""

from __future__ import annotations

import xxhash


def block_key(dataset: str, snapshot: str, path: str, index: int) -> str:
    """16 hex digits of xxh3-64 over the block's identity (NUL-separated: no field has NUL)."""
    return xxhash.xxh3_64_hexdigest(f"{dataset}\0{snapshot}\0{path}\0{index}".encode())


def pack_key(dataset: str, snapshot: str, pack: int) -> str:
    """A pack (small files laid end to end, shard/packing.py) is named by its snapshot and
    number: the snapshot id already hashes every member's path, size and version token."""
    return xxhash.xxh3_64_hexdigest(f"{dataset}\0{snapshot}\0\0pack\0{pack}".encode())


def key_hash(key: str) -> int:
    """The ring position of a key (a 64-bit integer)."""
    return xxhash.xxh3_64_intdigest(key.encode())


def block_count(size: int, block_size: int) -> int:
    """An empty file still has one (empty) block, so every file has an owner."""
    return max(1, -(-size // block_size))


def block_bounds(index: int, size: int, block_size: int) -> tuple[int, int]:
    start = index * block_size
    return start, min(start + block_size, size)


def blocks_for_range(start: int, end: int, size: int, block_size: int) -> range:
    """Indices of the blocks that hold bytes [start, end) of a file of `size` bytes."""
    end = min(end, size)
    if start >= end:
        return range(0)
    return range(start // block_size, (end - 1) // block_size + 1)
