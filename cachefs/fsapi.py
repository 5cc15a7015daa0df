"""The rest of the fsspec API that libraries call: times, change keys, existence, glob.

DuckDB asks `modified` before it reads, caches key on `ukey`/`checksum`, and pyarrow,
polars and `datasets` expand patterns with `glob` (`**` included). All of them are
answered from the dataset's manifest, without a round trip once it is loaded:

- a file's time (`mtime`, `modified`, `created`) is its snapshot's: the moment its bytes
  were pinned. A file that changes at the origin only shows through a refresh, which makes
  a new snapshot with a later time, so a cache keyed on it is never stale. (The manifest
  has no per-file origin time; adding one would widen every client's manifest.)
- `ukey`/`checksum` name the bytes: the file's version token where the manifest carries
  it, else the snapshot (which hashes every version token) and the path.
- `find` and `glob` filter the manifest's Arrow columns (a regular expression kernel over
  the paths below the pattern's fixed folder) and build only the names they return.
"""

from __future__ import annotations

import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import xxhash
from fsspec.asyn import sync
from fsspec.utils import glob_translate

from cachefs.blocks import DatasetView
from cachefs.common.errors import BadRequest, NotFound
from cachefs.common.manifest import check_path

_MAGIC = "*?["


def _has_magic(s: str) -> bool:
    return any(c in s for c in _MAGIC)


def arrow_regex(pattern: str) -> str:
    """fsspec's glob pattern (`glob_translate`, Python `re`, matched from the start and
    ending in `\\Z`) as RE2 for Arrow: anchored both ends."""
    if pattern.endswith(r"\Z"):
        pattern = pattern[:-2] + "$"
    return "^" + pattern


class LibraryCalls:
    """Mixed into `CachefsFileSystem` (which provides `_view`, `_split`, `_info`, `loop`)."""

    # -- times and change keys ------------------------------------------------------------
    async def _modified(self, path: str) -> datetime.datetime:
        info = await self._info(path)  # type: ignore[attr-defined]
        if "mtime" not in info:
            raise BadRequest("the root of cachefs:// has no time; ask about a dataset or a path in one")
        return datetime.datetime.fromtimestamp(info["mtime"], tz=datetime.timezone.utc)

    def modified(self, path: str) -> datetime.datetime:
        """When the path's bytes were pinned (its snapshot's time), as an aware UTC datetime."""
        return sync(self.loop, self._modified, path)  # type: ignore[attr-defined]

    def created(self, path: str) -> datetime.datetime:
        """The same as `modified`: a snapshot's files come into being with it."""
        return self.modified(path)

    async def _ukey(self, path: str) -> str:
        name, rel = self._split(self._strip_protocol(path))  # type: ignore[attr-defined]
        view: DatasetView = await self._view(name)  # type: ignore[attr-defined]
        entry = view.manifest.get(rel)
        if entry is None:
            view.manifest.entry(rel)  # NotFound unless a directory
            return xxhash.xxh3_128_hexdigest(f"dir\0{name}\0{view.info.snapshot}\0{rel}".encode())
        if entry.version:  # the origin's own token: unchanged across snapshots when the file is
            key = f"version\0{view.info.origin}\0{rel}\0{entry.size}\0{entry.version}"
        else:
            key = f"snapshot\0{view.info.origin}\0{view.info.snapshot}\0{rel}"
        return xxhash.xxh3_128_hexdigest(key.encode())

    def ukey(self, path: str) -> str:
        """A key that changes when the file's bytes may have: its version token where the
        manifest has it, else its snapshot and path."""
        return sync(self.loop, self._ukey, path)  # type: ignore[attr-defined]

    def checksum(self, path: str) -> int:
        """`ukey` as an integer (fsspec's contract: equal means the same bytes)."""
        return int(self.ukey(path)[:16], 16)

    # -- existence ------------------------------------------------------------------------
    async def _exists(self, path: str, **kwargs: Any) -> bool:
        try:
            await self._info(path)  # type: ignore[attr-defined]
        except NotFound:
            return False
        return True

    async def _isdir(self, path: str) -> bool:
        try:
            return (await self._info(path))["type"] == "directory"  # type: ignore[attr-defined]
        except NotFound:
            return False

    async def _isfile(self, path: str) -> bool:
        try:
            return (await self._info(path))["type"] == "file"  # type: ignore[attr-defined]
        except NotFound:
            return False

    # -- find and glob from the manifest's columns -------------------------------------
    def _found(self, view: DatasetView, name: str, files: pa.Table, detail: bool,
               folders: pa.Array | None = None) -> Any:
        """Names (or fsspec's detail dicts) of `files` (path, size; path order) and
        `folders` (sorted), each built only now, from the columns."""
        prefix = pa.scalar(f"{name}/")
        names = pc.binary_join_element_wise(prefix, files.column("path"), "").to_pylist()
        dirs = pc.binary_join_element_wise(prefix, folders, "").to_pylist() if folders is not None else []
        if not detail:
            return sorted(names + dirs) if dirs else names  # path order is str order already
        snapshot, mtime = view.info.snapshot, view.info.created
        out = {n: {"name": n, "size": s, "type": "file", "snapshot": snapshot, "mtime": mtime}
               for n, s in zip(names, files.column("size").to_pylist())}
        out.update({d: {"name": d, "size": 0, "type": "directory", "mtime": mtime} for d in dirs})
        return dict(sorted(out.items())) if dirs else out

    async def _glob(self, path: str, maxdepth: int | None = None, **kwargs: Any) -> Any:
        """fsspec's glob (`*`, `?`, `[...]`, `**`), answered by one regular expression over
        the manifest's paths below the pattern's fixed folder."""
        stripped = self._strip_protocol(path)  # type: ignore[attr-defined]
        name, _, rel = stripped.partition("/")
        if maxdepth is not None or not _has_magic(rel) or _has_magic(name) or not name:
            return await super()._glob(path, maxdepth=maxdepth, **kwargs)  # type: ignore[misc]
        detail, withdirs = kwargs.get("detail", False), kwargs.get("withdirs", True)
        ends_with_sep = path.endswith("/")
        slash_dirs = ends_with_sep or stripped.endswith("/**")  # a folder matches as "folder/"
        rel = check_path(rel)
        first = min(i for i in (rel.find(c) for c in _MAGIC) if i >= 0)
        root = rel[:rel.rfind("/", 0, first)] if "/" in rel[:first] else ""
        view: DatasetView = await self._view(name)  # type: ignore[attr-defined]
        try:
            below = view.manifest.files_below(root)
        except NotFound:
            return {} if detail else []
        regex = arrow_regex(glob_translate(rel + ("/" if ends_with_sep else "")))
        files = below.filter(pc.match_substring_regex(below.column("path"), regex))
        folders = None
        if withdirs:
            folders = view.manifest.folders_below(root, below.column("path"))
            if root and view.manifest.is_dir(root):
                folders = pa.concat_arrays([pa.array([root], pa.string()), folders])
            seen = pc.binary_join_element_wise(folders, pa.scalar("/"), "") if slash_dirs else folders
            folders = folders.filter(pc.match_substring_regex(seen, regex))
        return self._found(view, name, files, detail, folders)
