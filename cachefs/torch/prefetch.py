"""Batches read ahead in the background, held by their exact indices, within a bound."""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

from cachefs.torch.order import Batch

Start = Callable[[Batch], "concurrent.futures.Future[Any]"]


class Prefetcher:
    """At most `limit` batches held or in flight (memory: limit x a batch's bytes).

    `expect` says which batches come next: new ones start, ones no longer expected are
    cancelled or dropped. `take` hands a batch out only for the very indices it was read
    for, so a guess that missed costs its read, never a wrong or stale sample.
    """

    def __init__(self, start: Start, limit: int) -> None:
        self._start = start
        self.limit = limit
        self._held: dict[Batch, concurrent.futures.Future[Any]] = {}
        self.started = 0  # batches read ahead ...
        self.taken = 0  # ... and the ones asked for after all

    def take(self, batch: Batch) -> concurrent.futures.Future[Any] | None:
        future = self._held.pop(batch, None)
        self.taken += future is not None
        return future

    def expect(self, batches: list[Batch]) -> None:
        wanted = batches[:self.limit]
        for batch in [b for b in self._held if b not in wanted]:
            self._held.pop(batch).cancel()
        for batch in wanted:
            if batch not in self._held:
                self._held[batch] = self._start(batch)
                self.started += 1

    def __len__(self) -> int:
        return len(self._held)


__all__ = ["Prefetcher"]
