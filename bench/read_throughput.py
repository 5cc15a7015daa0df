"""Read throughput, side by side in one run: the loopback ceiling, the origin read
directly (S3 on moto via s3fs), cachefs cold (blocks come from the origin) and cachefs
warm (blocks come from the cache nodes). Prints GB/s and ratios; writes JSON.

    python bench/read_throughput.py            # 512 MiB in 8 files, 3 cache nodes
    python bench/read_throughput.py --quick    # 64 MiB, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import write_json  # noqa: E402

MiB = 1024 * 1024


def node_cpu(endpoint: str, admin_token: str) -> tuple[float, int]:
    """(CPU seconds, reads served) so far, summed over the cluster's cache nodes (`status`)."""
    from cachefs.admin import AdminClient
    from cachefs.config import ClientConfig

    async def go() -> dict[str, Any]:
        async with AdminClient(ClientConfig(endpoint=endpoint, admin_token=admin_token)) as a:
            return await a.status()

    nodes = asyncio.run(go())["nodes"]
    return sum(n.get("cpu_seconds", 0.0) for n in nodes), sum(n.get("requests", 0) for n in nodes)


def cachefs_cpu() -> float:
    """CPU seconds of the threads that read for cachefs: the caller's, fsspec's event loop
    ("fsspecIO") and cachefs's I/O loops. The process's whole `process_time` also counts the
    Ray driver's own threads (gRPC, heartbeats), which run whatever the client does."""
    import threading

    total = time.thread_time()
    for t in threading.enumerate():
        if t.ident is not None and t is not threading.current_thread() and \
                (t.name == "fsspecIO" or t.name.startswith("cachefs-io-")):
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except (OSError, AttributeError):  # the thread ended meanwhile, or no per-thread clocks here
                pass
    return total


class CpuMeter:
    """CPU of the client (this process; and its reading threads alone) and of the cache
    nodes over a `with` block, per item."""

    def __init__(self, endpoint: str, admin_token: str) -> None:
        self.endpoint, self.admin_token = endpoint, admin_token
        self.client = self.threads = self.node = 0.0
        self.requests = 0

    def __enter__(self) -> "CpuMeter":
        self._node0, self._req0 = node_cpu(self.endpoint, self.admin_token)
        self._client0, self._threads0 = time.process_time(), cachefs_cpu()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client, self.threads = time.process_time() - self._client0, cachefs_cpu() - self._threads0
        node, requests = node_cpu(self.endpoint, self.admin_token)
        self.node, self.requests = node - self._node0, requests - self._req0

    def per_item(self, items: int) -> dict[str, float]:
        """µs of client CPU per item (the process; its reading threads), node CPU per item
        and per request (a batch is one request)."""
        return {"client_us_per_item": 1e6 * self.client / items, "reader_us_per_item": 1e6 * self.threads / items,
                "node_us_per_item": 1e6 * self.node / items,
                "node_us_per_request": 1e6 * self.node / max(self.requests, 1), "requests": self.requests}


def _sendfile_server(path: str, port_q: Any, streams: int) -> None:
    """Send the file over `streams` connections with socket.sendfile (the kernel's fast path)."""
    import threading

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(streams)
    port_q.put(srv.getsockname()[1])
    size = os.path.getsize(path)
    share = -(-size // streams)

    def serve(conn: socket.socket, i: int) -> None:
        with conn, open(path, "rb") as f:
            conn.sendfile(f, i * share, max(0, min(share, size - i * share)))

    threads = []
    for i in range(streams):
        conn, _ = srv.accept()
        t = threading.Thread(target=serve, args=(conn, i))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    srv.close()


def loopback_ceiling(path: str, streams: int) -> float:
    """GB/s of socket.sendfile → recv_into over loopback, `streams` connections at once."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_sendfile_server, args=(path, q, streams))
    proc.start()
    port = q.get(timeout=30)
    size = os.path.getsize(path)
    share = -(-size // streams)

    def one(i: int) -> int:
        """A plain blocking reader: recv_into one reused buffer, the cheapest way to receive."""
        want = max(0, min(share, size - i * share))
        buf = memoryview(bytearray(8 * MiB))
        got = 0
        with socket.create_connection(("127.0.0.1", port)) as s:
            while got < want:
                n = s.recv_into(buf, min(len(buf), want - got))
                if not n:
                    break
                got += n
        return got

    def client() -> int:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(streams) as pool:
            return sum(pool.map(one, range(streams)))

    t0 = time.perf_counter()
    got = client()
    secs = time.perf_counter() - t0
    proc.join(timeout=30)
    assert got == size, (got, size)
    return size / secs / 1e9


def stream_all(fs: Any, paths: list[str], concurrency: int, piece: int = 8 * MiB,
               into: bool = True) -> tuple[int, float]:
    """How a training reader consumes large files: `concurrency` files at once, each
    streamed front to back in `piece`-sized reads, into one reused buffer per reader
    (readinto, as the loopback reader does with recv_into) or as new bytes (read).
    Returns (bytes, seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path: str) -> int:
        n = 0
        buf = bytearray(piece)
        with fs.open(path, "rb") as f:
            if into:
                while got := f.readinto(buf):
                    n += got
            else:
                while chunk := f.read(piece):
                    n += len(chunk)
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        n = sum(pool.map(one, paths))
    return n, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 MiB instead of 512 MiB")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--size-mib", type=int, default=512, help="total dataset size")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4, help="files read at once by each reader")
    ap.add_argument("--tier", choices=["memory", "disk"], default="memory",
                    help="where warm blocks live: Arrow buffers in RAM, or files sent with sendfile")
    ap.add_argument("--json", default="bench/results/read_throughput.json", help="where to write the figures")
    args = ap.parse_args()
    total = (64 if args.quick else args.size_mib) * MiB
    per_file = total // args.files

    import boto3
    import ray
    import s3fs
    from moto.server import ThreadedMotoServer

    from server.config import ClusterConfig
    from cachefs.filesystem import CachefsFileSystem
    from server import hosting

    work = Path(tempfile.mkdtemp(prefix="cachefs-bench-"))
    os.environ["CACHEFS_HOME"] = str(work / "home")
    blob = os.urandom(per_file)
    local = work / "blob.bin"
    local.write_bytes(blob * args.files)

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    host, port = moto.get_host_and_port()
    opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    boto3.client("s3", aws_access_key_id="k", aws_secret_access_key="s", **opts["client_kwargs"]).create_bucket(Bucket="bench")
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    for i in range(args.files):
        s3.pipe_file(f"bench/data/file-{i:03d}.bin", blob)
    results: dict[str, Any] = {"bytes": per_file * args.files, "files": args.files, "nodes": args.nodes,
                               "tier": args.tier,
                               "cpus": os.cpu_count()}
    try:
        results["loopback_sendfile"] = loopback_ceiling(str(local), streams=args.concurrency)

        origin_fs = s3fs.S3FileSystem(skip_instance_cache=True, default_block_size=8 * MiB, **opts)
        n, secs = stream_all(origin_fs, [f"bench/data/file-{i:03d}.bin" for i in range(args.files)], args.concurrency)
        results["origin_direct_s3"] = n / secs / 1e9

        # address="local": a Ray of its own, never one that happens to run on this machine
        ray.init(address="local", namespace="cachefs-bench", logging_level="ERROR", log_to_driver=False,
                 include_dashboard=False)
        node_mem = max(256 * MiB, 2 * total // args.nodes)
        tiers = ({"memory_bytes": node_mem, "disk_bytes": 0} if args.tier == "memory" else
                 {"memory_bytes": 16 * MiB, "disk_bytes": node_mem, "disk_root": str(work / "disk")})
        handle = hosting.up(ClusterConfig(nodes=args.nodes, namespace="cachefs-bench",
                                          allowed_origin_hosts=("127.0.0.1",), **tiers))  # S3 on loopback

        fs = CachefsFileSystem(endpoint=handle.endpoint, token=handle.token, skip_instance_cache=True)
        paths = [f"bench/file-{i:03d}.bin" for i in range(args.files)]

        async def register() -> None:
            from cachefs.admin import AdminClient
            from cachefs.config import ClientConfig

            async with AdminClient(ClientConfig(endpoint=handle.endpoint, admin_token=handle.admin_token)) as a:
                op = await a.wait(await a.add_dataset("bench", "s3://bench/data", opts), timeout=120)
                assert op.finished_ok, op

        asyncio.run(register())
        n, secs = stream_all(fs, paths, args.concurrency)
        results["cachefs_cold"] = n / secs / 1e9
        warm, warm_read = [], []
        with CpuMeter(handle.endpoint, handle.admin_token) as meter:
            for _ in range(3):
                n, secs = stream_all(fs, paths, args.concurrency)
                warm.append(n / secs / 1e9)
                n, secs = stream_all(fs, paths, args.concurrency, into=False)
                warm_read.append(n / secs / 1e9)
        gb = 6 * per_file * args.files / 1e9
        results["cpu_warm"] = {"client_s_per_gb": meter.client / gb, "node_s_per_gb": meter.node / gb,
                               "node_us_per_request": 1e6 * meter.node / max(meter.requests, 1),
                               "requests": meter.requests}
        results["cachefs_warm_read_bytes"] = max(warm_read)
        fs.close()
        results["cachefs_warm"] = max(warm)
        results["cachefs_warm_runs"] = warm
    finally:
        hosting.down(os.environ, namespace="cachefs-bench")
        ray.shutdown()
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)

    ceiling, origin_gbps = results["loopback_sendfile"], results["origin_direct_s3"]
    results["ratios"] = {
        "warm_vs_loopback": results["cachefs_warm"] / ceiling,
        "warm_vs_origin": results["cachefs_warm"] / origin_gbps,
        "cold_vs_origin": results["cachefs_cold"] / origin_gbps,
    }
    print(f"\nread throughput: {args.files} files, {per_file * args.files / MiB:.0f} MiB, {args.nodes} cache nodes, "
          f"{os.cpu_count()} cores, {args.concurrency} files at once")
    print(f"{'peer':<28}{'GB/s':>8}{'x loopback':>12}{'x origin':>10}")
    for key, label in (("loopback_sendfile", "loopback ceiling (sendfile)"), ("origin_direct_s3", "origin direct (S3/moto)"),
                       ("cachefs_cold", "cachefs cold"), ("cachefs_warm", "cachefs warm (readinto)")):
        v = results[key]
        print(f"{label:<28}{v:>8.2f}{v / ceiling:>12.2f}{v / origin_gbps:>10.1f}")
    v = results["cachefs_warm_read_bytes"]
    print(f"{'cachefs warm, read() bytes':<28}{v:>8.2f}{v / ceiling:>12.2f}{v / origin_gbps:>10.1f}")
    c = results["cpu_warm"]
    print(f"\nCPU, warm reads: client {c['client_s_per_gb']:.2f} s/GB, nodes {c['node_s_per_gb']:.2f} s/GB, "
          f"{c['node_us_per_request']:.0f} µs per request ({c['requests']} requests)")
    print(f"\nwrote {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
