"""Block keys and block arithmetic: which blocks a byte range touches, and their names.

A key names what its bytes are, not the snapshot that first read them, so a file that did
not change keeps its cached bytes across refreshes: a block of a large file is named by the
file's *unit id* (its path, size, version token and the block size), a pack by its id (its
members as they were laid out when it was made, shard/packing.py). Both ids are computed by
the server, which holds the version tokens, and travel in the manifest's `unit` column (8
bytes a file), so readers find blocks without the version tokens. A manifest from before
that column (unit 0) names its blocks by its snapshot, as it always did.
"""

from __future__ import annotations

from typing import Iterable

import xxhash


def identity(snapshot: str, unit: int) -> str:
    """What a key is made of besides the dataset: the unit id, or (an older manifest, unit 0)
    the snapshot, which hashes every version token."""
    return f"u{unit:016x}" if unit else snapshot


def block_key(dataset: str, ident: str, path: str, index: int) -> str:
    """16 hex digits of xxh3-64 over the block's identity (NUL-separated: no field has NUL)."""
    return xxhash.xxh3_64_hexdigest(f"{dataset}\0{ident}\0{path}\0{index}".encode())


def pack_key(dataset: str, ident: str, pack: int) -> str:
    """A pack (small files laid end to end, shard/packing.py), by its id and number."""
    return xxhash.xxh3_64_hexdigest(f"{dataset}\0{ident}\0\0pack\0{pack}".encode())


def file_unit(path: str, size: int, version: str, block_size: int) -> int:
    """The unit id of a file with blocks of its own: what its bytes are (never 0)."""
    return xxhash.xxh3_64_intdigest(f"{path}\0{size}\0{version}\0{block_size}".encode()) or 1


def pack_unit(members: Iterable[tuple[str, int, str, int]], block_size: int) -> int:
    """The id of a new pack: its members (path, size, version, offset) as laid out (never 0)."""
    h = xxhash.xxh3_64(f"pack\0{block_size}\n".encode())
    for path, size, version, offset in members:
        h.update(f"{path}\0{size}\0{version}\0{offset}\n".encode())
    return h.intdigest() or 1


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
