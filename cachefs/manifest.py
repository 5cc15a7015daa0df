"""The manifest: a dataset snapshot as an Arrow table, and the index clients query.

Part of the wire contract (the server builds it, the client reads it as Arrow IPC). Once
loaded, `ls`, `info` and `find` cost no round trip: the directory tree is derived here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow as pa
import xxhash

from cachefs.errors import BadRequest, NotFound

SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("version", pa.string())])


def check_path(path: str) -> str:
    """A dataset-relative path, normalised; refuses anything that could escape the dataset."""
    if not isinstance(path, str):
        raise BadRequest("path must be a string")
    if "\x00" in path:
        raise BadRequest("path contains a NUL byte")
    if path.startswith("/") or path.startswith("\\"):
        raise BadRequest(f"path {path!r} is absolute; give it relative to the dataset root")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadRequest(f"path {path!r} contains '..'; paths may not leave the dataset")
    return "/".join(parts)


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    version: str


def build_table(entries: Iterable[FileEntry]) -> pa.Table:
    rows = sorted(entries, key=lambda e: e.path)
    return pa.table(
        {"path": [e.path for e in rows], "size": [e.size for e in rows], "version": [e.version for e in rows]},
        schema=SCHEMA,
    )


def snapshot_id(table: pa.Table) -> str:
    """A content id: the same listing always gives the same snapshot, a changed one never does."""
    h = xxhash.xxh3_128()
    for path, size, version in zip(*(table.column(c).to_pylist() for c in ("path", "size", "version")), strict=True):
        h.update(f"{path}\0{size}\0{version}\n".encode())
    return h.hexdigest()[:20]


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except pa.ArrowInvalid as e:
        raise BadRequest(f"not an Arrow IPC manifest: {e}") from e
    if not table.schema.equals(SCHEMA):
        raise BadRequest(f"manifest schema {table.schema} differs from {SCHEMA}")
    return table


class Manifest:
    """A read-only index of one snapshot: files by path and the directories they imply."""

    def __init__(self, table: pa.Table, snapshot: str = "") -> None:
        self.table = table
        self.snapshot = snapshot or snapshot_id(table)
        paths = table.column("path").to_pylist()
        sizes = table.column("size").to_pylist()
        versions = table.column("version").to_pylist()
        self.files: dict[str, FileEntry] = {p: FileEntry(p, s, v) for p, s, v in zip(paths, sizes, versions, strict=True)}
        children: dict[str, set[str]] = {"": set()}
        for p in paths:
            parts = p.split("/")
            for depth in range(len(parts)):
                children.setdefault("/".join(parts[:depth]), set()).add(parts[depth])
        self.children = {d: sorted(c) for d, c in children.items()}

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def __len__(self) -> int:
        return len(self.files)

    def file(self, path: str) -> FileEntry:
        try:
            return self.files[path]
        except KeyError:
            raise NotFound(f"no file {path!r} in snapshot {self.snapshot}") from None

    def is_dir(self, path: str) -> bool:
        return path in self.children

    def entry(self, path: str) -> tuple[str, int]:
        """('file', size) or ('directory', 0); NotFound otherwise."""
        if path in self.files:
            return "file", self.files[path].size
        if path in self.children:
            return "directory", 0
        raise NotFound(f"no file or directory {path!r} in snapshot {self.snapshot}")

    def list_dir(self, path: str) -> list[tuple[str, str, int]]:
        """Children of a directory as (relative path, type, size)."""
        if path not in self.children:
            if path in self.files:
                return [(path, "file", self.files[path].size)]
            raise NotFound(f"no directory {path!r} in snapshot {self.snapshot}")
        out = []
        for name in self.children[path]:
            child = f"{path}/{name}" if path else name
            kind, size = self.entry(child)
            out.append((child, kind, size))
        return out

    def walk_files(self, path: str = "") -> Iterator[FileEntry]:
        """Every file at or below `path`, in path order."""
        if path in self.files:
            yield self.files[path]
            return
        if path not in self.children:
            raise NotFound(f"no file or directory {path!r} in snapshot {self.snapshot}")
        prefix = f"{path}/" if path else ""
        for p, e in self.files.items():
            if p.startswith(prefix):
                yield e
