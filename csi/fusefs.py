"""FUSE operations: a read-only view of one dataset snapshot, on pyfuse3's low-level,
inode-based async API, served on the same asyncio loop as the cachefs client.

Entries and attributes come from the SnapshotTree built once at mount time (no network).
Bytes come from a SnapshotReader (chunks through the mount's one cache). A snapshot never
changes, so everything the kernel may cache it may keep for the life of the mount:
entries, attributes and misses (`entry_timeout`/`attr_timeout`), listings with their
attributes (pyfuse3 always answers readdirplus), and pages across opens (`keep_cache`).

An open file needs no state of its own: its handle is its inode, and reads of any handle
share the mount's chunks. Errors become errnos in one place (`_errno`): missing paths
ENOENT, writes EROFS, everything else EIO with a log line, and a read waits at most the
mount's op deadline. No exception but FUSEError may leave a handler: pyfuse3 would drop
the request, and the reader that sent it would hang.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from csi.config import MountConfig
from csi.reader import SnapshotReader
from csi.tree import Entry, SnapshotTree

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


def _errno(what: str, exc: Exception, timeout: float) -> int:
    """The one place an exception becomes an errno; EIO always leaves a log line saying why."""
    code = errno_of(exc)
    if isinstance(exc, TimeoutError):
        log.error("%s: no answer within %g s (cache cluster and origin unreachable?); answering EIO",
                  what, timeout)
    elif code == errno.EIO:
        log.error("%s failed, answering EIO: %s: %s", what, type(exc).__name__, exc)
    return code


def _answers_errno(op: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn any exception of a handler into FUSEError (see the module docstring)."""

    @functools.wraps(op)
    async def guarded(self: "DatasetOperations", *args: Any) -> T:
        try:
            return await op(self, *args)
        except FUSEError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug must cost one request an EIO, never the mount
            raise FUSEError(_errno(f"{op.__name__}{args[:2]}", e, self.config.op_timeout)) from None

    return guarded


async def _refused(self: Any, *_args: Any) -> Any:
    raise FUSEError(errno.EROFS)


class DatasetOperations(pyfuse3.Operations):
    """The mount's operations over one snapshot tree and its reader."""

    supports_dot_lookup = True  # "." and ".." are answered from the tree

    def __init__(self, tree: SnapshotTree, reader: SnapshotReader, config: MountConfig,
                 mtime: float | None = None, on_init: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.tree = tree
        self.reader = reader
        self.config = config
        self._mtime_ns = int((mtime or time.time()) * 1e9)
        self._on_init = on_init
        self._nlinks: dict[int, int] = {}  # directory inode → st_nlink, counted once
        self._opened = bytearray(len(tree) + 1)  # inode → opened before (its pages may be cached)

    def init(self) -> None:
        """Called while the kernel's INIT is answered; must not raise."""
        if self._on_init is not None:
            try:
                self._on_init()
            except Exception as e:  # noqa: BLE001 - tuning is best effort
                log.warning("after-mount hook failed: %s", e)

    # ---- entries and attributes: from the tree, no network --------------------------------

    def _entry(self, inode: int) -> Entry:
        entry = self.tree.entry(inode)
        if entry is None:
            raise FUSEError(errno.ENOENT)
        return entry

    def _attributes(self, entry: Entry) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = entry.inode
        attr.st_mode = entry.mode
        attr.st_size = entry.size
        attr.st_blocks = (entry.size + 511) // 512
        if entry.children is None:
            attr.st_nlink = 1
        else:
            nlink = self._nlinks.get(entry.inode)
            if nlink is None:
                nlink = self._nlinks[entry.inode] = SnapshotTree.nlink(entry)
            attr.st_nlink = nlink
        attr.st_uid = attr.st_gid = 0
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._mtime_ns
        attr.entry_timeout = attr.attr_timeout = self.config.attr_timeout
        return attr

    @_answers_errno
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        parent = self._entry(parent_inode)
        if name == b".":
            entry: Entry | None = parent
        elif name == b"..":
            entry = self.tree.lookup(parent.path.rpartition("/")[0])
        else:
            entry = self.tree.child(parent_inode, os.fsdecode(name))
        if entry is None:
            miss = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the miss
            miss.entry_timeout = self.config.attr_timeout
            return miss
        return self._attributes(entry)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Inodes live as long as the mount: nothing to count."""

    @_answers_errno
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attributes(self._entry(inode))

    @_answers_errno
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        if self._entry(inode).children is None:
            raise FUSEError(errno.ENOTDIR)
        return inode

    @_answers_errno
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        """Entry i of the listing has offset i + 1; stops when the kernel's buffer is full."""
        children = self._entry(fh).listing()
        for i in range(start_id, len(children)):
            child = children[i]
            name = os.fsencode(child.path.rpartition("/")[2])
            if not pyfuse3.readdir_reply(token, name, self._attributes(child), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        """Directory handles hold nothing."""

    @_answers_errno
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = 4096
        stats.f_blocks = (self.tree.bytes + 4095) // 4096
        stats.f_bfree = stats.f_bavail = 0
        stats.f_files = len(self.tree)
        stats.f_ffree = stats.f_favail = 0
        stats.f_namemax = 255
        return stats

    @_answers_errno
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        self._entry(inode)
        raise FUSEError(pyfuse3.ENOATTR)

    @_answers_errno
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        self._entry(inode)
        return []

    # ---- data ----------------------------------------------------------------------------

    @_answers_errno
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        """The handle is the inode; `keep_cache`: the pages of earlier opens are still right."""
        if flags & _WRITE_FLAGS:
            raise FUSEError(errno.EROFS)
        entry = self._entry(inode)
        if entry.children is not None:
            raise FUSEError(errno.EISDIR)
        if not self._opened[inode]:
            # The first open: no page of the file can be cached yet, so its first read will
            # come; start the fetch now. Later opens are usually answered by the page cache.
            self._opened[inode] = 1
            self.reader.prefetch(entry.path, entry.size)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        entry = self.tree.entry(fh)
        if entry is None or entry.children is not None:
            raise FUSEError(errno.EBADF)
        try:
            return await self.reader.read(entry.path, entry.size, off, size)
        except Exception as e:  # noqa: BLE001 - every failure must become an errno, never a crash
            raise FUSEError(_errno(f"read {entry.path} [{off}, {off + size})", e, self.config.op_timeout)) from None

    async def flush(self, fh: int) -> None:
        """Nothing to write back. ENOSYS tells the kernel so: it never sends a flush again
        (one request less per close)."""
        raise FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        """Handles hold nothing: the chunks belong to the mount."""

    # ---- writes: always refused (a read-only mount stops most of them in the kernel) ------

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _refused
    write = create = setxattr = removexattr = fsync = fsyncdir = _refused


def fuse_options(config: MountConfig, fsname: str) -> set[str]:
    """Mount options: read-only, our fstype (fuse.cachefs), the kernel checks permissions."""
    opts = {"ro", "default_permissions", "subtype=cachefs", f"fsname={fsname}"}
    if os.geteuid() == 0:
        opts.add("allow_other")  # pods run as other users than the root plugin
    return opts


async def serve(ops: DatasetOperations, mountpoint: str, fsname: str) -> None:
    """Mount, serve on the running loop until unmounted or `pyfuse3.terminate()`, clean up.

    Needs `pyfuse3.asyncio.enable()` first. Raises RuntimeError if the mount fails.
    """
    pyfuse3.init(ops, mountpoint, fuse_options(ops.config, fsname))
    try:
        await pyfuse3.main()
    finally:
        # After fusermount3 -u the kernel is done with us already; after terminate() (or
        # an error) we must unmount ourselves. close() copes with both.
        pyfuse3.close(unmount=True)
