"""One cache of file chunks per mount, shared by every open file: a byte-budgeted LRU
with single-flight loads.

Chunks are immutable (a snapshot never changes), so a cached chunk is never stale and
may be handed to any number of readers at once. Concurrent readers of a chunk that is
not here yet share one load: N processes opening the same file cost one fetch. A load
runs as a task of its own, so a reader that gives up never cancels it for the others;
its result enters the LRU when it completes, whether anyone still waits for it or not
(that is what makes a prefetch useful). A failed load is forgotten: the next read tries
again.

Runs on one event loop and is not thread-safe: the mount serves FUSE and fetches bytes
on the same loop, so there is nothing to lock.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Hashable, TypeVar

log = logging.getLogger("cachefs.fuse.cache")
T = TypeVar("T")

Load = Callable[[], Awaitable[bytes]]
# Several chunks in one call: their bytes (or each one's exception), in the order asked.
LoadMany = Callable[[], Awaitable[list["bytes | BaseException"]]]


class ChunkCache:
    """Chunks by key, at most `budget` bytes of them; the least recently used go first."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0  # bytes of the chunks held (in-flight loads not counted)
        self._chunks: OrderedDict[Hashable, bytes] = OrderedDict()
        self._loading: dict[Hashable, asyncio.Future[bytes]] = {}
        self._closed = False
        self._batches: set[asyncio.Task[Any]] = set()  # batched loads in flight, kept referenced

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._chunks or key in self._loading

    def peek(self, key: Hashable) -> bytes | None:
        """The chunk if it is here (and mark it used), else None; never waits."""
        chunk = self._chunks.get(key)
        if chunk is not None:
            self._chunks.move_to_end(key)
        return chunk

    async def get(self, key: Hashable, load: Load) -> bytes:
        """The chunk, loading it unless it is here or on its way."""
        chunk = self.peek(key)
        if chunk is not None:
            return chunk
        return await asyncio.shield(self._start(key, load))

    def prefetch(self, key: Hashable, load: Load) -> None:
        """Start loading the chunk in the background unless it is here or on its way."""
        if key not in self._chunks and not self._closed:
            self._start(key, load)

    def prefetch_many(self, keys: list[Hashable], load: LoadMany) -> None:
        """Load several chunks with one call (one batched read) in the background. `load`
        answers exactly `keys`, in order; pass only keys `wanted` says yes to."""
        if self._closed or not keys:
            return
        futures = []
        for key in keys:
            future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self._loading[key] = future
            future.add_done_callback(lambda f, key=key: self._loaded(key, f))
            futures.append(future)
        batch = asyncio.ensure_future(self._run(load))

        def settle(done: asyncio.Task[list[bytes | BaseException]]) -> None:
            if done.cancelled() or done.exception() is not None:
                error = OSError(errno.EIO, "the mount is shutting down") if done.cancelled() else done.exception()
                results: list[bytes | BaseException] = [error] * len(futures)  # type: ignore[list-item]
            else:
                results = done.result()
            for future, result in zip(futures, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

        batch.add_done_callback(settle)
        self._batches.add(batch)
        batch.add_done_callback(self._batches.discard)

    def wanted(self, key: Hashable) -> bool:
        """Neither here nor on its way."""
        return key not in self._chunks and key not in self._loading

    def _start(self, key: Hashable, load: Load) -> asyncio.Future[bytes]:
        task = self._loading.get(key)
        if task is None:
            if self._closed:
                raise OSError(errno.EIO, "the mount is shutting down")
            task = asyncio.ensure_future(self._run(load))
            self._loading[key] = task
            task.add_done_callback(lambda t: self._loaded(key, t))
        return task

    async def _run(self, load: Callable[[], Awaitable[T]]) -> T:
        try:
            return await load()
        except asyncio.CancelledError:
            # Loads are shielded from their readers: only close() cancels one, and the
            # readers waiting for it must get an answer (EIO), not a dropped request.
            if self._closed:
                raise OSError(errno.EIO, "the mount is shutting down") from None
            raise

    def _loaded(self, key: Hashable, task: asyncio.Future[bytes]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        if task.cancelled():
            return
        error = task.exception()  # retrieved here, so a prefetch nobody awaits logs no warning
        if error is not None:
            log.debug("loading %s failed: %s: %s", key, type(error).__name__, error)
            return
        self._put(key, task.result())

    def _put(self, key: Hashable, chunk: bytes) -> None:
        if len(chunk) > self.budget or key in self._chunks:
            return
        self._chunks[key] = chunk
        self.size += len(chunk)
        while self.size > self.budget:
            _, old = self._chunks.popitem(last=False)
            self.size -= len(old)

    def discard(self, key: Hashable) -> None:
        """Forget a chunk nobody will ask for again (a load in flight is left alone)."""
        chunk = self._chunks.pop(key, None)
        if chunk is not None:
            self.size -= len(chunk)

    def close(self) -> None:
        """Stop every load in flight: the mount is going away; their readers get EIO."""
        self._closed = True
        for task in list(self._batches):
            task.cancel()  # settles its chunks with EIO
        for task in list(self._loading.values()):
            if isinstance(task, asyncio.Task):
                task.cancel()  # _run turns it into EIO for its readers
            elif not task.done():  # a chunk of a batch
                task.set_exception(OSError(errno.EIO, "the mount is shutting down"))
