"""The `cachefs` command: one argparse tree, each command group registered by its owner.

A command group lives with the part it drives (the client's here, `up`/`down` and the demo
in server/, `csi`/`mount` in csi/, `operator` in server/k8s/) and names itself in the
`cachefs.commands` entry-point group of pyproject.toml as `NAME = "module:register"`.
`register(subparsers)` adds its parsers and sets `func=handler` on each; handlers return
an exit code. A group's module imports nothing heavy: a handler whose extra is missing says
which to install (cachefs/common/extras.py). Errors of ours are printed as one line (what
was wrong, what to do), never as a traceback.

Adding a group is one line in pyproject.toml; HELP_ORDER only says where it shows in
`cachefs --help` (groups it does not name come last, by name).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
import tomllib
from pathlib import Path
from typing import Callable

from cachefs.common.errors import CachefsError

GROUP = "cachefs.commands"
HELP_ORDER = ("cluster", "status", "dataset", "files", "node", "demo", "csi", "operator")


def command_groups() -> dict[str, str]:
    """Group name → "module:register". From the pyproject.toml beside the code when it runs
    from a source tree (what the code is, even under an older editable install's metadata),
    else from the installed package's entry points."""
    source = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if source.is_file():
        with open(source, "rb") as f:
            table = tomllib.load(f).get("project", {}).get("entry-points", {}).get(GROUP)
        if table:
            return dict(table)
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=GROUP)}


def _ordered(groups: dict[str, str]) -> list[tuple[str, str]]:
    rank = {name: i for i, name in enumerate(HELP_ORDER)}
    return sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def load_register(target: str) -> Callable[[argparse._SubParsersAction], None]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr or "register")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachefs",
        description="A distributed dataset cache for ML training. "
        "Start with `cachefs demo`, or `cachefs up` then `cachefs dataset add`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _, target in _ordered(command_groups()):
        try:
            register = load_register(target)
        except ModuleNotFoundError as e:
            if e.name and target.startswith(e.name):
                continue  # that command group is not part of this build
            raise
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CachefsError as e:
        print(f"cachefs {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cachefs {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
