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

A read of a big file that is not part of a stream (a random read: not at the file's
start, and not yet half a chunk of contiguous reads) whose chunk is neither here nor on
its way fetches only the `window`s (1/32 of a chunk, 256 KiB for 8 MiB blocks) it
touches, in one fetch, and keeps them in the cache by window: a random 1 MiB read costs
about 1 MiB of fetch instead of its whole chunk, and random small reads (O_DIRECT) are
still answered from memory once their window is here. Streams keep whole chunks.

Replies are memoryview slices of the cached chunk: no copy in Python; the kernel copies
once from the reply buffer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any, Awaitable, Callable, TypeVar

from cachefs.common.errors import OriginChanged, SnapshotGone
from csi.chunkcache import ChunkCache

# (path relative to the snapshot root, start, end) → exactly the bytes [start, end)
Fetch = Callable[[str, int, int], Awaitable[bytes]]
# Many whole small files in one call (one batched read): [(path, size)] → each one's bytes
# or exception, in order
FetchMany = Callable[[list[tuple[str, int]]], Awaitable[list["bytes | BaseException"]]]

log = logging.getLogger("cachefs.fuse")
T = TypeVar("T")
_STREAMS = 4096  # files whose last read end is remembered (to tell sequential reads)
_MIN_WINDOW = 64 * 1024  # smallest window a default picks: below it, a fetch costs more than its bytes


class SnapshotReader:
    def __init__(self, fetch: Fetch, cache: ChunkCache, chunk_size: int, readahead: int, timeout: float,
                 fetch_many: FetchMany | None = None, window: int | None = None) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if window is None:  # 1/32 of a chunk, if that is a whole number of 64 KiB
            window = chunk_size // 32 if chunk_size % (32 * _MIN_WINDOW) == 0 else 0
        if window and (window <= 0 or chunk_size % window):
            raise ValueError("window must divide chunk_size")
        self.window = window  # 0: random reads fetch whole chunks too
        self._fetch = fetch
        self._fetch_many = fetch_many
        self.cache = cache
        self.chunk_size = chunk_size
        self.readahead = readahead
        self.timeout = timeout
        self.fetched = [0, 0]  # fetches, bytes fetched (logged when serving ends)
        self._runs: dict[str, tuple[int, int]] = {}  # path → (where its last read ended, contiguous bytes so far)
        self._gone_logged = False

    def read_now(self, path: str, size: int, offset: int, length: int) -> bytes | memoryview | None:
        """The bytes if they are at hand (one cached chunk, or past the end), else None and
        nothing recorded: the caller then awaits `read`. Lets the mount answer most reads
        without a task."""
        end = min(offset + length, size)
        if offset >= end:
            return b""
        cs = self.chunk_size
        first = offset // cs
        if first != (end - 1) // cs:
            return None
        chunk = self.cache.peek((path, first))
        if chunk is None:
            if not self.window or size <= cs:
                return None
            w = self.window
            index = offset // w
            if index != (end - 1) // w:
                return None
            part = self.cache.peek((path, first, index))
            if part is None:
                return None
            self._ahead(path, size, offset, end)
            return memoryview(part)[offset - index * w:end - index * w]
        run = self._ahead(path, size, offset, end)
        self._drop_done(path, size, offset, end, run)
        return memoryview(chunk)[offset - first * cs:end - first * cs]

    async def read(self, path: str, size: int, offset: int, length: int) -> bytes | memoryview:
        """Bytes [offset, offset+length) of the file, cut at its `size`."""
        end = min(offset + length, size)
        if offset >= end:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        run = self._ahead(path, size, offset, end)
        if (self.window and not run and offset and size > cs
                and all((path, i) not in self.cache for i in range(first, last + 1))):
            return await self._windows(path, size, offset, end)
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
        self._drop_done(path, size, offset, end, run)
        return data

    async def _windows(self, path: str, size: int, offset: int, end: int) -> bytes | memoryview:
        """A random read: the windows it touches, those missing fetched with one call."""
        w, per = self.window, self.chunk_size // self.window
        indexes = range(offset // w, (end - 1) // w + 1)
        keys = [(path, i // per, i) for i in indexes]
        missing = [i for i, key in zip(indexes, keys) if self.cache.wanted(key)]
        if missing:
            lo = hi = missing[0]  # one fetch for the first run of missing windows (the rest: one each)
            while hi + 1 in missing:
                hi += 1
            self.cache.prefetch_many([(path, i // per, i) for i in range(lo, hi + 1)],
                                     self._window_loader(path, lo * w, min((hi + 1) * w, size)))
        parts = [memoryview(part) for part in await asyncio.gather(
            *(self.cache.get(key, self._window_loader(path, i * w, min((i + 1) * w, size), single=True))
              for i, key in zip(indexes, keys)))]
        parts[-1] = parts[-1][:end - indexes[-1] * w]  # the end first: with one part, both cut it
        parts[0] = parts[0][offset - indexes[0] * w:]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _window_loader(self, path: str, start: int, stop: int, single: bool = False) -> Callable[[], Awaitable[Any]]:
        """Loads [start, stop) and cuts it into windows (memoryviews of one buffer, no copy)."""
        w = self.window

        async def load() -> Any:
            data = memoryview(await self._load(path, start, stop))
            parts = [data[i:i + w] for i in range(0, len(data), w)]
            return parts[0] if single else parts

        return load

    def _ahead(self, path: str, size: int, offset: int, end: int) -> int:
        """Record a read of a big file; once it is a stream, fetch ahead. The run so far
        (0: not a stream)."""
        cs = self.chunk_size
        if size <= cs:
            return 0
        run = self._run(path, offset, end)
        if run < cs // 2:
            return 0
        last = (end - 1) // cs
        if self.readahead:
            for i in range(last + 1, min(last + 1 + self.readahead, -(-size // cs))):
                self.cache.prefetch((path, i), self._loader(path, size, i))
        return run

    def _drop_done(self, path: str, size: int, offset: int, end: int, run: int) -> None:
        """Drop the chunks a stream's read completed, if the stream had all of them."""
        if not run:
            return
        cs = self.chunk_size
        for i in range(offset // cs, (end - 1) // cs + 1):
            if i * cs >= end - run and min((i + 1) * cs, size) <= end:
                self.cache.discard((path, i))

    def prefetch(self, path: str, size: int) -> None:
        """Start fetching a file that fits in one chunk (called at open: overlaps the fetch
        with the round trips between open and the first read)."""
        if 0 < size <= self.chunk_size:
            self.cache.prefetch((path, 0), self._loader(path, size, 0))

    def prefetch_files(self, files: list[tuple[str, int]]) -> None:
        """Fetch these small files (each at most a chunk) in one batched read, except those
        here or on their way. Several files cost about what one costs: the round trip and
        the request's CPU are paid once."""
        todo = [(path, size) for path, size in files if 0 < size <= self.chunk_size and self.cache.wanted((path, 0))]
        if not todo:
            return
        if self._fetch_many is None or len(todo) == 1:
            for path, size in todo:
                self.prefetch(path, size)
            return
        fetch_many = self._fetch_many

        async def load() -> list[bytes | BaseException]:
            self.fetched[0] += 1
            self.fetched[1] += sum(size for _, size in todo)
            results = await within(fetch_many(todo), self.timeout)
            for i, ((path, size), data) in enumerate(zip(todo, results)):
                if isinstance(data, (SnapshotGone, OriginChanged)):
                    results[i] = self._gone(path, data)
                elif not isinstance(data, BaseException) and len(data) != size:
                    results[i] = OSError(errno.EIO, f"short read of {path}: {len(data)} of {size} bytes")
            return results

        self.cache.prefetch_many([(path, 0) for path, _ in todo], load)

    def _gone(self, path: str, e: BaseException) -> OSError:
        """The mount shows one snapshot (its tree, its sizes); bytes of another would be
        wrong bytes. Fail loudly (EIO), and say once in the log what to do."""
        if not self._gone_logged:
            self._gone_logged = True
            log.error("%s: this mount's snapshot can no longer be read there (%s); remount the volume to see "
                      "the current snapshot", path, e)
        return OSError(errno.EIO, f"{path}: the mount's snapshot can no longer be read there; remount ({e})")

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
        self.fetched[0] += 1
        self.fetched[1] += stop - start
        try:
            data = await within(self._fetch(path, start, stop), self.timeout)
        except (SnapshotGone, OriginChanged) as e:
            raise self._gone(path, e) from e
        if len(data) != stop - start:
            raise OSError(errno.EIO, f"short read of {path}: {len(data)} of {stop - start} bytes at {start}")
        return data


async def within(aw: Awaitable[T], timeout: float) -> T:
    """Await with a deadline; TimeoutError when it passes (the awaited call is cancelled)."""
    async with asyncio.timeout(timeout):
        return await aw
