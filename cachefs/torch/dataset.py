"""`CachefsDataset`: the files under a cachefs folder as a map-style torch Dataset.

A batch is one batched read (`_cat_ranges`: grouped by owner node, sent to every owner at
once). Given the order (a sampler made by `dataset.sampler()`), each worker also reads its
next batches ahead while the current one is consumed (cachefs/torch/order.py says how a
worker knows which). Without it (a plain RandomSampler), each batch is read when asked.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pyarrow as pa
from torch.utils.data import Dataset, get_worker_info

from cachefs.torch.batch import Samples
from cachefs.torch.client import Client
from cachefs.torch.order import Batch, CachefsSampler, Follow, Lookahead, Order, rank_and_world
from cachefs.torch.prefetch import Prefetcher

Transform = Callable[[str, bytes], Any]


@dataclass
class _Here:
    """What one process keeps: its read-ahead and where it is in the order."""

    pid: int
    prefetcher: Prefetcher
    lookahead: Lookahead | None


class CachefsDataset(Dataset):
    """Sample i is the i-th file under `root` in path order: its bytes, or
    `transform(path, bytes)` (the path too, since labels usually live in it).

    `root` is a folder (`cachefs://DATASET/folder` or `DATASET/folder`), listed once from
    the manifest, or a list of file paths kept in the given order. `endpoint` and `token`
    default to CACHEFS_ENDPOINT / CACHEFS_TOKEN or the cluster file, read in each process;
    `storage_options` are other client options (`read_timeout`, `io_threads`, ...).

    Each DataLoader worker holds at most `prefetch_batches` batches read ahead (memory:
    workers x prefetch_batches x a batch's bytes); 0 turns reading ahead off.
    """

    def __init__(self, root: str | Sequence[str], *, transform: Transform | None = None,
                 endpoint: str | None = None, token: str | None = None, prefetch_batches: int = 2,
                 storage_options: dict[str, Any] | None = None) -> None:
        if prefetch_batches < 0:
            raise ValueError("prefetch_batches must be 0 or more")
        self.client = Client(endpoint, token, storage_options)
        paths = self.client.paths(root, "files")
        # One Arrow buffer, not a million Python strings: forked workers would copy a list
        # page by page as reference counts touch it (and spawned ones unpickle it faster).
        self._paths = pa.array(paths, pa.string())
        self.transform = transform
        self.prefetch_batches = prefetch_batches
        self._follow: Follow | None = None
        self._here: _Here | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_here": None}  # read-ahead belongs to the process that started it

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return self._paths[self._index(index)].as_py()

    def sampler(self, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                world_size: int | None = None, drop_last: bool = False) -> CachefsSampler:
        """A sampler in an order the workers can predict, so they read ahead. Splits the
        samples between ranks like DistributedSampler (rank and world size default to
        torch.distributed's when it is initialised). The dataset follows the last sampler
        made from it."""
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        self._follow = Follow(Order(len(self), shuffle, seed, rank, world_size, drop_last))
        self._forget()
        return CachefsSampler(self._follow.order, self._follow)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A whole batch in one batched read (torch >= 2.1 calls this when batch_size is set)."""
        batch = tuple(self._index(i) for i in indices)
        here = self._process()
        paths = self._paths_of(batch)
        future = here.prefetcher.take(batch)
        read_ahead = future is not None
        if future is None:
            future = self._read(paths)
        what = f"a batch of {len(batch)} samples from {paths[0] if paths else '-'}"
        results = self.client.wait(future, what)
        if read_ahead and any(isinstance(r, BaseException) for r in results):
            results = self.client.wait(self._read(paths), what)  # read ahead is not the last word: again, now
        if here.lookahead is not None:
            # Only now: reads ahead started with the batch asked for would share the nodes
            # and the wire with it and delay it. They run while this one is consumed.
            here.prefetcher.expect(here.lookahead.after(batch))
        for r in results:
            if isinstance(r, BaseException):
                raise r  # names the file (FileNotFoundError for a missing one)
        if self.transform is None:
            return Samples(results)  # to the trainer through shared memory (cachefs/torch/batch.py)
        return [self.transform(p, data) for p, data in zip(paths, results)]

    def _index(self, i: Any) -> int:
        i = operator.index(i)
        if not 0 <= i < len(self._paths):
            raise IndexError(f"sample {i} is out of range: the dataset has {len(self._paths)}")
        return i

    def _paths_of(self, batch: Batch) -> list[str]:
        return self._paths.take(pa.array(batch, pa.int64())).to_pylist()

    def _read(self, paths: list[str]) -> Any:
        """One batched read in the background: each file's bytes, or its exception."""
        return self.client.start(self.client.fs._cat_ranges(paths, None, None, on_error="return"))

    def _start(self, batch: Batch) -> Any:
        return self._read(self._paths_of(batch))

    def _process(self) -> _Here:
        pid = os.getpid()
        if self._here is None or self._here.pid != pid:
            info = get_worker_info()  # None in the main process (num_workers=0)
            workers = info.num_workers if info is not None else 1
            lookahead = Lookahead(self._follow, workers, self.prefetch_batches) \
                if self._follow is not None and self.prefetch_batches else None
            self._here = _Here(pid, Prefetcher(self._start, self.prefetch_batches), lookahead)
        return self._here

    def _forget(self) -> None:
        if self._here is not None and self._here.pid == os.getpid():
            self._here.prefetcher.expect([])  # cancel what was read for another order
        self._here = None


__all__ = ["CachefsDataset", "Transform"]
