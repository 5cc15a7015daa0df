"""A dataset that changes: what a refresh costs, and a job that reads across it (issue #18).

    python bench/refresh.py            # 10,000 files (~16 KB each), 1% changed, 0.5% added
    python bench/refresh.py --quick    # 2,000 files, for CI

A warm dataset on an S3 origin (moto, every object byte that leaves it metered) changes:
1% of its files get new content, 0.5% are added. Side by side:

  refresh --warm            the new snapshot warmed, then made current: unchanged files keep
                            their cached blocks, so the origin sends about what changed
  new snapshot, cold        the same listing registered afresh and warmed: what every refresh
                            cost while block keys named the snapshot (nothing carried over)

Reported: origin bytes of each as a multiple of the changed bytes (goal <= 1.2x), the time
until the new snapshot is current, and a job that reads random files through one
filesystem opened before the refresh, all through it: failed reads (goal 0) and whether
every byte it read was the old snapshot's (goal: yes).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cluster import Cluster, local_ray  # noqa: E402
from bench.harness import BUCKET, MiB, MeteredS3, machine, mib, table, workdir, write_json  # noqa: E402


def content(path: str, version: int, size: int) -> bytes:
    """A file's bytes, known from its path and version alone (the job checks what it reads)."""
    return random.Random(f"{path}:{version}").randbytes(size)


def put(s3: MeteredS3, files: dict[str, tuple[int, int]], prefix: str) -> None:
    import boto3
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.options)
    if not fs.exists(BUCKET):
        boto3.client("s3", aws_access_key_id="bench", aws_secret_access_key="bench",
                     **s3.options["client_kwargs"]).create_bucket(Bucket=BUCKET)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: fs.pipe_file(f"{BUCKET}/{prefix}/{kv[0]}", content(kv[0], kv[1][1], kv[1][0])),
                      files.items()))


class Job:
    """Reads random files through one filesystem, from before the refresh to after it."""

    def __init__(self, cluster: Cluster, name: str, files: dict[str, tuple[int, int]]) -> None:
        from cachefs.filesystem import CachefsFileSystem

        self.fs = CachefsFileSystem(endpoint=cluster.endpoint, token=cluster.token, skip_instance_cache=True)
        self.name, self.files = name, dict(files)  # the snapshot it opened: path → (size, version)
        self.snapshot = self.fs.info(f"{name}/{next(iter(files))}")["snapshot"]
        self.reads = self.failed = self.wrong = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rnd, paths = random.Random(5), sorted(self.files)
        while not self._stop.is_set():
            path = rnd.choice(paths)
            size, version = self.files[path]
            try:
                data = self.fs.cat_file(f"{self.name}/{path}")
            except OSError as e:
                self.failed += 1
                self.errors.append(f"{path}: {e}")
                continue
            self.reads += 1
            self.wrong += data != content(path, version, size)

    def __enter__(self) -> "Job":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        self.fs.close()


def refresh(cluster: Cluster, name: str, warm: bool) -> Any:
    async def go() -> Any:
        async with cluster._admin() as a:
            return await a.wait(await a.refresh_dataset(name, warm=warm), timeout=900)

    return asyncio.run(go())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,000 files instead of 10,000")
    ap.add_argument("--files", type=int, help="files in the dataset")
    ap.add_argument("--mean", type=int, default=16 * 1024, help="mean file size in bytes (default 16 KiB)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    n = args.files or (2_000 if args.quick else 10_000)
    rnd = random.Random(18)
    files = {f"train/c{i % 50:02d}/{i:06d}.jpg": (int(args.mean * rnd.uniform(0.5, 1.5)), 0) for i in range(n)}
    changed = rnd.sample(sorted(files), max(1, n // 100))
    added = {f"train/new/{i:06d}.jpg": (int(args.mean * rnd.uniform(0.5, 1.5)), 0) for i in range(max(1, n // 200))}
    after = {**files, **{p: (files[p][0], 1) for p in changed}, **added}
    new_bytes = sum(files[p][0] for p in changed) + sum(s for s, _ in added.values())
    rows, out = [], {"machine": machine(), "files": n, "changed": len(changed), "added": len(added),
                     "changed_bytes": new_bytes}
    with workdir("cachefs-bench-refresh-") as work, MeteredS3() as s3, local_ray():
        put(s3, files, "ds")
        budget = 4 * sum(s for s, _ in after.values()) + 64 * MiB
        with Cluster(work, 2, budget, "lru", 8 * MiB, "cachefs-bench-refresh") as cluster:
            cluster.register("ds", f"s3://{BUCKET}/ds", s3.options)
            cluster.warm("ds")
            with Job(cluster, "ds", files) as job:
                deadline = time.monotonic() + 30
                while job.reads < 50 and time.monotonic() < deadline:  # the job is reading
                    time.sleep(0.05)
                put(s3, {p: after[p] for p in [*changed, *added]}, "ds")
                before = s3.meter()[0]
                t0 = time.perf_counter()
                op = refresh(cluster, "ds", warm=True)
                current_s = time.perf_counter() - t0
                incremental = s3.meter()[0] - before
                if op.state != "succeeded":
                    raise RuntimeError(f"refresh --warm failed: {op.message}")
                reads_before = job.reads
                deadline = time.monotonic() + 30
                while job.reads < reads_before + 50 and time.monotonic() < deadline:  # and reads on after it
                    time.sleep(0.05)
            rows.append(["refresh --warm", mib(incremental), f"{incremental / new_bytes:.2f}x", f"{current_s:.1f}"])
            out["refresh_warm"] = {"origin_bytes": incremental, "multiple": incremental / new_bytes,
                                   "seconds_until_current": current_s}
            out["job"] = {"reads": job.reads, "failed": job.failed, "wrong": job.wrong, "errors": job.errors[:5]}
            # the same listing as a snapshot of its own, nothing carried over: a refresh before #18
            put(s3, after, "cold")
            before = s3.meter()[0]
            t0 = time.perf_counter()
            cluster.register("cold", f"s3://{BUCKET}/cold", s3.options)
            cluster.warm("cold")
            cold_s = time.perf_counter() - t0
            cold = s3.meter()[0] - before
            rows.append(["new snapshot, cold", mib(cold), f"{cold / new_bytes:.2f}x", f"{cold_s:.1f}"])
            out["cold"] = {"origin_bytes": cold, "multiple": cold / new_bytes, "seconds_until_current": cold_s}
    print(f"{n} files, {len(changed)} changed and {len(added)} added: {mib(new_bytes)} MiB new bytes")
    print(table(["peer", "origin bytes", "x changed bytes", "s until current"], rows))
    print(f"job across the refresh: {job.reads} reads, {job.failed} failed, {job.wrong} not the old snapshot's "
          f"bytes (snapshot {job.snapshot} throughout)")
    print(f"ratio cold / refresh --warm: {cold / max(1, incremental):.0f}x the origin bytes")
    if args.json:
        write_json(args.json, out)
    return 0 if job.failed == 0 and job.wrong == 0 and incremental <= 1.2 * new_bytes else 1


if __name__ == "__main__":
    sys.exit(main())
