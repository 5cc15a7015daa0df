"""Read throughput through a cachefs FUSE mount, side by side in one run with the cachefs
client itself and the loopback ceiling. Prints GB/s and ratios; writes JSON.

    python bench/mount_throughput.py            # 24 files x 16 MiB, 3 cache nodes, 4 readers
    python bench/mount_throughput.py --quick    # 8 files x 8 MiB
    python bench/mount_throughput.py --small    # 4000 files of 60-160 KB: mount vs local disk
    python bench/mount_throughput.py --repeat 5 # sequential passes 5 times: best GB/s, least mount CPU/GB

Starts a Ray of its own and a 3-node cache cluster, writes a dataset to a local origin,
registers and warms it, then reads every file with N readers.

Big files (default), N reader threads:

  loopback ceiling        socket.sendfile → recv_into over loopback (bench/read_throughput.py)
  client, sequential      cachefs:// files streamed with readinto (8 MiB pieces)
  mount, sequential       the same files through the mount: open/readinto, pages dropped first
  client, random          1 MiB reads at random offsets, through cachefs://
  mount, random           the same offsets through the mount, pages dropped first
  mount, re-read          sequential again: served by the kernel page cache (keep_cache)
  mount, random 4 KiB     O_DIRECT reads at random offsets of one file, 1 and 8 threads, in
                          IOPS: every read is a FUSE request (the figure Alluxio publishes)

Small files (--small), N reader processes each `open().read()` of its share of the files
(bench/file_readers.py), files/s side by side with the same files on local disk:

  local disk              the origin directory, page cache warm (read once before)
  mount xN, first read    a fresh mount with N serving processes (--serving 1,2,4): nothing
                          cached in the kernel or the mount, cluster warm
  mount xN, pages dropped again, the kernel's pages dropped first: the serving processes'
                          chunk caches answer (each has its own: a read may land on another)
  mount, re-read          again: the kernel page cache answers (keep_cache)
  kill                    a mount with 1 serving process, SIGKILLed under the readers:
                          the longest read around the kill, and the failed reads (goal: 0)

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


def _cpu_seconds(mountpoint: Path) -> float:
    """CPU time (user + system) the mount has used so far: its process, the serving
    processes it forked (live ones, and those it reaped), a figure that a busy shared
    machine disturbs far less than throughput does."""
    from cachefs.common import procs
    from csi.mounter import mount_pids

    pids = mount_pids(str(mountpoint))
    if not pids:
        return float("nan")

    def ticks(pid: int, reaped: bool) -> int:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return sum(int(f) for f in fields[11:15 if reaped else 13])

    children = [pid for pid, (ppid, _) in procs.processes().items() if ppid == pids[0]]
    total = ticks(pids[0], True) + sum(ticks(pid, False) for pid in children)
    return total / os.sysconf("SC_CLK_TCK")


def _iops(path: str, threads: int, reads_each: int, size: int) -> float:
    """Random 4 KiB reads with O_DIRECT (each one a FUSE request, no page cache), reads/s."""
    import mmap

    def work(seed: int) -> int:
        rnd = random.Random(seed)
        buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            for _ in range(reads_each):
                assert os.preadv(fd, [buf], rnd.randrange(0, size // 4096) * 4096) == 4096
        finally:
            os.close(fd)
        return reads_each

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        done = sum(pool.map(work, range(threads)))
    return done / (time.perf_counter() - started)


def _stall_when_killed(mountpoint: Path, paths: list[str], readers: int) -> dict[str, float]:
    """Readers read files (pages dropped, so every read reaches the mount) while one serving
    process is SIGKILLed: the longest a read took around the kill, and the failed reads."""
    import signal
    import threading

    from cachefs.common import procs
    from csi.mounter import mount_pids

    holder = mount_pids(str(mountpoint))[0]
    stop = threading.Event()
    slowest, failed, done = [0.0], [0], [0]

    def reader(k: int) -> None:
        i = k
        while not stop.is_set():
            path = paths[i % len(paths)]
            i += readers
            started = time.perf_counter()
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    while os.read(fd, 1 << 20):
                        pass
                finally:
                    os.close(fd)
            except OSError:
                failed[0] += 1
            slowest[0] = max(slowest[0], time.perf_counter() - started)
            done[0] += 1

    threads = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(readers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while done[0] < 200 and time.monotonic() < deadline:  # readers going
        time.sleep(0.01)
    slowest[0] = 0.0
    victim = min(pid for pid, (ppid, _) in procs.processes().items() if ppid == holder)
    os.kill(victim, signal.SIGKILL)
    after = done[0]
    while done[0] < after + 200 and time.monotonic() < deadline:  # readers going again
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    return {"longest_read_s": slowest[0], "failed_reads": failed[0]}


def _drop_pages(paths: list[str]) -> None:
    """Forget the kernel's cached pages of these files, so the next read goes to FUSE."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _write_big(origin: Path, args: argparse.Namespace) -> None:
    for i in range(args.files):
        (origin / f"shard-{i:04d}.bin").write_bytes(os.urandom(args.file_mib * MiB))


def _write_small(origin: Path, args: argparse.Namespace) -> int:
    """`args.files` files of 60-160 KB, 100 to a directory (as image datasets are laid out)."""
    rnd, total = random.Random(7), 0
    for i in range(args.files):
        path = origin / f"d{i // 100:03d}" / f"{i:06d}.jpg"
        path.parent.mkdir(exist_ok=True)
        size = rnd.randint(60_000, 160_000)
        path.write_bytes(os.urandom(size))
        total += size
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 files x 8 MiB")
    ap.add_argument("--small", action="store_true", help="many small files through the mount vs local disk")
    ap.add_argument("--files", type=int, default=None, help="default 24 (4000 with --small)")
    ap.add_argument("--file-mib", type=int, default=16)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3,
                    help="big files: rounds of the sequential passes (random: one, on a cold cache); best GB/s and least CPU/GB kept")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--serving", default="1,2,4", help="serving processes per mount to compare (--small); big files use the first")
    ap.add_argument("--json", default=None, help="where to write the figures (default bench/results/...)")
    args = ap.parse_args()
    if args.quick:
        args.files, args.file_mib = args.files or 8, 8
    args.files = args.files or (4000 if args.small else 24)
    args.json = args.json or f"bench/results/mount_{'small' if args.small else 'throughput'}.json"

    import ray

    from cachefs.admin import AdminClient
    from cachefs.config import ClientConfig
    from server.config import ClusterConfig
    from server import hosting

    work = Path(tempfile.mkdtemp(prefix="cachefs-bench-mount-"))
    os.environ["CACHEFS_HOME"] = str(work / "home")
    origin, mountpoint = work / "origin", work / "mnt"
    origin.mkdir()
    if args.small:
        total = _write_small(origin, args)
    else:
        _write_big(origin, args)
        total = args.files * args.file_mib * MiB
    cli = [sys.executable, "-m", "cachefs.cli.main"]
    ray.init(address="local", namespace="cachefs-bench", logging_level="ERROR", log_to_driver=False,
             include_dashboard=False)
    try:
        handle = hosting.up(ClusterConfig(nodes=args.nodes, memory_bytes=max(256 * MiB, 2 * total // args.nodes),
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

        def mount(serving: int = 0) -> None:
            subprocess.run([*cli, "unmount", str(mountpoint)], capture_output=True, timeout=60, env=env)
            done = subprocess.run([*cli, "mount", "bench", str(mountpoint), "--serving-processes", str(serving)],
                                  capture_output=True, text=True, timeout=120, env=env)
            if done.returncode != 0:
                raise SystemExit(f"cachefs mount failed: {done.stderr}")

        if args.small:
            report = _small(args, origin, mountpoint, total, mount)
        else:
            mount(int(args.serving.split(",")[0]))
            report = _big(args, work, config, origin, mountpoint)
    finally:
        subprocess.run([*cli, "unmount", str(mountpoint)], capture_output=True, timeout=60)
        hosting.down(os.environ, namespace="cachefs-bench")
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def _small(args: argparse.Namespace, origin: Path, mountpoint: Path, total: int,
           mount: Callable[[], None]) -> dict[str, Any]:
    """Files/s through the mount against local disk, `args.readers` processes each."""
    from file_readers import read_files

    rel = sorted(str(p.relative_to(origin)) for p in origin.rglob("*.jpg"))
    local = [str(origin / r) for r in rel]
    via_mount = [str(mountpoint / r) for r in rel]
    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}  # µs of the mount process's CPU per file

    def timed(label: str, paths: list[str]) -> None:
        before = _cpu_seconds(mountpoint)
        files, nbytes, secs = read_files(paths, args.readers)
        assert (files, nbytes) == (len(rel), total), f"{label}: read {files} files, {nbytes} of {total} bytes"
        rates[label] = files / secs
        cpu[label] = (_cpu_seconds(mountpoint) - before) / files * 1e6

    read_files(local, args.readers)  # warm the page cache
    timed("local disk", local)
    for serving in [int(n) for n in args.serving.split(",")]:
        mount(serving)  # fresh: nothing of these files is cached in the kernel or the mount yet
        timed(f"mount x{serving}, first read", via_mount)
        _drop_pages(via_mount)
        timed(f"mount x{serving}, pages dropped", via_mount)
    timed("mount, re-read (page cache)", via_mount)
    mount(1)  # the default: the only serving process is killed
    stall = _stall_when_killed(mountpoint, via_mount, args.readers)

    print(f"\nsmall files: {len(rel)} files of 60-160 KB ({total / MiB:.0f} MiB), {args.readers} reader processes, "
          f"{args.nodes} cache nodes, {os.cpu_count()} cores")
    print(f"{'path':<30}{'files/s':>10}{'x local':>10}{'mount CPU us/file':>20}")
    for label, rate in rates.items():
        mount_cpu = f"{cpu[label]:>20.0f}" if label != "local disk" else ""
        print(f"{label:<30}{rate:>10.0f}{rate / rates['local disk']:>10.2f}{mount_cpu}")
    print(f"a serving process SIGKILLed under {args.readers} readers: longest read {stall['longest_read_s']:.2f} s, "
          f"{stall['failed_reads']:.0f} failed reads")
    return {"files": len(rel), "bytes": total, "readers": args.readers, "files_per_s": rates, "kill": stall,
            "ratios": {k: v / rates["local disk"] for k, v in rates.items()},
            "mount_cpu_us_per_file": {k: v for k, v in cpu.items() if k != "local disk"}}


def _big(args: argparse.Namespace, work: Path, config: Any, origin: Path, mountpoint: Path) -> dict[str, Any]:
    """GB/s: loopback ceiling, client and mount, sequential and random, and the page-cache re-read."""
    from cachefs.filesystem import CachefsFileSystem
    from read_throughput import loopback_ceiling

    size = args.file_mib * MiB
    (work / "blob.bin").write_bytes(os.urandom(min(args.files * size, 256 * MiB)))
    rel = sorted(p.name for p in origin.iterdir())
    rnd = random.Random(3)
    offsets = {r: [rnd.randrange(0, size - RANDOM_READ) for _ in range(max(4, args.file_mib // 2))] for r in rel}
    figures: dict[str, float] = {}
    cpu: dict[str, float] = {}  # seconds of the mount process's CPU per GB read through it
    rounds: dict[str, list[float]] = {}  # the same, every round
    fs = CachefsFileSystem(endpoint=config.endpoint, token=config.token, skip_instance_cache=True)
    via_client = [f"bench/{r}" for r in rel]
    via_mount = [str(mountpoint / r) for r in rel]
    total = args.files * size

    def record(label: str, run: Callable[[], tuple[int, float]], expected: int) -> None:
        """Best of the rounds: GB/s and (separately) the least mount CPU per GB."""
        before = _cpu_seconds(mountpoint)
        nbytes, secs = run()
        assert nbytes == expected, f"{label}: read {nbytes} of {expected} bytes"
        figures[label] = max(figures.get(label, 0.0), nbytes / secs / 1e9)
        if label.startswith("mount"):
            spent = (_cpu_seconds(mountpoint) - before) / (nbytes / 1e9)
            cpu[label] = min(cpu.get(label, float("inf")), spent)
            rounds.setdefault(label, []).append(round(spent, 3))

    figures["loopback ceiling"] = loopback_ceiling(str(work / "blob.bin"), streams=args.readers)
    unbuffered = _stream(lambda p: open(p, "rb", buffering=0))
    for _ in range(args.repeat):  # side by side in every round; before any random read fills the mount's cache
        record("client, sequential", lambda: _timed(via_client, _stream(fs.open), args.readers), total)
        _drop_pages(via_mount)
        record("mount, sequential", lambda: _timed(via_mount, unbuffered, args.readers), total)
    random_total = sum(len(o) for o in offsets.values()) * RANDOM_READ
    record("client, random", lambda: _timed([(f"bench/{r}", offsets[r]) for r in rel], _random(fs.open),
                                            args.readers), random_total)
    _drop_pages(via_mount)
    record("mount, random", lambda: _timed([(str(mountpoint / r), offsets[r]) for r in rel],
                                           _random(lambda p: open(p, "rb", buffering=0)), args.readers), random_total)
    iops = {f"mount, random 4 KiB, {n} threads": _iops(via_mount[0], n, 400 if args.quick else 2000, size)
            for n in (1, 8)}
    _timed(via_mount, unbuffered, args.readers)  # fill the page cache
    record("mount, re-read (page cache)", lambda: _timed(via_mount, unbuffered, args.readers), total)
    fs.close()

    ratios = {
        "mount_vs_client_sequential": figures["mount, sequential"] / figures["client, sequential"],
        "mount_vs_client_random": figures["mount, random"] / figures["client, random"],
        "client_vs_loopback": figures["client, sequential"] / figures["loopback ceiling"],
    }
    print(f"\nmount throughput: {args.files} files x {args.file_mib} MiB, {args.readers} readers, "
          f"{args.nodes} cache nodes, {os.cpu_count()} cores")
    ceiling = figures["loopback ceiling"]
    print(f"{'path':<30}{'GB/s':>8}{'x loopback':>12}{'mount CPU s/GB':>16}")
    for label, rate in figures.items():
        mount_cpu = f"{cpu[label]:>16.2f}" if label in cpu else ""
        print(f"{label:<30}{rate:>8.2f}{rate / ceiling:>12.2f}{mount_cpu}")
    print(f"mount / client: sequential {ratios['mount_vs_client_sequential']:.2f}, "
          f"random {ratios['mount_vs_client_random']:.2f}")
    print(f"mount, sequential CPU s/GB each round: {rounds.get('mount, sequential')}")
    for label, rate in iops.items():
        print(f"{label:<30}{rate:>8.0f} IOPS (O_DIRECT: every read a FUSE request)")
    return {"files": args.files, "file_mib": args.file_mib, "readers": args.readers, "GBps": figures, "iops": iops,
            "ratios": ratios, "mount_cpu_s_per_GB": cpu,
            "mount_cpu_s_per_GB_each_round": rounds}


if __name__ == "__main__":
    sys.exit(main())
