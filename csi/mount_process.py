"""Entry point of one mount: `python -m csi.mount_process --source URL --target DIR`.

Each mount is its own process, started detached (new session) by csi.mounter, so that
restarting the CSI plugin or the CLI never takes a mounted volume down with it. It lists
the snapshot once, then serves FUSE until unmounted (`fusermount3 -u`) or sent SIGTERM;
either way libfuse unmounts and the process exits 0.

The source is an fsspec URL: `cachefs://DATASET` in production; the client finds its
endpoint and token in CACHEFS_ENDPOINT / CACHEFS_TOKEN (never on the command line,
where `ps` would show the token). Logs go to stderr, which the starter sends to a file.

Exit codes: 0 unmounted cleanly, 2 bad arguments or unknown dataset, 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

from csi.config import MountConfig

log = logging.getLogger("cachefs.mount")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m csi.mount_process",
                                description="Serve one read-only cachefs FUSE mount.")
    p.add_argument("--source", required=True, help="fsspec URL of the snapshot, e.g. cachefs://imagenet")
    p.add_argument("--target", required=True, help="existing empty directory to mount on")
    p.add_argument("--fsname", default="", help="name shown in /proc/mounts (default: the source)")
    p.add_argument("--mtime", type=float, default=0.0,
                   help="modification time to show for every entry (the snapshot's creation time)")
    defaults = MountConfig()
    p.add_argument("--attr-timeout", type=float, default=defaults.attr_timeout)
    p.add_argument("--op-timeout", type=float, default=defaults.op_timeout)
    p.add_argument("--max-read-bytes", type=int, default=defaults.max_read_bytes)
    p.add_argument("--readahead-bytes", type=int, default=defaults.readahead_bytes)
    p.add_argument("--fuse-threads", type=int, default=defaults.fuse_threads)
    return p


def config_args(config: MountConfig) -> list[str]:
    """The flags that carry `config` to a mount process (the inverse of `build_parser`)."""
    return [
        "--attr-timeout", str(config.attr_timeout),
        "--op-timeout", str(config.op_timeout),
        "--max-read-bytes", str(config.max_read_bytes),
        "--readahead-bytes", str(config.readahead_bytes),
        "--fuse-threads", str(config.fuse_threads),
    ]


def _set_readahead(target: str, readahead_bytes: int, deadline: float) -> None:
    """Raise the kernel readahead of the mount's backing device once it is mounted.

    Runs beside the FUSE loop: the mount only exists after fuse_main has mounted it.
    Best effort: needs root (sysfs), and a failure only costs throughput.
    """
    from csi.mounter import find_mount

    while time.monotonic() < deadline:
        entry = find_mount(target)
        if entry is not None:
            path = f"/sys/class/bdi/{entry.device}/read_ahead_kb"
            try:
                with open(path, "w") as f:
                    f.write(str(max(readahead_bytes // 1024, 4)))
                log.info("readahead of %s set to %d KiB", entry.device, readahead_bytes // 1024)
            except OSError as e:
                log.info("could not set readahead (%s): %s", path, e)
            return
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("CACHEFS_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cachefs.errors import CachefsError

    try:
        config = MountConfig(attr_timeout=args.attr_timeout, op_timeout=args.op_timeout,
                             max_read_bytes=args.max_read_bytes, readahead_bytes=args.readahead_bytes,
                             fuse_threads=args.fuse_threads)
    except CachefsError as e:
        log.error("bad mount options: %s", e)
        return EXIT_BAD_INPUT

    import fsspec

    from csi.fusefs import DatasetOperations, serve
    from csi.tree import SnapshotTree

    target = os.path.abspath(args.target)
    try:
        fs, root = fsspec.core.url_to_fs(args.source)
        started = time.monotonic()
        tree = SnapshotTree.from_fs(fs, root)
    except FileNotFoundError as e:
        log.error("cannot mount %s: not found: %s", args.source, e)
        return EXIT_BAD_INPUT
    except (OSError, ValueError) as e:
        log.error("cannot list %s: %s: %s", args.source, type(e).__name__, e)
        return EXIT_FAILED
    log.info("listed %s: %d files, %d bytes in %.2f s; mounting on %s",
             args.source, tree.files, tree.bytes, time.monotonic() - started, target)

    ops = DatasetOperations(fs, root, tree, config, mtime=args.mtime or None)
    if config.readahead_bytes:
        threading.Thread(target=_set_readahead, args=(target, config.readahead_bytes, time.monotonic() + 30),
                         daemon=True, name="readahead").start()
    try:
        serve(ops, target, fsname=args.fsname or args.source)
    except RuntimeError as e:  # mfusepy: fuse_main failed (bad mountpoint, no /dev/fuse, ...)
        log.error("FUSE mount on %s failed: %s (is the target an existing directory, and /dev/fuse usable?)", target, e)
        return EXIT_FAILED
    log.info("unmounted %s", target)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
