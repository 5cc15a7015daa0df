"""Single-flight: concurrent callers for the same key share one execution.

This is what makes "the origin is read once per block" true when 32 readers miss the
same cold block at once: the first caller starts the load as its own task, the others
await the same task. The task is shielded, so a reader that gives up (a closed
connection) never cancels the load the others are waiting for.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")


class Group(Generic[T]):
    def __init__(self) -> None:
        self._calls: dict[str, asyncio.Task[T]] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, key: str) -> bool:
        """Is a load of `key` in flight?"""
        return key in self._calls

    def _done(self, key: str, task: asyncio.Task[T]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so a load nobody awaits any more logs no warning

    async def do(self, key: str, load: Callable[[], Awaitable[T]]) -> T:
        task = self._calls.get(key)
        if task is None:
            task = asyncio.ensure_future(load())
            self._calls[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return await asyncio.shield(task)
