"""The directory tree of one snapshot, held in memory for the life of a mount.

A snapshot never changes, so the mount lists it once (from the client's manifest, no
origin call) and answers every lookup, getattr and readdir from this index: the kernel
can then cache entries and attributes for as long as the mount lives without ever being
wrong. Inodes are assigned once, when the tree is built, and never reused: the kernel
may hold on to any of them (and does, after readdirplus) without a forget mattering.
They are a pure function of the snapshot (`from_find` sorts the listing first): a
serving process started again, anywhere, numbers every entry as its predecessor did, so
the ids the kernel holds stay valid across a replaced server.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

FILE_MODE = stat.S_IFREG | 0o444
DIR_MODE = stat.S_IFDIR | 0o555
ROOT_INODE = 1  # FUSE's root; the table's index 0 stays empty


@dataclass(slots=True, eq=False)
class Entry:
    """One file or directory. `path` is relative to the snapshot root ('' for the root);
    `children` (name → entry, in listing order) is set for directories only."""

    inode: int
    path: str
    size: int
    children: dict[str, "Entry"] | None = None
    ordered: list["Entry"] | None = None  # children as a list, for readdir offsets; built on first use

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def mode(self) -> int:
        return DIR_MODE if self.children is not None else FILE_MODE

    def listing(self) -> list["Entry"]:
        """The children in a fixed order: readdir offset i is the i-th child."""
        if self.ordered is None:
            self.ordered = list(self.children.values()) if self.children is not None else []
        return self.ordered


class SnapshotTree:
    """Paths are relative to the dataset root, '/'-separated; '' is the root itself."""

    def __init__(self) -> None:
        self.root = Entry(ROOT_INODE, "", 0, children={})
        self._inodes: list[Entry | None] = [None, self.root]
        self.files = 0
        self.dirs = 1
        self.bytes = 0

    @classmethod
    def from_listing(cls, entries: Iterable[tuple[str, int, bool]]) -> "SnapshotTree":
        """Build from (relative path, size, is_dir); parent directories are implied."""
        tree = cls()
        for path, size, is_dir in entries:
            tree._add(path, size, is_dir)
        return tree

    @classmethod
    def from_find(cls, found: dict[str, dict[str, Any]], root: str) -> "SnapshotTree":
        """Build from `fs.find(root, withdirs=True, detail=True)` (for cachefs: the manifest).

        `root` must be spelt as `find` answers (the fs's `_strip_protocol`); anything not
        below it is never exposed.
        """
        root = root.rstrip("/")
        prefix = root + "/" if root else ""

        def relative() -> Iterator[tuple[str, int, bool]]:
            for name, info in sorted(found.items()):  # node ids: a function of the snapshot alone
                name = name.rstrip("/")
                if name == root or (prefix and not name.startswith(prefix)):
                    continue
                yield name[len(prefix):], int(info.get("size") or 0), info.get("type") == "directory"

        return cls.from_listing(relative())

    def _new(self, path: str, size: int, is_dir: bool) -> Entry:
        entry = Entry(len(self._inodes), path, size, children={} if is_dir else None)
        self._inodes.append(entry)
        if is_dir:
            self.dirs += 1
        else:
            self.files += 1
            self.bytes += size
        return entry

    def _add(self, path: str, size: int, is_dir: bool) -> None:
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            return  # a manifest never holds these; refuse rather than escape the root
        node = self.root
        for i, part in enumerate(parts[:-1]):
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = self._new("/".join(parts[:i + 1]), 0, True)
            if child.children is None:
                return  # a file and a directory with one name: keep the first seen
            node = child
        assert node.children is not None
        if parts[-1] not in node.children:
            node.children[parts[-1]] = self._new("/".join(parts), 0 if is_dir else size, is_dir)

    # ---- look-ups: what FUSE asks --------------------------------------------------------

    def __len__(self) -> int:
        """Number of entries (files and directories, the root included)."""
        return len(self._inodes) - 1

    def entry(self, inode: int) -> Entry | None:
        if 0 < inode < len(self._inodes):
            return self._inodes[inode]
        return None

    def child(self, parent: int, name: str) -> Entry | None:
        node = self.entry(parent)
        if node is None or node.children is None:
            return None
        return node.children.get(name)

    def lookup(self, path: str) -> Entry | None:
        node: Entry | None = self.root
        for part in path.split("/"):
            if not part:
                continue
            if node is None or node.children is None:
                return None
            node = node.children.get(part)
        return node

    @staticmethod
    def nlink(entry: Entry) -> int:
        """2 + subdirectories for a directory (what `find` relies on), 1 for a file."""
        if entry.children is None:
            return 1
        return 2 + sum(1 for c in entry.children.values() if c.children is not None)
