"""What the epoch and accelerator benches share: a metered S3 origin, synthetic datasets,
a cachefs cluster on a local Ray, reader processes ("training nodes"), tables and JSON.

Every resource here is a context manager that stops what it started, with a bounded
wait, so an interrupted bench leaves no moto server, Ray cluster or process behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KiB, MiB = 1024, 1024 * 1024
BUCKET = "bench"
STOP_TIMEOUT = 15.0


# -- the origin: moto's S3 in a process of its own, with a meter ---------------------------
def _is_object_get(environ: dict[str, Any]) -> bool:
    """A GET of an object's bytes (path-style /bucket/key), not a listing or a HEAD."""
    if environ.get("REQUEST_METHOD") != "GET":
        return False
    bucket, _, key = environ.get("PATH_INFO", "").lstrip("/").partition("/")
    return bool(bucket and key)


def _serve_moto(port_q: Any, nbytes: Any, requests: Any) -> None:
    import logging

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    app = DomainDispatcherApplication(create_backend_app)

    def metered(environ: dict[str, Any], start_response: Any) -> Any:
        body = app(environ, start_response)
        if not _is_object_get(environ):
            return body
        with requests.get_lock():
            requests.value += 1

        def counted() -> Iterator[bytes]:
            for chunk in body:
                with nbytes.get_lock():
                    nbytes.value += len(chunk)
                yield chunk
            if hasattr(body, "close"):
                body.close()

        return counted()

    server = make_server("127.0.0.1", 0, metered, threaded=True)
    port_q.put(server.server_port)
    server.serve_forever()


class MeteredS3:
    """moto's S3 server in its own process (its own GIL), counting object bytes it sends.

    The meter is the one count every peer is held to: whatever a peer's own bookkeeping
    says, these are the bytes that left the origin.
    """

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._bytes = ctx.Value("q", 0)
        self._requests = ctx.Value("q", 0)
        q = ctx.Queue()
        self._proc = ctx.Process(target=_serve_moto, args=(q, self._bytes, self._requests), daemon=True,
                                 name="bench-moto")
        self._proc.start()
        try:
            port = q.get(timeout=60)
        except Exception:
            self.stop()
            raise
        self.endpoint = f"http://127.0.0.1:{port}"
        self.options = {"key": "bench", "secret": "bench",
                        "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def meter(self) -> tuple[int, int]:
        """(object bytes sent, object GETs) so far."""
        return self._bytes.value, self._requests.value

    def stop(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(STOP_TIMEOUT)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(STOP_TIMEOUT)

    def __enter__(self) -> "MeteredS3":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- datasets ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    """A synthetic dataset: files (path relative to the prefix, size) under s3://bench/<name>."""

    name: str
    kind: str  # "images" (many small files, one sample each) | "shards" (large files of records)
    files: tuple[tuple[str, int], ...]
    sample_bytes: int  # what one training sample is: a file, or a record inside a shard

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def samples(self) -> int:
        return len(self.files) if self.kind == "images" else max(1, self.bytes // self.sample_bytes)

    @property
    def prefix(self) -> str:
        return f"{BUCKET}/{self.name}"

    def samples_in(self, paths: Sequence[str]) -> int:
        if self.kind == "images":
            return len(paths)
        sizes = dict(self.files)
        return sum(sizes[p] for p in paths) // self.sample_bytes

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "files": len(self.files), "bytes": self.bytes,
                "samples": self.samples, "sample_bytes": self.sample_bytes}


def images(name: str, total: int, mean: int, spread: float = 0.2, seed: int = 1,
           suffix: str = ".jpg") -> Dataset:
    """About `total` bytes of files of `mean` bytes (uniformly ± spread) in 10 class folders,
    one sample per file (ImageNet-style folders, or one TFRecord per sample)."""
    rng = random.Random(seed)
    n = max(1, round(total / mean))
    files = tuple((f"train/class_{i % 10:02d}/sample_{i:06d}{suffix}", int(mean * rng.uniform(1 - spread, 1 + spread)))
                  for i in range(n))
    return Dataset(name, "images", files, mean)


def shards(name: str, total: int, shard: int, record: int = MiB) -> Dataset:
    """`total // shard` shards of exactly `shard` bytes, each holding `record`-byte samples."""
    return Dataset(name, "shards", tuple((f"shards/shard-{i:05d}.tar", shard) for i in range(max(1, total // shard))),
                   record)


def upload(s3: MeteredS3, ds: Dataset, threads: int = 8) -> float:
    """Write the dataset's files (random bytes) to the origin; returns seconds."""
    import boto3
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.options)
    if not fs.exists(BUCKET):
        boto3.client("s3", aws_access_key_id="bench", aws_secret_access_key="bench",
                     **s3.options["client_kwargs"]).create_bucket(Bucket=BUCKET)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda f: fs.pipe_file(f"{ds.prefix}/{f[0]}", os.urandom(f[1])), ds.files))
    return time.perf_counter() - t0


def epoch_order(ds: Dataset, epoch: int, seed: int = 0) -> list[str]:
    """The epoch's global shuffle, the same in every process (like a sampler's set_epoch)."""
    paths = [p for p, _ in ds.files]
    random.Random(f"{seed}:{epoch}").shuffle(paths)
    return paths


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A temp dir that is also CACHEFS_HOME (so `cachefs mount` finds the cluster), removed on exit."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    old = os.environ.get("CACHEFS_HOME")
    os.environ["CACHEFS_HOME"] = str(work / "home")
    os.environ.pop("CACHEFS_TOKEN", None)
    os.environ.pop("CACHEFS_ENDPOINT", None)
    try:
        yield work
    finally:
        if old is None:
            os.environ.pop("CACHEFS_HOME", None)
        else:
            os.environ["CACHEFS_HOME"] = old
        shutil.rmtree(work, ignore_errors=True)


# -- reader processes ----------------------------------------------------------------------
def _node_main(conn: Any, rank: int) -> None:
    """Training node `rank`: builds readers on demand and runs what the driver asks."""
    from bench.peers import make_reader

    readers: dict[str, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        cmd, args = msg[0], msg[1:]
        try:
            if cmd == "exit":
                break
            if cmd == "call":  # ("call", spec, target, *args): reader.target(*args), or target(reader, *args)
                spec, target, rest = args[0], args[1], args[2:]
                if spec.key not in readers:
                    readers[spec.key] = make_reader(spec, rank)
                reader = readers[spec.key]
                fn = getattr(reader, target) if isinstance(target, str) else functools.partial(target, reader)
                conn.send(("ok", fn(*rest)))
            elif cmd == "drop":
                reader = readers.pop(args[0].key, None)
                if reader is not None:
                    reader.close()
                conn.send(("ok", None))
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except Exception:  # report any failure to the driver, which raises it there
            conn.send(("error", traceback.format_exc()))
    for reader in readers.values():
        with contextlib.suppress(Exception):
            reader.close()


class Nodes:
    """k reader processes (spawned: the driver holds a Ray connection, never fork it)."""

    def __init__(self, k: int, timeout: float) -> None:
        ctx = mp.get_context("spawn")
        self.timeout = timeout
        self.procs, self.conns = [], []
        for i in range(k):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_node_main, args=(child, i), daemon=True, name=f"bench-node-{i}")
            p.start()
            self.procs.append(p)
            self.conns.append(parent)

    def call(self, spec: Any, target: Any, per_node_args: Sequence[tuple[Any, ...]]) -> list[Any]:
        """On node i, reader.target(*args_i) (a method name) or target(reader, *args_i) (a
        module-level function), all nodes at once; waits for all (bounded)."""
        for conn, args in zip(self.conns, per_node_args):
            conn.send(("call", spec, target, *args))
        return [self._answer(conn) for conn in self.conns[:len(per_node_args)]]

    def drop(self, spec: Any) -> None:
        for conn in self.conns:
            conn.send(("drop", spec))
        for conn in self.conns:
            self._answer(conn)

    def _answer(self, conn: Any) -> Any:
        if not conn.poll(self.timeout):
            raise TimeoutError(f"a reader process did not answer within {self.timeout:.0f} s")
        status, value = conn.recv()
        if status != "ok":
            raise RuntimeError(f"a reader process failed:\n{value}")
        return value

    def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("exit",))
        for p in self.procs:
            p.join(STOP_TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join(STOP_TIMEOUT)

    def __enter__(self) -> "Nodes":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- reporting -----------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """The machine and the code measured (the commit, "+dirty" if cachefs' code has changes)."""
    import subprocess

    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * KiB
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        repo = Path(__file__).resolve().parent.parent
        git = ["git", "-C", str(repo)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "cachefs", "server", "shard", "csi"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        commit += "+dirty" if dirty else ""
    return {"cpus": os.cpu_count(), "memory_bytes": mem, "load_average": os.getloadavg(),
            "python": sys.version.split()[0], "commit": commit}


def mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:  # the first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths), *map(fmt, cells[1:])])


def write_json(path: str, doc: dict[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    return out

