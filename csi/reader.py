"""Reads of one snapshot's files for the mount: block-aligned chunks through the mount's
one ChunkCache, fetched with the client's async API, each fetch bounded by a deadline.

A file no larger than a chunk is one chunk: its first read (or its open, see `prefetch`)
fetches the whole file in one call, and every later read of it, from any handle or
process, is answered from that buffer. A larger file is read chunk by chunk. Once a file
has been read contiguously for half a chunk, it is being streamed: each read then fetches
the next `readahead` chunks in the background, so that they are here when the kernel asks.
Half a chunk, not one read: the kernel splits one unaligned 1 MiB read into two requests,
and a random reader must not pay a chunk of readahead for that. A streamed chunk is
dropped once all its bytes have been served: the kernel's page cache holds them now, and
a stream then keeps a few chunks in memory instead of filling the budget (fresh memory
costs page faults, and every other file's chunks would be pushed out).

Replies are memoryview slices of the cached chunk: no copy in Python; the kernel copies
once from the reply buffer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sys
from typing import Awaitable, Callable, TypeVar

from cachefs.common.errors import OriginChanged, SnapshotGone
from csi.chunkcache import ChunkCache

# (path relative to the snapshot root, start, end) → exactly the bytes [start, end)
Fetch = Callable[[str, int, int], Awaitable[bytes]]

log = logging.getLogger("cachefs.fuse")
T = TypeVar("T")
_STREAMS = 4096  # files whose last read end is remembered (to tell sequential reads)


class SnapshotReader:
    def __init__(self, fetch: Fetch, cache: ChunkCache, chunk_size: int, readahead: int, timeout: float) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._fetch = fetch
        self.cache = cache
        self.chunk_size = chunk_size
        self.readahead = readahead
        self.timeout = timeout
        self._runs: dict[str, tuple[int, int]] = {}  # path → (where its last read ended, contiguous bytes so far)
        self._gone_logged = False

    async def read(self, path: str, size: int, offset: int, length: int) -> bytes | memoryview:
        """Bytes [offset, offset+length) of the file, cut at its `size`."""
        end = min(offset + length, size)
        if offset >= end:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        run = self._run(path, offset, end) if size > cs else 0
        streaming = run >= cs // 2
        if streaming and self.readahead:
            for i in range(last + 1, min(last + 1 + self.readahead, -(-size // cs))):
                self.cache.prefetch((path, i), self._loader(path, size, i))
        lo = offset - first * cs
        if first == last:  # the common case: one chunk
            chunk = self.cache.peek((path, first)) or await self._chunk(path, size, first)
            data: bytes | memoryview = memoryview(chunk)[lo:lo + end - offset]
        else:
            parts = [memoryview(c) for c in await asyncio.gather(*(self._chunk(path, size, i)
                                                                    for i in range(first, last + 1)))]
            parts[0] = parts[0][lo:]
            parts[-1] = parts[-1][:end - last * cs]
            data = b"".join(parts)
        if streaming:  # drop the chunks this read completed, if the stream had all of them
            for i in range(first, last + 1):
                if i * cs >= end - run and min((i + 1) * cs, size) <= end:
                    self.cache.discard((path, i))
        return data

    def prefetch(self, path: str, size: int) -> None:
        """Start fetching a file that fits in one chunk (called at open: overlaps the fetch
        with the round trips between open and the first read)."""
        if 0 < size <= self.chunk_size:
            self.cache.prefetch((path, 0), self._loader(path, size, 0))

    def _run(self, path: str, offset: int, end: int) -> int:
        """How many bytes of the file up to `end` have now been read contiguously; records it."""
        last_end, run = self._runs.pop(path, (-1, 0))
        run = run + end - offset if offset == last_end else end - offset
        self._runs[path] = (end, run)  # most recent last: the oldest file is forgotten first
        if len(self._runs) > _STREAMS:
            del self._runs[next(iter(self._runs))]
        return run

    async def _chunk(self, path: str, size: int, index: int) -> bytes:
        return await self.cache.get((path, index), self._loader(path, size, index))

    def _loader(self, path: str, size: int, index: int) -> Callable[[], Awaitable[bytes]]:
        start = index * self.chunk_size
        stop = min(start + self.chunk_size, size)
        return lambda: self._load(path, start, stop)

    async def _load(self, path: str, start: int, stop: int) -> bytes:
        try:
            data = await within(self._fetch(path, start, stop), self.timeout)
        except (SnapshotGone, OriginChanged) as e:
            # The mount shows one snapshot (its tree, its sizes); bytes of another would be
            # wrong bytes. Fail loudly, and say once what to do.
            if not self._gone_logged:
                self._gone_logged = True
                log.error("%s: this mount's snapshot can no longer be read there (%s); remount the volume to see "
                          "the current snapshot", path, e)
            raise OSError(errno.EIO, f"{path}: the mount's snapshot can no longer be read there; remount ({e})") from e
        if len(data) != stop - start:
            raise OSError(errno.EIO, f"short read of {path}: {len(data)} of {stop - start} bytes at {start}")
        return data


async def within(aw: Awaitable[T], timeout: float) -> T:
    """Await with a deadline; TimeoutError when it passes (the awaited call is cancelled)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout):
            return await aw
    return await asyncio.wait_for(aw, timeout)
