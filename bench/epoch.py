"""Training epochs on k nodes, side by side in one run: the origin read directly, a cache
on every node (the "copy per node" approach), and cachefs (one sharded copy).

k reader processes ("training nodes") read a freshly shuffled epoch each (a global
shuffle per epoch split across the nodes, like PyTorch's DistributedSampler with
set_epoch), with a few loader threads each, for e epochs, on two datasets: many ~100 KiB
image-like files, and large shards (WebDataset/Parquet-like).

For a dataset of D bytes every cache gets the same budget per node, B = 2/3 D: one node
cannot hold the dataset, the cluster (k·B = 2 D for k = 3) can. Peers:
  origin              s3fs on moto's S3; nothing kept
  per-node cache      each node keeps whole files on local disk, LRU within B
  per-node, no budget the same without a budget (fsspec simplecache/filecache): k copies
  cachefs             k cache nodes of B each (disk B, memory B/4), one sharded copy

Then shuffled epochs over a dataset twice the cluster's cache, cachefs with
eviction=lru and eviction=sticky: LRU evicts what the next epoch needs, Sticky keeps a
stable resident set and hits about capacity/dataset of its reads.

Origin bytes: counted by each peer (cachefs: the nodes' `origin_bytes`), and by a meter
on the origin itself, which every peer is held to.

    python bench/epoch.py          # 192 MiB of images, 384 MiB of 64 MiB shards; 3 nodes, 5 epochs
    python bench/epoch.py --quick  # 24 MiB of each, 8 MiB shards: for CI, well under a minute
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cluster import Cluster, local_ray  # noqa: E402
from bench.harness import (KiB, MiB, Dataset, MeteredS3, Nodes, epoch_order, images, machine, mib,  # noqa: E402
                           shards, table, upload, workdir, write_json)
from bench.peers import PeerSpec  # noqa: E402


def run_epochs(nodes: Nodes, k: int, ds: Dataset, spec: PeerSpec, epochs: int, workers: int, s3: MeteredS3,
               cluster: Cluster | None = None, dataset_name: str = "") -> list[dict[str, Any]]:
    """e shuffled epochs of `ds` through `spec` on k nodes; one record per epoch."""
    sizes = dict(ds.files)
    records = []
    for epoch in range(1, epochs + 1):
        order = epoch_order(ds, epoch)
        shares = [[(p, sizes[p]) for p in order[i::k]] for i in range(k)]  # DistributedSampler's split
        meter0, counters0 = s3.meter(), cluster.counters(dataset_name) if cluster else None
        t0 = time.perf_counter()
        results = nodes.call(spec, "read_all", [(share, workers) for share in shares])
        seconds = time.perf_counter() - t0
        meter1 = s3.meter()
        read = sum(r["bytes"] for r in results)
        if read != ds.bytes:
            raise AssertionError(f"{spec.label}: epoch {epoch} read {read} bytes of {ds.bytes}")
        if cluster is not None:
            counters1 = cluster.counters(dataset_name)
            origin = counters1["origin_bytes"] - counters0["origin_bytes"]
            held = counters1["held_bytes"]
        else:
            origin = sum(r["origin_bytes"] for r in results)
            held = sum(r["held_bytes"] for r in results)
        samples = ds.samples
        records.append({
            "dataset": ds.name, "peer": spec.label, "kind": spec.kind, "epoch": epoch, "seconds": seconds,
            "samples": samples, "samples_per_s": samples / seconds, "bytes_read": read, "origin_bytes": origin,
            "origin_bytes_metered": meter1[0] - meter0[0], "origin_gets_metered": meter1[1] - meter0[1],
            "held_bytes": held, "hit_ratio": 1 - origin / read,
        })
        print(f"  {ds.name:<7} {spec.label:<24} epoch {epoch}: {seconds:6.2f} s, origin {mib(origin):>7} MiB, "
              f"hit ratio {1 - origin / read:.2f}", flush=True)
    return records


def summarise(records: list[dict[str, Any]], ds: Dataset) -> list[dict[str, Any]]:
    out = []
    for peer in dict.fromkeys(r["peer"] for r in records):
        mine = [r for r in records if r["peer"] == peer]
        later = mine[1:] or mine
        origin = sum(r["origin_bytes"] for r in mine)
        out.append({"dataset": ds.name, "peer": peer, "epochs": len(mine), "origin_bytes": origin,
                    "origin_bytes_metered": sum(r["origin_bytes_metered"] for r in mine),
                    "origin_reads_of_dataset": origin / ds.bytes,
                    "held_bytes_max": max(r["held_bytes"] for r in mine),
                    "held_copies_of_dataset": max(r["held_bytes"] for r in mine) / ds.bytes,
                    "first_epoch_seconds": mine[0]["seconds"],
                    "later_epoch_seconds": sum(r["seconds"] for r in later) / len(later),
                    "later_hit_ratio": sum(r["hit_ratio"] for r in later) / len(later)})
    return out


def print_epochs(title: str, records: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(table(["peer", "epoch", "time s", "samples/s", "origin MiB", "metered MiB", "held MiB", "hit ratio"],
                [[r["peer"], r["epoch"], f"{r['seconds']:.2f}", f"{r['samples_per_s']:.0f}", mib(r["origin_bytes"]),
                  mib(r["origin_bytes_metered"]), mib(r["held_bytes"]), f"{r['hit_ratio']:.2f}"] for r in records]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="24 MiB datasets and 8 MiB shards (for CI)")
    ap.add_argument("--nodes", type=int, default=3, help="training nodes = cache nodes (k ≥ 3)")
    ap.add_argument("--epochs", type=int, default=None, help="default 5; quick 3")
    ap.add_argument("--images-mib", type=int, default=None, help="image dataset size (default 192; quick 24)")
    ap.add_argument("--sample-kib", type=int, default=100, help="image-like file size (± 20%%)")
    ap.add_argument("--shards-mib", type=int, default=None, help="shard dataset size (default 384; quick 24)")
    ap.add_argument("--shard-mib", type=int, default=None, help="shard size (default 64; quick 8)")
    ap.add_argument("--record-kib", type=int, default=1024, help="what one sample is inside a shard")
    ap.add_argument("--workers", type=int, default=4, help="loader threads per node")
    ap.add_argument("--block-kib", type=int, default=None,
                    help="cachefs block size (default 8192, the production default; quick 1024, so that the "
                         "few blocks of the small shards spread over the nodes)")
    ap.add_argument("--skip-eviction", action="store_true", help="skip the LRU vs Sticky part")
    ap.add_argument("--json", default="bench/results/epoch.json", help="where to write the figures")
    args = ap.parse_args()
    args.epochs = args.epochs or (3 if args.quick else 5)
    if args.nodes < 3 or args.epochs < 2:
        ap.error("use at least 3 nodes and 2 epochs")
    shard = (args.shard_mib or (8 if args.quick else 64)) * MiB
    k, epochs = args.nodes, args.epochs
    datasets = [images("images", (args.images_mib or (24 if args.quick else 192)) * MiB, args.sample_kib * KiB),
                shards("shards", (args.shards_mib or (24 if args.quick else 384)) * MiB, shard, args.record_kib * KiB)]
    # Per node, D = 1.5 B: more than one node holds, less than the cluster's k·B.
    budgets = {ds.name: math.ceil(ds.bytes * 2 / 3) for ds in datasets}
    block = (args.block_kib or (1024 if args.quick else 8192)) * KiB
    doc: dict[str, Any] = {
        "bench": "epoch", "quick": args.quick, "machine": machine(),
        "params": {"nodes": k, "epochs": epochs, "workers": args.workers, "block_size": block},
        "datasets": {ds.name: {**ds.describe(), "node_budget_bytes": budgets[ds.name],
                               "cluster_budget_bytes": k * budgets[ds.name]} for ds in datasets},
        "epochs": [], "summary": [],
    }
    started = time.perf_counter()
    with workdir("cachefs-bench-epoch-") as work, MeteredS3() as s3, Nodes(k, timeout=900) as nodes:
        for ds in datasets:
            upload(s3, ds)
        so = s3.options
        for ds in datasets:  # the peers without a cluster
            for spec in (PeerSpec("origin", "origin (S3 direct)", ds.prefix, so),
                         PeerSpec("pernode", "per-node cache", ds.prefix, so, str(work / f"pn-{ds.name}"),
                                  budgets[ds.name]),
                         PeerSpec("pernode", "per-node, no budget", ds.prefix, so, str(work / f"pnx-{ds.name}"))):
                doc["epochs"] += run_epochs(nodes, k, ds, spec, epochs, args.workers, s3)
                nodes.drop(spec)
                if spec.cache_dir:
                    shutil.rmtree(spec.cache_dir, ignore_errors=True)
        with local_ray():
            for ds in datasets:
                with Cluster(work, k, budgets[ds.name], "lru", block, f"cachefs-bench-{ds.name}") as cluster:
                    cluster.register(ds.name, f"s3://{ds.prefix}", so)
                    spec = PeerSpec("cachefs", "cachefs", ds.name, endpoint=cluster.endpoint, token=cluster.token)
                    doc["epochs"] += run_epochs(nodes, k, ds, spec, epochs, args.workers, s3, cluster, ds.name)
                    nodes.drop(spec)
            if not args.skip_eviction:
                ds = datasets[0]
                small_budget = ds.bytes // (2 * k)  # a dataset twice the cluster's cache
                doc["eviction"] = {"dataset": ds.name, "dataset_bytes": ds.bytes, "node_budget_bytes": small_budget,
                                   "cluster_budget_bytes": k * small_budget,
                                   "expected_hit_ratio": k * small_budget / ds.bytes, "epochs": []}
                for eviction in ("lru", "sticky"):
                    with Cluster(work, k, small_budget, eviction, block, f"cachefs-bench-{eviction}") as cluster:
                        # images unpacked here: the policies are compared on per-file units (a pack of
                        # a hundred images is too coarse a unit for a cache this small)
                        cluster.register(ds.name, f"s3://{ds.prefix}", so, pack_threshold=0)
                        spec = PeerSpec("cachefs", f"cachefs eviction={eviction}", ds.name, endpoint=cluster.endpoint,
                                        token=cluster.token)
                        doc["eviction"]["epochs"] += run_epochs(nodes, k, ds, spec, epochs, args.workers, s3,
                                                                cluster, ds.name)
                        nodes.drop(spec)
    doc["seconds"] = time.perf_counter() - started

    for ds in datasets:
        mine = [r for r in doc["epochs"] if r["dataset"] == ds.name]
        doc["summary"] += summarise(mine, ds)
        print_epochs(f"{ds.name}: {len(ds.files)} files, {mib(ds.bytes)} MiB ({ds.samples} samples); {k} nodes, "
                     f"budget {mib(budgets[ds.name])} MiB per node ({mib(k * budgets[ds.name])} MiB in all); "
                     f"{epochs} shuffled epochs", mine)
    print(f"\nover {epochs} epochs (origin reads and copies held, in datasets)")
    print(table(["dataset", "peer", "origin reads", "copies held", "epoch 1 s", "later epochs s", "later hit ratio"],
                [[s["dataset"], s["peer"], f"{s['origin_reads_of_dataset']:.2f}", f"{s['held_copies_of_dataset']:.2f}",
                  f"{s['first_epoch_seconds']:.2f}", f"{s['later_epoch_seconds']:.2f}", f"{s['later_hit_ratio']:.2f}"]
                 for s in doc["summary"]]))
    if "eviction" in doc:
        ev = doc["eviction"]
        print_epochs(f"eviction: {ev['dataset']} ({mib(ev['dataset_bytes'])} MiB) on a cache of "
                     f"{mib(ev['cluster_budget_bytes'])} MiB; capacity/dataset = {ev['expected_hit_ratio']:.2f}",
                     ev["epochs"])
    out = write_json(args.json, doc)
    print(f"\nwrote {out} ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
