"""`cachefs up`, `down`, `status`: the cache cluster's life cycle on Ray."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

from cachefs.common import extras
from cachefs.cli.output import add_client_flags, add_json_flag, print_json, run_admin, stderr, stdout, table
from server.config import ClusterConfig
from cachefs.common.settings import format_size, load


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start (or complete) the cache cluster on Ray",
                       description="Start the coordinator and the cache nodes on Ray. Idempotent: running it "
                       "again starts only what is missing. Without --address or RAY_ADDRESS it starts a local "
                       "Ray cluster. Records the endpoint, a reader token and an admin token in $CACHEFS_HOME/cluster.json "
                       "(0600).")
    p.add_argument("--nodes", type=int, help="cache nodes to run (0: one per Ray node; default 0)")
    p.add_argument("--memory", dest="memory_bytes", help="memory tier per node, e.g. 256MiB")
    p.add_argument("--disk", dest="disk_bytes", help="disk tier per node, e.g. 1GiB (0: memory only)")
    p.add_argument("--disk-root", help="where nodes keep their disk tier (default $CACHEFS_HOME/disk)")
    p.add_argument("--state-dir", help="where the coordinator keeps the registry (default $CACHEFS_HOME/state)")
    p.add_argument("--address", help="Ray cluster to join (default RAY_ADDRESS, else start a local one)")
    p.add_argument("--host", help="address cache nodes listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port of each cache node (default any free port)")
    p.add_argument("--block-size", help="block size, e.g. 8MiB")
    p.add_argument("--eviction", choices=["lru", "sticky"], help="eviction policy (sticky: stable set under shuffled epochs)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="PREFIX",
                   help="also allow origins under PREFIX, e.g. file:///data/ or s3://my-bucket/ (repeat; added to "
                   "the configured allowed_origins, which by default hold the object stores and http(s) but no "
                   "local paths)")
    p.add_argument("--allow-origin-host", action="append", default=[], metavar="HOST",
                   help="let http(s) origins and endpoint URLs reach HOST (a name, IP or CIDR) although it is a "
                   "loopback, link-local or metadata address (repeat)")
    p.add_argument("--watch", action="store_true", help="keep running, placing a cache node on every new Ray node")
    add_json_flag(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the cache cluster (datasets stay registered)",
                       description="Stop the cache nodes and the coordinator, and the local Ray cluster if "
                       "`up` started it. The dataset registry is kept on disk for the next `up`.")
    add_json_flag(p)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="nodes, budgets, datasets and what is cached",
                       description="Show the ring epoch, every cache node with its memory and disk use, and "
                       "every dataset with the bytes cached.")
    add_client_flags(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_status)


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    keys = ("nodes", "memory_bytes", "disk_bytes", "disk_root", "state_dir", "address", "host", "port",
            "block_size", "eviction")
    config = load(ClusterConfig, {k: getattr(args, k, None) for k in keys})
    # The flags add to the configured lists: `--allow-origin file:///data/` keeps s3:// allowed.
    return dataclasses.replace(
        config,
        allowed_origins=tuple(dict.fromkeys(config.allowed_origins + tuple(getattr(args, "allow_origin", ())))),
        allowed_origin_hosts=tuple(dict.fromkeys(config.allowed_origin_hosts
                                                 + tuple(getattr(args, "allow_origin_host", ())))))


def cmd_up(args: argparse.Namespace) -> int:
    extras.require("server", "up")
    from server import hosting

    config = cluster_config(args)
    say = (lambda s: None) if args.json else (lambda s: stderr().print(f"[dim]{s}…[/dim]"))
    handle = hosting.up(config, os.environ, say=say)
    if args.json:
        doc = handle.to_json()
        doc.pop("token")
        doc.pop("admin_token")
        print_json(doc)
    else:
        stdout().print(f"cachefs is up: {len(handle.endpoints)} cache node(s), endpoint {handle.endpoint}\n"
                       "next: cachefs dataset add NAME URL, then cachefs warm NAME")
    if args.watch:
        hosting.watch(config, os.environ)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    extras.require("server", "down")
    from server import hosting

    say = (lambda s: None) if args.json else (lambda s: stderr().print(f"[dim]{s}…[/dim]"))
    stopped = hosting.down(os.environ, say=say)
    if args.json:
        print_json({"stopped": stopped})
    else:
        stdout().print("cachefs is down" if stopped else "nothing was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    doc: dict[str, Any] = run_admin(args, lambda a: a.status())
    if args.json:
        print_json(doc)
        return 0
    table(f"cache nodes (ring epoch {doc['epoch']})", ["node", "url", "memory", "disk", "blocks"], [
        (n["id"], n["url"], f"{format_size(n['memory_used'])} / {format_size(n['memory_budget'])}",
         f"{format_size(n['disk_used'])} / {format_size(n['disk_budget'])}", n["memory_blocks"] + n["disk_blocks"])
        for n in doc["nodes"]])
    table("datasets", ["name", "origin", "files", "size", "cached", "snapshot", "last refresh"], [
        (d["name"], d["origin"], d["files"], format_size(d["bytes"]),
         f"{100 * d['cached_bytes'] / max(d['bytes'] * d['replicas'], 1):.0f}%", d["snapshot"],
         _last_refresh(d.get("last_refresh")))
        for d in doc["datasets"]])
    return 0


def _last_refresh(last: dict | None) -> str:
    """'succeeded (interval, changed) 12:00:03' and the like; '-' when none yet."""
    if not last:
        return "-"
    when = time.strftime("%H:%M:%S", time.localtime(last["time"])) if last.get("time") else ""
    changed = ", changed" if last.get("changed") else ""
    return f"{last['state']} ({last['trigger']}{changed}) {when}".strip()
