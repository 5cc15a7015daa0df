"""`cachefs up`, `cachefs down`: the cache cluster's life cycle on Ray (the `server` extra).

Registered as a command group through the `cachefs.commands` entry points (pyproject.toml);
nothing heavy at import time, so `cachefs --help` stays fast on a client-only install and
`up` says which extra to install.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from cachefs.cli.output import add_json_flag, print_json, stderr, stdout
from cachefs.common import extras
from cachefs.common.settings import given, load
from server.config import ClusterConfig


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


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    keys = ("nodes", "memory_bytes", "disk_bytes", "disk_root", "state_dir", "address", "host", "port",
            "block_size", "eviction")
    config = load(ClusterConfig, {k: getattr(args, k, None) for k in keys})
    # The flags add to the configured lists: `--allow-origin file:///data/` keeps s3:// allowed.
    # What was given rides along: a field no flag, variable or file set stays the node's to
    # decide (its own CACHEFS_HOST: the chart's workers listen on their pod IP).
    return with_given(config, dataclasses.replace(
        config,
        allowed_origins=tuple(dict.fromkeys(config.allowed_origins + tuple(getattr(args, "allow_origin", ())))),
        allowed_origin_hosts=tuple(dict.fromkeys(config.allowed_origin_hosts
                                                 + tuple(getattr(args, "allow_origin_host", ()))))))


def with_given(source: ClusterConfig, copy: ClusterConfig) -> ClusterConfig:
    """`copy` remembering which fields of `source` were given (dataclasses.replace forgets)."""
    chosen = given(source)
    if chosen is not None:
        object.__setattr__(copy, "_given", chosen | {"allowed_origins", "allowed_origin_hosts"})
    return copy


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
