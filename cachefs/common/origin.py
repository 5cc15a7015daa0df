"""The origin: where a dataset really lives, reached through fsspec, and read against the
snapshot's version tokens, so that a changed file fails loudly instead of being served.

Cache nodes read origins; a client does too, only as a last resort when no cache node
answers and it has credentials of its own (origin_fallback). Listing an origin to take a
snapshot is the cluster's alone (server/listing.py). Reads on an event loop use the
filesystem's async API when it has one (s3fs, gcsfs), and a thread otherwise (local files).
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

import fsspec
from fsspec.asyn import AsyncFileSystem

from cachefs.common.errors import BadRequest, CachefsError, OriginChanged, OriginUnavailable
from cachefs.common.manifest import FileEntry


def version_token(info: dict[str, Any]) -> str:
    """The token that changes whenever a file's bytes change, tagged with its kind:
    vid (S3 VersionId), gen (GCS generation), etag, or mtime (+ inode, for local files)."""
    size = info.get("size", 0)
    if info.get("VersionId"):
        return f"vid:{size}:{info['VersionId']}"
    if info.get("generation"):
        return f"gen:{size}:{info['generation']}"
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return f"etag:{size}:{info[key]}"
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            extra = f":{info['ino']}" if info.get("ino") else ""
            return f"mtime:{size}:{info[key]}{extra}"
    return f"size:{size}"


def _token_value(token: str, kind: str) -> str | None:
    """The ETag or VersionId a token carries, if it is of that kind."""
    tkind, _, rest = token.partition(":")
    return rest.partition(":")[2] if tkind == kind else None


def _changed(entry: FileEntry) -> OriginChanged:
    return OriginChanged(f"{entry.path} changed in the origin since the snapshot was taken; "
                         "run `cachefs dataset refresh` to serve the new version")


def _whole(entry: FileEntry, data: bytes, want: int) -> bytes:
    """The bytes of a range, refused if the origin gave fewer or more (it changed under us)."""
    if len(data) != want:
        raise OriginChanged(f"{entry.path} returned {len(data)} bytes for a {want}-byte range; "
                            "the origin changed: run `cachefs dataset refresh`")
    return data


def _s3_error_code(e: BaseException) -> str:
    """The S3 error code behind an s3fs error (structured data, not message text)."""
    response = getattr(e.__cause__, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def split_origin(url: str) -> tuple[str, str]:
    """'s3://bucket/prefix/' → ('s3', 'bucket/prefix'); refuses what fsspec cannot open."""
    if "://" not in url:
        raise BadRequest(f"origin {url!r} is not a URL: use a form like s3://bucket/prefix or file:///data/set")
    protocol = url.split("://", 1)[0]
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as e:
        raise BadRequest(f"origin protocol {protocol!r} is not available: {e}") from e
    root = cls._strip_protocol(url).rstrip("/")
    return protocol, root


class Origin:
    """One dataset's origin prefix: list it, read byte ranges, check version tokens."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, timeout: float = 60.0) -> None:
        self.url = url
        self.protocol, self.root = split_origin(url)
        self.storage_options = dict(storage_options or {})
        self.timeout = timeout
        self._async_fs: AsyncFileSystem | None = None
        self._sync_fs: fsspec.AbstractFileSystem | None = None

    def _full(self, path: str) -> str:
        return f"{self.root}/{path}" if self.root else path

    @property
    def sync_fs(self) -> fsspec.AbstractFileSystem:
        if self._sync_fs is None:
            self._sync_fs = fsspec.filesystem(self.protocol, **self.storage_options)
        return self._sync_fs

    async def _afs(self) -> AsyncFileSystem | None:
        """An async instance bound to the running loop, or None for sync-only filesystems."""
        cls = fsspec.get_filesystem_class(self.protocol)
        if not getattr(cls, "async_impl", False):
            return None
        if self._async_fs is None:
            fs = cls(asynchronous=True, loop=asyncio.get_running_loop(), skip_instance_cache=True,
                     **self.storage_options)
            if hasattr(fs, "set_session"):
                await fs.set_session()
            self._async_fs = fs
        return self._async_fs

    # -- reads (event loop; data path) -------------------------------------------------
    async def read(self, entry: FileEntry, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file, checked against the snapshot's version token."""
        (result,) = await self.read_many([(entry, start, end)])
        if isinstance(result, BaseException):
            raise result
        return result

    async def read_many(self, reads: Sequence[tuple[FileEntry, int, int]],
                        concurrency: int = 16) -> list[bytes | CachefsError]:
        """Several ranges at once (the members of a pack): each answer is its bytes or its
        own error, so one changed file never fails the others. A sync backend (local
        files) reads them all in one thread hop; an async one, `concurrency` at a time."""
        try:
            async with asyncio.timeout(self.timeout):
                afs = await self._afs()
                if afs is None:
                    return await asyncio.to_thread(self._read_many_sync, reads)
                gate = asyncio.Semaphore(concurrency)

                async def one(entry: FileEntry, start: int, end: int) -> bytes | CachefsError:
                    async with gate:
                        try:
                            return await self._read_async(afs, entry, start, end)
                        except Exception as e:  # noqa: BLE001 - translated once, below
                            return self._error(entry, e)

                return list(await asyncio.gather(*(one(*r) for r in reads)))
        except TimeoutError:
            err = OriginUnavailable(f"origin {self.url} did not answer within {self.timeout:.0f} s")
            return [err for _ in reads]

    def _error(self, entry: FileEntry, e: BaseException) -> CachefsError:
        """Any backend's failure of one read, as the error the reader gets."""
        if isinstance(e, (OriginChanged, OriginUnavailable)):
            return e
        if isinstance(e, FileNotFoundError):
            return OriginChanged(f"{entry.path} is gone from the origin since the snapshot; "
                                 "run `cachefs dataset refresh` to take a new snapshot")
        if isinstance(e, TimeoutError):
            return OriginUnavailable(f"origin {self.url} did not answer within {self.timeout:.0f} s")
        return OriginUnavailable(f"cannot read {entry.path} from origin {self.url}: {type(e).__name__}: {e}")

    async def _read_async(self, afs: AsyncFileSystem, entry: FileEntry, start: int, end: int) -> bytes:
        path = self._full(entry.path)
        if self.protocol in ("s3", "s3a") and end > start:
            return await self._read_s3_exact(afs, path, entry, start, end)
        data = await afs._cat_file(path, start=start, end=end)
        # Checking after the read catches a change before or during it (tokens never repeat).
        if version_token(await afs._info(path)) != entry.version:
            raise _changed(entry)
        return _whole(entry, data, end - start)

    def _read_many_sync(self, reads: Sequence[tuple[FileEntry, int, int]]) -> list[bytes | CachefsError]:
        fs = self.sync_fs
        out: list[bytes | CachefsError] = []
        for entry, start, end in reads:
            path = self._full(entry.path)
            try:
                data = fs.cat_file(path, start=start, end=end)
                if version_token(fs.info(path)) != entry.version:
                    raise _changed(entry)
                out.append(_whole(entry, data, end - start))
            except Exception as e:  # noqa: BLE001 - translated once
                out.append(self._error(entry, e))
        return out

    async def _read_s3_exact(self, afs: AsyncFileSystem, path: str, entry: FileEntry, start: int, end: int) -> bytes:
        """One GET that S3 itself refuses (412) if the object is no longer the snapshot's:
        pinned by VersionId when the bucket is versioned, else conditional on the ETag."""
        bucket, key, _ = afs.split_path(path)
        version, etag = _token_value(entry.version, "vid"), _token_value(entry.version, "etag")
        condition = {"VersionId": version} if version else {"IfMatch": etag} if etag else {}
        try:
            resp = await afs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                      **condition)
            try:
                data = await resp["Body"].read()
            finally:
                resp["Body"].close()
        except OSError as e:
            if isinstance(e, FileNotFoundError) or _s3_error_code(e) in ("PreconditionFailed", "412", "NoSuchVersion"):
                raise _changed(entry) from e
            raise
        if not condition and version_token(await afs._info(path)) != entry.version:
            raise _changed(entry)  # no token to pin the read to: checked afterwards like other backends
        return _whole(entry, data, end - start)

    async def close(self) -> None:
        fs, self._async_fs = self._async_fs, None
        session = getattr(fs, "_s3", None) or getattr(fs, "session", None)
        close = getattr(session, "close", None)
        if close is not None:
            try:
                await close() if asyncio.iscoroutinefunction(close) else close()
            except Exception:  # closing is best effort: the node is going away
                pass
        await asyncio.sleep(0)
