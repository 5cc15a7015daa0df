"""The manifest: a dataset snapshot as an Arrow table, and the index clients query.

Part of the wire contract (the server builds it, the client reads it as Arrow IPC). Once
loaded, `ls`, `info` and `find` cost no round trip. The index is the table itself: rows
are sorted by path, so a file is a binary search away and a directory is a contiguous
run of rows; nothing per file is built in Python objects, which is what keeps a client's
memory near the size of the table for a million files.

Schema 2 adds where each small file lives in its pack (shard/packing.py) and a hash of
each path, so that a reader finds a file by bisecting 8-byte integers rather than strings.
A schema-1 table (path, size, version) still loads: every file then has blocks of its own.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from cachefs.errors import BadRequest, NotFound
from shard import NOT_PACKED, pack_layout

SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("version", pa.string()),
                    ("pack", pa.int32()), ("offset", pa.int32()),
                    ("hash", pa.uint64())])  # xxh3-64 of the path: what readers find a file by
LEGACY_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("version", pa.string())])


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
    """One file of a snapshot; `pack` >= 0 when its bytes live at `offset` in a pack."""

    path: str
    size: int
    version: str
    pack: int = NOT_PACKED
    offset: int = 0

    @property
    def packed(self) -> bool:
        return self.pack != NOT_PACKED


def build_table(entries: Iterable[FileEntry], block_size: int = 8 * 1024 * 1024, pack_threshold: int = 0) -> pa.Table:
    """The snapshot's table: files in path order, small ones (below `pack_threshold`) in packs."""
    rows = sorted(entries, key=lambda e: e.path)
    sizes = [e.size for e in rows]
    packs, offsets, _ = pack_layout(sizes, block_size, pack_threshold) if pack_threshold else (
        [NOT_PACKED] * len(rows), [0] * len(rows), 0)
    paths = [e.path for e in rows]
    return pa.table({"path": paths, "size": sizes, "version": [e.version for e in rows],
                     "pack": packs, "offset": offsets, "hash": path_hashes(paths)}, schema=SCHEMA)


def path_hashes(paths: Iterable[str]) -> pa.Array:
    digest = xxhash.xxh3_64_intdigest
    return pa.array([digest(p.encode()) for p in paths], pa.uint64())


def snapshot_id(table: pa.Table, layout: str = "") -> str:
    """A content id: the same listing (and pack layout) always gives the same snapshot, a
    changed one never does. `layout` names the packing parameters, since the same files
    packed differently make different blocks."""
    h = xxhash.xxh3_128(layout.encode())
    for path, size, version in zip(*(table.column(c).to_pylist() for c in ("path", "size", "version")), strict=True):
        h.update(f"{path}\0{size}\0{version}\n".encode())
    return h.hexdigest()[:20]


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes | pa.Buffer) -> pa.Table:
    """A manifest table from Arrow IPC; a schema-1 table is upgraded (no file packed)."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data) if isinstance(data, bytes) else data).read_all()
    except pa.ArrowInvalid as e:
        raise BadRequest(f"not an Arrow IPC manifest: {e}") from e
    if table.schema.equals(LEGACY_SCHEMA):
        n = table.num_rows
        table = table.append_column("pack", pa.array([NOT_PACKED] * n, pa.int32())).append_column(
            "offset", pa.array([0] * n, pa.int32())).append_column(
            "hash", path_hashes(table.column("path").to_pylist()))
    if not table.schema.equals(SCHEMA):
        raise BadRequest(f"manifest schema {table.schema} is neither {SCHEMA} nor the older {LEGACY_SCHEMA}")
    return table


class _Strings(Sequence[bytes]):
    """A string column seen as UTF-8 bytes straight from its Arrow buffers: `bisect` works
    on it (UTF-8 byte order is code point order, the order the table is sorted in) without
    an Arrow scalar or a str per probe."""

    def __init__(self, array: pa.StringArray) -> None:
        _, offsets, data = array.buffers()
        self._offsets = memoryview(offsets).cast("i")[array.offset:array.offset + len(array) + 1]
        self._data = memoryview(data) if data is not None else memoryview(b"")
        self._n = len(array)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[override]
        return self._data[self._offsets[i]:self._offsets[i + 1]].tobytes()

    def text(self, i: int) -> str:
        return self[i].decode()


def _column_view(array: pa.Array, fmt: str) -> memoryview:
    """The values of a null-free fixed-width column as a memoryview (no copy)."""
    return memoryview(array.buffers()[1]).cast(fmt)[array.offset:array.offset + len(array)]


class Manifest:
    """A read-only index of one snapshot: files by path and the directories they imply."""

    def __init__(self, table: pa.Table, snapshot: str = "") -> None:
        if table.schema.equals(LEGACY_SCHEMA):
            table = from_ipc(to_ipc(table))
        self.table = table.combine_chunks()
        self.snapshot = snapshot or snapshot_id(self.table)
        column = lambda name: self.table.column(name).chunk(0) if self.table.num_rows else pa.array(  # noqa: E731
            [], self.table.schema.field(name).type)
        self._path_array = column("path")
        self._paths = _Strings(self._path_array)
        self._versions = _Strings(column("version"))
        self._sizes = _column_view(column("size"), "q")
        self._packs = _column_view(column("pack"), "i")
        self._offsets = _column_view(column("offset"), "i")
        self._pack_rows: list[int] | None = None  # rows of packed files, in pack order (server side)
        self._pack_starts: list[int] | None = None
        # the path index: hashes in ascending order, and the row of each (8 + 8 bytes a file)
        order = pc.sort_indices(column("hash"))
        self._hashes = _column_view(pc.take(column("hash"), order), "Q")
        self._order = _column_view(order, "Q")
        self.table = self.table.drop_columns(["hash"])  # the index replaces it

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def total_bytes(self) -> int:
        return int(pc.sum(self.table.column("size")).as_py() or 0)

    @property
    def nbytes(self) -> int:
        """Memory the index holds (the table's buffers)."""
        return self.table.nbytes

    # -- files ---------------------------------------------------------------------------
    def row(self, path: str) -> int | None:
        key = path.encode()
        h = xxhash.xxh3_64_intdigest(key)
        hashes, n = self._hashes, len(self._hashes)
        i = bisect.bisect_left(hashes, h)
        while i < n and hashes[i] == h:  # 64-bit collisions are possible, so the path decides
            row = self._order[i]
            if self._paths[row] == key:
                return row
            i += 1
        return None

    def at(self, row: int) -> FileEntry:
        return FileEntry(self._paths.text(row), self._sizes[row], self._versions.text(row), self._packs[row],
                         self._offsets[row])

    def file(self, path: str) -> FileEntry:
        row = self.row(path)
        if row is None:
            raise NotFound(f"no file {path!r} in snapshot {self.snapshot}")
        return self.at(row)

    def get(self, path: str) -> FileEntry | None:
        row = self.row(path)
        return None if row is None else self.at(row)

    # -- directories ------------------------------------------------------------------------
    def _under(self, path: str) -> tuple[int, int]:
        """Rows [lo, hi) strictly below directory `path` ('' is the root)."""
        if not path:
            return 0, len(self._paths)
        prefix = path.encode() + b"/"
        lo = bisect.bisect_left(self._paths, prefix)
        hi = bisect.bisect_left(self._paths, path.encode() + b"0", lo)  # '0' follows '/'
        return lo, hi

    def is_dir(self, path: str) -> bool:
        if not path:
            return True
        lo, hi = self._under(path)
        return hi > lo

    def entry(self, path: str) -> tuple[str, int]:
        """('file', size) or ('directory', 0); NotFound otherwise."""
        row = self.row(path)
        if row is not None:
            return "file", self._sizes[row]
        if self.is_dir(path):
            return "directory", 0
        raise NotFound(f"no file or directory {path!r} in snapshot {self.snapshot}")

    def list_dir(self, path: str) -> list[tuple[str, str, int]]:
        """Children of a directory as (relative path, type, size), in name order; computed
        with Arrow kernels over the directory's run of rows, so a huge directory costs
        milliseconds, not a Python loop per file."""
        row = self.row(path)
        if row is not None:
            return [(path, "file", self._sizes[row])]
        lo, hi = self._under(path)
        if hi <= lo:
            if not path and not len(self):
                return []
            raise NotFound(f"no directory {path!r} in snapshot {self.snapshot}")
        skip = len(path.encode()) + 1 if path else 0
        rel = pc.binary_slice(self._path_array.slice(lo, hi - lo).cast(pa.binary()), skip, 1 << 30)
        slash = pc.find_substring(rel, "/")
        is_file = pc.equal(slash, -1)
        base = f"{path}/" if path else ""
        files = pc.filter(rel, is_file).cast(pa.string()).to_pylist()
        sizes = pc.filter(self.table.column("size").slice(lo, hi - lo), is_file).to_pylist()
        nested = pc.filter(rel, pc.invert(is_file))
        first = pc.list_element(pc.split_pattern(nested, "/", max_splits=1), 0)
        names = pc.unique(first).cast(pa.string()).to_pylist() if len(nested) else []
        out = [(base + n, "file", s) for n, s in zip(files, sizes)] + [(base + n, "directory", 0) for n in names]
        return sorted(out)

    def walk_files(self, path: str = "") -> Iterator[FileEntry]:
        """Every file at or below `path`, in path order."""
        row = self.row(path) if path else None
        if row is not None:
            yield self.at(row)
            return
        lo, hi = self._under(path)
        if hi <= lo and path:
            raise NotFound(f"no file or directory {path!r} in snapshot {self.snapshot}")
        for i in range(lo, hi):
            yield self.at(i)

    # -- packs (the server's view) ----------------------------------------------------------
    def _index_packs(self) -> None:
        rows = [i for i, p in enumerate(self._packs) if p != NOT_PACKED]  # packs ascend with rows
        starts: list[int] = []
        last = NOT_PACKED
        for j, i in enumerate(rows):
            if self._packs[i] != last:
                last = self._packs[i]
                starts.append(j)
        starts.append(len(rows))
        self._pack_rows, self._pack_starts = rows, starts

    @property
    def packs(self) -> int:
        if self._pack_starts is None:
            self._index_packs()
        assert self._pack_starts is not None
        return len(self._pack_starts) - 1

    def pack_members(self, pack: int) -> list[FileEntry]:
        """The files laid out in `pack`, in offset order (built once; O(files) the first time)."""
        if self._pack_starts is None:
            self._index_packs()
        assert self._pack_rows is not None and self._pack_starts is not None
        if not 0 <= pack < len(self._pack_starts) - 1:
            raise NotFound(f"no pack {pack} in snapshot {self.snapshot} ({len(self._pack_starts) - 1} packs)")
        lo, hi = self._pack_starts[pack], self._pack_starts[pack + 1]
        return [self.at(i) for i in self._pack_rows[lo:hi]]

    def pack_size(self, pack: int) -> int:
        """Bytes in `pack` (its last member's end), without building its members."""
        if self._pack_starts is None:
            self._index_packs()
        assert self._pack_rows is not None and self._pack_starts is not None
        if not 0 <= pack < len(self._pack_starts) - 1:
            raise NotFound(f"no pack {pack} in snapshot {self.snapshot} ({len(self._pack_starts) - 1} packs)")
        last = self._pack_rows[self._pack_starts[pack + 1] - 1]
        return self._offsets[last] + self._sizes[last]
