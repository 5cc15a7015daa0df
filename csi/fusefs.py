"""FUSE operations: a read-only view of one dataset snapshot over an fsspec filesystem.

Attributes and listings come from a SnapshotTree built once at mount time, so `ls`,
`stat` and `os.walk` never touch the network. Reads go through the fsspec filesystem
(cachefs: block-sized fetches from the owning cache nodes, with readahead). Snapshots
never change, which is what lets us keep the kernel page cache across opens
(`keep_cache`) and hand out long attribute and entry timeouts.

Every operation that reaches the network runs on a worker pool and is waited for with a
deadline: a stuck request answers EIO with a log line instead of hanging the reader.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import mfusepy as fuse

from csi.config import MountConfig
from csi.tree import SnapshotTree

log = logging.getLogger("cachefs.fuse")
T = TypeVar("T")

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def errno_of(exc: BaseException) -> int:
    """The errno a reader sees: missing stays ENOENT, writes EROFS, the rest EIO."""
    if isinstance(exc, FileNotFoundError):
        return errno.ENOENT
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return errno.EROFS
    return errno.EIO


@dataclass
class Handle:
    """One open(): its fsspec file object, opened on first read, guarded by `lock`
    because a file object keeps a position and a cache that concurrent reads would race."""

    path: str
    size: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    file: Any = None


class DatasetOperations(fuse.Operations):
    """The mount's operations; `fs` + `root` name the snapshot (for cachefs: root = dataset)."""

    use_ns = True  # mfusepy: times in nanoseconds

    def __init__(self, fs: Any, root: str, tree: SnapshotTree, config: MountConfig, mtime: float | None = None) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.tree = tree
        self.config = config
        self._mtime_ns = int((mtime or time.time()) * 1e9)
        self._handles: dict[int, Handle] = {}
        self._handles_lock = threading.Lock()  # guards _handles
        self._ids = itertools.count(1)
        self._pool = ThreadPoolExecutor(max_workers=config.fuse_threads, thread_name_prefix="cachefs-read")

    # ---- helpers -------------------------------------------------------------------

    def _full(self, path: str) -> str:
        rel = path.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def _entry(self, path: str):  # -> Entry
        entry = self.tree.lookup(path)
        if entry is None:
            raise fuse.FuseOSError(errno.ENOENT)
        return entry

    def _remote(self, what: str, fn: Callable[[], T]) -> T:
        """Run fn on the pool with the op deadline; map its failure to an errno, once."""
        future = self._pool.submit(fn)
        try:
            return future.result(timeout=self.config.op_timeout)
        except FutureTimeout:
            future.cancel()
            log.error("%s: no answer within %.0f s (cache cluster and origin unreachable?); answering EIO",
                      what, self.config.op_timeout)
            raise fuse.FuseOSError(errno.EIO) from None
        except fuse.FuseOSError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure must become an errno, never a crash
            code = errno_of(e)
            if code == errno.EIO:
                log.error("%s failed, answering EIO: %s: %s", what, type(e).__name__, e)
            raise fuse.FuseOSError(code) from e

    # ---- session -------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        """Negotiate large reads and many requests in flight (parallel DataLoader workers)."""
        if conn is None:
            return
        # libfuse3 refuses to start unless this equals the max_read mount option.
        conn.max_read = self.config.max_read_bytes
        conn.max_readahead = max(conn.max_readahead, self.config.max_read_bytes)
        conn.max_background = max(conn.max_background, 64)
        conn.congestion_threshold = max(conn.congestion_threshold, 48)

    # ---- metadata: from the tree, no network -------------------------------------------

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        entry = self._entry(path)
        t = self._mtime_ns
        return {
            "st_mode": entry.mode,
            "st_nlink": 2 + sum(1 for c in entry.children.values() if c.is_dir) if entry.is_dir else 1,
            "st_size": entry.size,
            "st_blocks": (entry.size + 511) // 512,
            "st_uid": 0,
            "st_gid": 0,
            "st_atime": t,
            "st_mtime": t,
            "st_ctime": t,
        }

    def readdir(self, path: str, fh: int) -> Iterator[Any]:
        entry = self._entry(path)
        if not entry.is_dir:
            raise fuse.FuseOSError(errno.ENOTDIR)
        yield "."
        yield ".."
        for name, child in entry.children.items():
            yield name, {"st_mode": child.mode}, 0

    def access(self, path: str, amode: int) -> int:
        self._entry(path)
        if amode & os.W_OK:
            raise fuse.FuseOSError(errno.EROFS)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        bsize = 4096
        blocks = (self.tree.bytes + bsize - 1) // bsize
        inodes = self.tree.files + self.tree.count_dirs()
        return {"f_bsize": bsize, "f_frsize": bsize, "f_blocks": blocks, "f_bfree": 0, "f_bavail": 0,
                "f_files": inodes, "f_ffree": 0, "f_favail": 0, "f_namemax": 255}

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        self._entry(path)
        raise fuse.FuseOSError(fuse.ENOATTR)

    def listxattr(self, path: str) -> list[str]:
        self._entry(path)
        return []

    # ---- data ----------------------------------------------------------------------

    def open(self, path: str, fi: Any) -> int:
        """raw_fi: we get the fuse_file_info itself, to set keep_cache."""
        if fi.flags & _WRITE_FLAGS:
            raise fuse.FuseOSError(errno.EROFS)
        entry = self._entry(path)
        if entry.is_dir:
            raise fuse.FuseOSError(errno.EISDIR)
        handle_id = next(self._ids)
        with self._handles_lock:
            self._handles[handle_id] = Handle(path=self._full(path), size=entry.size)
        fi.fh = handle_id
        fi.keep_cache = 1  # the snapshot cannot have changed since the last open
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        with self._handles_lock:
            handle = self._handles.get(fi.fh)
        if handle is None:
            raise fuse.FuseOSError(errno.EBADF)
        if offset >= handle.size or size <= 0:
            return b""
        size = min(size, handle.size - offset)
        file = handle.file
        if file is not None and file.ready(offset, offset + size) and handle.lock.acquire(blocking=False):
            # read ahead already and nobody else reading this handle: no network, so no deadline hop
            try:
                return self._copy_out(handle, offset, size)
            finally:
                handle.lock.release()
        return self._remote(f"read {handle.path} [{offset}, {offset + size})", lambda: self._read(handle, offset, size))

    def _read(self, handle: Handle, offset: int, size: int) -> bytes:
        # A stuck read elsewhere may hold the lock: give up when the op deadline would.
        if not handle.lock.acquire(timeout=self.config.op_timeout):
            raise TimeoutError(f"another read of {handle.path} is stuck")
        try:
            if handle.file is None:
                handle.file = self.fs.open(handle.path, "rb")
            return self._copy_out(handle, offset, size)
        finally:
            handle.lock.release()

    @staticmethod
    def _copy_out(handle: Handle, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the open file; the caller holds handle.lock."""
        handle.file.seek(offset)
        data = handle.file.read(size)
        if len(data) != size:
            raise OSError(errno.EIO, f"short read: {len(data)} of {size} bytes at {offset}; "
                                     f"the file has {handle.size} bytes in the snapshot")
        return data

    def release(self, path: str, fi: Any) -> int:
        with self._handles_lock:
            handle = self._handles.pop(fi.fh, None)
        if handle is not None and handle.file is not None:
            file = handle.file
            self._pool.submit(_close_quietly, file, handle.path)
        return 0

    def destroy(self, path: str) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- writes: always refused ------------------------------------------------------

    def _read_only(self, *args: Any, **kwargs: Any) -> int:
        raise fuse.FuseOSError(errno.EROFS)

    chmod = chown = create = link = mkdir = mknod = rename = rmdir = _read_only
    setxattr = removexattr = symlink = truncate = unlink = utimens = write = _read_only


def _close_quietly(file: Any, path: str) -> None:
    try:
        file.close()
    except Exception as e:  # noqa: BLE001 - closing a read-only file must never crash a mount
        log.warning("closing %s: %s", path, e)


def fuse_options(config: MountConfig, fsname: str) -> dict[str, Any]:
    """Mount options: read-only, kernel cache kept, long timeouts, large reads."""
    opts: dict[str, Any] = {
        "ro": True,
        "fsname": fsname,
        "subtype": "cachefs",
        "kernel_cache": True,
        "attr_timeout": config.attr_timeout,
        "entry_timeout": config.attr_timeout,
        "negative_timeout": config.attr_timeout,
        "max_read": config.max_read_bytes,
        "default_permissions": True,
    }
    if os.geteuid() == 0:
        opts["allow_other"] = True  # pods run as other users than the root plugin
    return opts


def serve(ops: DatasetOperations, mountpoint: str, fsname: str, foreground: bool = True) -> None:
    """Mount and serve until unmounted (fusermount3 -u) or SIGTERM; multi-threaded."""
    fuse.FUSE(ops, mountpoint, raw_fi=True, foreground=foreground, **fuse_options(ops.config, fsname))
