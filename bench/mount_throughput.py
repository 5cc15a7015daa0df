"""Read throughput through a cachefs FUSE mount, side by side in one run with the cachefs
client itself and the loopback ceiling. Prints GB/s and ratios; writes JSON.

    python bench/mount_throughput.py            # 24 files x 16 MiB, 3 cache nodes, 4 readers
    python bench/mount_throughput.py --quick    # 8 files x 8 MiB

Starts a Ray of its own and a 3-node cache cluster, writes a dataset to a local origin,
registers and warms it, then reads every file with N reader threads:

  loopback ceiling        socket.sendfile → recv_into over loopback (bench/read_throughput.py)
  client, sequential      cachefs:// files streamed with readinto (8 MiB pieces)
  mount, sequential       the same files through the mount: open/readinto, pages dropped first
  client, random          1 MiB reads at random offsets, through cachefs://
  mount, random           the same offsets through the mount, pages dropped first
  mount, re-read          sequential again: served by the kernel page cache (keep_cache)

Needs FUSE (root, /dev/fuse, fusermount3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MiB = 1024 * 1024
PIECE = 8 * MiB
RANDOM_READ = 1 * MiB


def _timed(jobs: list[Any], work: Callable[[Any], int], readers: int) -> tuple[int, float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=readers) as pool:
        total = sum(pool.map(work, jobs))
    return total, time.perf_counter() - started


def _stream(opener: Callable[[str], Any]) -> Callable[[str], int]:
    def read(path: str) -> int:
        n, buf = 0, bytearray(PIECE)
        with opener(path) as f:
            while got := f.readinto(buf):
                n += got
        return n

    return read


def _random(opener: Callable[[str], Any]) -> Callable[[tuple[str, list[int]]], int]:
    def read(job: tuple[str, list[int]]) -> int:
        path, offsets = job
        n, buf = 0, bytearray(RANDOM_READ)
        with opener(path) as f:
            for off in offsets:
                f.seek(off)
                n += f.readinto(buf)
        return n

    return read


def _drop_pages(paths: list[str]) -> None:
    """Forget the kernel's cached pages of these files, so the next read goes to FUSE."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 files x 8 MiB")
    ap.add_argument("--files", type=int, default=24)
    ap.add_argument("--file-mib", type=int, default=16)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--json", default="bench/results/mount_throughput.json", help="where to write the figures")
    args = ap.parse_args()
    if args.quick:
        args.files, args.file_mib = 8, 8

    import ray

    from cachefs.admin import AdminClient
    from cachefs.config import ClientConfig, ClusterConfig
    from cachefs.filesystem import CachefsFileSystem
    from read_throughput import loopback_ceiling
    from server import hosting

    work = Path(tempfile.mkdtemp(prefix="cachefs-bench-mount-"))
    os.environ["CACHEFS_HOME"] = str(work / "home")
    origin, mountpoint = work / "origin", work / "mnt"
    origin.mkdir()
    size = args.file_mib * MiB
    for i in range(args.files):
        (origin / f"shard-{i:04d}.bin").write_bytes(os.urandom(size))
    (work / "blob.bin").write_bytes(os.urandom(min(args.files * size, 256 * MiB)))
    rel = sorted(p.name for p in origin.iterdir())
    rnd = random.Random(3)
    offsets = {r: [rnd.randrange(0, size - RANDOM_READ) for _ in range(max(4, args.file_mib // 2))] for r in rel}
    figures: dict[str, float] = {}
    cli = [sys.executable, "-m", "cachefs.cli.main"]
    mounted = False
    ray.init(address="local", namespace="cachefs-bench", logging_level="ERROR", log_to_driver=False,
             include_dashboard=False)
    try:
        handle = hosting.up(ClusterConfig(nodes=args.nodes, memory_bytes=max(256 * MiB, 2 * args.files * size // args.nodes),
                                          disk_bytes=0, namespace="cachefs-bench",
                                          allowed_origins=(f"file://{origin}/",)))
        config = ClientConfig(endpoint=",".join(handle.endpoints), token=handle.token, admin_token=handle.admin_token)

        async def register() -> None:
            async with AdminClient(config) as admin:
                op = await admin.wait(await admin.add_dataset("bench", f"file://{origin}"), timeout=600)
                assert op.finished_ok, op.message
                op = await admin.wait(await admin.warm_dataset("bench"), timeout=1800)
                assert op.finished_ok, op.message

        asyncio.run(register())
        env = {**os.environ, "CACHEFS_ENDPOINT": config.endpoint, "CACHEFS_TOKEN": config.token}
        done = subprocess.run([*cli, "mount", "bench", str(mountpoint)], capture_output=True, text=True,
                              timeout=120, env=env)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        mounted = True
        fs = CachefsFileSystem(endpoint=config.endpoint, token=config.token, skip_instance_cache=True)
        via_client = [f"bench/{r}" for r in rel]
        via_mount = [str(mountpoint / r) for r in rel]
        total = args.files * size

        def record(label: str, result: tuple[int, float], expected: int) -> None:
            nbytes, secs = result
            assert nbytes == expected, f"{label}: read {nbytes} of {expected} bytes"
            figures[label] = nbytes / secs / 1e9

        figures["loopback ceiling"] = loopback_ceiling(str(work / "blob.bin"), streams=args.readers)
        record("client, sequential", _timed(via_client, _stream(fs.open), args.readers), total)
        _drop_pages(via_mount)
        record("mount, sequential", _timed(via_mount, _stream(lambda p: open(p, "rb", buffering=0)), args.readers), total)
        random_total = sum(len(o) for o in offsets.values()) * RANDOM_READ
        record("client, random", _timed([(f"bench/{r}", offsets[r]) for r in rel], _random(fs.open), args.readers),
               random_total)
        _drop_pages(via_mount)
        record("mount, random", _timed([(str(mountpoint / r), offsets[r]) for r in rel],
                                       _random(lambda p: open(p, "rb", buffering=0)), args.readers), random_total)
        _timed(via_mount, _stream(lambda p: open(p, "rb", buffering=0)), args.readers)  # fill the page cache
        record("mount, re-read (page cache)", _timed(via_mount, _stream(lambda p: open(p, "rb", buffering=0)),
                                                     args.readers), total)
        fs.close()
    finally:
        if mounted:
            subprocess.run([*cli, "unmount", str(mountpoint)], capture_output=True, timeout=60)
        hosting.down(os.environ, namespace="cachefs-bench")
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    ratios = {
        "mount_vs_client_sequential": figures["mount, sequential"] / figures["client, sequential"],
        "mount_vs_client_random": figures["mount, random"] / figures["client, random"],
        "client_vs_loopback": figures["client, sequential"] / figures["loopback ceiling"],
    }
    print(f"\nmount throughput: {args.files} files x {args.file_mib} MiB, {args.readers} readers, "
          f"{args.nodes} cache nodes, {os.cpu_count()} cores")
    ceiling = figures["loopback ceiling"]
    print(f"{'path':<30}{'GB/s':>8}{'x loopback':>12}")
    for label, rate in figures.items():
        print(f"{label:<30}{rate:>8.2f}{rate / ceiling:>12.2f}")
    print(f"mount / client: sequential {ratios['mount_vs_client_sequential']:.2f}, "
          f"random {ratios['mount_vs_client_random']:.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"files": args.files, "file_mib": args.file_mib, "readers": args.readers,
                               "GBps": figures, "ratios": ratios}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
