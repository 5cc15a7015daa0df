"""Listing an origin once, to pin a snapshot: every file under its prefix with its size and
version token, and every folder (empty ones too: tools that walk the tree, such as MLPerf
Storage's DLIO or an `ImageFolder`, expect the origin's tree, not just its files). Admin
work: it runs in a thread, reports progress and can be cancelled."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from cachefs.common.errors import BadRequest, Cancelled, NotFound, OriginUnavailable
from cachefs.common.manifest import FileEntry, check_path
from cachefs.common.origin import Origin, version_token


@dataclass(frozen=True)
class Listing:
    """What an origin holds under its prefix: files, and folders (relative paths, the root
    left out). Object stores show a folder by a common prefix or a marker key (a zero-byte
    key ending in '/', which s3fs lists as a file named with that slash): a folder, never a
    file."""

    files: list[FileEntry]
    folders: list[str]


def list_origin(origin: Origin, progress: Callable[[int, int], None] | None = None,
                cancelled: threading.Event | None = None) -> Listing:
    """Every file under the prefix with its size and version token, and every folder."""
    fs = origin.sync_fs
    fs.invalidate_cache()  # fsspec instances are shared and cache listings: a refresh must see today's
    try:
        if not fs.exists(origin.root):
            raise NotFound(f"origin {origin.url} does not exist (or is empty)")
        if fs.isfile(origin.root):
            raise BadRequest(f"origin {origin.url} is a file; give the prefix (folder) that holds the dataset")
        entries: list[FileEntry] = []
        folders: set[str] = set()
        total = 0

        def relative(name: str) -> str:
            return fs._strip_protocol(name)[len(origin.root):].lstrip("/")

        for folder, _subdirs, files in fs.walk(origin.root, detail=True):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled("listing cancelled")
            if rel := check_path(relative(folder)):
                folders.add(rel)
            for info in files.values():
                if info.get("type") != "file":
                    continue
                if info["name"].endswith("/") and not info.get("size"):  # an object store's folder marker
                    if rel := check_path(relative(info["name"])):
                        folders.add(rel)
                    continue
                entries.append(FileEntry(check_path(relative(info["name"])), int(info.get("size") or 0),
                                         version_token(info)))
                total += int(info.get("size") or 0)
            if progress is not None:
                progress(len(entries), total)
        return Listing(entries, sorted(folders))
    except (NotFound, BadRequest, Cancelled):
        raise
    except FileNotFoundError as e:
        raise NotFound(f"origin {origin.url} does not exist: {e}") from e
    except Exception as e:  # any backend's own error: report it, whatever its type
        raise OriginUnavailable(f"cannot list origin {origin.url}: {type(e).__name__}: {e}") from e
