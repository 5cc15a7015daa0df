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
    return cachefs_cluster.dataset_of(OLD, origin, "pinned"), origin


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
        old_or_loud(lambda rel=rel: _raised(fs.cat_ranges([f"{name}/{rel}"], [0], [None])[0]), rel)
        old_or_loud(lambda rel=rel: fs.cat_file(f"{name}/{rel}", 0, 20000) + fs.cat_file(f"{name}/{rel}", 20000), rel)
    with pytest.raises(OSError, match="no longer served|refresh"):  # not cached: its old bytes are gone
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
        assert "no longer served" in str(e) or "refresh" in str(e), e
    for rel, data in zip(rels, seen):
        assert data == OLD[rel], rel
    assert torch is not None


# -- a refresh reads about what changed (#18) ------------------------------------------------

def test_a_refresh_then_warm_reads_from_the_origin_about_what_changed(cachefs_cluster, tmp_path) -> None:
    import random

    rnd = random.Random(18)
    files = {f"img/{i:04d}.jpg": rnd.randbytes(rnd.randint(1_000, 60_000)) for i in range(300)}
    files |= {f"big/{i}.bin": rnd.randbytes(2 * 1024 * 1024 + i) for i in range(3)}
    origin = tmp_path / "o"
    name = cachefs_cluster.dataset_of(files, origin, "incremental")
    assert cachefs_cluster.warm(name).state == "succeeded"
    changed = {rel: rnd.randbytes(len(files[rel])) for rel in ["img/0007.jpg", "img/0150.jpg", "big/1.bin"]}
    added = {f"img/new{i}.jpg": rnd.randbytes(30_000) for i in range(3)}
    for rel, data in (changed | added).items():
        (origin / rel).write_bytes(data)
        st = os.stat(origin / rel)
        os.utime(origin / rel, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    before = cachefs_cluster.totals("origin_bytes")
    refresh(cachefs_cluster, name)
    assert cachefs_cluster.warm(name).state == "succeeded"
    fetched = cachefs_cluster.totals("origin_bytes") - before
    new_bytes = sum(len(d) for d in (changed | added).values())
    assert new_bytes <= fetched <= 1.2 * new_bytes, (fetched, new_bytes)
    files |= changed | added
    fs = cachefs_cluster.fs()
    assert fs.cat([f"{name}/{rel}" for rel in files]) == {f"{name}/{rel}": d for rel, d in files.items()}
    assert cachefs_cluster.totals("origin_bytes") - before == fetched  # all of it was cached


def test_packs_stay_dense_over_many_refreshes() -> None:
    """Pure: 40 refreshes of a 2,000-file dataset, 1% changed and 0.5% added each time."""
    import random

    from cachefs.common.manifest import FileEntry, Manifest, build_table
    from shard.packing import SPARSE

    bs, rnd = 1 << 20, random.Random(7)
    files = {f"d{i % 7}/f{i:05d}": (rnd.randint(1, 200_000), "v0") for i in range(2000)}
    entries = lambda: [FileEntry(p, s, v) for p, (s, v) in files.items()]  # noqa: E731
    first = cur = Manifest(build_table(entries(), bs, bs // 4))
    for k in range(40):
        for p in rnd.sample(sorted(files), 20):
            files[p] = (files[p][0], f"v{k + 1}")
        files |= {f"new{k}/n{i}": (rnd.randint(1, 200_000), "v0") for i in range(10)}
        prev, cur = cur, Manifest(build_table(entries(), bs, bs // 4, cur))
        unchanged = [(path, prev.get(path)) for path, (_, version) in files.items()
                     if prev.get(path) is not None and prev.get(path).version == version]
        kept: dict[int, int] = {}  # bytes of each old pack whose files did not change
        for _, old in unchanged:
            kept[old.pack] = kept.get(old.pack, 0) + old.size
        for path, old in unchanged:  # unchanged files keep their unit (their cached bytes) ...
            if cur.get(path).unit != old.unit:
                assert kept[old.pack] < SPARSE * bs, path  # ... unless their pack became sparse (compacted)
    live = _live(cur)
    sparse = [p for p, n in live.items() if n < SPARSE * bs]
    assert len(sparse) <= max(2, len(live) // 20) + 1, (len(sparse), len(live))
    assert sum(live.values()) >= 0.7 * bs * len(live)
    assert cur.packs < 1.5 * first.packs * sum(s for s, _ in files.values()) / sum(e.size for e in first.walk_files())


def _live(manifest: Any) -> dict[int, int]:
    """Bytes of each pack that the snapshot reads."""
    live: dict[int, int] = {}
    for row in range(len(manifest)):
        e = manifest.at(row)
        if e.packed:
            live[e.pack] = live.get(e.pack, 0) + e.size
    return live


# -- jobs keep their snapshot (#18) -----------------------------------------------------------

def test_readers_opened_before_a_refresh_keep_reading_the_old_snapshots_exact_bytes(cachefs_cluster, changing, env,
                                                                                    tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from cachefs.torch import CachefsDataset

    name, origin = changing
    assert cachefs_cluster.warm(name).state == "succeeded"
    point = tmp_path / "mnt"
    done = cli(env, "mount", name, str(point))
    assert done.returncode == 0, done.stderr
    try:
        fs = cachefs_cluster.fs()
        files = {rel: fs.open(f"{name}/{rel}") for rel in OLD}
        ds = CachefsDataset(name, endpoint=cachefs_cluster.endpoint, token=cachefs_cluster.token, prefetch_batches=0)
        old = fs.info(f"{name}/c.bin")["snapshot"]
        change_origin(origin)
        new = refresh(cachefs_cluster, name)
        assert {rel: (point / rel).read_bytes() for rel in OLD} == OLD  # the mount
        assert {rel: f.read() for rel, f in files.items()} == OLD  # files open before
        assert {rel: fs.cat_file(f"{name}/{rel}") for rel in OLD} == OLD  # the instance, direct path included
        assert fs.cat_ranges([f"{name}/e.bin"], [8_999_000], [None]) == [OLD["e.bin"][8_999_000:]]
        rels = [ds.path(i).split("/", 1)[1] for i in range(len(ds))]
        assert [ds[i] for i in range(len(ds))] == [OLD[r] for r in rels]  # the trainer ...
        loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork")
        assert list(loader) == [OLD[r] for r in rels]  # ... and a worker started after the refresh
        other = cachefs_cluster.fs()  # pinned by name: `cachefs://name@SNAPSHOT`
        assert other.cat_file(f"cachefs://{name}@{old}/c.bin") == OLD["c.bin"]
        assert other.cat_file(f"{name}/c.bin") == NEW["c.bin"]  # unpinned, a new reader gets the current one
        assert other.cat_file(f"{name}@{new}/e.bin") == NEW["e.bin"]
        fs.invalidate_cache()  # the reader asks to move on
        assert fs.cat_file(f"{name}/c.bin") == NEW["c.bin"]
        assert torch is not None
    finally:
        cli(env, "unmount", "--lazy", str(point))


def test_a_pinned_reader_past_its_lease_gets_410_saying_what_to_do(cachefs_cluster, changing) -> None:
    from cachefs.common.errors import SnapshotGone
    from conftest import wait_until

    name, origin = changing

    async def short_lease():
        async with cachefs_cluster.admin() as a:
            return await a.update_dataset(name, lease=1)

    assert cachefs_cluster.run(short_lease()).lease == 1
    fs = cachefs_cluster.fs()
    assert fs.cat_file(f"{name}/same.bin") == OLD["same.bin"]
    change_origin(origin)
    refresh(cachefs_cluster, name)

    def refused() -> SnapshotGone | None:
        try:
            fs.cat_file(f"{name}/same.bin")
        except SnapshotGone as e:
            return e
        return None

    error = wait_until(refused, timeout=60, what="the lease to end")
    assert "lease" in str(error) and "Reopen" in str(error) and "invalidate_cache" in str(error), error
    assert isinstance(error, OSError)


def test_a_snapshot_the_dataset_never_had_is_404_and_a_malformed_one_400(cachefs_cluster, changing) -> None:
    from cachefs.common.errors import BadRequest

    name, _ = changing
    fs = cachefs_cluster.fs()
    with pytest.raises(FileNotFoundError, match="no snapshot"):
        fs.ls(f"{name}@{'0' * 20}")
    with pytest.raises(BadRequest, match="not a snapshot id"):
        fs.cat_file(f"{name}@../x/c.bin")
    assert fs.cat_file(f"{name}/c.bin") == OLD["c.bin"]


def _raised(result: Any) -> Any:
    if isinstance(result, BaseException):
        raise result
    return result


# -- warm, then swap (#18) -------------------------------------------------------------------

def test_refresh_warm_makes_the_new_snapshot_current_only_once_it_is_cached(cachefs_cluster, changing) -> None:
    name, origin = changing
    old = cachefs_cluster.fs().info(f"{name}/c.bin")["snapshot"]
    change_origin(origin)

    async def go():
        async with cachefs_cluster.admin() as a:
            return await a.wait(await a.refresh_dataset(name, warm=True), timeout=120)

    op = cachefs_cluster.run(go())
    assert op.state == "succeeded" and op.result["changed"] and op.result["snapshot"] != old, op
    before = cachefs_cluster.totals("origin_bytes")
    fs = cachefs_cluster.fs()
    assert fs.info(f"{name}/c.bin")["snapshot"] == op.result["snapshot"]
    assert {rel: fs.cat_file(f"{name}/{rel}") for rel in NEW} == NEW
    assert cachefs_cluster.totals("origin_bytes") == before  # it was all cached before it became current


def test_a_refresh_that_fails_midway_leaves_the_current_snapshot_serving(cachefs_cluster, changing) -> None:
    name, origin = changing
    fs = cachefs_cluster.fs()
    current = fs.info(f"{name}/c.bin")["snapshot"]
    change_origin(origin)
    for d in range(100):  # a listing long enough to be cancelled while it runs
        (origin / f"many{d:03d}").mkdir()
        for f in range(100):
            (origin / f"many{d:03d}" / f"{f}.bin").write_bytes(b"x")

    async def start_then_cancel():
        async with cachefs_cluster.admin() as a:
            op = await a.refresh_dataset(name, warm=True)
            await a.cancel(op.id)
            return await a.wait(op, timeout=120), await a.list_datasets()

    op, datasets = cachefs_cluster.run(start_then_cancel())
    assert op.state == "cancelled", op
    assert next(d for d in datasets if d.name == name).snapshot == current
    fresh = cachefs_cluster.fs()
    assert fresh.info(f"{name}/c.bin")["snapshot"] == current and fresh.size(f"{name}/c.bin") == 60_000
    assert fresh.cat_file(f"{name}/same.bin") == OLD["same.bin"]


def test_a_pack_read_after_some_of_its_files_changed_is_kept_and_never_gives_zeros(cachefs_cluster, tmp_path) -> None:
    from cachefs.common.errors import OriginChanged

    files = {"a.bin": b"a" * 3000, "b.bin": b"b" * 3000, "c.bin": b"c" * 3000}  # one pack
    origin = tmp_path / "o"
    name = cachefs_cluster.dataset_of(files, origin, "deadspace")
    old_reader = cachefs_cluster.fs()
    assert old_reader.size(f"{name}/b.bin") == 3000  # holds the first snapshot, nothing read yet
    (origin / "b.bin").write_bytes(b"B" * 3000)
    st = os.stat(origin / "b.bin")
    os.utime(origin / "b.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    refresh(cachefs_cluster, name)
    disk_blocks = cachefs_cluster.totals("disk_blocks")
    new_reader = cachefs_cluster.fs()
    assert new_reader.cat_file(f"{name}/a.bin") == files["a.bin"]  # the pack, read with b.bin's range dead
    assert cachefs_cluster.totals("disk_blocks") == disk_blocks + 1  # kept on disk too
    assert new_reader.cat_file(f"{name}/c.bin") == files["c.bin"]
    assert new_reader.cat_file(f"{name}/b.bin") == b"B" * 3000
    with pytest.raises(OriginChanged):  # the old snapshot's b.bin: gone at the origin, never zeros
        old_reader.cat_file(f"{name}/b.bin")
    assert old_reader.cat_file(f"{name}/a.bin") == files["a.bin"]
