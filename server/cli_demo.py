"""`cachefs demo`: the whole story on one machine, in about a minute.

Local Ray cluster → sample dataset in a local origin → register → warm (cold: from the
origin) → read everything back twice through `cachefs://` (warm: from the cache) →
figures → stop (unless --keep).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cachefs.admin import AdminClient
from cachefs.common import extras
from cachefs.cli.output import add_json_flag, follow, print_json, stderr, stdout, table
from cachefs.config import ClientConfig
from server.config import ClusterConfig
from cachefs.common.settings import cachefs_home, format_size, load
from cachefs.common.errors import CachefsError
from cachefs.sample import SampleSpec, make_sample

DATASET = "demo"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole story on a local cluster and print the figures",
                       description="Start a local 3-node cache cluster, generate a sample dataset (nested "
                       "folders, many small files, a few large ones), register and warm it, read it back twice "
                       "through cachefs://, print cold vs warm throughput, origin bytes, hit ratio and each "
                       "node's share, then stop everything (unless --keep).")
    p.add_argument("--nodes", type=int, default=3, help="cache nodes (default 3)")
    p.add_argument("--memory", default="256MiB", help="memory tier per node (default 256MiB)")
    p.add_argument("--disk", default="1GiB", help="disk tier per node (default 1GiB)")
    p.add_argument("--origin-dir", help="where to write the sample dataset (default: a temporary directory)")
    p.add_argument("--small-files", type=int, default=600, help="number of small files (default 600)")
    p.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    add_json_flag(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    say = (lambda s: None) if args.json else (lambda s: stderr().print(f"[dim]{s}…[/dim]"))
    if extras.missing("server"):  # a light install: the demo brings what it needs, then starts over
        extras.install("server", say)
        os.execv(sys.executable, [sys.executable, "-m", "cachefs.cli.main", *sys.argv[1:]])
    from server import hosting

    tmp = None if args.origin_dir else tempfile.TemporaryDirectory(prefix="cachefs-demo-")
    origin_dir = Path(args.origin_dir or tmp.name)  # type: ignore[union-attr]
    was_running = (cachefs_home() / "cluster.json").exists()
    try:
        say(f"writing a sample dataset to {origin_dir}")
        make_sample(origin_dir, SampleSpec(small_files=args.small_files))
        config = load(ClusterConfig, {"nodes": args.nodes, "memory_bytes": args.memory, "disk_bytes": args.disk})
        # the sample lives on local disk: let this cluster read it (local paths are refused by default)
        config = dataclasses.replace(config, allowed_origins=(*config.allowed_origins,
                                                              f"file://{origin_dir.resolve()}/"))
        if not was_running and not args.keep and not config.address and "RAY_ADDRESS" not in os.environ:
            # A Ray cluster owned by this process: it cannot outlive the demo, whatever happens.
            import ray

            say("starting a local Ray cluster")
            ray.init(namespace=config.namespace, logging_level="ERROR", log_to_driver=False,
                     include_dashboard=False)
        handle = hosting.up(config, os.environ, say=say)
        figures = asyncio.run(_story(ClientConfig(endpoint=handle.endpoint, token=handle.token, admin_token=handle.admin_token),
                                     f"file://{origin_dir.resolve()}", args.json, say, args.keep))
    finally:
        if not args.keep and not was_running:
            say("stopping the cluster")
            hosting.down(os.environ)
            import ray

            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    _print(figures, args.json)
    return 0 if figures["warm"]["state"] == "succeeded" and figures["verified"] else 1


async def _story(config: ClientConfig, origin: str, as_json: bool, say: Any, keep: bool) -> dict[str, Any]:
    from cachefs.filesystem import CachefsFileSystem

    async with AdminClient(config) as admin:
        if DATASET in {d.name for d in await admin.list_datasets()}:
            await admin.remove_dataset(DATASET)
        op = await follow(admin, await admin.add_dataset(DATASET, origin), "listing the origin", quiet=as_json)
        if not op.finished_ok:
            raise CachefsError(f"could not register the sample dataset: {op.message}")
        before = await admin.status()
        warm = await follow(admin, await admin.warm_dataset(DATASET), "warming (cold reads from the origin)",
                            quiet=as_json)
        after_warm = await admin.status()

        fs = CachefsFileSystem(endpoint=config.endpoint, token=config.token, asynchronous=True,
                               skip_instance_cache=True)
        try:
            paths = await fs._find(DATASET)
            reads = []
            verified = True
            for round_ in (1, 2):
                say(f"reading every file back through cachefs:// (round {round_})")
                t0 = time.perf_counter()
                data = await fs._cat(paths, batch_size=64)
                secs = time.perf_counter() - t0
                nbytes = sum(len(v) for v in data.values())
                reads.append({"round": round_, "bytes": nbytes, "seconds": secs, "gbps": nbytes / secs / 1e9})
            origin_root = origin[len("file://"):]
            for p, v in list(data.items())[:: max(1, len(data) // 50)]:  # spot-check against the origin
                rel = p.split("/", 1)[1]
                verified &= v == Path(origin_root, rel).read_bytes()
        finally:
            await fs._close()
        final = await admin.status()
        if not keep:  # its origin is a temporary directory: leave no dangling registration
            await admin.remove_dataset(DATASET)

    def total(doc: dict[str, Any], key: str) -> int:
        return sum(n[key] for n in doc["nodes"])

    hits = total(final, "hits") - total(after_warm, "hits")
    misses = total(final, "misses") - total(after_warm, "misses")
    info = next(d for d in final["datasets"] if d["name"] == DATASET)
    warm_secs = max(warm.finished - warm.started, 1e-9)
    return {
        "dataset": {"files": info["files"], "bytes": info["bytes"]},
        "warm": {"state": warm.state, "seconds": warm_secs, "gbps": warm.done_bytes / warm_secs / 1e9,
                 "origin_bytes": total(after_warm, "origin_bytes") - total(before, "origin_bytes")},
        "reads": reads,
        "origin_bytes_during_reads": total(final, "origin_bytes") - total(after_warm, "origin_bytes"),
        "hit_ratio": hits / max(hits + misses, 1),
        "nodes": [{"id": n["id"], "cached_bytes": n["datasets"].get(DATASET, 0),
                   "share": n["datasets"].get(DATASET, 0) / max(info["bytes"], 1)} for n in final["nodes"]],
        "verified": verified,
    }


def _print(f: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(f)
        return
    con = stdout()
    d = f["dataset"]
    con.print(f"\n[bold]cachefs demo[/bold]: {d['files']} files, {format_size(d['bytes'])}")
    rows = [("cold (warm-up from the origin)", f"{f['warm']['gbps']:.2f} GB/s", f"{f['warm']['seconds']:.2f} s")]
    rows += [(f"warm read {r['round']} (from the cache)", f"{r['gbps']:.2f} GB/s", f"{r['seconds']:.2f} s")
             for r in f["reads"]]
    table(None, ["pass", "throughput", "time"], rows)
    con.print(f"origin bytes: {format_size(f['warm']['origin_bytes'])} during warm-up, "
              f"{format_size(f['origin_bytes_during_reads'])} during the two reads; "
              f"hit ratio of the reads: {100 * f['hit_ratio']:.1f}%")
    table("each node's share", ["node", "cached", "share"],
          [(n["id"], format_size(n["cached_bytes"]), f"{100 * n['share']:.1f}%") for n in f["nodes"]])
    con.print("bytes match the origin" if f["verified"] else "[red]bytes differ from the origin[/red]")
