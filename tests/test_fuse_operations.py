"""The mount's parts without a kernel mount: the snapshot tree and its inodes, the chunk
cache (budget, LRU, single-flight), the reader (whole small files, chunks, readahead, the
deadline) and the errnos of the FUSE operations.

Bytes come through the reader's one seam, `fetch(path, start, end)`, here over files in
memory; one file's fetch never answers and another fails as an unreachable cluster does.
The real mount over the real cluster is tests/test_fuse_mount.py.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time

import pytest

from fuse_helpers import CHUNK, FILES, KiB, MiB, MemoryOrigin, tree_of

from cachefs.common.errors import NodeUnavailable
from conftest import quiet, until
from csi.chunkcache import ChunkCache
from csi.config import FOREVER, MountConfig
from csi.reader import SnapshotReader
from csi.tree import DIR_MODE, FILE_MODE, ROOT_INODE, SnapshotTree

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def origin() -> MemoryOrigin:
    return MemoryOrigin(FILES)


@pytest.fixture
def reader(origin) -> SnapshotReader:
    return SnapshotReader(origin.fetch, ChunkCache(16 * MiB), CHUNK, readahead=2, timeout=0.5)


# ---- the tree: inodes assigned once ---------------------------------------------------------

def test_every_entry_gets_one_inode_and_parents_are_implied():
    tree = tree_of(FILES)
    assert tree.files == len(FILES) and tree.bytes == sum(map(len, FILES.values()))
    assert tree.dirs == 3 and len(tree) == len(FILES) + 3  # root, sub, sub/deeper
    inodes = [tree.lookup(p).inode for p in [*FILES, "", "sub", "sub/deeper"]]
    assert sorted(inodes) == list(range(ROOT_INODE, ROOT_INODE + len(tree)))
    for path in FILES:
        entry = tree.lookup(path)
        assert tree.entry(entry.inode) is entry and entry.path == path and entry.mode == FILE_MODE
    sub = tree.lookup("sub")
    assert sub.mode == DIR_MODE and tree.child(sub.inode, "stuck.bin") is tree.lookup("sub/stuck.bin")
    assert SnapshotTree.nlink(tree.root) == 3 and SnapshotTree.nlink(sub) == 3


def test_listing_order_is_fixed_so_readdir_offsets_hold():
    tree = tree_of(FILES)
    first = [e.path for e in tree.root.listing()]
    assert first == [e.path for e in tree.root.listing()] == ["small.bin", "exact.bin", "big.bin", "empty.bin",
                                                               "sub", "down.bin"]


TREE_REFUSALS = [
    ("dot_dot", [("../etc/passwd", 1, False)], 0),
    ("dot", [("./a", 1, False)], 0),
    ("a_file_where_a_directory_is", [("a", 1, False), ("a/b", 1, False)], 1),
    ("a_name_listed_twice", [("a", 1, False), ("a", 2, False)], 1),
]


@pytest.mark.parametrize("case,listing,files", TREE_REFUSALS, ids=[c[0] for c in TREE_REFUSALS])
def test_the_tree_refuses_what_would_escape_or_collide(case, listing, files):
    tree = SnapshotTree.from_listing(listing)
    assert tree.files == files and tree.lookup("..") is None


def test_a_find_listing_is_cut_to_the_root_and_never_exposes_outside_it():
    found = {"ds": {"type": "directory", "size": 0}, "ds/a.bin": {"type": "file", "size": 3},
             "ds/d": {"type": "directory", "size": 0}, "dsx/b.bin": {"type": "file", "size": 4}}
    tree = SnapshotTree.from_find(found, "ds")
    assert [e.path for e in tree.root.listing()] == ["a.bin", "d"] and tree.lookup("a.bin").size == 3


def test_unknown_inodes_are_none():
    tree = tree_of(FILES)
    assert tree.entry(0) is None and tree.entry(len(tree) + 1) is None and tree.child(999, "x") is None


# ---- the chunk cache --------------------------------------------------------------------------

async def test_concurrent_readers_of_a_chunk_cause_one_load():
    cache, loads, release = ChunkCache(16 * MiB), [], asyncio.Event()

    async def load() -> bytes:
        loads.append(1)
        await release.wait()
        return b"x" * 100

    readers = [asyncio.ensure_future(cache.get(("f", 0), load)) for _ in range(20)]
    await until(lambda: loads, "the load to start")  # every reader has asked by then (they ran first)
    release.set()
    results = await asyncio.gather(*readers)
    assert loads == [1] and all(r == b"x" * 100 for r in results)
    assert await cache.get(("f", 0), load) == b"x" * 100 and loads == [1]


async def test_the_budget_evicts_the_least_recently_used():
    cache = ChunkCache(16 * MiB)

    def load(byte: bytes):
        async def go() -> bytes:
            return byte * (6 * MiB)
        return go

    await cache.get("a", load(b"a"))
    await cache.get("b", load(b"b"))
    assert cache.peek("a") is not None  # a is now the most recently used
    await cache.get("c", load(b"c"))
    assert "b" not in cache and "a" in cache and "c" in cache and cache.size == 12 * MiB
    await cache.get("huge", lambda: _const(b"h" * (17 * MiB)))
    assert "huge" not in cache and cache.size <= cache.budget  # larger than the budget: served, not kept


async def _const(data: bytes) -> bytes:
    return data


async def test_a_failed_load_is_forgotten_and_the_next_read_tries_again():
    cache, attempts = ChunkCache(16 * MiB), []

    async def flaky() -> bytes:
        attempts.append(1)
        if len(attempts) == 1:
            raise NodeUnavailable("down")
        return b"ok"

    with pytest.raises(NodeUnavailable):
        await cache.get("k", flaky)
    assert await cache.get("k", flaky) == b"ok" and len(attempts) == 2


async def test_closing_the_cache_answers_waiting_readers_with_eio():
    cache = ChunkCache(16 * MiB)

    started = asyncio.Event()

    async def never() -> bytes:
        started.set()
        await asyncio.Event().wait()
        return b""

    waiting = asyncio.ensure_future(cache.get("k", never))
    await asyncio.wait_for(started.wait(), 10)
    cache.close()
    with pytest.raises(OSError) as err:
        await waiting
    assert err.value.errno == errno.EIO
    with pytest.raises(OSError):
        await cache.get("other", never)


# ---- the reader -------------------------------------------------------------------------------

async def test_a_small_file_is_fetched_whole_once_for_every_read_of_it(reader, origin):
    data = FILES["small.bin"]
    reader.prefetch("small.bin", len(data))
    for offset, length in [(0, 4096), (4096, 4096), (9000, 4096), (0, 1 * MiB), (len(data), 10)]:
        assert bytes(await reader.read("small.bin", len(data), offset, length)) == data[offset:offset + length]
    assert origin.fetches == [("small.bin", 0, len(data))]


async def test_a_file_of_exactly_one_chunk_is_one_fetch(reader, origin):
    data = FILES["exact.bin"]
    assert bytes(await reader.read("exact.bin", len(data), 0, 1 * MiB)) == data
    assert origin.fetches == [("exact.bin", 0, CHUNK)]


async def test_reads_of_a_big_file_return_its_bytes_at_any_offset_and_fetch_whole_chunks(reader, origin):
    data = FILES["big.bin"]
    for offset, length in [(CHUNK * 3 + 5, 100), (CHUNK - 10, 20), (len(data) - 1, 10), (len(data), 10),
                           (CHUNK * 2 + 1, CHUNK * 2), (0, 10)]:
        assert bytes(await reader.read("big.bin", len(data), offset, length)) == data[offset:offset + length]
    for _path, start, end in origin.fetches:
        assert start % CHUNK == 0 and end - start in (CHUNK, len(data) % CHUNK)
    assert len(origin.fetches) == len({f[1] for f in origin.fetches}) == 6  # each chunk once
    assert bytes(await reader.read("big.bin", len(data), 0, len(data) + 100)) == data  # all at once


async def test_a_sequential_reader_gets_the_next_chunks_fetched_ahead(reader, origin):
    data, piece = FILES["big.bin"], CHUNK // 8
    for offset in range(0, CHUNK // 2, piece):
        await reader.read("big.bin", len(data), offset, piece)
        await until(quiet, "the read-ahead it started to finish")
        streamed = offset + piece >= CHUNK // 2  # half a chunk read contiguously: a stream
        assert sorted(f[1] // CHUNK for f in origin.fetches) == ([0, 1, 2] if streamed else [0])


async def test_a_stream_keeps_only_the_chunks_it_has_not_had_all_of(reader, origin):
    data, piece = FILES["big.bin"], CHUNK // 4
    for offset in range(0, 2 * CHUNK + piece, piece):
        assert bytes(await reader.read("big.bin", len(data), offset, piece)) == data[offset:offset + piece]
    await until(quiet, "the read-ahead to finish")
    assert ("big.bin", 0) not in reader.cache and ("big.bin", 1) not in reader.cache  # served: the kernel has them
    assert ("big.bin", 2) in reader.cache and ("big.bin", 3) in reader.cache  # being read, and ahead


async def test_a_random_reader_gets_no_readahead_even_when_the_kernel_splits_its_reads(reader, origin):
    data, piece = FILES["big.bin"], CHUNK // 8
    for offset in (3 * CHUNK + 100, 1 * CHUNK + 100):
        await reader.read("big.bin", len(data), offset, piece)  # one read, split in two requests
        await reader.read("big.bin", len(data), offset + piece, piece)
    await until(quiet, "any read-ahead to finish")
    assert sorted(f[1] // CHUNK for f in origin.fetches) == [1, 3]


async def test_a_fetch_that_never_answers_fails_at_the_deadline(reader):
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await reader.read("sub/stuck.bin", 1000, 0, 4096)
    assert 0.4 < time.monotonic() - started < 3


async def test_a_short_fetch_is_an_error_not_silently_short_bytes():
    origin = MemoryOrigin({"f": b"abc"})
    reader = SnapshotReader(origin.fetch, ChunkCache(16 * MiB), CHUNK, readahead=0, timeout=1)
    with pytest.raises(OSError) as err:
        await reader.read("f", 10, 0, 10)  # the snapshot says 10 bytes, the fetch brings 3
    assert err.value.errno == errno.EIO and "short read" in str(err.value)


async def test_a_random_read_of_a_big_file_fetches_only_the_windows_it_touches(origin):
    data, window = FILES["big.bin"], CHUNK // 8
    reader = SnapshotReader(origin.fetch, ChunkCache(16 * MiB), CHUNK, readahead=2, timeout=0.5, window=window)
    offset = 3 * CHUNK + 100  # not at the start, no stream: a random read
    assert bytes(await reader.read("big.bin", len(data), offset, window)) == data[offset:offset + window]
    assert origin.fetches == [("big.bin", 3 * CHUNK, 3 * CHUNK + 2 * window)]  # two windows, one fetch
    for off, length in [(offset + 10, 50), (3 * CHUNK + window + 7, window - 7)]:  # inside them: no fetch
        assert reader.read_now("big.bin", len(data), off, length) is not None or off + length > offset + window
        assert bytes(await reader.read("big.bin", len(data), off, length)) == data[off:off + length]
    assert len(origin.fetches) == 1
    last = len(data) - 30  # the file's short tail window
    assert bytes(await reader.read("big.bin", len(data), last, window)) == data[last:]
    assert origin.fetches[-1] == ("big.bin", 5 * CHUNK, len(data))
    for offset in range(0, 2 * CHUNK, CHUNK // 4):  # a stream from the start: whole chunks
        assert bytes(await reader.read("big.bin", len(data), offset, CHUNK // 4)) == data[offset:offset + CHUNK // 4]
    await until(quiet, "the read-ahead to finish")
    assert {(s, e) for _, s, e in origin.fetches[2:]} >= {(0, CHUNK), (CHUNK, 2 * CHUNK)}



async def test_a_failed_window_fetch_fails_its_reads_and_the_next_read_fetches_again(origin):
    data, window = FILES["big.bin"], CHUNK // 8
    failures = [NodeUnavailable("the cache node went away")]

    async def fetch(path: str, start: int, end: int) -> bytes:
        if failures:
            raise failures.pop()
        return await origin.fetch(path, start, end)

    reader = SnapshotReader(fetch, ChunkCache(16 * MiB), CHUNK, readahead=2, timeout=0.5, window=window)
    offset = 2 * CHUNK + 5
    with pytest.raises(NodeUnavailable):
        await reader.read("big.bin", len(data), offset, 100)
    assert bytes(await reader.read("big.bin", len(data), offset, 100)) == data[offset:offset + 100]
    assert origin.fetches == [("big.bin", 2 * CHUNK, 2 * CHUNK + window)]
