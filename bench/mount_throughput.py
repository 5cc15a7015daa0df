"""Read throughput through a cachefs FUSE mount, against the client itself and local disk.

    python bench/mount_throughput.py [--files 64] [--file-mib 16] [--readers 8] [--json]

Needs a running cluster (`cachefs up`, or CACHEFS_ENDPOINT / CACHEFS_TOKEN) and FUSE
(root, /dev/fuse, fusermount3). Writes a dataset to a local origin, registers and warms
it, then reads every file with N reader threads:

  origin (local disk)       the origin read directly: page cache, the machine's ceiling
  client (cachefs://)       fs.cat_file, the fsspec client without FUSE
  mount, first read         through the mount, pages not yet in the kernel's page cache
  mount, second read        again, reopened: served from the page cache (keep_cache)

The gap between "client" and "mount, first read" is what FUSE costs; the last line
shows what a second epoch gets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable


def _read_all(paths: list[str], read: Callable[[str], int], readers: int) -> tuple[float, int]:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=readers) as pool:
        total = sum(pool.map(read, paths))
    return time.perf_counter() - started, total


def _read_file(path: str) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(4 * 1024 * 1024):
            n += len(chunk)
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=64)
    p.add_argument("--file-mib", type=int, default=16)
    p.add_argument("--readers", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args()

    from cachefs.admin import AdminClient
    from cachefs.config import ClientConfig, load
    from cachefs.filesystem import CachefsFileSystem

    client = load(ClientConfig)
    client.require_endpoint()
    work = Path(tempfile.mkdtemp(prefix="cachefs-bench-"))
    origin, mountpoint = work / "origin", work / "mnt"
    origin.mkdir()
    for i in range(args.files):
        (origin / f"shard-{i:04d}.bin").write_bytes(os.urandom(args.file_mib * 1024 * 1024))
    name = f"bench-mount-{uuid.uuid4().hex[:6]}"
    total_bytes = args.files * args.file_mib * 1024 * 1024

    async def register() -> None:
        async with AdminClient(client) as admin:
            op = await admin.wait(await admin.add_dataset(name, f"file://{origin}"), timeout=600)
            assert op.state == "succeeded", op.message
            op = await admin.wait(await admin.warm_dataset(name), timeout=1800)
            assert op.state == "succeeded", op.message

    asyncio.run(register())
    rel = sorted(p.name for p in origin.iterdir())
    figures: dict[str, float] = {}

    def record(label: str, seconds: float, nbytes: int) -> None:
        assert nbytes == total_bytes, f"{label}: read {nbytes} of {total_bytes} bytes"
        figures[label] = nbytes / seconds / 1e6

    record("origin (local disk)", *_read_all([str(origin / r) for r in rel], _read_file, args.readers))
    fs = CachefsFileSystem(endpoint=client.endpoint, token=client.token, skip_instance_cache=True)
    record("client (cachefs://)", *_read_all([f"{name}/{r}" for r in rel], lambda q: len(fs.cat_file(q)),
                                             args.readers))
    cli = [sys.executable, "-m", "cachefs.cli.main"]
    done = subprocess.run([*cli, "mount", name, str(mountpoint)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return 1
    try:
        paths = [str(mountpoint / r) for r in rel]
        record("mount, first read", *_read_all(paths, _read_file, args.readers))
        record("mount, second read", *_read_all(paths, _read_file, args.readers))
    finally:
        subprocess.run([*cli, "unmount", "--lazy", str(mountpoint)], capture_output=True, timeout=60)
        async def remove() -> None:
            async with AdminClient(client) as admin:
                await admin.remove_dataset(name)
        asyncio.run(remove())
        subprocess.run(["rm", "-rf", str(work)], timeout=60)

    if args.json:
        print(json.dumps({"files": args.files, "file_mib": args.file_mib, "readers": args.readers,
                          "MB_per_s": figures}, indent=2))
    else:
        print(f"{args.files} files × {args.file_mib} MiB, {args.readers} readers")
        for label, rate in figures.items():
            print(f"  {label:<22} {rate:>9.0f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
