"""Small files, side by side in one run: the local copy cachefs replaces, and every way of
reading through cachefs. Prints files/s and ratios to local disk; writes JSON.

    python bench/small_files.py            # 4,000 files of 60-160 KB (ImageNet-like), 3 cache nodes
    python bench/small_files.py --quick    # 400 files, for CI

Peers (the dataset warm in the cache before any cachefs peer is timed):

  local disk, 1 process      open().read() of every file, served by the page cache
  local disk, 4 processes    the same, split over 4 processes
  cachefs one by one         fs.cat_file(path) in a loop, one thread
  cachefs batched            fs.cat([256 paths]) in a loop, one thread
  mount, 4 processes         `cachefs mount`, then 4 processes open().read() every file
                             (a fresh mount: every read goes through FUSE)
  DataLoader, 4 workers      cachefs.torch.CachefsDataset in a torch DataLoader (if torch is installed),
                             its sampler's order known to the workers, which read their next batches ahead;
                             persistent workers, one untimed epoch first; samples are bytes, and the
                             default collate_fn hands a batch on as it is (cachefs's crosses to the
                             trainer in shared memory, cachefs/torch/batch.py)
  ..., RandomSampler         the same with the DataLoader's own shuffle: a batch is read when asked for
  local disk DataLoader      the same DataLoader over the local files: what the DataLoader itself costs
                             (every sample's bytes pickled through a pipe to the trainer)

and, for whole-file reads of large files, warm `fs.cat_file` of 48 MiB files against the
loopback ceiling (socket.sendfile → recv_into, bench/read_throughput.py).
Single-process peers are compared with local disk in 1 process, the others with 4.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import write_json  # noqa: E402

MiB = 1024 * 1024
BATCH = 256


def make_dataset(root: Path, files: int, seed: int = 7) -> list[str]:
    """`files` files of 60-160 KB in 100 folders (a class per folder, like ImageNet)."""
    rnd = random.Random(seed)
    paths = []
    for i in range(files):
        rel = f"train/c{i % 100:03d}/img{i:06d}.jpg"
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rnd.randbytes(rnd.randint(60_000, 160_000)))
        paths.append(rel)
    return paths


def _read_local(paths: list[str]) -> int:
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            n += len(f.read())
    return n


def in_processes(paths: list[str], procs: int, work: Callable[[list[str]], int]) -> float:
    """Seconds for `procs` processes to run `work` over an equal share of `paths` each."""
    ctx = mp.get_context("fork")
    shares = [paths[i::procs] for i in range(procs)]
    with ctx.Pool(procs) as pool:
        pool.map(_noop, range(procs))  # the workers exist before the clock starts
        t0 = time.perf_counter()
        pool.map(work, shares)
        return time.perf_counter() - t0


def _noop(_: int) -> None:
    return None


def best_rate(files: int, run: Callable[[], float], repeat: int) -> float:
    """files/s of the fastest of `repeat` runs (each returns its seconds)."""
    return max(files / run() for _ in range(repeat))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def dataloader_rate(dataset: Any, workers: int, repeat: int, sampler: Any = None) -> float:
    """files/s of the best of `repeat` epochs of a DataLoader as a training job runs one:
    persistent workers, started (one untimed epoch) before the clock, as the processes of
    the local-disk peers are; shuffled by `sampler` (with `set_epoch`) or by the DataLoader."""
    import torch.utils.data as tud

    loader = tud.DataLoader(dataset, batch_size=BATCH, shuffle=sampler is None, sampler=sampler,
                            num_workers=workers, persistent_workers=True, prefetch_factor=4)
    epochs = iter(range(repeat + 1))

    def epoch() -> float:
        if sampler is not None:
            sampler.set_epoch(next(epochs))
        t0 = time.perf_counter()
        n = sum(len(batch) for batch in loader)
        assert n == len(dataset)
        return time.perf_counter() - t0

    epoch()  # the workers start, connect and load the manifest
    return best_rate(len(dataset), epoch, repeat)


class LocalFiles:
    """The local-disk peer of the DataLoader: a map-style dataset of file bytes."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="400 files and one 48 MiB file (for CI)")
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="runs per peer; the best is reported")
    ap.add_argument("--skip-mount", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", default="bench/results/small_files.json")
    args = ap.parse_args()
    files = 400 if args.quick else args.files
    big_files = 1 if args.quick else 4
    repeat = 1 if args.quick else args.repeat

    from bench.cluster import MountUnavailable, local_ray, mounted
    from bench.read_throughput import CpuMeter, loopback_ceiling
    from cachefs.admin import AdminClient
    from cachefs.config import ClientConfig
    from server.config import ClusterConfig, DEFAULT_ALLOWED_ORIGINS
    from cachefs.filesystem import CachefsFileSystem
    from server import hosting

    work = Path(tempfile.mkdtemp(prefix="cachefs-small-"))
    os.environ["CACHEFS_HOME"] = str(work / "home")
    origin = work / "origin"
    rels = make_dataset(origin, files)
    big = origin / "big"
    big.mkdir()
    blob = os.urandom(48 * MiB)
    for i in range(big_files):
        (big / f"blob{i}.bin").write_bytes(blob)
    local = [str(origin / r) for r in rels]
    random.Random(1).shuffle(local)
    total = sum(os.path.getsize(p) for p in local)
    doc: dict[str, Any] = {"bench": "small_files", "quick": args.quick, "files": files, "bytes": total,
                           "nodes": args.nodes, "cpus": os.cpu_count(), "rates": {}, "notes": {}}
    rates = doc["rates"]
    namespace = "cachefs-small"
    try:
        _read_local(local)  # into the page cache
        rates["local disk, 1 process"] = best_rate(files, lambda: timed(lambda: _read_local(local)), repeat)
        rates["local disk, 4 processes"] = best_rate(files, lambda: in_processes(local, 4, _read_local), repeat)

        with local_ray():
            node_memory = max(256 * MiB, 2 * (total + big_files * 48 * MiB) // args.nodes)
            handle = hosting.up(ClusterConfig(nodes=args.nodes, memory_bytes=node_memory, disk_bytes=0,
                                              namespace=namespace,
                                              allowed_origins=(*DEFAULT_ALLOWED_ORIGINS, f"file://{origin}/")))
            try:
                import asyncio

                async def register() -> None:
                    async with AdminClient(ClientConfig(endpoint=handle.endpoint, admin_token=handle.admin_token)) as a:
                        op = await a.wait(await a.add_dataset("small", f"file://{origin}"), timeout=300)
                        assert op.finished_ok, op
                        op = await a.wait(await a.warm_dataset("small"), timeout=600)
                        assert op.finished_ok, op

                asyncio.run(register())
                fs = CachefsFileSystem(endpoint=handle.endpoint, token=handle.token, skip_instance_cache=True)
                remote = [f"small/{os.path.relpath(p, origin)}" for p in local]
                assert fs.cat_file(remote[0]) == Path(local[0]).read_bytes()

                def one_by_one() -> float:  # results dropped as they come, as the local disk peer does
                    return timed(lambda: sum(len(fs.cat_file(p)) for p in remote))

                def batched() -> float:
                    return timed(lambda: sum(len(b) for i in range(0, files, BATCH)
                                             for b in fs.cat(remote[i:i + BATCH]).values()))

                cpu = doc["cpu"] = {}
                for peer, run in (("cachefs one by one", one_by_one), ("cachefs batched", batched)):
                    with CpuMeter(handle.endpoint, handle.admin_token) as meter:
                        rates[peer] = best_rate(files, run, repeat)
                    cpu[peer] = meter.per_item(files * repeat)

                if not args.skip_mount:
                    try:
                        env = {**os.environ, "CACHEFS_ENDPOINT": handle.endpoint, "CACHEFS_TOKEN": handle.token}
                        os.environ.update(env)
                        mnt = work / "mnt"
                        mnt.mkdir()
                        best = 0.0
                        for _ in range(repeat):  # a fresh mount each time: every read goes through FUSE
                            with mounted("small", mnt):
                                paths = [str(mnt / os.path.relpath(p, origin)) for p in local]
                                best = max(best, files / in_processes(paths, 4, _read_local))
                        rates["mount, 4 processes"] = best
                    except MountUnavailable as e:
                        doc["notes"]["mount"] = str(e)

                if not args.skip_torch:
                    try:
                        from cachefs.torch import CachefsDataset
                        ds = CachefsDataset("small/train", endpoint=handle.endpoint, token=handle.token)
                        rates["DataLoader, 4 workers"] = dataloader_rate(ds, 4, repeat, ds.sampler(seed=0))
                        ds = CachefsDataset("small/train", endpoint=handle.endpoint, token=handle.token)
                        rates["DataLoader, 4 workers, RandomSampler"] = dataloader_rate(ds, 4, repeat)
                        rates["local disk DataLoader, 4 workers"] = dataloader_rate(LocalFiles(local), 4, repeat)
                    except ImportError as e:
                        doc["notes"]["torch"] = f"skipped: {e}"

                # the ceiling over as many bytes as the reads below (fixed costs drown a small file)
                every = work / "every-blob.bin"
                every.write_bytes(blob * big_files)
                ceiling = loopback_ceiling(str(every), streams=4)  # as bench/read_throughput.py
                bigs = [f"small/big/blob{i}.bin" for i in range(big_files)]
                whole = max(big_files * 48 * MiB / timed(lambda: [fs.cat_file(p) for p in bigs]) / 1e9
                            for _ in range(repeat))
                doc["whole_file"] = {"loopback_gbps": ceiling, "cat_file_gbps": whole, "ratio": whole / ceiling}
                fs.close()
            finally:
                hosting.down(os.environ, namespace=namespace)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    one, four = rates["local disk, 1 process"], rates["local disk, 4 processes"]
    print(f"\nsmall files: {files} files of 60-160 KB ({total / MiB:.0f} MiB), {args.nodes} cache nodes, "
          f"{os.cpu_count()} cores; best of {repeat}")
    print(f"{'peer':<36}{'files/s':>10}{'x local 1p':>12}{'x local 4p':>12}")
    doc["ratios"] = {}
    for peer, rate in rates.items():
        doc["ratios"][peer] = {"vs_local_1p": rate / one, "vs_local_4p": rate / four}
        print(f"{peer:<36}{rate:>10.0f}{rate / one:>12.2f}{rate / four:>12.2f}")
    if doc.get("cpu"):
        # client: the whole process (Ray's driver threads included); readers: the caller's
        # thread + fsspec's loop + cachefs's I/O loops, what the read path itself costs
        print(f"\n{'CPU (µs)':<36}{'client/item':>12}{'readers/item':>13}{'node/item':>12}{'node/request':>14}")
        for peer, c in doc["cpu"].items():
            print(f"{peer:<36}{c['client_us_per_item']:>12.0f}{c.get('reader_us_per_item', 0):>13.0f}"
                  f"{c['node_us_per_item']:>12.0f}{c['node_us_per_request']:>14.0f}")
    w = doc.get("whole_file")
    if w:
        print(f"\nwhole-file cat_file of 48 MiB files: {w['cat_file_gbps']:.2f} GB/s; loopback ceiling "
              f"{w['loopback_gbps']:.2f} GB/s; ratio {w['ratio']:.2f}")
    for k, v in doc["notes"].items():
        print(f"note ({k}): {v}")
    print(f"\nwrote {write_json(args.json, doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
