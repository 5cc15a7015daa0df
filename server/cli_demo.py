"""`cachefs demo`: why cachefs exists, on one machine, in under a minute.

A local 3-node cluster; a sample dataset in an object store (moto's S3 server on
127.0.0.1, when moto is installed; else a local folder, said in one line); register;
warm it (cold: every byte from the origin, once); read everything back twice through the
batched read path (warm: from the cache); and beside those figures, what per-node copies
would cost: N copies in memory and N reads of the origin, where cachefs holds one and read
it once. The last line says whether the bytes match the origin's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import logging
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from cachefs.admin import AdminClient
from cachefs.cli.output import add_json_flag, follow, print_json, stderr, stdout, table
from cachefs.common import extras
from cachefs.common.errors import CachefsError
from cachefs.common.settings import cachefs_home, format_size, load
from cachefs.config import ClientConfig
from cachefs.sample import SampleSpec, make_sample
from server.config import ClusterConfig

DATASET = "demo"
BUCKET = "cachefs-demo"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole story on a local cluster and print the figures",
                       description="Start a local 3-node cache cluster, put a sample dataset (class folders of "
                       "small files, a few large shards) in an object store (moto's S3 server), register and "
                       "warm it, read it back twice through cachefs:// in batches, and print the origin read "
                       "directly, the cold and warm throughput, origin bytes, each node's share, and what one "
                       "copy per node would cost beside cachefs's one copy; then stop everything (unless --keep).")
    p.add_argument("--nodes", type=int, default=3, help="cache nodes (default 3)")
    p.add_argument("--memory", default="256MiB", help="memory tier per node (default 256MiB)")
    p.add_argument("--disk", default="1GiB", help="disk tier per node (default 1GiB)")
    p.add_argument("--origin-dir", help="where to write the sample dataset (default: a temporary directory)")
    p.add_argument("--small-files", type=int, default=600, help="number of small files (default 600)")
    p.add_argument("--origin", choices=["auto", "s3", "local"], default="auto",
                   help="where the sample lives: s3 (moto's S3 server on 127.0.0.1, needs moto), local (a "
                   "folder), auto (s3 when moto is installed; the default)")
    p.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    add_json_flag(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    say = (lambda s: None) if args.json else (lambda s: stderr().print(f"[dim]{s}…[/dim]"))
    needed = [e for e in ("server", "demo") if extras.missing(e) and (e == "server" or args.origin != "local")]
    if needed:  # a light install: the demo brings what it needs (Ray; moto for its S3 origin), then starts over
        for extra in needed:
            extras.install(extra, say)
        os.execv(sys.executable, [sys.executable, "-m", "cachefs.cli.main", *sys.argv[1:]])
    from server import hosting

    use_s3, line = choose_origin(args.origin, importlib.util.find_spec("moto") is not None)
    if line and not args.json:
        stdout().print(line)
    was_running = (cachefs_home() / "cluster.json").exists()
    with ExitStack() as stack:
        local = Path(args.origin_dir) if args.origin_dir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="cachefs-demo-")))
        say(f"writing a sample dataset to {local}")
        make_sample(local, SampleSpec(small_files=args.small_files))
        config = load(ClusterConfig, {"nodes": args.nodes, "memory_bytes": args.memory, "disk_bytes": args.disk})
        if use_s3:
            origin, options = stack.enter_context(S3Origin(local, say))
            # moto listens on loopback, which origins may not reach by default
            config = dataclasses.replace(config, allowed_origin_hosts=(*config.allowed_origin_hosts, "127.0.0.1"))
        else:
            origin, options = f"file://{local.resolve()}", {}
            # the sample lives on local disk: let this cluster read it (local paths are refused by default)
            config = dataclasses.replace(config, allowed_origins=(*config.allowed_origins, f"{origin}/"))
        if not was_running and not args.keep and not config.address and "RAY_ADDRESS" not in os.environ:
            # A Ray cluster owned by this process: it cannot outlive the demo, whatever happens.
            import ray

            say("starting a local Ray cluster")
            ray.init(namespace=config.namespace, logging_level="ERROR", log_to_driver=False,
                     include_dashboard=False)
            stack.callback(ray.shutdown)
        if not args.keep and not was_running:
            stack.callback(lambda: (say("stopping the cluster"), hosting.down(os.environ)))
        handle = hosting.up(config, os.environ, say=say)
        client = ClientConfig(endpoint=handle.endpoint, token=handle.token, admin_token=handle.admin_token)
        figures = asyncio.run(_story(client, origin, options, local, args, say))
        figures["origin"]["kind"] = "s3 (moto)" if use_s3 else "local folder"
    _print(figures, args.json)
    return 0 if figures["warm"]["state"] == "succeeded" and figures["verified"] else 1


def choose_origin(wanted: str, have_moto: bool) -> tuple[bool, str]:
    """(origin in S3?, a line to tell the user, or ""): S3 on moto's server when asked or
    when moto is there; a local folder otherwise, said plainly."""
    if wanted == "s3" and not have_moto:
        raise CachefsError("--origin s3 runs moto's S3 server, which is not installed: pip install 'moto[server]'")
    if wanted == "auto" and not have_moto:
        return False, ("moto is not installed, so the origin is a local folder "
                       "(pip install 'moto[server]' to see an object store as the origin)")
    return wanted != "local", ""


class S3Origin:
    """moto's S3 server on 127.0.0.1 holding the sample: (origin URL, storage options)."""

    def __init__(self, local: Path, say: Callable[[str], None]) -> None:
        self.local, self.say = local, say

    def __enter__(self) -> tuple[str, dict[str, Any]]:
        import s3fs
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        options = {"key": "demo", "secret": "demo",
                   "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
        self.say(f"uploading it to an S3 bucket (moto's server on {host}:{port})")
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        fs.call_s3("create_bucket", Bucket=BUCKET)  # no LocationConstraint: moto refuses us-east-1 as one
        fs.put(str(self.local) + "/", f"{BUCKET}/sample/", recursive=True)
        return f"s3://{BUCKET}/sample", options

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


async def _origin_read(origin: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every file read from the origin directly, as a job without a cache reads it each epoch."""
    import fsspec

    fs = fsspec.filesystem(origin.split("://")[0], asynchronous=False, skip_instance_cache=True, **options)
    t0 = time.perf_counter()
    data = await asyncio.to_thread(fs.cat, fs.find(origin))
    secs = time.perf_counter() - t0
    nbytes = sum(len(v) for v in data.values())
    return {"bytes": nbytes, "seconds": secs, "gbps": nbytes / secs / 1e9}


async def _story(config: ClientConfig, origin: str, options: dict[str, Any], local: Path, args: argparse.Namespace,
                 say: Callable[[str], None]) -> dict[str, Any]:
    from cachefs.filesystem import CachefsFileSystem

    async with AdminClient(config) as admin:
        if DATASET in {d.name for d in await admin.list_datasets()}:
            await admin.remove_dataset(DATASET)
        op = await follow(admin, await admin.add_dataset(DATASET, origin, options), "listing the origin",
                          quiet=args.json)
        if not op.finished_ok:
            raise CachefsError(f"could not register the sample dataset: {op.message}")
        say("reading every file from the origin directly (no cache), for comparison")
        direct = await _origin_read(origin, options)
        before = await admin.status()
        warm = await follow(admin, await admin.warm_dataset(DATASET), "warming (cold reads from the origin)",
                            quiet=args.json)
        after_warm = await admin.status()

        fs = CachefsFileSystem(endpoint=config.endpoint, token=config.token, asynchronous=True,
                               skip_instance_cache=True)
        try:
            paths = await fs._find(DATASET)
            reads = []
            for round_ in (1, 2):
                say(f"reading every file back through cachefs://, in batches (round {round_})")
                t0 = time.perf_counter()
                data = await fs._cat_ranges(paths, None, None, on_error="raise")  # one batched read per node
                secs = time.perf_counter() - t0
                nbytes = sum(len(v) for v in data)
                reads.append({"round": round_, "bytes": nbytes, "seconds": secs, "gbps": nbytes / secs / 1e9})
            verified = all(v == (local / p.split("/", 1)[1]).read_bytes() for p, v in zip(paths, data))
        finally:
            await fs._close()
        final = await admin.status()
        if not args.keep:  # its origin goes away with the demo: leave no dangling registration
            await admin.remove_dataset(DATASET)

    def total(doc: dict[str, Any], key: str) -> int:
        return sum(n[key] for n in doc["nodes"])

    hits = total(final, "hits") - total(after_warm, "hits")
    misses = total(final, "misses") - total(after_warm, "misses")
    info = next(d for d in final["datasets"] if d["name"] == DATASET)
    warm_secs = max(warm.finished - warm.started, 1e-9)
    nodes = len(final["nodes"])
    cached = sum(n["datasets"].get(DATASET, 0) for n in final["nodes"])
    origin_bytes = total(after_warm, "origin_bytes") - total(before, "origin_bytes")
    return {
        "dataset": {"files": info["files"], "bytes": info["bytes"]},
        "origin": {"url": origin, "read_seconds": direct["seconds"], "read_gbps": direct["gbps"]},
        "warm": {"state": warm.state, "seconds": warm_secs, "gbps": warm.done_bytes / warm_secs / 1e9,
                 "origin_bytes": origin_bytes},
        "reads": reads,
        "origin_bytes_during_reads": total(final, "origin_bytes") - total(after_warm, "origin_bytes"),
        "hit_ratio": hits / max(hits + misses, 1),
        "nodes": [{"id": n["id"], "cached_bytes": n["datasets"].get(DATASET, 0),
                   "share": n["datasets"].get(DATASET, 0) / max(info["bytes"], 1)} for n in final["nodes"]],
        # one copy per node (a local-disk or page-cache copy on each of N nodes) against cachefs's one copy
        "per_node_copies": {"nodes": nodes, "memory_bytes": nodes * info["bytes"],
                            "origin_bytes": nodes * info["bytes"]},
        "cachefs": {"memory_bytes": cached, "origin_bytes": origin_bytes,
                    "node_budget_bytes": min(n["memory_budget"] + n["disk_budget"] for n in final["nodes"]),
                    "cluster_budget_bytes": total(final, "memory_budget") + total(final, "disk_budget")},
        "verified": verified,
    }


def _print(f: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(f)
        return
    con = stdout()
    d, o = f["dataset"], f["origin"]
    con.print(f"\n[bold]cachefs demo[/bold]: {d['files']} files, {format_size(d['bytes'])}, origin {o['url']} "
              f"({o['kind']})")
    rows = [("the origin, read directly (every epoch without a cache)", f"{o['read_gbps']:.2f} GB/s",
             f"{o['read_seconds']:.2f} s"),
            ("cold: warm-up, from the origin once", f"{f['warm']['gbps']:.2f} GB/s", f"{f['warm']['seconds']:.2f} s")]
    rows += [(f"warm read {r['round']}: from the cache, batched", f"{r['gbps']:.2f} GB/s", f"{r['seconds']:.2f} s")
             for r in f["reads"]]
    table(None, ["pass", "throughput", "time"], rows)
    best = max(r["gbps"] for r in f["reads"])
    con.print(f"warm reads: {best / max(o['read_gbps'], 1e-9):.1f}x the origin's speed; origin bytes during "
              f"them: {format_size(f['origin_bytes_during_reads'])} (hit ratio {100 * f['hit_ratio']:.1f}%)")
    table("each node's share", ["node", "cached", "share"],
          [(n["id"], format_size(n["cached_bytes"]), f"{100 * n['share']:.1f}%") for n in f["nodes"]])
    p, c = f["per_node_copies"], f["cachefs"]
    table(f"one copy per node ({p['nodes']} nodes) against cachefs's one copy", ["", "a copy per node", "cachefs"], [
        ("memory or disk held", f"{p['nodes']} x {format_size(d['bytes'])} = {format_size(p['memory_bytes'])}",
         format_size(c["memory_bytes"])),
        ("read from the origin", format_size(p["origin_bytes"]), format_size(c["origin_bytes"])),
        ("largest dataset it can hold", f"one node's: {format_size(c['node_budget_bytes'])}",
         f"the cluster's: {format_size(c['cluster_budget_bytes'])}"),
    ])
    con.print("bytes match the origin" if f["verified"] else "[red]bytes differ from the origin[/red]")
