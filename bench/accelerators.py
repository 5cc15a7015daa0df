"""Accelerator utilisation, MLPerf-Storage style: how many emulated accelerators one
training node keeps busy when it reads through each peer.

An emulated accelerator takes batches from its own data loader and "computes" for a fixed
time per batch (it sleeps); AU = time computing / wall time. Its loader is PyTorch's
DataLoader in miniature (torch is not needed): `read_threads` workers, each reading whole
batches sample by sample, at most 2 batches per worker prefetched into a queue.

Workloads, from MLPerf Storage v1.0 (A100, configs/dlio/workload/*_a100.yaml):
  resnet50   114,660-byte samples (one file each here; MLPerf packs them in TFRecords),
             0.435 s per batch of 400 (1.09 ms/sample), 8 read threads, AU target 90%
  cosmoflow  2,828,486 ± 71,311-byte samples (one file each), 5.51 ms per sample, batch 1,
             4 read threads, AU target 70%
A 2-core machine cannot feed one A100 (105 MB/s for resnet50, 513 MB/s for cosmoflow), so
each emulated accelerator is an A100 `--slowdown` times slower (compute time × slowdown,
batches of `--batch` samples for resnet50); only the comparison between peers carries over.

Peers, on one training node, with the budgets of bench/epoch.py (dataset D, B = 2/3 D):
  origin              s3fs on moto's S3
  per-node cache      whole files on local disk, LRU within B (warmed by one pass)
  cachefs (fsspec)    cachefs:// client; 3 cache nodes of B each, dataset warmed
  cachefs (mount)     the same through `cachefs mount` (FUSE; page cache dropped per file)
For each peer, accelerator counts go up until AU falls below --stop-below.

    python bench/accelerators.py           # D = 128 MiB per workload, 1..32 accelerators
    python bench/accelerators.py --quick   # D = 24 MiB, 1 and 4 accelerators: for CI
"""

from __future__ import annotations

import argparse
import itertools
import math
import queue
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cluster import Cluster, MountUnavailable, local_ray, mounted  # noqa: E402
from bench.harness import (MiB, Dataset, MeteredS3, Nodes, epoch_order, images, machine, table, upload,  # noqa: E402
                           workdir, write_json)
from bench.peers import PeerSpec  # noqa: E402

BATCH_TIMEOUT = 300.0  # one batch; a loader that produces nothing for this long has failed
PREFETCH = 2  # batches each loader worker may hold ready (PyTorch's default prefetch_factor)


@dataclass(frozen=True)
class Workload:
    name: str
    sample_bytes: int
    sample_spread: float  # uniform ± this fraction (cosmoflow: stdev 71,311 B)
    sample_seconds: float  # A100 compute per sample
    batch: int
    read_threads: int
    mlperf_au: float  # the AU an MLPerf Storage run must keep
    dataset_mib: int  # large enough that the loaders' window stays under half an epoch (see `window_ok`)


WORKLOADS = {
    "resnet50": Workload("resnet50", 114_660, 0.0, 0.435 / 400, 400, 8, 0.90, 128),
    "cosmoflow": Workload("cosmoflow", 2_828_486, 0.0437, 0.00551, 1, 4, 0.70, 512),
}
WINDOW_LIMIT = 0.5  # in epochs; see window_ok


def accelerate(reader: Any, shares: Sequence[Sequence[tuple[str, int]]], batch: int, compute: float,
               workers: int, prefetch: int = 2) -> dict[str, Any]:  # prefetch: PyTorch's prefetch_factor
    """Run len(shares) accelerators at once in this process; each consumes its share in
    batches of `batch`, computing `compute` seconds per batch. Returns AU per accelerator."""
    before = reader.stats()
    start = time.perf_counter()
    results: list[dict[str, float]] = [{} for _ in shares]
    errors: list[BaseException] = []

    def accelerator(i: int, share: Sequence[tuple[str, int]]) -> None:
        batches = [share[j:j + batch] for j in range(0, len(share), batch)]
        q: queue.Queue[Any] = queue.Queue(maxsize=workers * prefetch)
        next_batch = itertools.count()
        lock = threading.Lock()

        def worker() -> None:  # a DataLoader worker: takes the next batch, reads it whole
            try:
                while True:
                    with lock:
                        j = next(next_batch)
                    if j >= len(batches):
                        return
                    q.put(sum(reader.read(p, size) for p, size in batches[j]), timeout=BATCH_TIMEOUT)
            except Exception as e:  # hand the failure to the accelerator, which raises it
                q.put(e)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(workers, len(batches)))]
        for t in threads:
            t.start()
        computing = waiting = 0.0
        for _ in batches:
            t0 = time.perf_counter()
            got = q.get(timeout=BATCH_TIMEOUT)
            if isinstance(got, BaseException):
                raise got
            t1 = time.perf_counter()
            time.sleep(compute)
            computing += time.perf_counter() - t1  # what was slept, oversleep included: not an I/O stall
            waiting += t1 - t0
        wall = time.perf_counter() - start
        for t in threads:
            t.join(BATCH_TIMEOUT)
        results[i] = {"au": computing / wall, "wall": wall, "waiting": waiting, "batches": len(batches)}

    def guarded(i: int, share: Sequence[tuple[str, int]]) -> None:
        try:
            accelerator(i, share)
        except Exception as e:  # raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i, s)) for i, s in enumerate(shares)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    after = reader.stats()
    wall = max(r["wall"] for r in results)
    au = [r["au"] for r in results]
    return {"accelerators": len(shares), "au": au, "au_mean": sum(au) / len(au), "au_min": min(au), "seconds": wall,
            "samples": sum(len(s) for s in shares), "bytes": after["read_bytes"] - before["read_bytes"],
            "origin_bytes": after["origin_bytes"] - before["origin_bytes"], "held_bytes": after["held_bytes"]}


def shares_for(ds: Dataset, n: int, per_accelerator: int, seed: int) -> list[list[tuple[str, int]]]:
    """What a DistributedSampler over n ranks gives them, epoch after epoch: each epoch's
    shuffle (padded by wrapping to a multiple of n) split across the ranks, rank i taking
    positions i, i+n, ... So the accelerators move through the epochs together."""
    sizes = dict(ds.files)
    shares: list[list[tuple[str, int]]] = [[] for _ in range(n)]
    epoch = seed
    while min(len(s) for s in shares) < per_accelerator:
        order = epoch_order(ds, epoch)
        order += (order * n)[:-len(order) % n]
        for i, share in enumerate(shares):
            share += [(p, sizes[p]) for p in order[i::n]]
        epoch += 1
    return [s[:per_accelerator] for s in shares]


def sweep(nodes: Nodes, spec: PeerSpec, ds: Dataset, wl: Workload, args: argparse.Namespace, s3: MeteredS3,
          cluster: Cluster | None = None) -> list[dict[str, Any]]:
    batch = wl.batch if wl.batch == 1 else args.batch
    compute = batch * wl.sample_seconds * args.slowdown
    records = []
    nodes.call(spec, "read", [ds.files[0]])  # not measured: sessions, manifest, mount lookups
    for run, n in enumerate(args.counts):
        shares = shares_for(ds, n, args.steps * batch, seed=1000 * run)
        meter0 = s3.meter()
        counters0 = cluster.counters(ds.name) if cluster else None
        r = nodes.call(spec, accelerate, [(shares, batch, compute, wl.read_threads, PREFETCH)])[0]
        meter1 = s3.meter()
        if cluster is not None:
            counters1 = cluster.counters(ds.name)
            r["origin_bytes"] = counters1["origin_bytes"] - counters0["origin_bytes"]
            r["held_bytes"] = counters1["held_bytes"]
        r.update({"workload": wl.name, "peer": spec.label, "kind": spec.kind, "batch": batch,
                  "compute_seconds": compute, "samples_per_s": r["samples"] / r["seconds"],
                  "demand_bytes_per_s": n * batch * wl.sample_bytes / compute,
                  "origin_bytes_metered": meter1[0] - meter0[0], "hit_ratio": 1 - r["origin_bytes"] / r["bytes"],
                  # Samples the loaders may hold or fetch at once, in epochs of this dataset: past ~0.5 the
                  # same files are wanted again while still recent, and a per-node cache hits more than
                  # it would on a dataset much larger than the loaders' window (MLPerf's rule).
                  "in_flight_epochs": n * wl.read_threads * PREFETCH * batch / len(ds.files)})
        records.append(r)
        print(f"  {wl.name:<10} {spec.label:<18} {n:>3} accelerators  AU {r['au_mean']:.2f} "
              f"(min {r['au_min']:.2f})  {r['samples_per_s']:.0f} samples/s  hit ratio {r['hit_ratio']:.2f}"
              f"{'' if window_ok(r) else '  (window: not counted)'}", flush=True)
        if r["au_mean"] < args.stop_below:
            break
    return records


def window_ok(record: dict[str, Any]) -> bool:
    """Whether a run says something about a per-node cache. MLPerf Storage wants datasets far
    larger than what the loaders hold: when the samples in flight reach a sizeable part of an
    epoch, files come back while still recent and a per-node cache hits more than it would
    on a real dataset. cachefs (all hits) and the origin (no cache) are not affected."""
    return record["kind"] != "pernode" or record["in_flight_epochs"] <= WINDOW_LIMIT


def most_kept(records: list[dict[str, Any]], threshold: float) -> int:
    """The most accelerators whose mean AU stayed at or above `threshold` (0 if none), over
    the runs that say something (`window_ok`)."""
    return max([r["accelerators"] for r in records if r["au_mean"] >= threshold and window_ok(r)], default=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="D = 24 MiB, 1 and 4 accelerators, 10 steps (for CI)")
    ap.add_argument("--dataset-mib", type=int, default=None,
                    help="dataset size per workload (default resnet50 128, cosmoflow 512; quick 24)")
    ap.add_argument("--counts", default=None, help="accelerator counts (default 1,2,3,4,6,8,12,16,24,32; quick 1,4)")
    ap.add_argument("--steps", type=int, default=None, help="batches per accelerator per run (default 32; quick 10)")
    ap.add_argument("--batch", type=int, default=8, help="resnet50 batch size (MLPerf: 400); cosmoflow keeps 1")
    ap.add_argument("--slowdown", type=float, default=10.0,
                    help="an emulated accelerator is an A100 this many times slower")
    ap.add_argument("--workloads", default="resnet50,cosmoflow")
    ap.add_argument("--cache-nodes", type=int, default=3)
    ap.add_argument("--block-kib", type=int, default=None, help="cachefs block size (default 8192; quick 1024)")
    ap.add_argument("--threshold", type=float, default=0.90, help="the AU an accelerator count must keep")
    ap.add_argument("--stop-below", type=float, default=0.5, help="stop a peer's sweep once AU falls below this")
    ap.add_argument("--no-mount", action="store_true", help="skip the FUSE mount peer")
    ap.add_argument("--json", default="bench/results/accelerators.json", help="where to write the figures")
    args = ap.parse_args()
    args.counts = [int(c) for c in (args.counts or ("1,4" if args.quick else "1,2,3,4,6,8,12,16,24,32")).split(",")]
    args.steps = args.steps or (10 if args.quick else 32)
    block = (args.block_kib or (1024 if args.quick else 8192)) * 1024
    k = args.cache_nodes
    workloads = [WORKLOADS[w] for w in args.workloads.split(",")]
    size = {wl.name: (args.dataset_mib or (24 if args.quick else wl.dataset_mib)) * MiB for wl in workloads}
    datasets = {wl.name: images(wl.name, size[wl.name], wl.sample_bytes, wl.sample_spread,
                                suffix=".jpg" if wl.name == "resnet50" else ".tfrecord") for wl in workloads}
    budgets = {name: math.ceil(ds.bytes * 2 / 3) for name, ds in datasets.items()}  # D = 1.5 B, as in epoch.py
    doc: dict[str, Any] = {
        "bench": "accelerators", "quick": args.quick, "machine": machine(),
        "params": {"slowdown": args.slowdown, "steps": args.steps, "resnet50_batch": args.batch, "counts": args.counts,
                   "threshold": args.threshold, "cache_nodes": k, "block_size": block, "window_limit": WINDOW_LIMIT},
        "workloads": {wl.name: {**asdict(wl), "dataset": datasets[wl.name].describe(),
                                "node_budget_bytes": budgets[wl.name]} for wl in workloads},
        "runs": [], "mount": "measured",
    }
    started = time.perf_counter()
    print(f"accelerator utilisation: one training node, {', '.join(w.name for w in workloads)}; "
          f"accelerators = A100 / {args.slowdown:g}", flush=True)
    with workdir("cachefs-bench-au-") as work, MeteredS3() as s3, Nodes(1, timeout=900) as nodes:
        so = s3.options
        for ds in datasets.values():
            upload(s3, ds)
        for wl in workloads:
            ds = datasets[wl.name]
            items = list(ds.files)
            doc["runs"] += sweep(nodes, PeerSpec("origin", "origin (S3 direct)", ds.prefix, so), ds, wl, args, s3)
            spec = PeerSpec("pernode", "per-node cache", ds.prefix, so, str(work / f"pn-{ds.name}"), budgets[ds.name])
            nodes.call(spec, "read_all", [(items, wl.read_threads)])  # warm-up pass: steady state
            doc["runs"] += sweep(nodes, spec, ds, wl, args, s3)
            nodes.drop(spec)
            shutil.rmtree(spec.cache_dir, ignore_errors=True)
        with local_ray():
            for wl in workloads:
                ds = datasets[wl.name]
                with Cluster(work, k, budgets[ds.name], "lru", block, f"cachefs-bench-{ds.name}") as cluster:
                    cluster.register(ds.name, f"s3://{ds.prefix}", so)
                    cluster.warm(ds.name)
                    spec = PeerSpec("cachefs", "cachefs (fsspec)", ds.name, endpoint=cluster.endpoint,
                                    token=cluster.token)
                    doc["runs"] += sweep(nodes, spec, ds, wl, args, s3, cluster)
                    nodes.drop(spec)
                    if not args.no_mount:
                        try:
                            with mounted(ds.name, work / f"mnt-{ds.name}") as mnt:
                                spec = PeerSpec("mount", "cachefs (mount)", str(mnt))
                                doc["runs"] += sweep(nodes, spec, ds, wl, args, s3, cluster)
                                nodes.drop(spec)
                        except MountUnavailable as e:
                            doc["mount"] = f"unavailable: {e}"
                            print(f"  mount skipped: {e}", file=sys.stderr)
    doc["seconds"] = time.perf_counter() - started

    doc["summary"] = []
    for wl in workloads:
        for peer in dict.fromkeys(r["peer"] for r in doc["runs"] if r["workload"] == wl.name):
            mine = [r for r in doc["runs"] if r["workload"] == wl.name and r["peer"] == peer]
            doc["summary"].append({"workload": wl.name, "peer": peer, "threshold": args.threshold,
                                   "max_accelerators": most_kept(mine, args.threshold),
                                   "mlperf_threshold": wl.mlperf_au,
                                   "max_accelerators_mlperf": most_kept(mine, wl.mlperf_au),
                                   "au_by_accelerators": {str(r["accelerators"]): r["au_mean"] for r in mine},
                                   "not_counted": [r["accelerators"] for r in mine if not window_ok(r)]})
    counts = args.counts

    def cell(s: dict[str, Any], c: int) -> str:
        au = s["au_by_accelerators"].get(str(c))
        return "-" if au is None else f"{au:.2f}" + ("*" if c in s["not_counted"] else "")

    print(f"\nmean AU by accelerator count (resnet50 batch {args.batch}, steps {args.steps}, A100/{args.slowdown:g}; "
          f"* per-node cache with the loaders' window over {WINDOW_LIMIT} epoch: not counted)")
    print(table(["workload", "peer", *map(str, counts), f"max @{args.threshold:.0%}", "max @MLPerf"],
                [[s["workload"], s["peer"], *[cell(s, c) for c in counts], s["max_accelerators"],
                  f"{s['max_accelerators_mlperf']} @{s['mlperf_threshold']:.0%}"] for s in doc["summary"]]))
    out = write_json(args.json, doc)
    print(f"\nwrote {out} ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
