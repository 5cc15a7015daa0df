"""`cachefs status`: nodes, budgets, datasets and what is cached (the admin API)."""

from __future__ import annotations

import argparse
from typing import Any

from cachefs.cli.output import add_client_flags, add_json_flag, print_json, run_admin, table
from cachefs.common.settings import format_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="nodes, budgets, datasets and what is cached",
                       description="Show the ring epoch, every cache node with its memory and disk use, and "
                       "every dataset with the bytes cached.")
    add_client_flags(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    doc: dict[str, Any] = run_admin(args, lambda a: a.status())
    if args.json:
        print_json(doc)
        return 0
    table(f"cache nodes (ring epoch {doc['epoch']})", ["node", "url", "memory", "disk", "blocks"], [
        (n["id"], n["url"], f"{format_size(n['memory_used'])} / {format_size(n['memory_budget'])}",
         f"{format_size(n['disk_used'])} / {format_size(n['disk_budget'])}", n["memory_blocks"] + n["disk_blocks"])
        for n in doc["nodes"]])
    table("datasets", ["name", "origin", "files", "size", "cached", "snapshot"], [
        (d["name"], d["origin"], d["files"], format_size(d["bytes"]),
         f"{100 * d['cached_bytes'] / max(d['bytes'] * d['replicas'], 1):.0f}%", d["snapshot"])
        for d in doc["datasets"]])
    return 0
