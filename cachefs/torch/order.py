"""The order samples are read in, as a pure function of (seed, epoch), and what it tells a
DataLoader worker about the batches it will be asked for next. No I/O.

A worker sees only its own batches, one at a time, and never the sampler. But when the
order is a pure function of (seed, epoch), the batch in hand says where the worker is:
find it in the epoch's order, and the DataLoader's round robin (worker k of W gets batches
k, k+W, k+2W, ...) says what comes next. A wrong guess (another sampler, `in_order=False`,
a dead worker) costs a read ahead, never a wrong sample: read-ahead batches are handed out
only for the very indices they were read for.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

Batch = tuple[int, ...]


@dataclass(frozen=True)
class Order:
    """Which samples one rank reads in an epoch: DistributedSampler's order for the same
    seed (a `randperm` seeded with seed + epoch; padded by repeating, or cut with
    `drop_last`, to an equal share per rank), so switching to it changes no order."""

    size: int
    shuffle: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"a dataset cannot have {self.size} samples")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")

    def __len__(self) -> int:
        """Samples per rank per epoch."""
        if self.drop_last:
            return self.size // self.world_size
        return -(-self.size // self.world_size)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for `epoch`, in reading order (int64)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        total = len(self) * self.world_size
        if total > self.size:  # pad with the first ones again, as DistributedSampler does
            order = order.repeat(-(-total // self.size))
        return order[:total][self.rank::self.world_size]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed's when initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CachefsSampler(Sampler[int]):
    """A sampler whose order the dataset can predict (make it with `dataset.sampler()`).

    Like DistributedSampler: call `set_epoch(epoch)` before each epoch for a new order.
    Persistent workers do not see `set_epoch`; they follow from the batches they are given,
    looking one epoch ahead, so consecutive epoch numbers keep them reading ahead."""

    def __init__(self, order: Order, follower: "Follow") -> None:
        self.order = order
        self.epoch = follower.epoch
        self._follower = follower

    def __iter__(self) -> Iterator[int]:
        return iter(self.order.indices(self.epoch).tolist())

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._follower.epoch = epoch  # workers started from now on begin at this epoch


@dataclass
class Follow:
    """What a dataset knows of its sampler: the order, and the epoch when it was last told
    (travels to workers when they start: exact for fresh workers, a hint for persistent ones)."""

    order: Order
    epoch: int = 0


class Lookahead:
    """Where a worker is in the order, from the batch it was just given; what comes next.

    Positions are kept for two epochs (the last one matched and the next), as int32 arrays
    over the dataset: ~8 bytes a sample, the price of an O(batch) answer per batch.
    """

    EPOCHS = 2

    def __init__(self, follow: Follow, stride: int, ahead: int) -> None:
        self.order = follow.order
        self.epoch = follow.epoch
        self.stride = max(1, stride)  # batches between two of this worker's: its number of workers
        self.ahead = ahead
        self.batch_size = 0  # the last full batch's: places a short last batch
        self._epochs: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _positions(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices in order, position of each sample in them, or -1)."""
        got = self._epochs.get(epoch)
        if got is None:
            indices = self.order.indices(epoch).to(torch.int32)
            where = torch.full((self.order.size,), -1, dtype=torch.int32)
            where[indices.long()] = torch.arange(len(indices), dtype=torch.int32)
            got = self._epochs[epoch] = (indices, where)
            while len(self._epochs) > self.EPOCHS:
                self._epochs.popitem(last=False)
        return got

    def after(self, batch: Sequence[int]) -> list[Batch]:
        """The batches this worker will most likely be asked for after `batch`, nearest
        first; none when `batch` is not where the order would put it."""
        if not batch or self.ahead < 1 or not 0 <= batch[0] < self.order.size:
            return []
        for epoch in range(self.epoch, self.epoch + self.EPOCHS):
            indices, where = self._positions(epoch)
            pos = int(where[batch[0]])
            full = pos + len(batch) < len(indices)  # not the last batch, which may be short
            size = len(batch) if full else self.batch_size or len(batch)
            if pos < 0 or pos % size or indices[pos:pos + len(batch)].tolist() != list(batch):
                continue
            self.epoch = epoch
            if full:
                self.batch_size = size
            starts = ((pos // size + k * self.stride) * size for k in range(1, self.ahead + 1))
            return [tuple(indices[s:s + size].tolist()) for s in starts if s < len(indices)]
        return []


__all__ = ["Batch", "CachefsSampler", "Follow", "Lookahead", "Order", "rank_and_world"]
