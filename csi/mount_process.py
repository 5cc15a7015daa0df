"""Entry point of one mount: `python -m csi.mount_process --source URL --target DIR`.

Each mount is its own process, started detached (new session) by csi.mounter, so that
restarting the CSI plugin or the CLI never takes a mounted volume down with it. It lists
the snapshot once, then serves FUSE until unmounted (`fusermount3 -u`) or sent SIGTERM
(or SIGINT); either way the mount is gone afterwards and the process exits 0.

One asyncio loop does everything: csi.fuse reads FUSE requests on it and the cachefs
client (created `asynchronous=True` on it) fetches bytes on it, so a request is answered
without handing anything to another thread.

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
import signal
import sys
import time
from typing import Any

from csi.config import MountConfig

log = logging.getLogger("cachefs.mount")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_CHUNK = 8 * 1024 * 1024  # for a source that is not cachefs (no dataset block size to follow)
MAX_BACKGROUND = 64  # FUSE requests in flight at once (kernel default 12): readahead of many readers


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
    defaults = MountConfig()
    p.add_argument("--attr-timeout", type=float, default=defaults.attr_timeout)
    p.add_argument("--op-timeout", type=float, default=defaults.op_timeout)
    p.add_argument("--readahead-bytes", type=int, default=defaults.readahead_bytes)
    p.add_argument("--cache-bytes", type=int, default=defaults.cache_bytes)
    p.add_argument("--readahead-chunks", type=int, default=defaults.readahead_chunks)
    return p


def config_args(config: MountConfig) -> list[str]:
    """The flags that carry `config` to a mount process (the inverse of `build_parser`)."""
    return [
        "--attr-timeout", str(config.attr_timeout),
        "--op-timeout", str(config.op_timeout),
        "--readahead-bytes", str(config.readahead_bytes),
        "--cache-bytes", str(config.cache_bytes),
        "--readahead-chunks", str(config.readahead_chunks),
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


async def _open_snapshot(source: str, timeout: float) -> tuple[Any, str, Any, int]:
    """(async fs on this loop, root, tree, chunk size): the snapshot listed once."""
    import fsspec

    from csi.reader import within
    from csi.tree import SnapshotTree

    options: dict[str, Any] = {}
    if source.startswith("cachefs://") and "CACHEFS_IO_THREADS" not in os.environ:
        # The client receives on this loop too: extra receive loops in threads would bring
        # back the thread hand-off per fetch that one loop is for (2x the CPU per small file).
        options["io_threads"] = 0
    fs, root = fsspec.core.url_to_fs(source, asynchronous=True, loop=asyncio.get_running_loop(),
                                     skip_instance_cache=True, **options)
    try:
        info = await within(fs._info(root), timeout)  # an unknown dataset raises FileNotFoundError here
        if info.get("type") != "directory":
            raise NotADirectoryError(f"{source} is not a directory")
        found = await within(fs._find(root, withdirs=True, detail=True), timeout)
        tree = SnapshotTree.from_find(found, fs._strip_protocol(root))
        chunk = DEFAULT_CHUNK
        if hasattr(fs, "_dataset_info"):  # cachefs: chunks follow the dataset's blocks
            chunk = (await within(fs._dataset_info(root.partition("/")[0]), timeout)).block_size
    except BaseException:
        await _close(fs)
        raise
    return fs, root.rstrip("/"), tree, chunk


async def _close(fs: Any) -> None:
    if hasattr(fs, "_close"):  # cachefs: its HTTP sessions
        await fs._close()


async def serve_mount(args: argparse.Namespace, config: MountConfig) -> int:
    """List, mount, serve until unmounted or signalled; the exit code."""
    from csi.chunkcache import ChunkCache
    from csi.fuse import session
    from csi.fuse.dispatch import Dispatcher, writer
    from csi.fuseloop import serve
    from csi.fusefs import DatasetOperations
    from csi.reader import SnapshotReader

    loop = asyncio.get_running_loop()
    target = os.path.abspath(args.target)
    started = time.monotonic()
    try:
        fs, root, tree, chunk = await _open_snapshot(args.source, config.op_timeout)
    except FileNotFoundError as e:
        log.error("cannot mount %s: not found: %s", args.source, e)
        return EXIT_BAD_INPUT
    except (OSError, ValueError) as e:  # TimeoutError is an OSError
        log.error("cannot list %s: %s: %s", args.source, type(e).__name__, e)
        return EXIT_FAILED
    log.info("listed %s: %d files, %d bytes in %.2f s; mounting on %s (chunks of %d KiB, cache %d MiB)",
             args.source, tree.files, tree.bytes, time.monotonic() - started, target, chunk // 1024,
             config.cache_bytes // 2**20)

    async def fetch(path: str, start: int, end: int) -> bytes:
        return await fs._cat_file(f"{root}/{path}" if root else path, start=start, end=end)

    cache = ChunkCache(config.cache_bytes)
    reader = SnapshotReader(fetch, cache, chunk, config.readahead_chunks, config.op_timeout)
    ops = DatasetOperations(tree, reader, config, mtime=args.mtime or None)
    background: set[asyncio.Future[Any]] = set()

    def after_init(_answer: Any) -> None:  # the INIT answer is out: tune what INIT would reset
        task = asyncio.ensure_future(asyncio.to_thread(tune_kernel, target, config.readahead_bytes))
        background.add(task)
        task.add_done_callback(background.discard)

    options = session.MountOptions(fsname=args.fsname or args.source, allow_other=os.geteuid() == 0)
    try:
        fd = session.mount(target, options, args.mount_with)
    except session.SessionError as e:
        log.error("FUSE mount on %s failed: %s", target, e)
        await _close(fs)
        return EXIT_FAILED
    stopping = asyncio.Event()

    def stop(signame: str) -> None:
        log.info("%s: unmounting %s", signame, target)
        cache.close()  # reads waiting on the network answer EIO now
        try:
            session.unmount(target)
        except OSError as e:
            log.error("unmounting %s failed: %s; ending the session anyway", target, e)
        stopping.set()  # files still open get ENOTCONN from here on, as after any unmount -z

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)
    dispatcher = Dispatcher(ops, writer(fd), max_background=MAX_BACKGROUND, on_init=after_init)
    try:
        await serve(fd, dispatcher, stopping)
    finally:
        cache.close()
        await _close(fs)
        os.close(fd)
    log.info("unmounted %s", target)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("CACHEFS_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cachefs.common.errors import CachefsError

    try:
        config = MountConfig(attr_timeout=args.attr_timeout, op_timeout=args.op_timeout,
                             readahead_bytes=args.readahead_bytes, cache_bytes=args.cache_bytes,
                             readahead_chunks=args.readahead_chunks)
    except CachefsError as e:
        log.error("bad mount options: %s", e)
        return EXIT_BAD_INPUT

    keep_freed_memory(config.cache_bytes)
    return asyncio.run(serve_mount(args, config))


if __name__ == "__main__":
    sys.exit(main())
