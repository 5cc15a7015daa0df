"""The directory tree of one snapshot, held in memory for the life of a mount.

A snapshot never changes, so the mount lists it once (from the client's manifest, no
origin call) and answers every getattr and readdir from this index: the kernel can then
cache attributes and entries for as long as it likes without ever being wrong.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

FILE_MODE = stat.S_IFREG | 0o444
DIR_MODE = stat.S_IFDIR | 0o555


@dataclass
class Entry:
    """One file or directory; `children` is filled for directories only."""

    size: int
    is_dir: bool
    children: dict[str, "Entry"] = field(default_factory=dict)

    @property
    def mode(self) -> int:
        return DIR_MODE if self.is_dir else FILE_MODE


class SnapshotTree:
    """Paths are relative to the dataset root, '/'-separated; '' is the root itself."""

    def __init__(self) -> None:
        self.root = Entry(size=0, is_dir=True)
        self.files = 0
        self.bytes = 0

    @classmethod
    def from_listing(cls, entries: Iterable[tuple[str, int, bool]]) -> "SnapshotTree":
        """Build from (relative path, size, is_dir); parent directories are implied."""
        tree = cls()
        for path, size, is_dir in entries:
            tree._add(path, size, is_dir)
        return tree

    @classmethod
    def from_fs(cls, fs: Any, root: str) -> "SnapshotTree":
        """List `root` of an fsspec filesystem once (for cachefs: from the manifest)."""
        root = fs._strip_protocol(root).rstrip("/")  # the spelling find() answers with
        listing = fs.find(root, withdirs=True, detail=True)
        prefix = root + "/" if root else ""

        def relative() -> Iterator[tuple[str, int, bool]]:
            for name, info in listing.items():
                name = name.rstrip("/")
                if name == root:
                    continue
                if prefix and not name.startswith(prefix):
                    continue  # not below root: never expose it
                rel = name[len(prefix):]
                yield rel, int(info.get("size") or 0), info.get("type") == "directory"

        return cls.from_listing(relative())

    def _add(self, path: str, size: int, is_dir: bool) -> None:
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            return  # a manifest never holds these; refuse rather than escape the root
        node = self.root
        for part in parts[:-1]:
            node = node.children.setdefault(part, Entry(size=0, is_dir=True))
            if not node.is_dir:
                return  # a file and a directory with one name: keep the first seen
        last = parts[-1]
        if last in node.children:
            return
        node.children[last] = Entry(size=0 if is_dir else size, is_dir=is_dir)
        if not is_dir:
            self.files += 1
            self.bytes += size

    def lookup(self, path: str) -> Entry | None:
        node = self.root
        for part in path.split("/"):
            if not part:
                continue
            if not node.is_dir:
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def count_dirs(self) -> int:
        stack, n = [self.root], 0
        while stack:
            node = stack.pop()
            n += 1
            stack.extend(c for c in node.children.values() if c.is_dir)
        return n
