"""Reads waiting for one node, sent together: batches form under load, by themselves.

Each node gets a queue with a few requests in flight. A lone read leaves at once (no
timer, no added latency); reads that arrive while the node's requests are all busy wait
and leave together in the next request, up to a size limit. So a `cat` of 256 paths, 16
DataLoader threads or 4 processes behind one mount turn into a few large requests per
node instead of hundreds of small ones, without any of them asking for batching.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable

from cachefs.plan import Outcome, Slice

Send = Callable[[str, list[Slice]], Awaitable[list[Outcome]]]  # an outcome per slice, in order


class NodeQueue:
    """One node's queue for one dataset snapshot (a request names one snapshot)."""

    def __init__(self, url: str, send: Send, senders: int, max_items: int, max_bytes: int) -> None:
        self.url = url
        self._send = send  # answers each slice's outcome; never raises for a slice's failure
        self.senders = senders
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._waiting: deque[tuple[Slice, asyncio.Future[Outcome]]] = deque()
        self._busy = 0

    def _chunk(self) -> list[tuple[Slice, asyncio.Future[Outcome]]]:
        """The next request's slices: as many waiting ones as fit the limits (at least one)."""
        chunk: list[tuple[Slice, asyncio.Future[Outcome]]] = []
        size = 0
        while self._waiting and len(chunk) < self.max_items:
            n = len(self._waiting[0][0].dest)
            if chunk and size + n > self.max_bytes:
                break
            chunk.append(self._waiting.popleft())
            size += n
        return chunk

    async def read(self, slices: list[Slice]) -> list[Outcome]:
        """Send `slices` to this node (now, or with the next request); each one's outcome."""
        if not self._waiting and self._busy < self.senders and len(slices) <= self.max_items \
                and sum(len(s.dest) for s in slices) <= self.max_bytes:
            self._busy += 1  # the fast path: an idle node, sent from this task, no hand-off
            try:
                return await self._send(self.url, slices)
            finally:
                self._busy -= 1
                self._kick()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in slices]
        self._waiting.extend(zip(slices, futures))
        self._kick()
        return list(await asyncio.gather(*futures))

    def _kick(self) -> None:
        while self._waiting and self._busy < self.senders:
            self._busy += 1
            asyncio.ensure_future(self._run(self._chunk()))

    async def _run(self, chunk: list[tuple[Slice, asyncio.Future[Outcome]]]) -> None:
        try:
            outcomes = await self._send(self.url, [s for s, _ in chunk])
            for (_, done), outcome in zip(chunk, outcomes, strict=True):
                if not done.done():
                    done.set_result(outcome)
        except Exception as e:  # a bug of ours: the waiters get it rather than hang
            for _, done in chunk:
                if not done.done():
                    done.set_exception(e)
        finally:  # cancelled too: every waiter is released
            self._busy -= 1
            for _, done in chunk:
                if not done.done():
                    done.cancel()
            self._kick()
