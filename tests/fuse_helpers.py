"""What the FUSE and CSI tests share: the origin's bytes, files in memory behind the reader's
fetch seam, and leaving no mount behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

from cachefs.common.errors import NodeUnavailable
from csi.mounter import mount_pids
from csi.mounts import read_mounts
from csi.tree import SnapshotTree

KiB, MiB = 1024, 1024 * 1024
CHUNK = 64 * KiB
FILES = {
    "small.bin": os.urandom(10_000),
    "exact.bin": os.urandom(CHUNK),
    "big.bin": os.urandom(5 * CHUNK + 123),
    "empty.bin": b"",
    "sub/deeper/x.bin": os.urandom(100),
    "sub/stuck.bin": os.urandom(1000),
    "down.bin": os.urandom(1000),
}


class MemoryOrigin:
    """The fetch seam over FILES; remembers every fetch. 'stuck' never answers, 'down' fails."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.fetches: list[tuple[str, int, int]] = []

    async def fetch(self, path: str, start: int, end: int) -> bytes:
        self.fetches.append((path, start, end))
        await asyncio.sleep(0)  # a real fetch always yields to the loop
        if "stuck" in path:
            await asyncio.Event().wait()
        if "down" in path:
            raise NodeUnavailable("no cache node answered and the origin is unreachable")
        return self.files[path][start:end]


def tree_of(files: dict[str, bytes]) -> SnapshotTree:
    return SnapshotTree.from_listing((path, len(data), False) for path, data in files.items())


def origin_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cleanup_mounts(root: Path) -> None:
    """Leave nothing behind: lazily unmount every FUSE mount under root, kill its process."""
    for point, entry in read_mounts().items():
        if point.startswith(str(root)) and entry.fstype.startswith("fuse"):
            pids = mount_pids(point)
            subprocess.run(["fusermount3", "-uz", point], capture_output=True, timeout=10)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def read_uncached(path: Path) -> bytes:
    """The whole file, from the mount's server rather than the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while block := os.read(fd, 1 << 20):
            chunks.append(block)
        return b"".join(chunks)
    finally:
        os.close(fd)
