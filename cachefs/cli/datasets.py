"""`cachefs dataset add|update|ls|rm|refresh` and `cachefs warm`."""

from __future__ import annotations

import argparse
import json

from cachefs.admin import AdminClient
from cachefs.cli.output import add_client_flags, add_json_flag, follow, print_json, report, run_admin, table
from cachefs.common.settings import format_size, parse_size
from cachefs.common.errors import BadRequest


def register(sub: argparse._SubParsersAction) -> None:
    ds = sub.add_parser("dataset", help="register, list, refresh and remove datasets",
                        description="Datasets bind a name to an origin prefix, pinned to a snapshot.")
    dsub = ds.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")

    p = dsub.add_parser("add", help="register a dataset (lists the origin once)",
                        description="Register NAME for the files under ORIGIN (any fsspec URL: s3://, gs://, "
                        "file://, ...). The cluster lists the origin once and pins that listing as a snapshot.")
    p.add_argument("name", help="lowercase letters, digits, '.', '_', '-'")
    p.add_argument("origin", help="e.g. s3://bucket/prefix or file:///data/set")
    p.add_argument("--storage-options", default="{}", help="JSON object passed to the origin's fsspec filesystem")
    p.add_argument("--replicas", type=int, default=1, help="copies of each block (default 1)")
    p.add_argument("--allow-namespace", action="append", default=[], dest="allowed_namespaces",
                   help="Kubernetes namespace allowed to mount it as a volume (repeat; '*' for every "
                   "namespace; default: none, so the CSI plugin mounts it nowhere)")
    p.add_argument("--pack-threshold", help="files below this size share 8 MiB packs (e.g. 1MiB; 0: no packing; "
                   "default: 1 MiB, or a quarter block)")
    _refresh_flags(p)
    _common(p)
    p.set_defaults(func=cmd_add)

    p = dsub.add_parser("update", help="change replicas, namespaces or storage options in place",
                        description="Change settings of NAME without a new snapshot: every cached block is kept. "
                        "The origin and the packing are fixed at registration (remove and add to change them).")
    p.add_argument("name")
    p.add_argument("--storage-options", help="JSON object: the new storage options (replace the old ones)")
    p.add_argument("--replicas", type=int, help="copies of each block")
    p.add_argument("--allow-namespace", action="append", dest="allowed_namespaces",
                   help="the namespaces allowed to mount it (repeat; replaces the list; '*' for every namespace)")
    p.add_argument("--no-namespaces", action="store_true", help="allow no namespace (the CSI plugin mounts it nowhere)")
    p.add_argument("--lease", type=float, help="seconds a replaced snapshot stays readable for the readers that "
                   "loaded it (default: a day)")
    _refresh_flags(p)
    p.add_argument("--refresh-manual", action="store_true", help="no refresh policy: refresh only when asked")
    _common(p)
    p.set_defaults(func=cmd_update)

    p = dsub.add_parser("ls", help="list datasets", description="List registered datasets.")
    _common(p)
    p.set_defaults(func=cmd_ls)

    p = dsub.add_parser("rm", help="remove a dataset and drop its cached blocks",
                        description="Remove NAME from the registry; every node drops its blocks. The origin is untouched.")
    p.add_argument("name")
    _common(p)
    p.set_defaults(func=cmd_rm)

    p = dsub.add_parser("refresh", help="take a new snapshot of the origin",
                        description="List the origin again. If anything changed, new readers get the new snapshot; "
                        "readers that hold the old one keep reading it while their lease lasts (see "
                        "`dataset update --lease`). Files that did not change keep their cached bytes.")
    p.add_argument("name")
    p.add_argument("--warm", action="store_true",
                   help="warm the new snapshot first and make it current only once it is cached (until then, "
                   "and if warming fails, readers get the current one)")
    _common(p)
    p.set_defaults(func=cmd_refresh)

    p = sub.add_parser("warm", help="load a dataset into the cache, on every node in parallel",
                       description="Every cache node fetches the blocks it owns from the origin. Shows progress; "
                       "Ctrl-C cancels. Exits non-zero if any file failed.")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, help="give up (and cancel) after this many seconds")
    _common(p)
    p.set_defaults(func=cmd_warm)


def _refresh_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("refresh policy", "when the cluster refreshes the dataset by itself (default: never)")
    g.add_argument("--refresh-interval", type=float, metavar="SECONDS",
                   help="refresh every SECONDS (with --refresh-on-change: check the origin that often)")
    g.add_argument("--refresh-on-change", action="store_true",
                   help="list the origin every interval (default 60 s) and refresh only when its files changed")
    g.add_argument("--refresh-warm", action="store_true", help="warm each new snapshot before it becomes current")


def _policy(args: argparse.Namespace) -> dict | None:
    """The `refresh` setting the flags ask for; None when they ask nothing."""
    if getattr(args, "refresh_manual", False):
        if args.refresh_interval or args.refresh_on_change or args.refresh_warm:
            raise BadRequest("--refresh-manual contradicts the other --refresh-* flags: give one or the other")
        return {}
    if args.refresh_interval is None and not args.refresh_on_change and not args.refresh_warm:
        return None
    return {"interval": args.refresh_interval or 0, "on_change": args.refresh_on_change, "warm": args.refresh_warm}


def _common(p: argparse.ArgumentParser) -> None:
    add_client_flags(p)
    add_json_flag(p)


def _options(text: str) -> dict:
    try:
        options = json.loads(text)
    except ValueError as e:
        raise BadRequest(f"--storage-options is not JSON: {e}") from e
    if not isinstance(options, dict):
        raise BadRequest('--storage-options must be a JSON object, like \'{"anon": true}\'')
    return options


def cmd_add(args: argparse.Namespace) -> int:
    options = _options(args.storage_options)
    threshold = parse_size(args.pack_threshold) if args.pack_threshold is not None else None

    async def go(admin: AdminClient) -> int:
        op = await admin.add_dataset(args.name, args.origin, options, args.replicas, args.allowed_namespaces,
                                     threshold, refresh=_policy(args))
        op = await follow(admin, op, f"listing {args.origin}", quiet=args.json)
        return report(op, args.json)

    return run_admin(args, go)


def cmd_update(args: argparse.Namespace) -> int:
    if args.no_namespaces and args.allowed_namespaces:
        raise BadRequest("--no-namespaces and --allow-namespace contradict each other: give one")
    namespaces = [] if args.no_namespaces else args.allowed_namespaces
    options = _options(args.storage_options) if args.storage_options is not None else None
    policy = _policy(args)
    if args.replicas is None and namespaces is None and options is None and args.lease is None and policy is None:
        raise BadRequest("nothing to update: give --replicas, --allow-namespace, --no-namespaces, --storage-options, "
                         "--lease or a --refresh-* flag")
    info = run_admin(args, lambda a: a.update_dataset(args.name, replicas=args.replicas, allowed_namespaces=namespaces,
                                                      storage_options=options, lease=args.lease, refresh=policy))
    if args.json:
        print_json(info.to_json())
    else:
        print(f"updated {info.name}: replicas {info.replicas}, allowed namespaces "
              f"{list(info.allowed_namespaces) or 'none'}, lease {info.lease:g} s, refresh "
              f"{info.refresh or 'manual'} (snapshot {info.snapshot} kept)")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    infos = run_admin(args, lambda a: a.list_datasets())
    if args.json:
        print_json([i.to_json() for i in infos])
    else:
        table(None, ["name", "origin", "files", "size", "replicas", "snapshot"],
              [(i.name, i.origin, i.files, format_size(i.bytes), i.replicas, i.snapshot) for i in infos])
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    run_admin(args, lambda a: a.remove_dataset(args.name))
    if args.json:
        print_json({"removed": args.name})
    else:
        print(f"removed {args.name}")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    async def go(admin: AdminClient) -> int:
        op = await follow(admin, await admin.refresh_dataset(args.name, warm=args.warm),
                          f"refreshing {args.name}", quiet=args.json)
        return report(op, args.json)

    return run_admin(args, go)


def cmd_warm(args: argparse.Namespace) -> int:
    async def go(admin: AdminClient) -> int:
        op = await follow(admin, await admin.warm_dataset(args.name), f"warming {args.name}", quiet=args.json,
                          timeout=args.timeout)
        return report(op, args.json)

    return run_admin(args, go)
