"""How a dataset reaches the cluster from whichever process it finds itself in.

An fsspec instance carries an event-loop thread and sockets: they do not survive a fork
(the thread stays in the parent) and pickling one for a spawned worker would share
nothing. So a dataset carries only the settings, and each process (the trainer, every
DataLoader worker, forked or spawned, persistent or not) makes its own filesystem on first
use, noticed by a change of `os.getpid()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from typing import Any, Coroutine, TypeVar

from cachefs.filesystem import CachefsFileSystem

T = TypeVar("T")


class Client:
    """Picklable settings (endpoint, token, other client options) and this process's
    filesystem, made from them when first needed."""

    def __init__(self, endpoint: str | None = None, token: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        # None: CACHEFS_ENDPOINT / CACHEFS_TOKEN or the cluster file, read in each process.
        self.options = {**(storage_options or {}), "endpoint": endpoint, "token": token}
        self._pid = 0
        self._fs: CachefsFileSystem | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.options = state["options"]
        self._pid = 0
        self._fs = None

    @property
    def fs(self) -> CachefsFileSystem:
        if self._pid != os.getpid():  # a new process: the inherited instance (if any) is the parent's
            self._fs = CachefsFileSystem(skip_instance_cache=True, **self.options)
            self._pid = os.getpid()
        assert self._fs is not None
        return self._fs

    @property
    def timeout(self) -> float:
        """How long a read may take, retries and failovers included (a bound, not a hang)."""
        c = self.fs.config
        return c.read_timeout * (c.retries + 2)

    def start(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `coro` on the filesystem's loop, in the background."""
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop)

    def wait(self, future: concurrent.futures.Future[T], what: str) -> T:
        """The future's result within `timeout`; cancelled and a TimeoutError past it."""
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"cachefs: {what} not read within {self.timeout:.0f} s") from None


__all__ = ["Client"]
