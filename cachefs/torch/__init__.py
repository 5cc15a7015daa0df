"""PyTorch datasets over cachefs: `CachefsDataset` (map-style, files under a folder, a batch
in one batched read, the next batches read ahead in each DataLoader worker) and
`CachefsShards` (iterable, shard files or tar members, split across workers and ranks).

An optional part: `import cachefs` and the fsspec filesystem never import torch.
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # torch is an optional extra
    raise ImportError("cachefs.torch needs PyTorch: pip install cachefs[torch]") from e

from cachefs.torch.dataset import CachefsDataset, Transform
from cachefs.torch.order import CachefsSampler, Order
from cachefs.torch.shards import CachefsShards

__all__ = ["CachefsDataset", "CachefsSampler", "CachefsShards", "Order", "Transform"]
