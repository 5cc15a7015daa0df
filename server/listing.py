"""Listing an origin once, to pin a snapshot: every file under its prefix with its size and
version token. Admin work: it runs in a thread, reports progress and can be cancelled."""

from __future__ import annotations

import threading
from typing import Callable

from cachefs.common.errors import BadRequest, Cancelled, NotFound, OriginUnavailable
from cachefs.common.manifest import FileEntry, check_path
from cachefs.common.origin import Origin, version_token


def list_files(origin: Origin, progress: Callable[[int, int], None] | None = None,
               cancelled: threading.Event | None = None) -> list[FileEntry]:
    """Every file under the prefix with its size and version token."""
    fs = origin.sync_fs
    fs.invalidate_cache()  # fsspec instances are shared and cache listings: a refresh must see today's
    try:
        if not fs.exists(origin.root):
            raise NotFound(f"origin {origin.url} does not exist (or is empty)")
        if fs.isfile(origin.root):
            raise BadRequest(f"origin {origin.url} is a file; give the prefix (folder) that holds the dataset")
        entries: list[FileEntry] = []
        total = 0
        for _dir, _subdirs, files in fs.walk(origin.root, detail=True):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled("listing cancelled")
            for info in files.values():
                if info.get("type") != "file":
                    continue
                rel = fs._strip_protocol(info["name"])[len(origin.root):].lstrip("/")
                entries.append(FileEntry(check_path(rel), int(info.get("size") or 0), version_token(info)))
                total += int(info.get("size") or 0)
            if progress is not None:
                progress(len(entries), total)
        return entries
    except (NotFound, BadRequest, Cancelled):
        raise
    except FileNotFoundError as e:
        raise NotFound(f"origin {origin.url} does not exist: {e}") from e
    except Exception as e:  # any backend's own error: report it, whatever its type
        raise OriginUnavailable(f"cannot list origin {origin.url}: {type(e).__name__}: {e}") from e
