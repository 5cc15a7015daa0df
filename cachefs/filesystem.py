"""`cachefs://DATASET/path`: an fsspec async filesystem over the cache cluster.

Built like s3fs: I/O methods are `async def _name` (fsspec mirrors them as sync
methods), the file object has one read path (`_fetch_range`), and every network call
goes through `Transport`. Metadata comes from the dataset's manifest, loaded once per
snapshot; bytes come from the blocks' owners directly (cachefs/blocks.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import weakref
from typing import Any

from fsspec.asyn import AsyncFileSystem, sync, sync_wrapper
from fsspec.caching import BaseCache, caches
from fsspec.spec import AbstractBufferedFile

from cachefs.common import wire
from cachefs import pins
from cachefs.blocks import BlockReader, DatasetView
from cachefs.buffers import BufferPool, new_bytes
from cachefs.config import ClientConfig
from cachefs.common.settings import load
from cachefs.blockproto import one_item_body, request_head
from cachefs.direct import DirectReads
from cachefs.fsapi import LibraryCalls
from cachefs.common.errors import BadRequest, CachefsError, NodeUnavailable, NotFound, ReadOnlyError, SnapshotGone
from cachefs.common.manifest import FileEntry, Manifest, check_path, from_ipc
from cachefs.pins import Pins
from cachefs.plan import Slice, plan
from cachefs.transport import Transport
from cachefs.common.wire import DatasetInfo

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(ClientConfig)}
DIRECT_MAX = 4 * 1024 * 1024  # sync reads up to this size may go on the caller's thread (cachefs/direct.py)
DIRECT_KNOWN = 1 << 17  # whole-file direct reads whose request bytes are kept (then forgotten at once)


def _read_only(*_args: Any, **_kwargs: Any) -> None:
    raise ReadOnlyError("cachefs is read-only: datasets are immutable snapshots of their origin; "
                        "write to the origin and run `cachefs dataset refresh`")


def _close_quietly(loop: Any, blocks: BlockReader, transport: Transport, pid: int) -> None:
    # A copy inherited by a forked child (a DataLoader worker) has no loop thread there: the
    # loop looks running but nothing would ever run the close, and waiting for it stalls the
    # child for seconds. The parent closes its own.
    if pid != os.getpid() or loop is None or loop.is_closed() or not loop.is_running():
        return
    for close in (transport.close, blocks.close):  # the session first: it is what warns when left open
        try:
            sync(loop, close, timeout=2)
        except Exception:  # interpreter shutdown or a dead loop: nothing left to close cleanly
            pass


def _bounds(size: int, start: int | None, end: int | None) -> tuple[int, int]:
    """fsspec's (start, end) of a file of `size` bytes as [lo, hi): None for its ends,
    negative from its end, clamped to it (lo >= hi: nothing to read)."""
    lo = 0 if start is None else (start if start >= 0 else max(0, size + start))
    hi = size if end is None else (end if end >= 0 else max(0, size + end))
    return max(0, lo), min(hi, size)


class CachefsFileSystem(LibraryCalls, AsyncFileSystem):
    """Read-only access to the datasets of one cachefs cluster.

    Storage options: `endpoint`, `token` and the other ClientConfig fields (else
    CACHEFS_* variables, else the file `cachefs up` writes); `origin_storage_options`
    for the direct-origin fallback; `snapshots` ({dataset: snapshot}) to read those
    snapshots only. An instance reads each dataset at the snapshot it first loaded until
    `invalidate_cache` (cachefs/pins.py).
    """

    protocol = "cachefs"
    root_marker = ""
    async_impl = True

    def __init__(self, *, asynchronous: bool = False, loop: Any = None,
                 origin_storage_options: dict[str, Any] | None = None,
                 snapshots: dict[str, str] | None = None, **kwargs: Any) -> None:
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
        super().__init__(asynchronous=asynchronous, loop=loop, **kwargs)
        self.config = load(ClientConfig, overrides)
        self.config.require_endpoint()
        self.transport = Transport(self.config)
        self.blocks = BlockReader(self.config, self.transport, origin_storage_options)
        self.direct = DirectReads(self.config.token, self.config.connect_timeout, self.config.read_timeout,
                                  self.transport.ssl_context, self.transport.server_name)
        self.pool = BufferPool(wire.DEFAULT_BLOCK_SIZE)  # open files' block buffers, reused
        self.pins = Pins(snapshots)
        # path → (dataset, view, routes, url, request, size) of a whole-file direct read (`_direct_read`)
        self._direct_known: dict[str, tuple[str, DatasetView, object, str, bytes, int]] = {}
        self._resolved: dict[str, tuple[str, DatasetView, FileEntry]] = {}  # path → (pin, view, entry): `_held`
        if not asynchronous:  # like s3fs: close the session when the instance goes away
            weakref.finalize(self, _close_quietly, self.loop, self.blocks, self.transport, os.getpid())

    # -- paths ---------------------------------------------------------------------------
    @classmethod
    def _strip_protocol(cls, path: str | list[str]) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        if path.startswith("cachefs://"):
            path = path[len("cachefs://"):]
        return path.strip("/")

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        name, _, rel = path.partition("/")
        if not name:
            raise BadRequest("a cachefs path starts with a dataset name: cachefs://DATASET/path")
        return name, check_path(rel)

    # -- datasets ------------------------------------------------------------------------
    async def _view(self, name: str) -> DatasetView:
        """The dataset as this instance reads it: the snapshot it holds (cachefs/pins.py).
        `name` may pin one itself: `dataset@SNAPSHOT`."""
        return await self.pins.view(name, self._load_view)

    async def _load_view(self, name: str, want: str | None) -> DatasetView:
        """The manifest of `want` (None: the current snapshot), with a lease on its snapshot:
        the cluster keeps it readable for a while after a refresh (server/leases.py)."""
        if not wire.DATASET_NAME_RE.match(name):
            raise NotFound(f"no dataset named {name!r} (dataset names are lowercase)")
        if want is not None and not wire.SNAPSHOT_ID_RE.match(want):
            raise BadRequest(f"{want!r} is not a snapshot id (hex digits, as `cachefs dataset ls` shows them)")
        at = f"snapshot={want}&" if want else ""
        info = DatasetInfo.from_json(await self._any_node("GET", wire.route(wire.DATASET, name=name) +
                                                          (f"?snapshot={want}" if want else "")))
        # version tokens only for a client that may read the origin itself (it checks them)
        versions = self.config.origin_fallback and self.blocks.origin_options is not None
        query = f"?{at}lease=1" + ("" if versions else "&versions=0")
        body, headers = await self._any_node("GET", wire.route(wire.DATASET_MANIFEST, name=name) + query, raw=True)
        snapshot = headers.get(wire.SNAPSHOT_HEADER, info.snapshot)
        table = await asyncio.to_thread(from_ipc, body) if len(body) > 1 << 20 else from_ipc(body)
        return DatasetView(dataclasses.replace(info, snapshot=snapshot), Manifest(table, snapshot))

    async def _any_node(self, method: str, path: str, raw: bool = False) -> Any:
        """A metadata call: any node answers (the ones the ring taught us included)."""
        return await self.blocks.endpoints.call(self.transport, method, path, raw=raw)

    async def _dataset_info(self, name: str) -> DatasetInfo:
        """The dataset's current info, asked afresh (one small request, no manifest)."""
        if not wire.DATASET_NAME_RE.match(name):
            raise NotFound(f"no dataset named {name!r} (dataset names are lowercase)")
        return DatasetInfo.from_json(await self._any_node("GET", wire.route(wire.DATASET, name=name)))

    dataset_info = sync_wrapper(_dataset_info)

    async def _datasets(self) -> list[DatasetInfo]:
        doc = await self._any_node("GET", wire.DATASETS)
        return [DatasetInfo.from_json(d) for d in doc["datasets"]]

    def invalidate_cache(self, path: str | None = None) -> None:
        """Move on to the current snapshot (of every dataset, or of the one `path` is in):
        files already open keep theirs."""
        self.pins.release(None if path is None else self._strip_protocol(path).partition("/")[0])
        self._direct_known.clear()  # checked against the pins anyway: this only lets old views go
        self._resolved.clear()

    # -- metadata ------------------------------------------------------------------------
    @staticmethod
    def _entry(name: str, rel: str, kind: str, size: int, view: DatasetView) -> dict[str, Any]:
        d: dict[str, Any] = {"name": f"{name}/{rel}" if rel else name, "size": size, "type": kind,
                             "mtime": view.info.created}  # the snapshot's time (cachefs/fsapi.py)
        if kind == "file":
            d["snapshot"] = view.info.snapshot  # what the bytes are pinned to (a file's version is in it)
            if view.manifest.has_versions:
                entry = view.manifest.get(rel)
                d["version"] = entry.version if entry else ""
        return d

    async def _info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        if not path:
            return {"name": "", "size": 0, "type": "directory"}
        name, rel = self._split(path)
        view = await self._view(name)
        kind, size = view.manifest.entry(rel)
        return self._entry(name, rel, kind, size, view)

    async def _ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        if not path:
            out = [{"name": d.name, "size": 0, "type": "directory", "mtime": d.created} for d in await self._datasets()]
        else:
            name, rel = self._split(path)
            view = await self._view(name)
            out = [self._entry(name, child, kind, size, view) for child, kind, size in view.manifest.list_dir(rel)]
        return out if detail else [o["name"] for o in out]

    async def _find(self, path: str, maxdepth: int | None = None, withdirs: bool = False,
                    detail: bool = False, **kwargs: Any) -> Any:
        """Every file below `path`, from the manifest in one pass (no walk of `ls` calls)."""
        path = self._strip_protocol(path)
        if not path or maxdepth is not None or withdirs:
            return await super()._find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        name, rel = self._split(path)
        view = await self._view(name)
        try:
            files = view.manifest.files_below(rel)
        except NotFound:
            return {} if detail else []
        return self._found(view, name, files, detail)

    # -- bytes ---------------------------------------------------------------------------
    async def _resolve(self, path: str) -> tuple[DatasetView, FileEntry]:
        name, rel = self._split(self._strip_protocol(path))
        view = await self._view(name)
        entry = view.manifest.get(rel)
        if entry is None:
            if view.manifest.is_dir(rel):
                raise IsADirectoryError(f"{path} is a directory")
            raise NotFound(f"no file {rel!r} in dataset {name} (snapshot {view.info.snapshot})")
        if len(self._resolved) >= DIRECT_KNOWN:
            self._resolved.clear()
        self._resolved[path] = (name, view, entry)
        return view, entry

    def _held(self, path: str) -> tuple[DatasetView, FileEntry] | None:
        """`_resolve`'s answer for a path resolved before, if its view is still the one
        pinned (no parsing, no manifest look-up, no coroutine); else None."""
        known = self._resolved.get(path)
        if known is None or self.pins.get(known[0]) is not known[1]:
            return None
        return known[1], known[2]

    async def _read_view(self, view: DatasetView, slices: list[Slice]) -> list[CachefsError | None]:
        """Every read of bytes: from the view's snapshot (each slice's error, None if served),
        or SnapshotGone saying what to do."""
        try:
            return await self.blocks.read(view, slices)
        except SnapshotGone as e:
            raise pins.gone(view.info.name, view.info.snapshot, f"the dataset was refreshed: {e.message}") from e

    async def _fill(self, view: DatasetView, slices: list[Slice]) -> None:
        """Fill the slices' destinations; raise the first slice's error, if any."""
        error = next((e for e in await self._read_view(view, slices) if e is not None), None)
        if error is not None:
            raise error

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """Sync `cat_file`: a small read one node can answer goes on this thread
        (cachefs/direct.py); anything else through the event loop (`_cat_file`)."""
        data = self._direct_read(path, start, end)
        return data if data is not None else sync(self.loop, self._cat_file, path, start, end, **kwargs)

    def _direct_read(self, path: str, start: int | None, end: int | None) -> bytes | None:
        if start is None and end is None:  # the one-by-one hot path: a whole file, asked before
            known = self._direct_known.get(path)
            if known is not None:
                name, view, routes, url, request, size = known
                if self.pins.get(name) is view and self.blocks.routes is routes and not self.blocks.is_down(url):
                    out, dest = new_bytes(size)
                    return out if self._direct_send(url, request, dest) else None
        try:
            name, rel = self._split(self._strip_protocol(path))
        except BadRequest:
            return None
        view = self.pins.get(name)
        entry = view.manifest.get(rel) if view is not None else None
        if view is None or entry is None:
            return None  # not loaded yet (or not a file): the usual path loads it, or says why
        lo, hi = _bounds(entry.size, start, end)
        if lo >= hi:
            return b""
        if hi - lo > DIRECT_MAX:
            return None
        buf = self._direct_fill(view, entry, lo, hi, new_bytes, (path, name) if start is None and end is None else None)
        return buf[0] if buf is not None else None

    def _direct_fill(self, view: DatasetView, entry: FileEntry, lo: int, hi: int,
                     alloc: Any, remember: tuple[str, str] | None = None) -> tuple[Any, memoryview] | None:
        """Bytes [lo, hi) of one unit from its owner, on this thread; None to go the usual way.
        `remember`: (path, pinned name) a whole-file read was asked by, kept with its request bytes
        (valid while the pinned view and the ring stay the same objects: the snapshot rule
        holds because the request names the view's snapshot)."""
        routes = self.blocks.routes
        slices = plan(view.info, entry, lo, hi, memoryview(b""))
        owner = self.blocks.owner(slices[0].key, view.info.replicas) if len(slices) == 1 else None
        if owner is None:
            return None
        url, epoch = owner
        request = request_head(url, view.info.name, self.direct.token, epoch,
                               one_item_body(view.info.snapshot, slices[0].item))
        if remember is not None:
            if len(self._direct_known) >= DIRECT_KNOWN:
                self._direct_known.clear()
            self._direct_known[remember[0]] = (remember[1], view, routes, url, request, hi - lo)
        out, dest = alloc(hi - lo)
        return (out, dest) if self._direct_send(url, request, dest) else None

    def _direct_send(self, url: str, request: bytes, dest: memoryview) -> bool:
        try:
            return self.direct.read_one(url, request, dest)
        except NodeUnavailable:
            self.blocks.mark_down(url)  # and the usual path tries the next owner
            return False

    async def _cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        (result,) = await self._cat_ranges([path], [start], [end], on_error="raise")
        return result

    async def _cat_ranges(self, paths: list[str], starts: list[int] | int | None, ends: list[int] | int | None,
                          max_gap: Any = None, on_error: str = "return", **kwargs: Any) -> list[Any]:
        """Many (path, start, end) reads as one batched read: grouped by node, sent at once."""
        n = len(paths)
        starts = starts if isinstance(starts, list) else [starts] * n  # type: ignore[list-item]
        ends = ends if isinstance(ends, list) else [ends] * n  # type: ignore[list-item]
        if not len(starts) == len(ends) == n:
            raise BadRequest("cat_ranges needs as many starts and ends as paths")
        results = await self._read_many(list(zip(paths, starts, ends)))
        if on_error == "raise":
            _raise_first(results)
        return results

    async def _cat_ranges_into(self, paths: list[str], starts: list[int | None], ends: list[int | None],
                               buffers: list[Any]) -> list[Any]:
        """`cat_ranges` into the caller's buffers (readinto): read i lands at the start of
        `buffers[i]` (any writable buffer at least that long), so a trainer or the mount
        reuses its memory instead of faulting in fresh pages for every file. Answers, per
        read, the number of bytes written or its exception."""
        if not len(starts) == len(ends) == len(buffers) == len(paths):
            raise BadRequest("cat_ranges_into needs as many starts, ends and buffers as paths")
        reads = list(zip(paths, starts, ends))
        try:
            return await self._read_many(reads, buffers)
        except SnapshotGone:  # refreshed since the manifest was loaded: a fresh read sees the new one
            for path in paths:
                self.invalidate_cache(path)
            return await self._read_many(reads, buffers)

    cat_ranges_into = sync_wrapper(_cat_ranges_into)

    async def _cat(self, path: Any, recursive: bool = False, on_error: str = "raise", batch_size: Any = None,
                   **kwargs: Any) -> Any:
        """Whole files, many at once (fsspec's `cat`): one batched read for all of them."""
        paths = await self._expand_path(path, recursive=recursive)
        files = [p for p in paths if not (await self._info(p))["type"] == "directory"] if recursive else paths
        results = await self._cat_ranges(files, None, None, on_error=on_error)
        out = dict(zip(files, results))
        if on_error == "omit":
            out = {k: v for k, v in out.items() if not isinstance(v, BaseException)}
        single = len(paths) == 1 and not isinstance(path, list) and paths[0] == self._strip_protocol(path)
        return out[paths[0]] if single and paths[0] in out else out

    async def _read_many(self, reads: list[tuple[str, int | None, int | None]],
                         into: list[Any] | None = None) -> list[Any]:
        """Each read's bytes (or, `into` given, its length, the bytes in `into[i]`), or its
        exception; all their slices read together."""
        results: list[Any] = [None] * len(reads)
        work: dict[str, tuple[DatasetView, list[Slice], list[tuple[int, int, int]]]] = {}  # (read, its slices)
        for i, (path, start, end) in enumerate(reads):
            held = self._held(path)
            if held is not None:
                view, entry = held
            else:
                try:
                    view, entry = await self._resolve(path)
                except (CachefsError, OSError) as e:
                    results[i] = e
                    continue
            lo, hi = _bounds(entry.size, start, end)
            if into is not None:
                try:
                    dest = memoryview(into[i]).cast("B")
                except TypeError as e:
                    results[i] = BadRequest(f"buffer {i} is not a contiguous writable buffer: {e}")
                    continue
                if dest.readonly or len(dest) < hi - lo:
                    results[i] = BadRequest(f"buffer {i} holds {len(dest)} bytes (read-only: {dest.readonly}); "
                                            f"{path} [{lo}, {hi}) needs {hi - lo} writable bytes")
                    continue
                out, dest = hi - lo, dest[:hi - lo]
            elif lo < hi:
                out, dest = new_bytes(hi - lo)
            results[i] = out if lo < hi else (0 if into is not None else b"")
            if lo >= hi:
                continue
            slices = plan(view.info, entry, lo, hi, dest)
            _, all_slices, per_read = work.setdefault(view.info.name, (view, [], []))
            per_read.append((i, len(all_slices), len(all_slices) + len(slices)))
            all_slices.extend(slices)
        if len(work) == 1:  # one dataset, the usual case: no task for it
            (view, slices, _), = work.values()
            outcomes = [await self._read_view(view, slices)]
        else:
            outcomes = await asyncio.gather(*(self._read_view(view, slices) for view, slices, _ in work.values()))
        for (_, _, per_read), errors in zip(work.values(), outcomes, strict=True):
            for i, lo, hi in per_read:
                error = next((e for e in errors[lo:hi] if e is not None), None)
                if error is not None:
                    results[i] = error
        return results

    async def _chunk(self, view: DatasetView, entry: FileEntry, start: int, end: int) -> memoryview:
        """Bytes [start, end) in a buffer of their own: a reused block buffer when large, an
        exact-size one when small (a 110 KB file never holds an 8 MiB buffer)."""
        _, buf = self._buffer(end - start)
        try:
            await self._fill(view, plan(view.info, entry, start, end, buf))
        except BaseException:
            self.pool.give(buf)
            raise
        return buf

    def _buffer(self, n: int) -> tuple[memoryview, memoryview]:
        """A buffer for n bytes of an open file: reused when large, exact when small."""
        buf = self.pool.take(n) if n > self.pool.size // 2 else memoryview(bytearray(n))
        return buf, buf

    async def _get_file(self, rpath: str, lpath: str, **kwargs: Any) -> None:
        if (await self._info(rpath))["type"] == "directory":
            os.makedirs(lpath, exist_ok=True)
            return
        os.makedirs(os.path.dirname(os.path.abspath(lpath)), exist_ok=True)
        view, entry = await self._resolve(rpath)
        step = view.info.block_size * max(1, self.config.max_concurrency // 2)
        with open(lpath, "wb") as f:
            for off in range(0, entry.size, step):
                data = await self._cat_file(rpath, off, min(off + step, entry.size))
                await asyncio.to_thread(f.write, data)

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> "CachefsFile":
        if mode != "rb":
            _read_only()
        view, entry = sync(self.loop, self._resolve, path)
        return CachefsFile(self, path, view, entry, block_size=block_size, cache_options=cache_options,
                           cache_type=kwargs.get("cache_type", "readahead"))

    # -- writes are refused --------------------------------------------------------------
    _pipe_file = _put_file = _rm_file = _rm = _cp_file = _mv = _mkdir = _makedirs = _touch = staticmethod(
        lambda *a, **k: _read_only())  # type: ignore[assignment]

    async def _close(self) -> None:
        self.direct.close()
        await self.blocks.close()
        await self.transport.close()

    def close(self) -> None:
        """Close the HTTP session (fsspec instances are cached; call when done for good)."""
        if self.asynchronous:
            raise RuntimeError("use `await fs._close()` on an asynchronous instance")
        sync(self.loop, self._close)


class BlockCache(BaseCache):
    """The read path of an open file: whole blocks, fetched ahead, sliced on read.

    A read wants block i: blocks i .. i+readahead are requested at once (concurrently,
    from their owners) so the next ones are on their way while the caller works. Blocks
    are kept in the buffers they arrived in, one block each; a read copies out just what
    it asked for, and no allocation is larger than a block (large fresh allocations cost
    page faults that here cost more than the copy itself).
    """

    name = "cachefs-blocks"

    def __init__(self, fs: "CachefsFileSystem", view: DatasetView, entry: FileEntry) -> None:
        super().__init__(view.info.block_size, _no_fetcher, entry.size)
        self.fs, self.view, self.entry = fs, view, entry
        self.bs = view.info.block_size
        self.count = max(1, -(-entry.size // self.bs))
        self.readahead = fs.config.readahead_blocks
        self.timeout = fs.config.read_timeout * (fs.config.retries + 2)
        self._blocks: dict[int, concurrent.futures.Future[memoryview]] = {}

    def _want(self, index: int) -> concurrent.futures.Future[memoryview]:
        fut = self._blocks.get(index)
        if fut is None:
            start = index * self.bs
            end = min(start + self.bs, self.entry.size)
            got = self.fs._direct_fill(self.view, self.entry, start, end, self.fs._buffer) \
                if self.count == 1 and end - start <= DIRECT_MAX else None  # a small file: this thread
            if got is not None:
                fut = concurrent.futures.Future()
                fut.set_result(got[1])
            else:
                fut = asyncio.run_coroutine_threadsafe(self.fs._chunk(self.view, self.entry, start, end), self.fs.loop)
            self._blocks[index] = fut
        return fut

    def _blocks_for(self, start: int, end: int) -> list[memoryview | bytes]:
        """The blocks holding [start, end), waited for; the next ones requested meanwhile."""
        first, last = start // self.bs, (end - 1) // self.bs
        for i in range(first, min(last + 1 + self.readahead, self.count)):
            self._want(i)
        for i in [i for i in self._blocks if i < first - 1 or i > last + self.readahead]:
            self._drop(i)  # a seek elsewhere: drop what no longer helps
        self.total_requested_bytes += end - start
        return [self._blocks[i].result(self.timeout) for i in range(first, last + 1)]

    def _drop(self, index: int) -> None:
        fut = self._blocks.pop(index)
        if not fut.cancel() and fut.done() and fut.exception() is None:
            self.fs.pool.give(fut.result())

    def _range(self, start: int | None, end: int | None) -> tuple[int, int]:
        start = 0 if start is None else start
        end = self.size if end is None else min(end, self.size)
        return start, max(start, end)

    def _fetch(self, start: int | None, end: int | None) -> bytes:
        start, end = self._range(start, end)
        if start >= end:
            return b""
        return _cut(self._blocks_for(start, end), start % self.bs, end - start)

    def readinto(self, start: int, out: memoryview) -> int:
        """Copy [start, start+len(out)) straight from the blocks into `out`: no bytes object."""
        start, end = self._range(start, start + len(out))
        if start >= end:
            return 0
        pos, offset = 0, start
        for part in self._blocks_for(start, end):
            lo = offset % self.bs
            n = min(len(part) - lo, end - offset)
            out[pos:pos + n] = part[lo:lo + n]
            pos, offset = pos + n, offset + n
        return pos

    def ready(self, start: int, end: int) -> bool:
        """Are the blocks of [start, end) here already (a read of them cannot wait on the network)?"""
        start, end = self._range(start, end)
        if start >= end:
            return True
        futs = [self._blocks.get(i) for i in range(start // self.bs, (end - 1) // self.bs + 1)]
        return all(f is not None and f.done() and not f.cancelled() and f.exception() is None for f in futs)

    def close(self) -> None:
        for i in list(self._blocks):
            self._drop(i)


def _cut(parts: list[memoryview | bytes], lo: int, n: int) -> bytes:
    """`n` bytes from offset `lo` of consecutive blocks, copied once (no join-then-slice)."""
    pieces, left = [], n
    for i, part in enumerate(parts):
        start = lo if i == 0 else 0
        take = min(len(part) - start, left)
        pieces.append(memoryview(part)[start:start + take])
        left -= take
    return pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)


def _raise_first(results: list[Any]) -> None:
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _readahead(cache_type: str, block_size: int, unit: int, default: int) -> int:
    """Blocks an open file reads ahead, from fsspec's `cache_type` and `block_size`: "none"
    reads only what is asked; any other fsspec cache reads ahead at least `block_size`."""
    if cache_type not in caches:
        raise BadRequest(f"cache_type {cache_type!r} is not an fsspec cache; use one of {', '.join(sorted(k for k in caches if k))}")
    if not isinstance(block_size, int) or block_size < 0:
        raise BadRequest(f"block_size must be a number of bytes >= 0, not {block_size!r}")
    if cache_type == "none":
        return 0
    return max(default, -(-block_size // unit) - 1)


def _no_fetcher(start: int, end: int) -> bytes:
    raise AssertionError("BlockCache fetches blocks itself")


class CachefsFile(AbstractBufferedFile):
    """A file of a pinned snapshot: reopen to see a refreshed one."""

    def __init__(self, fs: CachefsFileSystem, path: str, view: DatasetView, entry: FileEntry,
                 block_size: int | None = None, cache_type: str = "readahead",
                 cache_options: dict[str, Any] | None = None) -> None:
        self.view, self.entry = view, entry
        super().__init__(fs, path, mode="rb", block_size=block_size or view.info.block_size, cache_type="none",
                         size=entry.size)
        self.cache = BlockCache(fs, view, entry)
        self.cache.readahead = _readahead(cache_type, self.blocksize, view.info.block_size, fs.config.readahead_blocks)

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.cache._fetch(start, end)

    def ready(self, start: int, end: int) -> bool:
        """True when reading [start, end) needs no network: its blocks were read ahead."""
        return self.cache.ready(start, end)

    def readinto(self, b: Any) -> int:
        """Fill `b` from the current position without building intermediate bytes objects
        (the way to read at full speed into a buffer you reuse)."""
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        out = memoryview(b).cast("B")
        n = self.cache.readinto(self.loc, out)
        self.loc += n
        return n

    def close(self) -> None:
        if not self.closed:
            self.cache.close()
        super().close()
