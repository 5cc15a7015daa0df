"""`cachefs ls`, `cat`, `get`: read datasets through the same client training jobs use."""

from __future__ import annotations

import argparse
import sys

from cachefs.cli.output import add_client_flags, add_json_flag, client_config, print_json, table
from cachefs.common.settings import format_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list a dataset directory", description="List DATASET[/path] from the manifest.")
    p.add_argument("path", nargs="?", default="", help="DATASET/path (empty: the datasets)")
    add_client_flags(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("cat", help="write a file's bytes to stdout", description="Print DATASET/path to stdout.")
    p.add_argument("path")
    p.add_argument("--range", help="bytes START-END (END exclusive)")
    add_client_flags(p)
    p.set_defaults(func=cmd_cat)

    p = sub.add_parser("get", help="copy files to local disk", description="Copy DATASET/path (a file, or with -r "
                       "a directory) to LOCAL.")
    p.add_argument("path")
    p.add_argument("local")
    p.add_argument("-r", "--recursive", action="store_true")
    add_client_flags(p)
    p.set_defaults(func=cmd_get)


def _fs(args: argparse.Namespace):  # -> CachefsFileSystem
    from cachefs.filesystem import CachefsFileSystem

    c = client_config(args)
    return CachefsFileSystem(endpoint=c.endpoint, token=c.token, skip_instance_cache=True)


def cmd_ls(args: argparse.Namespace) -> int:
    entries = _fs(args).ls(args.path, detail=True)
    if args.json:
        print_json(entries)
    else:
        table(None, ["name", "type", "size"], [(e["name"], e["type"], format_size(e["size"])) for e in entries])
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    start = end = None
    if args.range:
        try:
            a, b = args.range.split("-")
            start, end = int(a), int(b)
        except ValueError:
            print("cachefs cat: error: --range takes START-END, e.g. 0-1024", file=sys.stderr)
            return 2
    sys.stdout.buffer.write(_fs(args).cat_file(args.path, start, end))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    _fs(args).get(args.path, args.local, recursive=args.recursive)
    return 0
