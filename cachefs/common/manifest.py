"""The manifest: a dataset snapshot as an Arrow table, and the index clients query.

Part of the wire contract (the server builds it, the client reads it as Arrow IPC). Once
loaded, `ls`, `info` and `find` cost no round trip, and nothing per file is built as a
Python object: a client holds the table's buffers and nothing else, which is what keeps a
million files in tens of megabytes and a load in milliseconds (no sorting on arrival).

Schema 2, the table as the server builds it:
- rows are ordered by `hash` (xxh3-64 of the path): finding a file is a bisection over
  8-byte integers;
- `by_path` lists the rows in path order: a folder is a contiguous run of it;
- `pack` and `offset` say where a small file lives in its pack (shard/packing.py); pack
  numbers are kept across refreshes (unchanged files stay where they were), so they need
  not be dense nor follow path order;
- `unit` names what a file's bytes are (its pack's id, or its own: shard/keys.py), so that
  block keys survive a refresh for files that did not change;
- `version` (the origin's version token) is left out of what clients load by default
  (`GET .../manifest?versions=0`): readers do not need it (`unit` hashes it), and it is
  the widest column.
- the schema's metadata `cachefs.folders` lists, as JSON, the folders that no file implies
  (empty ones, and ones that hold only empty folders: the leaves among them), so the tree
  a reader sees is the origin's, not just its files' (MLPerf Storage's DLIO and
  `ImageFolder` look at folders). Tables written before it have no such key and show the
  folders their files imply.
A schema-1 table (path, size, version; rows in path order) still loads: it is given the
schema-2 columns on arrival, and no file of it is packed. A schema-2 table without `unit`
loads with unit 0: its blocks are named by its snapshot, as they were.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from cachefs.common.errors import BadRequest, NotFound
from shard import NOT_PACKED, file_unit, pack_layout, pack_unit, repack

SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("version", pa.string()),
                    ("pack", pa.int32()), ("offset", pa.int32()), ("unit", pa.uint64()), ("hash", pa.uint64()),
                    ("by_path", pa.uint32())])
READER_SCHEMA = pa.schema([f for f in SCHEMA if f.name != "version"])  # what clients load
UNITLESS_SCHEMA = pa.schema([f for f in SCHEMA if f.name != "unit"])  # schema 2 before `unit`
UNITLESS_READER_SCHEMA = pa.schema([f for f in READER_SCHEMA if f.name != "unit"])
LEGACY_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("version", pa.string())])
FOLDERS_KEY = b"cachefs.folders"  # schema metadata: the folders no file implies, a JSON list


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
    """One file of a snapshot; `pack` >= 0 when its bytes live at `offset` in a pack.
    `version` is "" where the manifest was loaded without versions (a reader's)."""

    path: str
    size: int
    version: str
    pack: int = NOT_PACKED
    offset: int = 0
    unit: int = 0  # what its bytes are (shard/keys.py); 0 in a manifest from before units

    @property
    def packed(self) -> bool:
        return self.pack != NOT_PACKED


def path_hash(path: str) -> int:
    return xxhash.xxh3_64_intdigest(path.encode())


def build_table(entries: Iterable[FileEntry], block_size: int = 8 * 1024 * 1024, pack_threshold: int = 0,
                previous: "Manifest | None" = None, folders: Iterable[str] = ()) -> pa.Table:
    """The snapshot's table, rows in hash order. Packs are laid out in path order; with the
    `previous` snapshot (its version tokens loaded), unchanged files keep their place and
    their pack's id, and the rest go to new packs (shard/packing.py `repack`). `folders`
    (the origin's, relative) are kept where no file implies them."""
    files = sorted(entries, key=lambda e: e.path)
    paths = [e.path for e in files]
    sizes = [e.size for e in files]
    versions = [e.version for e in files]
    ids: dict[int, int] = {}  # pack → its id, for packs kept from the previous snapshot
    if pack_threshold and previous is not None and previous.has_units and previous.has_versions:
        kept: list[tuple[int, int] | None] = []
        for e in files:
            old = previous.get(e.path)
            same = old is not None and old.packed and old.size == e.size and old.version == e.version
            kept.append((old.pack, old.offset) if same else None)  # type: ignore[union-attr]
            if same:
                ids[old.pack] = old.unit  # type: ignore[union-attr]
        packs, offsets, _ = repack(sizes, kept, block_size, pack_threshold, previous.next_pack)
    elif pack_threshold:
        packs, offsets, _ = pack_layout(sizes, block_size, pack_threshold)
    else:
        packs, offsets = [NOT_PACKED] * len(files), [0] * len(files)
    members: dict[int, list[tuple[str, int, str, int]]] = {}
    for path, size, version, pack, offset in zip(paths, sizes, versions, packs, offsets):
        if pack != NOT_PACKED and pack not in ids:
            members.setdefault(pack, []).append((path, size, version, offset))
    ids.update({p: pack_unit(sorted(m, key=lambda x: x[3]), block_size) for p, m in members.items()})
    units = [ids[pack] if pack != NOT_PACKED else file_unit(path, size, version, block_size)
             for path, size, version, pack in zip(paths, sizes, versions, packs)]
    in_path_order = pa.table({"path": paths, "size": sizes, "version": versions,
                              "pack": pa.array(packs, pa.int32()), "offset": pa.array(offsets, pa.int32()),
                              "unit": pa.array(units, pa.uint64()),
                              "hash": pa.array([path_hash(p) for p in paths], pa.uint64())})
    return with_folders(_hash_ordered(in_path_order), leaf_folders(folders, paths))


def leaf_folders(folders: Iterable[str], sorted_paths: list[str]) -> list[str]:
    """The folders that neither a file nor another folder lies below, in path order: the
    rest are implied by what lies below them."""
    candidates = sorted({check_path(f) for f in folders} - {""})
    leaves = []
    for i, folder in enumerate(candidates):
        below = folder + "/"
        j = bisect.bisect_left(sorted_paths, below)
        if j < len(sorted_paths) and sorted_paths[j].startswith(below):
            continue
        k = bisect.bisect_left(candidates, below, i + 1)
        if k < len(candidates) and candidates[k].startswith(below):
            continue
        leaves.append(folder)
    return leaves


def with_folders(table: pa.Table, folders: list[str]) -> pa.Table:
    """`table` recording `folders` (no file implies them) in its schema's metadata."""
    if not folders:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}), FOLDERS_KEY: json.dumps(folders).encode()})


def recorded_folders(table: pa.Table) -> list[str]:
    """The folders a table records beyond those its files imply (none in older tables)."""
    raw = (table.schema.metadata or {}).get(FOLDERS_KEY)
    if not raw:
        return []
    try:
        folders = json.loads(raw)
    except ValueError as e:
        raise BadRequest(f"manifest's folder list is not JSON: {e}") from e
    if not isinstance(folders, list) or not all(isinstance(f, str) for f in folders):
        raise BadRequest("manifest's folder list must be a JSON list of paths")
    return sorted(check_path(f) for f in folders)


def _hash_ordered(table: pa.Table) -> pa.Table:
    """Rows of a path-ordered table re-ordered by hash, with `by_path` to get path order back."""
    order = pc.sort_indices(table, [("hash", "ascending"), ("path", "ascending")])
    rows = table.take(order)
    # by_path[i] = the row that holds the i-th path: where row order[i] landed, which is i's inverse
    by_path = pc.sort_indices(order).cast(pa.uint32())
    return pa.Table.from_arrays([*rows.columns, by_path], schema=SCHEMA if "unit" in table.column_names
                                else UNITLESS_SCHEMA)


def snapshot_id(table: pa.Table, layout: str = "") -> str:
    """A content id: the same listing (and pack layout) always gives the same snapshot, a
    changed one never does. `layout` names the packing parameters, since the same files
    packed differently make different blocks; a packed table is hashed column by column
    (Arrow buffers, in path order), an unpacked one file by file as cachefs 0.1 did, so a
    refresh of an unchanged older dataset keeps its snapshot."""
    folders = recorded_folders(table)
    if not layout:
        h = xxhash.xxh3_128()
        rows = table.take(table.column("by_path")) if "by_path" in table.column_names else table
        for path, size, version in zip(*(rows.column(c).to_pylist() for c in ("path", "size", "version")),
                                       strict=True):
            h.update(f"{path}\0{size}\0{version}\n".encode())
        if folders:  # an added or removed empty folder is a new snapshot; none keeps 0.1's ids
            h.update(f"\0folders\0{json.dumps(folders)}".encode())
        return h.hexdigest()[:20]
    h = xxhash.xxh3_128(layout.encode())
    if folders:
        h.update(f"\0folders\0{json.dumps(folders)}".encode())
    rows = table.take(table.column("by_path")).combine_chunks()
    # the layout too: the same files laid out otherwise (another history of refreshes) make other packs
    for name in ("path", "size", "version") + (("pack", "offset") if "unit" in table.column_names else ()):
        h.update(f"\0{name}\0".encode())
        for buffer in _value_buffers(rows.column(name).chunk(0) if rows.num_rows else pa.array([], pa.string())):
            h.update(buffer)
    return h.hexdigest()[:20]


def _value_buffers(array: pa.Array) -> list[memoryview]:
    """The bytes that say what an array holds (not its padding, nor where a slice starts)."""
    if pa.types.is_string(array.type):
        if not len(array):
            return []
        offsets = _offsets(array)
        first, last = offsets[0].as_py(), offsets[-1].as_py()
        relative = pc.subtract(offsets, first)
        data = array.buffers()[2]
        return [memoryview(relative.buffers()[1])[:4 * len(relative)],
                memoryview(data)[first:last] if data is not None else memoryview(b"")]
    width = array.type.bit_width // 8
    return [memoryview(array.buffers()[1])[array.offset * width:(array.offset + len(array)) * width]]


def _offsets(array: pa.Array) -> pa.Array:
    """A string array's n + 1 offsets (into its data buffer) as an int32 array."""
    return pa.Array.from_buffers(pa.int32(), len(array) + 1, [None, array.buffers()[1]], offset=array.offset)


def to_ipc(table: pa.Table) -> bytes:
    """Arrow IPC, its buffers compressed with zstd: a million files' reader manifest is
    24 MB on the wire instead of 50, and decompresses in ~30 ms."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes | pa.Buffer) -> pa.Table:
    """A manifest table from Arrow IPC: schema 2 (with or without versions), or schema 1
    brought to schema 2 (hashed, nothing packed)."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data) if isinstance(data, bytes) else data).read_all()
    except pa.ArrowInvalid as e:
        raise BadRequest(f"not an Arrow IPC manifest: {e}") from e
    if table.schema.equals(LEGACY_SCHEMA):
        table = _upgraded(table)
    if not any(table.schema.equals(s) for s in (SCHEMA, READER_SCHEMA, UNITLESS_SCHEMA, UNITLESS_READER_SCHEMA)):
        raise BadRequest(f"manifest schema {table.schema} is neither {SCHEMA} nor an older one")
    return table


def _upgraded(table: pa.Table) -> pa.Table:
    """A schema-1 table in schema 2: hashed, nothing packed."""
    table = table.sort_by("path")  # so it was written; made sure of, since `by_path` relies on it
    n = table.num_rows
    paths = table.column("path").to_pylist()
    return _hash_ordered(table.append_column("pack", pa.array([NOT_PACKED] * n, pa.int32())).append_column(
        "offset", pa.array([0] * n, pa.int32())).append_column(
        "hash", pa.array([path_hash(p) for p in paths], pa.uint64())))


def for_readers(table: pa.Table) -> pa.Table:
    """The table readers load: everything but the version tokens."""
    return table.drop_columns(["version"]) if "version" in table.column_names else table


class _Strings(Sequence[bytes]):
    """A string column seen as UTF-8 bytes straight from its Arrow buffers: no Arrow
    scalar and no str per access."""

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


class _InOrder(Sequence[bytes]):
    """Paths in path order (UTF-8 bytes sort as code points do): what `bisect` walks to
    find a folder's run."""

    def __init__(self, paths: _Strings, by_path: memoryview) -> None:
        self._paths, self._by_path = paths, by_path

    def __len__(self) -> int:
        return len(self._by_path)

    def __getitem__(self, i):  # type: ignore[override]
        return self._paths[self._by_path[i]]


_SKIP_FROM = 50_000  # folders with more paths below them than this are skimmed first (Manifest._skim)
_SKIM_AT_MOST = 2_000  # ... unless they turn out to have more children than this


def _column_view(array: pa.Array, fmt: str) -> memoryview:
    """The values of a null-free fixed-width column as a memoryview (no copy)."""
    return memoryview(array.buffers()[1]).cast(fmt)[array.offset:array.offset + len(array)]


class Manifest:
    """A read-only index of one snapshot: files by path, the directories they imply, and
    the folders the origin held beyond those (empty ones)."""

    def __init__(self, table: pa.Table, snapshot: str = "") -> None:
        if table.schema.equals(LEGACY_SCHEMA):
            table = _upgraded(table)
        self.table = table.combine_chunks()
        self.snapshot = snapshot or snapshot_id(self.table)
        self.has_versions = "version" in self.table.column_names
        column = lambda name: self.table.column(name).chunk(0) if self.table.num_rows else pa.array(  # noqa: E731
            [], self.table.schema.field(name).type)
        self._path_array = column("path")
        self._paths = _Strings(self._path_array)
        self._versions = _Strings(column("version")) if self.has_versions else None
        self._sizes = _column_view(column("size"), "q")
        self._packs = _column_view(column("pack"), "i")
        self._offsets = _column_view(column("offset"), "i")
        self.has_units = "unit" in self.table.column_names
        self._units = _column_view(column("unit"), "Q") if self.has_units else None
        self._hashes = _column_view(column("hash"), "Q")
        self._by_path = _column_view(column("by_path"), "I")
        self._in_order = _InOrder(self._paths, self._by_path)
        self._folders = [f.encode() for f in recorded_folders(self.table)]  # path order, as bytes
        self._pack_rows: list[int] | None = None  # rows of packed files, in pack order (server side)
        self._pack_index: dict[int, tuple[int, int]] | None = None  # pack → its run of _pack_rows

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
            if self._paths[i] == key:
                return i
            i += 1
        return None

    def at(self, row: int) -> FileEntry:
        return FileEntry(self._paths.text(row), self._sizes[row],
                         self._versions.text(row) if self._versions is not None else "",
                         self._packs[row], self._offsets[row], self._units[row] if self._units is not None else 0)

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
        """Positions [lo, hi) in path order strictly below directory `path` ('' is the root)."""
        if not path:
            return 0, len(self._in_order)
        lo = bisect.bisect_left(self._in_order, path.encode() + b"/")
        hi = bisect.bisect_left(self._in_order, path.encode() + b"0", lo)  # '0' follows '/'
        return lo, hi

    @property
    def folders(self) -> list[str]:
        """The folders no file implies (empty ones), in path order."""
        return [f.decode() for f in self._folders]

    def _folders_at(self, path: str) -> tuple[int, int]:
        """Positions [lo, hi) in the recorded folders at or below `path` ('' : all). They
        are leaves: a recorded folder has nothing recorded below it."""
        if not path:
            return 0, len(self._folders)
        key = path.encode()
        lo = bisect.bisect_left(self._folders, key)
        if lo < len(self._folders) and self._folders[lo] == key:
            return lo, lo + 1
        lo = bisect.bisect_left(self._folders, key + b"/", lo)
        return lo, bisect.bisect_left(self._folders, key + b"0", lo)  # '0' follows '/'

    def is_dir(self, path: str) -> bool:
        if not path:
            return True
        lo, hi = self._under(path)
        if hi > lo:
            return True
        lo, hi = self._folders_at(path)
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
            if not self.is_dir(path):
                raise NotFound(f"no directory {path!r} in snapshot {self.snapshot}")
            return self._folder_children(path, [])
        if hi - lo > _SKIP_FROM:
            skipped = self._skim(path, lo, hi)
            if skipped is not None:
                return self._folder_children(path, skipped)
        rows = self.table.column("by_path").slice(lo, hi - lo)
        skip = len(path.encode()) + 1 if path else 0
        rel = pc.binary_slice(pc.take(self._path_array, rows).cast(pa.binary()), skip, 1 << 30)
        is_file = pc.equal(pc.find_substring(rel, "/"), -1)
        base = f"{path}/" if path else ""
        files = pc.filter(rel, is_file).cast(pa.string()).to_pylist()
        sizes = pc.filter(pc.take(self.table.column("size"), rows), is_file).to_pylist()
        nested = pc.filter(rel, pc.invert(is_file))
        first = pc.list_element(pc.split_pattern(nested, "/", max_splits=1), 0)
        names = pc.unique(first).cast(pa.string()).to_pylist() if len(nested) else []
        out = [(base + n, "file", s) for n, s in zip(files, sizes)] + [(base + n, "directory", 0) for n in names]
        return self._folder_children(path, out)

    def _folder_children(self, path: str, children: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
        """`children` (from files) with the recorded folders' children of `path` added, sorted."""
        lo, hi = self._folders_at(path)
        base = f"{path}/" if path else ""
        known = {name for name, _, _ in children}
        for i in range(lo, hi):
            rel = self._folders[i].decode()[len(base):]
            if not rel:
                continue  # `path` itself
            child = base + rel.split("/", 1)[0]
            if child not in known:
                known.add(child)
                children.append((child, "directory", 0))
        return sorted(children)

    def _skim(self, path: str, lo: int, hi: int) -> list[tuple[str, str, int]] | None:
        """A big folder's children found by jumping over each subfolder's run (a bisection
        each) rather than reading every path below it; None when it has too many children
        for that to pay (the caller then reads them all, with Arrow kernels)."""
        base = path.encode() + b"/" if path else b""
        prefix = f"{path}/" if path else ""
        out: list[tuple[str, str, int]] = []
        i = lo
        while i < hi:
            rel = self._in_order[i][len(base):]
            slash = rel.find(b"/")
            if slash < 0:
                out.append((prefix + rel.decode(), "file", self._sizes[self._by_path[i]]))
                i += 1
            else:
                out.append((prefix + rel[:slash].decode(), "directory", 0))
                i = bisect.bisect_left(self._in_order, base + rel[:slash] + b"0", i, hi)  # past its run
            if len(out) > _SKIM_AT_MOST:
                return None
        return out

    def walk_files(self, path: str = "") -> Iterator[FileEntry]:
        """Every file at or below `path`, in path order."""
        row = self.row(path) if path else None
        if row is not None:
            yield self.at(row)
            return
        lo, hi = self._under(path)
        if hi <= lo and path and not self.is_dir(path):
            raise NotFound(f"no file or directory {path!r} in snapshot {self.snapshot}")
        for i in range(lo, hi):
            yield self.at(self._by_path[i])

    def files_below(self, path: str = "") -> pa.Table:
        """Every file at or below `path` as an Arrow table (path, size) in path order: one
        `take` over the folder's run of rows, no Python object per file (what `find` and
        `glob` filter and turn into names). NotFound for a path that is neither."""
        row = self.row(path) if path else None
        if row is not None:
            rows = pa.array([row], pa.uint32())
        else:
            lo, hi = self._under(path)
            if hi <= lo and path and not self.is_dir(path):
                raise NotFound(f"no file or directory {path!r} in snapshot {self.snapshot}")
            rows = self.table.column("by_path").slice(lo, hi - lo)
        return self.table.select(["path", "size"]).take(rows)

    def folders_below(self, below: str, files: pa.Array | pa.ChunkedArray) -> pa.Array:
        """Every folder strictly below folder `below`, sorted: those its `files` (from
        `files_below(below)`) imply and the recorded (empty) ones with their parents."""
        lo, hi = self._folders_at(below)
        recorded = [f.decode() for f in self._folders[lo:hi] if f != below.encode()]
        if not recorded:
            return self.implied_folders(files, below)
        leaves = pa.array(recorded, pa.string())
        both = pa.concat_arrays([self.implied_folders(files, below), leaves,
                                 self.implied_folders(leaves, below)])
        both = pc.unique(both)
        return pc.take(both, pc.sort_indices(both))

    @staticmethod
    def implied_folders(paths: pa.Array | pa.ChunkedArray, below: str = "") -> pa.Array:
        """The folders that `paths` (files, relative to the dataset) imply strictly below
        folder `below`, sorted: each file's parent, then theirs, each level a `unique` of
        the one before (a million files in a thousand folders cost a thousand strings)."""
        level = pc.unique(pc.replace_substring_regex(
            pc.filter(paths, pc.match_substring(paths, "/")), r"/[^/]*$", ""))
        found: list[pa.Array] = []
        while len(level):
            found.append(level)
            nested = pc.filter(level, pc.match_substring(level, "/"))
            level = pc.unique(pc.replace_substring_regex(nested, r"/[^/]*$", ""))
        folders = pa.concat_arrays([a.cast(pa.string()) for a in found]) if found else pa.array([], pa.string())
        folders = pc.unique(folders)
        if below:
            prefix = below + "/"
            folders = pc.filter(folders, pc.starts_with(folders, prefix))
        return pc.take(folders, pc.sort_indices(folders))

    # -- packs (the server's view) ----------------------------------------------------------
    def _index_packs(self) -> None:
        """Packed rows grouped by pack, in offset order (numbers kept across refreshes need
        not follow path order, nor be dense)."""
        packs, offsets = self._packs, self._offsets
        rows = sorted((r for r in range(len(packs)) if packs[r] != NOT_PACKED), key=lambda r: (packs[r], offsets[r]))
        index: dict[int, tuple[int, int]] = {}
        start = 0
        for j in range(1, len(rows) + 1):
            if j == len(rows) or packs[rows[j]] != packs[rows[start]]:
                index[packs[rows[start]]] = (start, j)
                start = j
        self._pack_rows, self._pack_index = rows, index

    @property
    def packs(self) -> int:
        """How many packs this snapshot reads."""
        return len(self._packs_index())

    def pack_numbers(self) -> list[int]:
        return sorted(self._packs_index())

    @property
    def next_pack(self) -> int:
        """The number a new pack of the next snapshot gets (numbers are never reused)."""
        return max(self._packs_index(), default=-1) + 1

    def pack_members(self, pack: int) -> list[FileEntry]:
        """The files laid out in `pack`, in offset order (built once; O(files) the first time)."""
        lo, hi = self._pack_range(pack)
        assert self._pack_rows is not None
        return [self.at(r) for r in self._pack_rows[lo:hi]]

    def pack_size(self, pack: int) -> int:
        """Bytes in `pack` up to its last live member's end, without building its members."""
        _, hi = self._pack_range(pack)
        assert self._pack_rows is not None
        last = self._pack_rows[hi - 1]
        return self._offsets[last] + self._sizes[last]

    def pack_unit(self, pack: int) -> int:
        """The pack's id (0 in a manifest from before units)."""
        lo, _ = self._pack_range(pack)
        assert self._pack_rows is not None
        return self._units[self._pack_rows[lo]] if self._units is not None else 0

    def _packs_index(self) -> dict[int, tuple[int, int]]:
        if self._pack_index is None:
            self._index_packs()
        assert self._pack_index is not None
        return self._pack_index

    def _pack_range(self, pack: int) -> tuple[int, int]:
        found = self._packs_index().get(pack)
        if found is None:
            raise NotFound(f"no pack {pack} in snapshot {self.snapshot} ({self.packs} packs)")
        return found
