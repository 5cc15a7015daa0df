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
import gc
import os
from typing import Any, Coroutine, Sequence, TypeVar

from torch.utils.data import get_worker_info

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
        self._inherited: CachefsFileSystem | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.options = state["options"]
        self._pid = 0
        self._fs = self._inherited = None

    @property
    def fs(self) -> CachefsFileSystem:
        if self._pid != os.getpid():
            # A new process. An instance inherited from the parent is kept, untouched: it is
            # the parent's to close, and collecting it here would only run its destructors
            # (aiohttp warns of "unclosed" sessions whose sockets belong to the parent).
            options = dict(self.options)
            if get_worker_info() is not None:
                _settle_worker(options)
            self._inherited, self._fs = self._fs, CachefsFileSystem(skip_instance_cache=True, **options)
            self._pid = os.getpid()
        assert self._fs is not None
        return self._fs

    def paths(self, source: str | Sequence[str], what: str) -> list[str]:
        """Every file below a folder (path order), or the paths given, as cachefs paths; the
        snapshot of each dataset they are in is pinned, for this process and every worker."""
        if isinstance(source, str):
            found = self.fs.find(source)
            if not found:
                raise FileNotFoundError(f"cachefs: no {what} under {source}")
        else:
            found = [CachefsFileSystem._strip_protocol(p) for p in source]
        self._pin({p.partition("/")[0] for p in found})
        return found

    def _pin(self, names: set[str]) -> None:
        """Workers read the snapshots this process listed (cachefs/pins.py), never a newer one."""
        fs = self.fs
        for name in sorted(n for n in names if "@" not in n):  # `dataset@SNAPSHOT` paths pin themselves
            held = fs.pins.get(name)
            fs.pins.want(name, held.info.snapshot if held is not None else fs.dataset_info(name).snapshot)
        self.options["snapshots"] = fs.pins.snapshots()

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


def _settle_worker(options: dict[str, Any]) -> None:
    """Once, in a DataLoader worker, before its first read."""
    # What the worker inherited (the trainer's heap: torch, the model, ...) lives as long as
    # it does. Frozen, it is no longer walked by every full collection, which the read
    # path's short-lived objects trigger: measured, a quarter of a worker's CPU went to
    # them. (Python's advice for forked workers; it also spares copy-on-write pages.)
    gc.freeze()
    if "CACHEFS_IO_THREADS" not in os.environ:
        # The workers are the parallelism: extra receive loops in each would only add
        # thread hand-offs (measured: ~25% more CPU per file read with 2 than with 0).
        options.setdefault("io_threads", 0)


__all__ = ["Client"]
