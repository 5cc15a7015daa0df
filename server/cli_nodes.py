"""`cachefs node ls` and `cachefs node drain`: the cache nodes, and taking one out gently.

A drain takes the node off the ring while it keeps serving; the other nodes pull its
blocks, then it stops (server/coordinator.py, server/drain.py). The chart's preStop hook
runs `cachefs node drain --here`: the node on this machine (its URL's host is one of
this machine's addresses, or $POD_IP) drains before Kubernetes stops the pod.
"""

from __future__ import annotations

import argparse
import os
import socket

from cachefs.admin import AdminClient
from cachefs.common.errors import BadRequest
from cachefs.common.settings import format_size
from cachefs.cli.output import add_client_flags, add_json_flag, follow, print_json, run_admin, stdout, table


def register(sub: argparse._SubParsersAction) -> None:
    nodes = sub.add_parser("node", help="list cache nodes, drain one before it goes away",
                           description="The cache nodes of the cluster and their state.")
    nsub = nodes.add_subparsers(dest="node_command", required=True, metavar="SUBCOMMAND")
    p = nsub.add_parser("ls", help="list cache nodes", description="List the cache nodes: serving or draining, "
                        "weight on the ring, bytes cached, and the progress of their last rebalance.")
    _common(p)
    p.set_defaults(func=cmd_ls)
    p = nsub.add_parser("drain", help="hand a node's blocks to the others, then stop it",
                        description="The node leaves the ring but keeps serving while the other nodes copy the "
                        "blocks they now own from it; then it stops. Readers never fail: what has not moved by "
                        "the deadline is read from the origin later. Shows progress; Ctrl-C cancels (the node "
                        "goes back on the ring). Exits non-zero if the drain did not complete.")
    p.add_argument("node_id", nargs="?", help="the node's id (`cachefs node ls`)")
    p.add_argument("--here", action="store_true",
                   help="drain the node(s) running on this machine (their URL's host is this machine's, or $POD_IP), "
                   "through Ray rather than the admin API: what the Helm chart's preStop hook runs on a worker")
    p.add_argument("--address", default="",
                   help="with --here: the Ray cluster's address (default: RAY_ADDRESS, else $FQ_RAY_IP:6379 as "
                   "KubeRay sets it in worker pods)")
    p.add_argument("--namespace", default="cachefs", help="with --here: the cachefs Ray namespace (default cachefs)")
    p.add_argument("--deadline", type=float, default=60.0,
                   help="seconds the others get to copy the blocks before the node stops anyway (default 60)")
    _common(p)
    p.set_defaults(func=cmd_drain)


def _common(p: argparse.ArgumentParser) -> None:
    add_client_flags(p)
    add_json_flag(p)


def cmd_ls(args: argparse.Namespace) -> int:
    nodes = run_admin(args, lambda a: a.call("list_nodes"))
    if args.json:
        print_json(nodes)
        return 0
    rows = []
    for n in nodes:
        r = n.get("rebalance") or {}
        moving = (f"{r.get('state')} @{r.get('epoch')}: {r.get('moved', 0)}/{r.get('units', 0)} units"
                  if r.get("state") not in (None, "idle") else "-")
        rows.append((n["id"], n["state"], n["url"], f"{n['weight']:g}", format_size(n["cached_bytes"]), moving))
    table(None, ["id", "state", "url", "weight", "cached", "rebalance"], rows)
    return 0


def local_addresses() -> set[str]:
    """This machine's addresses as a node URL would name them."""
    names = {"127.0.0.1", "localhost", socket.gethostname()}
    if os.environ.get("POD_IP"):
        names.add(os.environ["POD_IP"])
    try:
        names.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return names


def drain_here(args: argparse.Namespace) -> int:
    """The preStop path: over Ray, so that a worker needs no admin token."""
    import sys

    from server import hosting

    address = args.address or os.environ.get("RAY_ADDRESS") or (
        f"{os.environ['FQ_RAY_IP']}:6379" if os.environ.get("FQ_RAY_IP") else "")
    if not address:
        raise BadRequest("--here needs the Ray cluster's address: give --address, or set RAY_ADDRESS")
    reports = hosting.drain_here(address, args.namespace, args.deadline, local_addresses(),
                                 say=lambda s: print(s, file=sys.stderr) if not args.json else None)
    if args.json:
        print_json(reports)
    elif not reports:
        print("no serving cache node runs on this machine: nothing to drain")
    for op in reports:
        if not args.json:
            stdout().print(f"drain {op['dataset']}: [bold]{op['state']}[/bold] — {op['done_bytes']}/"
                           f"{op['total_bytes']} unit(s) handed over")
            if op.get("message"):
                stdout().print(f"  {op['message']}")
    return 0 if all(op["state"] == "succeeded" for op in reports) else 1


def cmd_drain(args: argparse.Namespace) -> int:
    if bool(args.node_id) == bool(args.here):
        raise BadRequest("name the node to drain (`cachefs node ls` lists them), or give --here: one of the two")
    if not 0 < args.deadline <= 86400:
        raise BadRequest(f"--deadline is seconds from 0 to 86400, not {args.deadline:g}")

    if args.here:
        return drain_here(args)

    async def go(admin: AdminClient) -> int:
        ids = [args.node_id]
        code = 0
        for node_id in ids:
            op = await admin.call("drain_node", node_id, {"deadline": args.deadline})
            op = await follow(admin, op, f"draining {node_id}", quiet=args.json)
            if args.json:
                print_json(op.to_json())
            else:
                stdout().print(f"drain {node_id}: [bold]{op.state}[/bold] — {op.done_bytes}/{op.total_bytes} "
                               f"unit(s) handed over in {max(op.finished - op.started, 0):.1f} s")
                if op.message:
                    stdout().print(f"  {op.message}")
            code = code or (0 if op.finished_ok else 1)
        return code

    return run_admin(args, go)
