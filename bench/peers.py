"""The peers a training node reads through, behind one small interface (`Reader`).

- `origin`  — the origin read directly with s3fs; nothing is kept.
- `pernode` — the "copy per node" approach: every node keeps whole files on its own local
  disk, least recently used evicted past a byte budget (`LocalLRUCache`). fsspec's
  `simplecache`/`filecache` work the same way (whole files, on first open) but have no
  byte budget; `budget=None` here is exactly that.
- `cachefs` — the `cachefs://` client; the cache cluster counts origin bytes, not the reader.
- `mount`   — a `cachefs mount` directory read with plain open/read. Each file's pages are
  dropped from the kernel's page cache after reading (POSIX_FADV_DONTNEED): the mount
  keeps pages (`keep_cache`), and that would be a second, unbudgeted copy in every node's
  RAM, the very per-node copy cachefs exists to avoid; dropping them measures cachefs.

A reader is built inside the process that reads (`make_reader(spec)`), from a picklable
`PeerSpec`. `read(path, size)` reads one file whole, as a data loader's worker does, and is
safe to call from many threads.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

MiB = 1024 * 1024
LOAD_TIMEOUT = 300.0  # one whole-file download from the origin


@dataclass(frozen=True)
class PeerSpec:
    kind: str  # origin | pernode | cachefs | mount
    label: str
    root: str  # S3 prefix (origin, pernode), dataset name (cachefs), mount directory (mount)
    storage_options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str = ""  # pernode: this node's cache directory is cache_dir/<node index>
    budget: int | None = None  # pernode: bytes per node; None: no limit
    endpoint: str = ""
    token: str = ""
    piece: int = MiB  # files are streamed in reads of this size...
    whole: int = 4 * MiB  # ...unless they are at most this large: then one request reads all

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.label}|{self.root}|{self.cache_dir}|{self.endpoint}"


def _drain(f: Any, piece: int) -> int:
    """Read a file object to its end in `piece`-sized reads (the bytes are materialised)."""
    n = 0
    while chunk := f.read(piece):
        n += len(chunk)
    return n


class Reader:
    """Reads whole files; counts bytes read, bytes taken from the origin, bytes kept."""

    def __init__(self, spec: PeerSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()  # guards the counters
        self.read_bytes = 0
        self.origin_bytes = 0

    def read(self, path: str, size: int) -> int:
        n = self._read(path, size)
        with self._lock:
            self.read_bytes += n
        return n

    def _read(self, path: str, size: int) -> int:
        raise NotImplementedError

    def origin_read(self) -> int:
        """Bytes this reader took from the origin so far."""
        return self.origin_bytes

    def held_bytes(self) -> int:
        """Bytes this reader keeps (its cache)."""
        return 0

    def stats(self) -> dict[str, int]:
        return {"read_bytes": self.read_bytes, "origin_bytes": self.origin_read(), "held_bytes": self.held_bytes()}

    def read_all(self, items: Sequence[tuple[str, int]], workers: int) -> dict[str, Any]:
        """Read every (path, size) with `workers` threads, like a data loader's workers."""
        import time

        before = self.stats()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(1, workers)) as pool:
            n = sum(pool.map(lambda item: self.read(*item), items))
        seconds = time.perf_counter() - t0
        after = self.stats()
        return {"seconds": seconds, "bytes": n, "files": len(items),
                "origin_bytes": after["origin_bytes"] - before["origin_bytes"], "held_bytes": after["held_bytes"]}

    def close(self) -> None:
        pass


class OriginReader(Reader):
    def __init__(self, spec: PeerSpec) -> None:
        import s3fs

        super().__init__(spec)
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, **spec.storage_options)

    def fetch(self, path: str, size: int) -> bytes | None:
        """The whole file in one GET when it is small; None when it should be streamed."""
        return self.fs.cat_file(f"{self.spec.root}/{path}") if size <= self.spec.whole else None

    def _read(self, path: str, size: int) -> int:
        data = self.fetch(path, size)
        if data is not None:
            n = len(data)
        else:  # 8 MiB ranged GETs, as a streaming loader would ask S3
            with self.fs.open(f"{self.spec.root}/{path}", "rb", block_size=8 * MiB, size=size) as f:
                n = _drain(f, self.spec.piece)
        with self._lock:
            self.origin_bytes += n
        return n


class LocalLRUCache:
    """Whole files on local disk within a byte budget (None: unbounded), least recently
    used evicted first. A file is fetched once however many threads want it at once; a
    file larger than the budget is passed through, never kept."""

    def __init__(self, root: str | os.PathLike[str], budget: int | None,
                 fetch: Callable[[str, int, Path], int]) -> None:
        self.root = Path(root)
        self.budget = budget
        self.fetch = fetch  # (path, size, destination) -> bytes written
        (self.root / ".tmp").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards everything below
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._loading: dict[str, threading.Event] = {}
        self.used = 0
        self.fetched_bytes = 0
        self.evictions = 0

    def open(self, path: str, size: int) -> BinaryIO:
        """An open local file with the bytes of `path` (opened under the lock, so an
        eviction that follows cannot take it away: the unlinked file stays readable)."""
        while True:
            with self._lock:
                if path in self._sizes:
                    self._sizes.move_to_end(path)
                    return open(self.root / path, "rb", buffering=0)
                loading = self._loading.get(path)
                if loading is None:
                    self._loading[path] = threading.Event()
            if loading is not None:  # another thread fetches it: wait, then look again
                if not loading.wait(LOAD_TIMEOUT):
                    raise TimeoutError(f"fetching {path} took longer than {LOAD_TIMEOUT:.0f} s")
                continue
            try:
                return self._load(path, size)
            finally:
                with self._lock:
                    self._loading.pop(path).set()

    def _load(self, path: str, size: int) -> BinaryIO:
        tmp = self.root / ".tmp" / uuid.uuid4().hex
        n = self.fetch(path, size, tmp)
        with self._lock:
            self.fetched_bytes += n
            if self.budget is not None and n > self.budget:
                f = open(tmp, "rb", buffering=0)
                tmp.unlink()
                return f
            final = self.root / path
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            self._sizes[path] = n
            self.used += n
            while self.budget is not None and self.used > self.budget:
                victim, vsize = self._sizes.popitem(last=False)
                (self.root / victim).unlink(missing_ok=True)
                self.used -= vsize
                self.evictions += 1
            return open(final, "rb", buffering=0)


class PerNodeReader(Reader):
    def __init__(self, spec: PeerSpec, node: int) -> None:
        super().__init__(spec)
        self.origin = OriginReader(spec)
        self.cache = LocalLRUCache(Path(spec.cache_dir) / f"node-{node}", spec.budget, self._fetch)

    def _fetch(self, path: str, size: int, dest: Path) -> int:
        data = self.origin.fetch(path, size)
        with open(dest, "wb") as out:
            if data is not None:
                out.write(data)
                return len(data)
            n = 0
            with self.origin.fs.open(f"{self.spec.root}/{path}", "rb", block_size=8 * MiB, size=size) as f:
                while chunk := f.read(8 * MiB):
                    out.write(chunk)
                    n += len(chunk)
            return n

    def origin_read(self) -> int:
        return self.cache.fetched_bytes

    def _read(self, path: str, size: int) -> int:
        with self.cache.open(path, size) as f:
            return _drain(f, self.spec.piece)

    def held_bytes(self) -> int:
        return self.cache.used


class CachefsReader(Reader):
    def __init__(self, spec: PeerSpec) -> None:
        from cachefs.filesystem import CachefsFileSystem

        super().__init__(spec)
        # No origin fallback: every byte comes through the cache nodes, which count them.
        self.fs = CachefsFileSystem(endpoint=spec.endpoint, token=spec.token, skip_instance_cache=True,
                                    origin_fallback=False)

    def _read(self, path: str, size: int) -> int:
        full = f"{self.spec.root}/{path}"
        if size <= self.spec.whole:  # its blocks fetched at once, from their owners
            return len(self.fs.cat_file(full))
        with self.fs.open(full, "rb") as f:
            return _drain(f, self.spec.piece)

    def close(self) -> None:
        self.fs.close()


class MountReader(Reader):
    def _read(self, path: str, size: int) -> int:
        with open(os.path.join(self.spec.root, path), "rb", buffering=0) as f:
            n = _drain(f, self.spec.piece)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return n


def make_reader(spec: PeerSpec, node: int = 0) -> Reader:
    if spec.kind == "origin":
        return OriginReader(spec)
    if spec.kind == "pernode":
        return PerNodeReader(spec, node)
    if spec.kind == "cachefs":
        return CachefsReader(spec)
    if spec.kind == "mount":
        return MountReader(spec)
    raise ValueError(f"unknown peer kind {spec.kind!r}")
