"""What one mount serves: the snapshot listed once (before the serving processes fork, so
they share its tree), and one serving process's loop: the cachefs client, the reader with
its chunk cache, the dataset's operations and the FUSE dispatcher on one clone of the
session, all on one asyncio loop (a request is answered without a thread hand-off).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from csi.config import MountConfig
from csi.tree import SnapshotTree

log = logging.getLogger("cachefs.mount")

DEFAULT_CHUNK = 8 * 1024 * 1024  # for a source that is not cachefs (no dataset block size to follow)
MAX_BACKGROUND = 64  # FUSE requests in flight at once (kernel default 12): readahead of many readers


@dataclass(frozen=True)
class Snapshot:
    source: str
    root: str  # the fs path of the snapshot's root, no trailing slash
    tree: SnapshotTree
    chunk: int  # bytes per chunk of the reader (the dataset's block size)
    # cachefs: {dataset: snapshot} the tree was listed from. Every serving process reads
    # exactly these (cachefs/pins.py): a client of its own would load the current snapshot,
    # whose bytes under this tree's sizes are wrong bytes (#20).
    pins: dict[str, str] = field(default_factory=dict)


def filesystem(source: str, pins: dict[str, str] | None = None) -> tuple[Any, str]:
    """(async fs on the running loop, root path) for an fsspec URL, never a cached instance;
    a cachefs one reads the snapshots `pins` names."""
    import fsspec

    options: dict[str, Any] = {}
    if source.startswith("cachefs://") and "CACHEFS_IO_THREADS" not in os.environ:
        # The client receives on this loop too: extra receive loops in threads would bring
        # back the thread hand-off per fetch that one loop is for (2x the CPU per small file).
        options["io_threads"] = 0
    if pins:
        options["snapshots"] = dict(pins)
    return fsspec.core.url_to_fs(source, asynchronous=True, loop=asyncio.get_running_loop(),
                                 skip_instance_cache=True, **options)


async def close(fs: Any) -> None:
    if hasattr(fs, "_close"):  # cachefs: its HTTP sessions
        await fs._close()


async def list_snapshot(source: str, timeout: float, pins: dict[str, str] | None = None) -> Snapshot:
    """The snapshot listed once (for cachefs: from the manifest; `pins`: the one a mount served
    before, so a resumed session lists the same tree). FileNotFoundError for an unknown dataset,
    NotADirectoryError for a file, TimeoutError past `timeout`."""
    from csi.reader import within

    fs, root = filesystem(source, pins)
    try:
        info = await within(fs._info(root), timeout)
        if info.get("type") != "directory":
            raise NotADirectoryError(f"{source} is not a directory")
        found = await within(fs._find(root, withdirs=True, detail=True), timeout)
        tree = SnapshotTree.from_find(found, fs._strip_protocol(root))
        chunk = DEFAULT_CHUNK
        if hasattr(fs, "_dataset_info"):  # cachefs: chunks follow the dataset's blocks
            chunk = (await within(fs._dataset_info(root.partition("/")[0]), timeout)).block_size
        pins = fs.pins.snapshots() if hasattr(fs, "pins") else {}
    finally:
        await close(fs)
    return Snapshot(source, root.rstrip("/"), tree, chunk, pins)


async def serve_snapshot(fd: int, snapshot: Snapshot, config: MountConfig, *, cache_bytes: int,
                         mtime: float | None, on_init: Callable[[Any], None] | None = None) -> int:
    """Serve the session on `fd` until it ends (ENODEV); the exit code (0)."""
    from csi.chunkcache import ChunkCache
    from csi.fuse.dispatch import Dispatcher, writer
    from csi.fuseloop import serve
    from csi.fusefs import DatasetOperations
    from csi.reader import SnapshotReader

    fs, _ = filesystem(snapshot.source, snapshot.pins)
    root = snapshot.root

    async def fetch(path: str, start: int, end: int) -> bytes:
        return await fs._cat_file(f"{root}/{path}" if root else path, start=start, end=end)

    async def fetch_many(files: list[tuple[str, int]]) -> list[bytes | BaseException]:
        paths = [f"{root}/{path}" if root else path for path, _ in files]
        if not hasattr(fs, "_cat_ranges"):
            return list(await asyncio.gather(*(fs._cat_file(p) for p in paths), return_exceptions=True))
        return await fs._cat_ranges(paths, None, None, on_error="return")  # one batched read

    cache = ChunkCache(cache_bytes)
    reader = SnapshotReader(fetch, cache, snapshot.chunk, config.readahead_chunks, config.op_timeout,
                            fetch_many=fetch_many)
    ops = DatasetOperations(snapshot.tree, reader, config, mtime=mtime)
    dispatcher = Dispatcher(ops, writer(fd), max_background=MAX_BACKGROUND, on_init=on_init)
    try:
        await serve(fd, dispatcher)
    finally:
        log.info("serving process %d answered: %s; fetched %d MiB in %d reads", os.getpid(),
                 dispatcher.summary() or "nothing", reader.fetched[1] >> 20, reader.fetched[0])
        cache.close()
        await close(fs)
    return 0
