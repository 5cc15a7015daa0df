"""The dataset's FUSE operations: a read-only view of one snapshot, inode-based, with no
byte of the protocol (csi/fuse/dispatch.py calls them, csi/fuse/protocol.py lays out the
answers).

Entries and attributes come from the SnapshotTree built once at mount time (no network);
node ids are the tree's inodes, a pure function of the snapshot, so a replaced serving
process answers for the same ids the kernel already holds. Bytes come from the
SnapshotReader (chunks through the mount's one cache), through one seam: `read_now` /
`read` with (path, size, offset, length). A snapshot never changes, so everything the
kernel may cache it keeps for the life of the mount (`timeout`).

Errors: missing nodes and names raise FileNotFoundError (ENOENT), a directory read as a
file EISDIR; everything else becomes EIO with a log line in the dispatcher.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Awaitable, Iterator

from csi.config import MountConfig
from csi.fuse.dispatch import FuseError
from csi.fuse.protocol import Attr
from csi.reader import SnapshotReader
from csi.tree import Entry, SnapshotTree


class DatasetOperations:
    """The mount's operations over one snapshot tree and its reader (dispatch.Operations)."""

    def __init__(self, tree: SnapshotTree, reader: SnapshotReader, config: MountConfig,
                 mtime: float | None = None) -> None:
        self.tree = tree
        self.reader = reader
        self.config = config
        self.timeout = config.attr_timeout
        self._mtime_ns = int((mtime or time.time()) * 1e9)
        self._attrs: dict[int, Attr] = {}  # inode → its attributes, built once
        self._positions: dict[int, int] = {}  # inode → its index in its directory's listing

    def deadline(self) -> float:
        return self.config.op_timeout

    # ---- entries and attributes: from the tree, no network --------------------------------

    def _entry(self, inode: int) -> Entry:
        entry = self.tree.entry(inode)
        if entry is None:
            raise FileNotFoundError(errno.ENOENT, f"no node {inode}")
        return entry

    def _attr(self, entry: Entry) -> Attr:
        attr = self._attrs.get(entry.inode)
        if attr is None:
            attr = self._attrs[entry.inode] = Attr(entry.inode, entry.mode, entry.size,
                                                   SnapshotTree.nlink(entry), self._mtime_ns)
        return attr

    def lookup(self, parent: int, name: bytes) -> Attr | None:
        """The child's attributes, or None for a miss (the kernel caches it)."""
        entry = self._entry(parent)
        if entry.children is None:
            raise FuseError(errno.ENOTDIR)
        if name == b".":
            return self._attr(entry)
        if name == b"..":
            found = self.tree.lookup(entry.path.rpartition("/")[0])
        else:
            found = entry.children.get(os.fsdecode(name))
        return None if found is None else self._attr(found)

    def getattr(self, inode: int) -> Attr:
        return self._attr(self._entry(inode))

    def listing(self, inode: int, offset: int) -> Iterator[tuple[bytes, Attr]]:
        """(name, attributes) of the directory's children from index `offset` on."""
        entry = self._entry(inode)
        if entry.children is None:
            raise FuseError(errno.ENOTDIR)
        children = entry.listing()
        for i in range(max(offset, 0), len(children)):
            child = children[i]
            yield os.fsencode(child.path.rpartition("/")[2]), self._attr(child)

    def statfs(self) -> tuple[int, int]:
        """(4 KiB blocks used, entries); nothing is free on a read-only snapshot."""
        return (self.tree.bytes + 4095) // 4096, len(self.tree)

    # ---- data: through the reader's one seam ---------------------------------------------

    def _file(self, inode: int) -> Entry:
        entry = self._entry(inode)
        if entry.children is not None:
            raise FuseError(errno.EISDIR)
        return entry

    def read_now(self, inode: int, offset: int, size: int) -> bytes | memoryview | None:
        entry = self._file(inode)
        return self.reader.read_now(entry.path, entry.size, offset, size)

    def read(self, inode: int, offset: int, size: int) -> Awaitable[bytes | memoryview]:
        """Bytes not at hand: a small file's miss fetches it with the small files after it
        in its directory, in one batched read (datasets are read a directory at a time,
        or shuffled over all of it: either way those files are read this epoch)."""
        entry = self._file(inode)
        if self.config.batch_files > 1 and 0 < entry.size <= self.reader.chunk_size:
            self.reader.prefetch_files(self._batch(entry))
        return self.reader.read(entry.path, entry.size, offset, size)

    def _batch(self, entry: Entry) -> list[tuple[str, int]]:
        """`entry` and the small files after it in its directory, up to batch_files/_bytes."""
        parent = self.tree.lookup(entry.path.rpartition("/")[0])
        if parent is None or parent.children is None:
            return [(entry.path, entry.size)]
        listing = parent.listing()
        if entry.inode not in self._positions:
            self._positions.update((child.inode, i) for i, child in enumerate(listing))
        batch, total = [], 0
        for child in listing[self._positions[entry.inode]:]:
            if len(batch) >= self.config.batch_files or total + child.size > self.config.batch_bytes:
                break
            if child.children is None and 0 < child.size <= self.reader.chunk_size:
                batch.append((child.path, child.size))
                total += child.size
        return batch or [(entry.path, entry.size)]
