"""cachefs.torch through a real torch DataLoader with real worker processes, on the
session's 3-node cluster: every sample equals the origin's bytes (shuffled by the cachefs
sampler or by a plain RandomSampler, with workers or without, persistent across epochs,
forked or spawned), workers read their next batches ahead when they know the order, a
missing file fails naming it, and shards are split across workers and ranks with none
read twice or skipped."""

from __future__ import annotations

import io
import os
import pickle
import random
import subprocess
import sys
import tarfile
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, get_worker_info  # noqa: E402

from cachefs.torch import CachefsDataset, CachefsShards  # noqa: E402
from cachefs.torch.order import Follow, Lookahead, Order  # noqa: E402
from conftest import BLOCK, write_tree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KiB = 1024
pytestmark = pytest.mark.timeout(120)


def image_files(seed: int = 21) -> dict[str, bytes]:
    """Small (packed) files in class folders, two above the pack threshold, one of several blocks."""
    rnd = random.Random(seed)
    files = {f"train/c{i % 5}/{i:04d}.jpg": rnd.randbytes(rnd.randint(1, 60 * KiB)) for i in range(150)}
    files |= {"train/big/a.bin": rnd.randbytes(300 * KiB), "train/big/b.bin": rnd.randbytes(BLOCK + 4321),
              "other/x.txt": b"not under train/"}
    return files


@pytest.fixture(scope="module")
def images(cachefs_cluster, tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    """(dataset name, the files under train/ by their cachefs path)."""
    files = image_files()
    name = cachefs_cluster.dataset_of(files, tmp_path_factory.mktemp("images"), "images")
    return name, {f"{name}/{rel}": data for rel, data in files.items() if rel.startswith("train/")}


def dataset(cluster: Any, root: Any, **kw: Any) -> CachefsDataset:
    return CachefsDataset(root, endpoint=cluster.endpoint, token=cluster.token, **kw)


def with_path(path: str, data: bytes) -> tuple[str, bytes]:
    return path, data


class ReadAheadReport(CachefsDataset):
    """Observes, changes nothing: each batch comes with whether its worker had read it ahead."""

    def __getitems__(self, indices: list[int]) -> Any:
        before = self._here.prefetcher.taken if self._here is not None else 0
        samples = super().__getitems__(indices)
        info = get_worker_info()
        return samples, self._here.prefetcher.taken > before, info.id if info else None


def identity(batch: Any) -> Any:
    return batch


# -- the order, as a specification --------------------------------------------------------
@pytest.mark.parametrize("size,world,drop_last,shuffle", [
    (10, 1, False, True), (10, 3, False, True), (10, 3, True, True), (2, 3, False, True),
    (7, 2, False, False), (1000, 4, True, True)])
def test_the_order_is_distributed_samplers_for_the_same_seed(size, world, drop_last, shuffle) -> None:
    for rank in range(world):
        for epoch in (0, 3):
            theirs = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=shuffle, seed=5,
                                        drop_last=drop_last)
            theirs.set_epoch(epoch)
            ours = Order(size, shuffle, seed=5, rank=rank, world_size=world, drop_last=drop_last)
            assert ours.indices(epoch).tolist() == list(theirs) and len(ours) == len(theirs)


def test_lookahead_predicts_a_workers_round_robin_batches_and_nothing_for_a_stranger() -> None:
    order = Order(100, seed=1)
    idx = order.indices(0).tolist()
    batches = [tuple(idx[i:i + 8]) for i in range(0, 100, 8)]  # 13 batches, the last one of 4
    workers = 3
    for k in range(workers):  # worker k is given batches k, k+3, ...; it expects the next two of its own
        ahead = Lookahead(Follow(order), stride=workers, ahead=2)
        for j in range(k, len(batches), workers):
            assert ahead.after(batches[j]) == [b for b in batches[j + workers:j + 3 * workers:workers]]
    stranger = Lookahead(Follow(order), stride=1, ahead=2)
    assert stranger.after(tuple(sorted(batches[0]))) == []  # not a batch of this order
    assert stranger.after(batches[0][1:] + batches[1][:1]) == []  # not where a batch starts
    nxt = Order(100, seed=1).indices(1).tolist()
    assert stranger.after(tuple(nxt[:8])) == [tuple(nxt[8:16]), tuple(nxt[16:24])]  # a persistent worker's next epoch
    assert stranger.epoch == 1


def test_set_epoch_changes_the_order_and_the_same_epoch_repeats_it(cachefs_cluster, images) -> None:
    name, files = images
    ds = dataset(cachefs_cluster, f"cachefs://{name}/train")
    assert len(ds) == len(files) and [ds.path(i) for i in range(len(ds))] == sorted(files)
    sampler = ds.sampler(seed=7)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert sorted(first) == sorted(second) == list(range(len(ds))) and first != second and list(sampler) == first
    halves = [list(ds.sampler(seed=7, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == list(range(len(ds)))


# -- samples through a DataLoader --------------------------------------------------------
def test_two_workers_with_the_cachefs_sampler_give_every_sample_in_order_read_ahead(cachefs_cluster, images) -> None:
    name, files = images
    ds = ReadAheadReport(f"{name}/train", endpoint=cachefs_cluster.endpoint, token=cachefs_cluster.token)
    sampler = ds.sampler(seed=3)
    loader = DataLoader(ds, batch_size=16, sampler=sampler, num_workers=2, collate_fn=identity)
    got = list(loader)
    samples = [s for batch, _, _ in got for s in batch]
    assert samples == [files[ds.path(i)] for i in sampler]
    for worker in (0, 1):  # each worker read ahead every batch after its first
        read_ahead = [ahead for _, ahead, w in got if w == worker]
        assert read_ahead == [False] + [True] * (len(read_ahead) - 1)


def test_a_batch_of_bytes_reaches_the_trainer_as_a_list_of_bytes_through_shared_memory(cachefs_cluster,
                                                                                       images) -> None:
    name, files = images
    ds = dataset(cachefs_cluster, f"{name}/train")
    sampler = ds.sampler(seed=2)
    batches = list(DataLoader(ds, batch_size=16, sampler=sampler, num_workers=2))  # the default collate_fn
    assert all(type(b) is list and all(type(s) is bytes for s in b) for b in batches)
    assert [s for b in batches for s in b] == [files[ds.path(i)] for i in sampler]
    batch = ds.__getitems__([0, 1, 2])
    assert ForkingPickler.loads(ForkingPickler.dumps(batch)) == pickle.loads(pickle.dumps(batch)) == list(batch)
    assert len(ForkingPickler.dumps(batch)) < 1000  # a file descriptor, not the bytes


def test_a_plain_random_sampler_gives_every_sample_once(cachefs_cluster, images) -> None:
    name, files = images
    ds = dataset(cachefs_cluster, f"{name}/train", transform=with_path)
    loader = DataLoader(ds, batch_size=16, sampler=RandomSampler(ds), num_workers=2, collate_fn=identity)
    samples = [s for batch in loader for s in batch]
    assert len(samples) == len(files) and dict(samples) == files


def test_without_workers_the_trainer_reads_ahead_itself(cachefs_cluster, images) -> None:
    name, files = images
    ds = dataset(cachefs_cluster, f"{name}/train", prefetch_batches=3)
    sampler = ds.sampler(seed=4)
    batches = list(DataLoader(ds, batch_size=32, sampler=sampler, num_workers=0, collate_fn=identity))
    assert [s for b in batches for s in b] == [files[ds.path(i)] for i in sampler]
    prefetcher = ds._here.prefetcher
    assert prefetcher.taken == len(batches) - 1 and len(prefetcher) == 0  # nothing left held
    plain = dataset(cachefs_cluster, f"{name}/train")  # no order given: a batch is read when asked
    assert [plain[i] for i in (5, 0, 5)] == [files[plain.path(i)] for i in (5, 0, 5)]
    assert plain._here.prefetcher.started == 0


def test_persistent_workers_follow_set_epoch_across_two_epochs(cachefs_cluster, images) -> None:
    name, files = images
    ds = ReadAheadReport(f"{name}/train", endpoint=cachefs_cluster.endpoint, token=cachefs_cluster.token)
    sampler = ds.sampler(seed=9)
    loader = DataLoader(ds, batch_size=16, sampler=sampler, num_workers=2, persistent_workers=True,
                        collate_fn=identity)
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        got = list(loader)
        orders.append(list(sampler))
        assert [s for batch, _, _ in got for s in batch] == [files[ds.path(i)] for i in orders[-1]]
        assert sum(ahead for _, ahead, _ in got) >= len(got) - 2  # all but each worker's first
    assert orders[0] != orders[1]


def test_spawned_workers_find_the_cluster_from_the_environment(cachefs_cluster, images, monkeypatch) -> None:
    name, files = images
    monkeypatch.setenv("CACHEFS_ENDPOINT", cachefs_cluster.endpoint)
    monkeypatch.setenv("CACHEFS_TOKEN", cachefs_cluster.token)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    ds = CachefsDataset(f"{name}/train/c1", transform=with_path)
    state = pickle.dumps(ds)
    assert cachefs_cluster.token.encode() not in state  # settings only: the token is read in each process
    loader = DataLoader(ds, batch_size=8, sampler=ds.sampler(seed=1), num_workers=1,
                        multiprocessing_context="spawn", collate_fn=identity)
    samples = dict(s for batch in loader for s in batch)
    assert samples == {p: d for p, d in files.items() if p.startswith(f"{name}/train/c1/")}


def test_a_missing_file_fails_naming_it(cachefs_cluster, images) -> None:
    name, files = images
    paths = sorted(files)[:3] + [f"{name}/train/c0/missing.jpg"]
    ds = dataset(cachefs_cluster, paths)
    assert ds[0] == files[paths[0]]
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        ds[3]
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        list(DataLoader(ds, batch_size=2, sampler=ds.sampler(seed=0), num_workers=2, collate_fn=identity))
    assert time.monotonic() - started < 30


def test_a_filesystem_inherited_by_a_forked_worker_is_dropped_at_once(cachefs_cluster) -> None:
    fs = cachefs_cluster.fs()
    fs.ls("")
    pid = os.fork()
    if pid == 0:  # the child: dropping the parent's instance must not wait for the parent's loop
        t0 = time.monotonic()
        del fs
        os._exit(0 if time.monotonic() - t0 < 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_importing_cachefs_never_imports_torch_and_a_missing_torch_says_what_to_install() -> None:
    check = "import sys, cachefs.filesystem, cachefs.cli.main; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT).returncode == 0
    no_torch = "import sys; sys.modules['torch'] = None; import cachefs.torch"
    done = subprocess.run([sys.executable, "-c", no_torch], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "pip install cachefs[torch]" in done.stderr


# -- shards ------------------------------------------------------------------------------
def tar_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture(scope="module")
def shards(cachefs_cluster, tmp_path_factory) -> tuple[str, dict[str, dict[str, bytes]], dict[str, bytes]]:
    """(dataset name, tar members by shard path, shard bytes by shard path): 7 shards."""
    rnd = random.Random(5)
    members = {f"shards/{s:03d}.tar": {f"{s:03d}{k:02d}.{ext}": rnd.randbytes(rnd.randint(1, 90 * KiB))
                                       for k in range(4) for ext in ("jpg", "cls")} for s in range(7)}
    members["shards/006.tar"]["blob.bin"] = rnd.randbytes(BLOCK + 999)  # a shard across blocks
    blobs = {rel: tar_of(m) for rel, m in members.items()}
    origin = write_tree(tmp_path_factory.mktemp("shards"), blobs)
    name = cachefs_cluster.unique("shards")
    cachefs_cluster.add_dataset(name, f"file://{origin}")
    return name, {f"{name}/{r}": m for r, m in members.items()}, {f"{name}/{r}": b for r, b in blobs.items()}


def shard_loader(cluster: Any, name: str, **kw: Any) -> DataLoader:
    ds = CachefsShards(f"{name}/shards", endpoint=cluster.endpoint, token=cluster.token, **kw)
    return DataLoader(ds, batch_size=None, num_workers=2)


def test_shards_are_split_across_workers_none_read_twice_or_skipped(cachefs_cluster, shards) -> None:
    name, _, blobs = shards
    got = list(shard_loader(cachefs_cluster, name))
    assert sorted(p for p, _ in got) == sorted(blobs) and dict(got) == blobs


@pytest.mark.parametrize("whole_shard_bytes", [64 * 1024 * KiB, 0], ids=["read whole", "streamed"])
def test_tar_members_equal_the_origin_whether_read_whole_or_streamed(cachefs_cluster, shards,
                                                                     whole_shard_bytes) -> None:
    name, members, _ = shards
    got = list(shard_loader(cachefs_cluster, name, tar=True, whole_shard_bytes=whole_shard_bytes))
    want = {f"{shard}/{m}": data for shard, ms in members.items() for m, data in ms.items()}
    assert len(got) == len(want) and dict(got) == want


def test_shards_are_split_across_ranks_too(cachefs_cluster, shards) -> None:
    name, _, blobs = shards
    per_rank = [[p for p, _ in shard_loader(cachefs_cluster, name, rank=r, world_size=2)] for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1]) and sorted(per_rank[0] + per_rank[1]) == sorted(blobs)


def test_a_missing_shard_fails_naming_it(cachefs_cluster, shards) -> None:
    name, _, blobs = shards
    ds = CachefsShards([*sorted(blobs)[:2], f"{name}/shards/999.tar"], endpoint=cachefs_cluster.endpoint,
                       token=cachefs_cluster.token)
    with pytest.raises(FileNotFoundError, match="999.tar"):
        list(DataLoader(ds, batch_size=None, num_workers=2))
