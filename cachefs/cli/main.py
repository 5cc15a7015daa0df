"""The `cachefs` command: one argparse tree, each command group in its own module.

A command module exposes `register(subparsers)`; it adds its parsers and sets
`func=handler` on each. Handlers return an exit code. Errors of ours are printed as one
line (what was wrong, what to do), never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cachefs.common.errors import CachefsError

# Order is the order of `cachefs --help`. csi and server.k8s build on the client; they
# are imported only here, at the command layer, so the library keeps its one-way deps.
COMMAND_MODULES = (
    "cachefs.cli.cluster",
    "cachefs.cli.datasets",
    "cachefs.cli.nodes",
    "cachefs.cli.files",
    "cachefs.cli.demo",
    "csi.cli",
    "server.k8s.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachefs",
        description="A distributed dataset cache for ML training. "
        "Start with `cachefs demo`, or `cachefs up` then `cachefs dataset add`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue  # that command group is not part of this build
            raise
        module.register(sub)
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
