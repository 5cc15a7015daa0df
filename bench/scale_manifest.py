"""A million files on this machine: register, list, load the manifest, warm.

A real `file://` tree of N small files (1,000 per folder) is registered with a 3-node
cluster on a Ray of this bench's own, then read by a client as a user would:

  registration     `dataset add` from the request to the pinned snapshot (listing, packing, manifest)
  manifest         bytes on the wire (Arrow IPC), time for a client to load it (GET + index), and
                   the client memory it holds per file (Arrow buffers, measured by Arrow's allocator)
  metadata         `ls` of a folder and of the root, `info` of one file, `find` of everything
  warm             every file into the cache (packed: a few hundred 8 MiB units), files/s
  10M              a 10M-file manifest built in memory and loaded the same way (no cluster:
                   the load is measured, not extrapolated; its wire time scales from the 1M one)

    python bench/scale.py --only manifest           # 1,000,000 files (~2 min to write them)
    python bench/scale.py --only manifest --quick   # 20,000 files, no 10M
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import MiB, table  # noqa: E402

PER_FOLDER = 1000


def write_tree(root: Path, files: int) -> int:
    """`files` files of 64-191 bytes, PER_FOLDER per folder; returns their bytes."""
    total = 0
    for i in range(files):
        folder = root / f"d{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True)
        size = 64 + i % 128
        (folder / f"f{i:07d}.bin").write_bytes(i.to_bytes(8, "little") * (size // 8) + b"\0" * (size % 8))
        total += size
    return total


def load_in_memory(files: int) -> dict[str, Any]:
    """A manifest of `files` files built with Arrow (paths and versions like a local tree's)
    and loaded as a client does: from IPC bytes to the index. No cluster, no wire."""
    import pyarrow as pa

    from cachefs.common.manifest import Manifest, _hash_ordered, for_readers, from_ipc, path_hash, to_ipc

    paths = [f"d{i // PER_FOLDER:05d}/f{i:08d}.bin" for i in range(files)]
    table = _hash_ordered(pa.table({
        "path": paths, "size": pa.array([100] * files, pa.int64()),
        "version": [f"mtime:100:1764000000.{i:09d}:{4000000 + i}" for i in range(files)],
        "pack": pa.array([i // 80_000 for i in range(files)], pa.int32()),
        "offset": pa.array([(i % 80_000) * 100 for i in range(files)], pa.int32()),
        "hash": pa.array([path_hash(p) for p in paths], pa.uint64())}))
    ipc = to_ipc(for_readers(table))
    del table, paths
    t0 = time.perf_counter()
    manifest = Manifest(from_ipc(pa.py_buffer(ipc)), "snap")
    load = time.perf_counter() - t0
    held = manifest.nbytes  # its buffers are views of the IPC bytes: what stays alive is those
    assert manifest.file("d00000/f00000007.bin").size == 100
    return {"files": files, "ipc_bytes": len(ipc), "load_seconds": load, "held_bytes": held,
            "bytes_per_file": held / files, **listing_in_memory(manifest, files)}


def listing_in_memory(manifest: Any, files: int) -> dict[str, float]:
    """`find` and `glob` of every file through the filesystem's own code, on a loaded
    manifest (no wire), beside the way `find` built them before: a FileEntry per file."""
    from cachefs.blocks import DatasetView
    from cachefs.common.wire import DatasetInfo
    from cachefs.filesystem import CachefsFileSystem

    from fsspec.asyn import sync

    fs = CachefsFileSystem(endpoint="http://127.0.0.1:9", token="t", skip_instance_cache=True)
    view = DatasetView(DatasetInfo("big", "file:///x", "snap", files, 100 * files), manifest)

    async def load(*_args: Any) -> DatasetView:
        return view

    sync(fs.loop, fs.pins.view, "big", load)  # the filesystem holds it as if it had loaded it
    out: dict[str, float] = {}
    for key, call, expect in (
            ("find_seconds", lambda: fs.find("big"), files),
            ("find_detail_seconds", lambda: fs.find("big", detail=True), files),
            ("glob_all_seconds", lambda: fs.glob("big/**/*.bin"), files),
            ("glob_tenth_seconds", lambda: fs.glob("big/d*/f*7.bin"), files // 10),
            ("find_per_entry_seconds", lambda: sorted(f"big/{e.path}" for e in manifest.walk_files("")), files)):
        t0 = time.perf_counter()
        assert len(call()) == expect, key
        out[key] = time.perf_counter() - t0
    fs.close()
    return out


def run(quick: bool) -> dict[str, Any]:
    from bench.cluster import local_ray
    from cachefs.config import ClientConfig
    from server.config import ClusterConfig, DEFAULT_ALLOWED_ORIGINS
    from cachefs.filesystem import CachefsFileSystem
    from server import hosting

    files = 20_000 if quick else 1_000_000
    work = Path(tempfile.mkdtemp(prefix="cachefs-scale-"))
    os.environ["CACHEFS_HOME"] = str(work / "home")
    origin = work / "origin"
    doc: dict[str, Any] = {"files": files}
    namespace = "cachefs-scale"
    try:
        t0 = time.perf_counter()
        doc["bytes"] = write_tree(origin, files)
        doc["write_seconds"] = time.perf_counter() - t0
        with local_ray():
            handle = hosting.up(ClusterConfig(nodes=3, memory_bytes=256 * MiB, disk_bytes=0, namespace=namespace,
                                              allowed_origins=(*DEFAULT_ALLOWED_ORIGINS, f"file://{origin}/")))
            try:
                admin = ClientConfig(endpoint=handle.endpoint, token=handle.token, admin_token=handle.admin_token)
                t0 = time.perf_counter()
                op = asyncio.run(admin_op_add(admin, f"file://{origin}"))
                doc["register_seconds"] = time.perf_counter() - t0
                doc["packs"] = op.result.get("packs", 0)

                fs = CachefsFileSystem(endpoint=handle.endpoint, token=handle.token, skip_instance_cache=True,
                                       asynchronous=False)
                doc.update(client_figures(fs, files))
                t0 = time.perf_counter()
                warm = asyncio.run(admin_warm(admin))
                doc["warm_seconds"] = time.perf_counter() - t0
                doc["warm_files"] = warm.done_files
                doc["warm_files_per_s"] = warm.done_files / doc["warm_seconds"]
                probe = [f"big/d{i // PER_FOLDER:04d}/f{i:07d}.bin" for i in range(0, files, max(1, files // 2000))]
                t0 = time.perf_counter()
                got = fs.cat(probe)
                doc["cat_sample_files_per_s"] = len(probe) / (time.perf_counter() - t0)
                assert all(len(v) >= 64 for v in got.values())
                fs.close()
            finally:
                hosting.down(os.environ, namespace=namespace)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc["in_memory"] = [load_in_memory(n) for n in ((100_000,) if quick else (1_000_000, 10_000_000))]
    return doc


async def admin_op_add(config: Any, origin: str) -> Any:
    from cachefs.admin import AdminClient

    async with AdminClient(config) as a:
        op = await a.wait(await a.add_dataset("big", origin), timeout=1800)
        assert op.finished_ok, op
        return op


async def admin_warm(config: Any) -> Any:
    from cachefs.admin import AdminClient

    async with AdminClient(config) as a:
        op = await a.wait(await a.warm_dataset("big"), timeout=1800)
        assert op.finished_ok, op
        return op


def client_figures(fs: Any, files: int) -> dict[str, Any]:
    """What a client pays for the manifest, and for metadata calls once it holds it."""
    from cachefs.common import wire

    out: dict[str, Any] = {}
    for key, query in (("manifest_wire_bytes", "?versions=0"), ("manifest_full_bytes", "")):
        body, _ = asyncio.run_coroutine_threadsafe(
            fs._any_node("GET", wire.route(wire.DATASET_MANIFEST, name="big") + query, raw=True), fs.loop).result(600)
        out[key] = len(body)
    loads, held = [], 0
    for _ in range(3):
        fs.invalidate_cache()
        t0 = time.perf_counter()
        view = asyncio.run_coroutine_threadsafe(fs._view("big"), fs.loop).result(600)
        loads.append(time.perf_counter() - t0)
        held = view.manifest.nbytes  # the table's buffers (views of the received IPC bytes)
    out["manifest_load_seconds"] = min(loads)
    out["manifest_held_bytes"] = held
    out["manifest_bytes_per_file"] = held / files
    t0 = time.perf_counter()
    assert len(fs.ls("big/d0000", detail=False)) == min(files, PER_FOLDER)
    out["ls_folder_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert len(fs.ls("big", detail=False)) == -(-files // PER_FOLDER)
    out["ls_root_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 1000
    for i in range(n):
        fs.info(f"big/d{(i * 7919 % files) // PER_FOLDER:04d}/f{i * 7919 % files:07d}.bin")
    out["info_per_s"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    assert len(fs.find("big")) == files
    out["find_seconds"] = time.perf_counter() - t0
    return out


def report(doc: dict[str, Any]) -> str:
    n = doc["files"]
    lines = [table(["what", "figure"], [
        ["files written (local tree)", f"{n:,} ({doc['bytes'] / MiB:.0f} MiB) in {doc['write_seconds']:.0f} s"],
        ["registration (list, pack, pin)", f"{doc['register_seconds']:.1f} s ({doc['packs']} packs)"],
        ["manifest on the wire (what readers load)",
         f"{doc['manifest_wire_bytes'] / MiB:.1f} MiB ({doc['manifest_wire_bytes'] / n:.0f} B/file)"],
        ["  with version tokens (the coordinator's)",
         f"{doc['manifest_full_bytes'] / MiB:.1f} MiB ({doc['manifest_full_bytes'] / n:.0f} B/file)"],
        ["manifest load (GET + index)", f"{doc['manifest_load_seconds']:.2f} s"],
        ["client memory for it", f"{doc['manifest_held_bytes'] / MiB:.1f} MiB ({doc['manifest_bytes_per_file']:.0f} B/file)"],
        ["ls of a folder (1,000 files)", f"{doc['ls_folder_seconds'] * 1e3:.1f} ms"],
        ["ls of the root", f"{doc['ls_root_seconds'] * 1e3:.1f} ms"],
        ["info of one file", f"{doc['info_per_s']:,.0f}/s"],
        ["find of everything", f"{doc['find_seconds']:.1f} s"],
        ["warm", f"{doc['warm_files']:,} files in {doc['warm_seconds']:.1f} s ({doc['warm_files_per_s']:,.0f} files/s)"],
        ["cat of a 2,000-file sample (warm)", f"{doc['cat_sample_files_per_s']:,.0f} files/s"],
    ])]
    lines.append(table(["manifest in memory", "IPC", "load", "held", "per file"], [
        [f"{m['files']:,} files", f"{m['ipc_bytes'] / MiB:.0f} MiB", f"{m['load_seconds']:.2f} s",
         f"{m['held_bytes'] / MiB:.0f} MiB", f"{m['bytes_per_file']:.0f} B"] for m in doc["in_memory"]]))
    lines.append(table(["listing a loaded manifest", "find", "find (detail)", "glob **/*.bin", "glob d*/f*7.bin",
                        "a FileEntry per file (before)", "ratio"], [
        [f"{m['files']:,} files", f"{m['find_seconds']:.2f} s", f"{m['find_detail_seconds']:.2f} s",
         f"{m['glob_all_seconds']:.2f} s", f"{m['glob_tenth_seconds']:.2f} s", f"{m['find_per_entry_seconds']:.2f} s",
         f"{m['find_per_entry_seconds'] / m['find_seconds']:.1f}x"] for m in doc["in_memory"]]))
    return "\n".join(lines)
