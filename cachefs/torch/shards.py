"""`CachefsShards`: shard files (WebDataset-style tars, or any file) as an IterableDataset.

Shards are split between ranks, then between a rank's DataLoader workers, so that every
shard is read by exactly one worker of one rank per epoch. A shard up to
`whole_shard_bytes` is read whole (one batched read from its blocks' owners), the next one
while the current one is consumed; a larger tar shard is streamed through an open file,
whose blocks are read ahead.
"""

from __future__ import annotations

import concurrent.futures
import io
import tarfile
from typing import Any, Iterator, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from cachefs.torch.client import Client
from cachefs.torch.order import rank_and_world

MiB = 1024 * 1024


class CachefsShards(IterableDataset):
    """Yields `(path, bytes)` per shard, or per regular file in each shard when `tar` is
    set (`path` is then `SHARD/MEMBER`; compressed tars are read too).

    `source` is a folder (every file below it, in path order) or a list of shard paths.
    `rank` and `world_size` default to torch.distributed's when it is initialised.
    At most two shards per worker are held whole (the current and the next).
    """

    def __init__(self, source: str | Sequence[str], *, tar: bool = False, endpoint: str | None = None,
                 token: str | None = None, rank: int | None = None, world_size: int | None = None,
                 whole_shard_bytes: int = 64 * MiB, storage_options: dict[str, Any] | None = None) -> None:
        self.client = Client(endpoint, token, storage_options)
        shards = self.client.paths(source, "shards")
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.shards = list(shards)
        self.tar = tar
        self.rank, self.world_size = rank, world_size
        self.whole_shard_bytes = whole_shard_bytes

    def assigned(self, worker: int = 0, workers: int = 1) -> list[str]:
        """The shards one worker of this rank reads."""
        return self.shards[self.rank::self.world_size][worker::workers]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        info = get_worker_info()
        mine = self.assigned(info.id, info.num_workers) if info is not None else self.assigned()
        ahead: concurrent.futures.Future[bytes | None] | None = None
        try:
            for i, path in enumerate(mine):
                data = self.client.wait(ahead if ahead is not None else self._begin(path), f"shard {path}")
                # The next one starts once this one is in (not sharing the wire with it), and
                # arrives while this one is consumed.
                ahead = self._begin(mine[i + 1]) if i + 1 < len(mine) else None
                yield from self._samples(path, data)
        finally:  # the consumer stopped early: the shard read ahead is not needed
            if ahead is not None:
                ahead.cancel()

    def _begin(self, path: str) -> concurrent.futures.Future[bytes | None]:
        """Start reading a shard whole (its errors wait for its turn); None for a large tar."""
        return self.client.start(self._whole(path))

    async def _whole(self, path: str) -> bytes | None:
        fs = self.client.fs
        if self.tar and (await fs._info(path))["size"] > self.whole_shard_bytes:
            return None  # streamed when its turn comes
        return await fs._cat_file(path)

    def _samples(self, path: str, data: bytes | None) -> Iterator[tuple[str, Any]]:
        if not self.tar:
            yield path, data
            return
        fileobj = io.BytesIO(data) if data is not None else self.client.fs.open(path, "rb")
        with fileobj, tarfile.open(fileobj=fileobj, mode="r|*") as archive:
            for member in archive:
                if member.isfile():
                    f = archive.extractfile(member)
                    assert f is not None
                    yield f"{path}/{member.name}", f.read()


__all__ = ["CachefsShards"]
