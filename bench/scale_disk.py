"""A node with a large disk tier starts in seconds: `DiskStore.open()` on N block files.

open() re-indexes from names and sizes (os.scandir and a stat per file); each block's
bytes are checked on its first read instead. Measured side by side with what open()
did before: read and hash every byte (here `_file_digest` on every file in one thread,
the same work). Twice: page cache warm (just written), and cold for the block data
(each file fsync'ed then dropped with POSIX_FADV_DONTNEED; directory entries and inodes
stay cached, as after a process restart; a reboot would make the scan slower too).

    python bench/scale.py --only disk            # 20,000 blocks of 64 KiB (1.2 GiB); 100,000 of 4 KiB, warm
    python bench/scale.py --only disk --quick    # 2,000 blocks of 64 KiB
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import KiB, table  # noqa: E402
from server import stores  # noqa: E402
from server.stores import DiskStore, digest_of  # noqa: E402


def write_blocks(root: Path, count: int, size: int) -> int:
    """`count` distinct blocks in the disk tier's layout, as a node would have left them."""
    snapshot = root / "train" / "snap-1"
    snapshot.mkdir(parents=True)
    base = bytearray(os.urandom(size))
    for i in range(count):
        base[:8] = i.to_bytes(8, "little")  # distinct bytes, distinct digests
        (snapshot / f"{i:016x}.{digest_of(bytes(base))}").write_bytes(base)
    return count * size


def drop_page_cache(root: Path) -> None:
    """Evict these files' data from the page cache (and only theirs: the machine is shared)."""
    for path in root.rglob("*.*"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


async def reopen(root: Path, budget: int) -> tuple[DiskStore, float]:
    store = DiskStore(root, budget)
    t0 = time.perf_counter()
    await store.open()
    return store, time.perf_counter() - t0


async def reread_all(store: DiskStore) -> float:
    paths = [b.path for b in store.blocks()]
    t0 = time.perf_counter()
    await asyncio.to_thread(lambda: [stores._file_digest(p) for p in paths])  # noqa: SLF001
    return time.perf_counter() - t0


def measure(count: int, size: int, caches: tuple[str, ...]) -> dict[str, Any]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="cachefs-bench-disk-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        nbytes = write_blocks(root, count, size)
        write_s = time.perf_counter() - t0
        for cache in caches:
            if cache == "cold":
                drop_page_cache(root)
            store, open_s = asyncio.run(reopen(root, 2 * nbytes))
            if len(store) != count or any(b.verified for b in store.blocks()):
                raise AssertionError(f"open() indexed {len(store)} of {count} blocks")
            if cache == "cold":
                drop_page_cache(root)
            reread_s = asyncio.run(reread_all(store))
            runs.append({"page_cache": cache, "open_s": open_s, "reread_s": reread_s,
                         "reread_gb_s": nbytes / reread_s / 1e9})
    return {"blocks": count, "block_bytes": size, "bytes": nbytes, "write_s": write_s, "runs": runs}


def run(quick: bool) -> dict[str, Any]:
    both = ("warm", "cold")
    # Many small blocks cost open() per file; the page cache only changes the re-read, so warm is enough there.
    tiers = [(2_000, 64 * KiB, both)] if quick else [(20_000, 64 * KiB, both), (100_000, 4 * KiB, ("warm",))]
    return {"tiers": [measure(*tier) for tier in tiers]}


def report(doc: dict[str, Any]) -> str:
    rows = [[f"{t['blocks']:,} × {t['block_bytes'] // KiB} KiB ({t['bytes'] / 2**30:.2f} GiB)", r["page_cache"],
             f"{r['open_s']:.2f}", f"{r['reread_s']:.2f}", f"{r['reread_gb_s']:.2f}",
             f"{r['reread_s'] / r['open_s']:.0f}×"] for t in doc["tiers"] for r in t["runs"]]
    return table(["disk tier", "page cache", "open(): names and sizes, s", "re-read every byte, s", "re-read GB/s",
                  "ratio"], rows)


if __name__ == "__main__":  # one section on its own: the same as `bench/scale.py --only ...`
    from bench.scale import section_main

    sys.exit(section_main(sys.modules[__name__]))
