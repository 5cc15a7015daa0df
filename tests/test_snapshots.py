"""A reader keeps the snapshot it opened (issue #20): through a real FUSE mount, an open
fsspec file, `cat_ranges`, direct reads and cachefs.torch, made before a refresh, each read
gives its snapshot's exact bytes or fails with a clear error, never the new snapshot's
bytes under the old sizes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from fuse_helpers import cleanup_mounts

pytestmark = pytest.mark.timeout(180)

OLD = {"c.bin": b"C" * 60_000, "e.bin": bytes(range(256)) * 35_156 + b"e" * 64,
       "g.bin": os.urandom(102_400), "same.bin": b"s" * 5000}
NEW = {"c.bin": b"Q" * 90_000, "e.bin": b"E" * 100, "g.bin": os.urandom(102_400), "same.bin": OLD["same.bin"]}
assert len(OLD["e.bin"]) == 9_000_000


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cachefs.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=90)


def change_origin(origin: Path) -> None:
    for rel, data in NEW.items():
        if data != OLD[rel]:
            (origin / rel).write_bytes(data)
            st = os.stat(origin / rel)
            os.utime(origin / rel, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a new version, surely


def refresh(cluster: Any, name: str) -> str:
    async def go():
        async with cluster.admin() as a:
            return await a.wait(await a.refresh_dataset(name), timeout=60)

    op = cluster.run(go())
    assert op.state == "succeeded" and op.result["changed"], op
    return op.result["snapshot"]


def old_or_loud(read: Callable[[], bytes], rel: str) -> str:
    """'old' when the read gave exactly the old snapshot's bytes, 'failed' when it failed
    with a clear error; anything else (other bytes) fails the test."""
    try:
        data = read()
    except OSError as e:
        assert e.errno == errno.EIO or "no longer served" in str(e) or "refresh" in str(e), (rel, e)
        return "failed"
    assert data == OLD[rel], f"{rel}: {len(data)} bytes that are not the old snapshot's {len(OLD[rel])}"
    return "old"


@pytest.fixture
def changing(cachefs_cluster, tmp_path) -> tuple[str, Path]:
    origin = tmp_path / "origin"
    origin.mkdir()
    for rel, data in OLD.items():
        (origin / rel).write_bytes(data)
    name = cachefs_cluster.unique("pinned")
    cachefs_cluster.add_dataset(name, f"file://{origin}")
    return name, origin


@pytest.fixture
def env(cachefs_cluster, tmp_path) -> Iterator[dict[str, str]]:
    home = tmp_path / "home"
    yield {**os.environ, "CACHEFS_ENDPOINT": cachefs_cluster.endpoint, "CACHEFS_TOKEN": cachefs_cluster.token,
           "CACHEFS_HOME": str(home), "CACHEFS_CONFIG": str(home / "no-config.toml")}
    cleanup_mounts(tmp_path)


def test_a_mount_made_before_a_refresh_never_reads_the_new_snapshots_bytes(cachefs_cluster, changing, env,
                                                                          tmp_path) -> None:
    name, origin = changing
    point = tmp_path / "mnt"
    done = cli(env, "mount", name, str(point))
    assert done.returncode == 0, done.stderr
    try:
        assert (point / "same.bin").read_bytes() == OLD["same.bin"]  # read (and cached) before
        change_origin(origin)
        refresh(cachefs_cluster, name)
        assert os.stat(point / "c.bin").st_size == 60_000  # the mount shows its snapshot
        outcomes = {rel: old_or_loud(lambda rel=rel: (point / rel).read_bytes(), rel) for rel in OLD}
        assert outcomes["same.bin"] == "old"
        if "failed" in outcomes.values():
            logs = "".join(p.read_text() for p in (Path(env["CACHEFS_HOME"]) / "logs").glob("*.log"))
            assert "remount" in logs, logs[-2000:]
    finally:
        cli(env, "unmount", "--lazy", str(point))
    # a mount made now shows the new snapshot
    done = cli(env, "mount", name, str(point))
    assert done.returncode == 0, done.stderr
    try:
        assert {rel: (point / rel).read_bytes() for rel in NEW} == NEW
    finally:
        cli(env, "unmount", "--lazy", str(point))


def test_fsspec_files_and_reads_made_before_a_refresh_keep_their_snapshot(cachefs_cluster, changing) -> None:
    name, origin = changing
    fs = cachefs_cluster.fs()
    files = {rel: fs.open(f"{name}/{rel}") for rel in OLD}
    assert fs.cat_file(f"{name}/same.bin") == OLD["same.bin"]
    change_origin(origin)
    refresh(cachefs_cluster, name)
    assert fs.size(f"{name}/c.bin") == 60_000  # the instance holds its snapshot
    for rel, f in files.items():
        old_or_loud(f.read, rel)
    for rel in OLD:  # cat_file (direct on this thread first), cat_ranges, cat
        old_or_loud(lambda rel=rel: fs.cat_file(f"{name}/{rel}"), rel)
        old_or_loud(lambda rel=rel: fs.cat_ranges([f"{name}/{rel}"], [0], [None])[0], rel)
        old_or_loud(lambda rel=rel: fs.cat_file(f"{name}/{rel}", 0, 20000) + fs.cat_file(f"{name}/{rel}", 20000), rel)
    with pytest.raises(OSError, match="no longer served"):
        fs.cat_file(f"{name}/e.bin", 8_000_000, 8_000_100)
    fs.invalidate_cache()  # the reader asks to move on
    assert {rel: fs.cat_file(f"{name}/{rel}") for rel in NEW} == NEW
    assert cachefs_cluster.fs().cat([f"{name}/{rel}" for rel in NEW]) == {f"{name}/{r}": d for r, d in NEW.items()}


def test_a_torch_dataset_and_its_workers_keep_the_snapshot_they_were_built_from(cachefs_cluster, changing) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from cachefs.torch import CachefsDataset

    name, origin = changing
    ds = CachefsDataset(name, endpoint=cachefs_cluster.endpoint, token=cachefs_cluster.token, prefetch_batches=0)
    rels = [ds.path(i).split("/", 1)[1] for i in range(len(ds))]
    assert sorted(rels) == sorted(OLD)
    change_origin(origin)
    refresh(cachefs_cluster, name)
    for i, rel in enumerate(rels):  # the trainer itself
        old_or_loud(lambda i=i: ds[i], rel)
    loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork")
    seen: list[Any] = []
    try:
        for sample in loader:  # a worker started after the refresh reads the dataset's snapshot, or says why not
            seen.append(sample)
    except Exception as e:  # noqa: BLE001 - torch re-raises the worker's error as its own type
        assert "no longer served" in str(e), e
    for rel, data in zip(rels, seen):
        assert data == OLD[rel], rel
    assert torch is not None
