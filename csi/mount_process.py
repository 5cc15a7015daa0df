"""Entry point of one mount: `python -m csi.mount_process --source URL --target DIR`.

Each mount is its own process, started detached (new session) by csi.mounter, so that
restarting the CSI plugin or the CLI never takes a mounted volume down with it. It lists
the snapshot once, mounts, and holds the FUSE session while forked serving processes
(one per core by default, `--serving-processes`) answer it, each on its own clone of the
session; one that dies is replaced under the readers' feet (csi/fuse/workers.py). It
runs until unmounted (`fusermount3 -u`) or sent SIGTERM (or SIGINT); either way the
mount is gone afterwards and the process exits 0.

In each serving process one asyncio loop does everything: csi.fuse reads FUSE requests
on it and the cachefs client (created `asynchronous=True` on it) fetches bytes on it, so
a request is answered without handing anything to another thread (csi/serving.py).

With `--keeper SOCKET` the session and every clone are handed to the keeper
(csi/keeper.py) once mounted, and again to a keeper that lost them; a mount process the
keeper starts with `--resume` takes them back instead of mounting, lists the same
snapshot (pinned) and serves on: the mount outlives its mount process.

The source is an fsspec URL: `cachefs://DATASET` in production; the client finds its
endpoint and token in CACHEFS_ENDPOINT / CACHEFS_TOKEN (never on the command line,
where `ps` would show the token). Logs go to stderr, which the starter sends to a file.

Exit codes: 0 unmounted cleanly, 2 bad arguments or unknown dataset, 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
from typing import Any

from csi import keeping
from csi.config import MountConfig
from csi.serving import MAX_BACKGROUND

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
    p.add_argument("--mount-with", choices=("auto", "mount", "fusermount3"), default="auto",
                   help="how to get the session: mount(2) (root), fusermount3 (anyone), auto: by uid")
    p.add_argument("--keeper", default="",
                   help="unix socket of `cachefs csi keeper`: hand it the session, so the mount outlives this process")
    p.add_argument("--resume", action="store_true",
                   help="take the session of --target back from the keeper instead of mounting (the keeper "
                        "starts a mount process so when the last one died)")
    defaults = MountConfig()
    p.add_argument("--attr-timeout", type=float, default=defaults.attr_timeout)
    p.add_argument("--op-timeout", type=float, default=defaults.op_timeout)
    p.add_argument("--readahead-bytes", type=int, default=defaults.readahead_bytes)
    p.add_argument("--cache-bytes", type=int, default=defaults.cache_bytes)
    p.add_argument("--readahead-chunks", type=int, default=defaults.readahead_chunks)
    p.add_argument("--serving-processes", type=int, default=defaults.serving_processes)
    p.add_argument("--batch-files", type=int, default=defaults.batch_files)
    p.add_argument("--batch-bytes", type=int, default=defaults.batch_bytes)
    return p


def config_args(config: MountConfig) -> list[str]:
    """The flags that carry `config` to a mount process (the inverse of `build_parser`)."""
    return [
        "--attr-timeout", str(config.attr_timeout),
        "--op-timeout", str(config.op_timeout),
        "--readahead-bytes", str(config.readahead_bytes),
        "--cache-bytes", str(config.cache_bytes),
        "--readahead-chunks", str(config.readahead_chunks),
        "--serving-processes", str(config.serving_processes),
        "--batch-files", str(config.batch_files),
        "--batch-bytes", str(config.batch_bytes),
    ]


def tune_kernel(target: str, readahead_bytes: int) -> None:
    """Raise the mount's readahead and requests in flight, once the kernel's INIT is answered
    (INIT would lower them again). Best effort: needs root (sysfs); a failure costs throughput."""
    from csi.mounts import find_mount

    entry = find_mount(target)
    if entry is None:
        return
    minor = entry.device.partition(":")[2]  # a FUSE connection is named by its device number
    settings = [(f"/sys/fs/fuse/connections/{minor}/max_background", MAX_BACKGROUND),
                (f"/sys/fs/fuse/connections/{minor}/congestion_threshold", MAX_BACKGROUND * 3 // 4)]
    if readahead_bytes:
        settings.append((f"/sys/class/bdi/{entry.device}/read_ahead_kb", max(readahead_bytes // 1024, 4)))
    for path, value in settings:
        try:
            with open(path, "w") as f:
                f.write(str(value))
            log.info("%s = %d", path, value)
        except OSError as e:
            log.info("could not set %s: %s", path, e)


def keep_freed_memory(cache_bytes: int) -> None:
    """Let glibc reuse freed chunks instead of returning them to the kernel.

    Chunks are block-sized (8 MiB) `bytes`; by default glibc maps each one fresh and unmaps
    it when freed, so every chunk costs a page fault per 4 KiB (~280 per MiB read, a third
    of the mount's CPU on a stream). Below a fixed mmap threshold and with a trim threshold
    above the cache budget, a freed chunk's memory is simply reused. Best effort: glibc only.
    """
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = min(2 * cache_bytes, 2**31 - 1)  # mallopt takes a C int
        ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) and libc.mallopt(m_trim_threshold, trim)
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.info("could not tune malloc (not glibc?): chunks will cost page faults")


def run_mount(args: argparse.Namespace, config: MountConfig, argv: list[str]) -> int:
    """List, mount (or take the session back from the keeper), serve until unmounted or
    signalled; the exit code."""
    from csi.fuse import session, workers
    from csi.serving import list_snapshot, serve_snapshot

    target = os.path.abspath(args.target)
    started = time.monotonic()
    taken: tuple[int, list[int], dict[str, str]] | None = None
    if args.resume:
        try:
            taken = keeping.take(args.keeper, target)
        except keeping.KeeperError as e:
            log.error("cannot resume %s: %s", target, e)
            return EXIT_FAILED
    try:
        snapshot = asyncio.run(list_snapshot(args.source, config.op_timeout, taken[2] if taken else None))
    except FileNotFoundError as e:
        log.error("cannot mount %s: not found: %s", args.source, e)
        return EXIT_BAD_INPUT
    except (OSError, ValueError) as e:  # TimeoutError is an OSError
        log.error("cannot list %s: %s: %s", args.source, type(e).__name__, e)
        return EXIT_FAILED
    count = len(taken[1]) if taken else workers.default_count(config.serving_processes)
    cache_bytes = max(config.cache_bytes // count, 16 * 2**20)  # the budget is the mount's, not each process's
    log.info("listed %s: %d files, %d bytes in %.2f s; %s %s (%d serving processes, chunks of %d KiB, "
             "cache %d MiB each)", args.source, snapshot.tree.files, snapshot.tree.bytes,
             time.monotonic() - started, "resuming the kept session of" if taken else "mounting on", target,
             count, snapshot.chunk // 1024, cache_bytes // 2**20)
    if taken:
        fd, clones = taken[0], taken[1]
    else:
        options = session.MountOptions(fsname=args.fsname or args.source, allow_other=os.geteuid() == 0)
        try:
            fd = session.mount(target, options, args.mount_with)
            clones = [session.clone(fd) for _ in range(count)]
        except session.SessionError as e:
            log.error("FUSE mount on %s failed: %s", target, e)
            return EXIT_FAILED
    held = keeping.Held(args.keeper, target, fd, clones, argv, snapshot.pins) if args.keeper else None
    if held is not None and not taken:
        held.hold()

    def after_init(_answer: Any) -> None:  # INIT is answered: tune what INIT would reset
        threading.Thread(target=tune_kernel, args=(target, config.readahead_bytes), daemon=True).start()

    def serve(clone: int) -> int:
        return asyncio.run(serve_snapshot(clone, snapshot, config, cache_bytes=cache_bytes,
                                          mtime=args.mtime or None, on_init=after_init))

    holder = workers.Holder(fd, count, serve, on_stop=lambda: session.unmount(target), clones=clones,
                            resume=taken is not None, tick=held.check if held is not None else None)
    try:
        code = holder.run()
    finally:
        os.close(fd)
    if args.keeper:
        keeping.drop(args.keeper, target)
    log.info("unmounted %s", target)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("CACHEFS_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cachefs.common.errors import CachefsError

    try:
        config = MountConfig(attr_timeout=args.attr_timeout, op_timeout=args.op_timeout,
                             readahead_bytes=args.readahead_bytes, cache_bytes=args.cache_bytes,
                             readahead_chunks=args.readahead_chunks,
                             serving_processes=args.serving_processes, batch_files=args.batch_files,
                             batch_bytes=args.batch_bytes)
    except CachefsError as e:
        log.error("bad mount options: %s", e)
        return EXIT_BAD_INPUT

    if args.resume and not args.keeper:
        log.error("--resume takes the session from the keeper: pass --keeper SOCKET too")
        return EXIT_BAD_INPUT
    keep_freed_memory(config.cache_bytes)
    return run_mount(args, config, keeping.own_argv(argv))


if __name__ == "__main__":
    sys.exit(main())
