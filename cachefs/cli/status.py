"""`cachefs status`: nodes, budgets, datasets and what is cached (the admin API)."""

from __future__ import annotations

import argparse
import time
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
    table(f"cache nodes (ring epoch {doc['epoch']})", ["node", "state", "url", "memory", "disk", "blocks",
                                                          "rebalance"], [
        (n["id"], n.get("state", "serving"), n["url"],
         f"{format_size(n['memory_used'])} / {format_size(n['memory_budget'])}",
         f"{format_size(n['disk_used'])} / {format_size(n['disk_budget'])}", n["memory_blocks"] + n["disk_blocks"],
         _rebalance(n.get("rebalance")))
        for n in doc["nodes"]])
    table("datasets", ["name", "origin", "files", "size", "cached", "snapshot", "last refresh"], [
        (d["name"], d["origin"], d["files"], format_size(d["bytes"]),
         f"{100 * d['cached_bytes'] / max(d['bytes'] * d['replicas'], 1):.0f}%", d["snapshot"],
         _last_refresh(d.get("last_refresh")))
        for d in doc["datasets"]])
    if doc.get("problem"):
        print(f"problem: {doc['problem']}")
    return 0


def _rebalance(progress: dict | None) -> str:
    """'done', or 'running 12/40 units' and the like; '-' when the node never moved any."""
    if not progress or progress.get("state", "idle") == "idle":
        return "-"
    units = f" {progress.get('moved', 0)}/{progress.get('units', 0)} units" if progress.get("units") else ""
    return f"{progress['state']}{units}"


def _last_refresh(last: dict | None) -> str:
    """'succeeded (interval, changed) 12:00:03' and the like; '-' when none yet."""
    if not last:
        return "-"
    when = time.strftime("%H:%M:%S", time.localtime(last["time"])) if last.get("time") else ""
    changed = ", changed" if last.get("changed") else ""
    return f"{last['state']} ({last['trigger']}{changed}) {when}".strip()
