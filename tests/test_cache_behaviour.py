"""The promises of the cache, on the real 3-node cluster: single-flight origin reads,
budgets, a dead node, a changed origin, refresh, and a restarted coordinator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import ray

from cachefs.common.errors import OriginChanged
from conftest import BLOCK, MiB, NAMESPACE, wait_until, write_tree


def test_32_concurrent_readers_of_one_cold_block_read_the_origin_once(cachefs_cluster, tmp_path) -> None:
    data = b"cold" * 100_000
    origin = write_tree(tmp_path / "o", {"one.bin": data})
    name = cachefs_cluster.unique("flight")
    cachefs_cluster.add_dataset(name, f"file://{origin}")
    before = cachefs_cluster.totals("misses")

    async def readers() -> list[bytes]:
        fss = [cachefs_cluster.fs(asynchronous=True) for _ in range(32)]
        try:
            return await asyncio.gather(*(fs._cat_file(f"{name}/one.bin") for fs in fss))
        finally:
            for fs in fss:
                await fs._close()

    results = asyncio.run(readers())
    assert all(r == data for r in results)
    assert cachefs_cluster.totals("misses") - before == 1


def test_dataset_larger_than_a_node_is_fully_cached_within_budgets(cachefs_cluster, tmp_path) -> None:
    # 60 MiB in 1 MiB blocks: more than any node holds (48 MiB), less than the cluster (144 MiB)
    files = {f"part-{i:02d}.bin": bytes([i]) * (4 * MiB) for i in range(15)}
    origin = write_tree(tmp_path / "o", files)
    name = cachefs_cluster.unique("big")
    info = cachefs_cluster.add_dataset(name, f"file://{origin}")
    blocks = sum(-(-len(d) // BLOCK) for d in files.values())
    before = cachefs_cluster.totals("misses")

    op = cachefs_cluster.warm(name)
    assert op.state == "succeeded", op
    assert op.done_bytes == info.bytes
    status = cachefs_cluster.status()
    assert cachefs_cluster.totals("misses") - before == blocks  # each block read from the origin once
    cached = next(d for d in status["datasets"] if d["name"] == name)["cached_bytes"]
    assert cached == info.bytes  # fully cached
    for n in status["nodes"]:
        assert n["memory_used"] <= n["memory_budget"] and n["disk_used"] <= n["disk_budget"], n
        assert n["datasets"].get(name, 0) < info.bytes  # nobody holds it all: it is sharded

    fs = cachefs_cluster.fs()
    got = fs.cat([f"{name}/{p}" for p in files])
    assert {k.split("/", 1)[1]: v for k, v in got.items()} == files
    assert cachefs_cluster.totals("misses") - before == blocks  # reading it back costs no origin read
    cachefs_cluster.remove_dataset(name)


def test_refused_dataset_warm_reports_failures_by_file(cachefs_cluster, tmp_path) -> None:
    origin = write_tree(tmp_path / "o", {"a.bin": b"a" * 1000, "b.bin": b"b" * 1000})
    name = cachefs_cluster.unique("warmfail")
    cachefs_cluster.add_dataset(name, f"file://{origin}")
    (origin / "b.bin").write_bytes(b"changed")
    op = cachefs_cluster.warm(name)
    assert op.state == "failed"
    assert list(op.failures) == ["b.bin"] and "refresh" in op.failures["b.bin"]


def test_a_changed_origin_file_fails_loudly_until_refresh(cachefs_cluster, fresh_origin: Path) -> None:
    name = cachefs_cluster.unique("changed")
    old_info = cachefs_cluster.add_dataset(name, f"file://{fresh_origin}")
    fs = cachefs_cluster.fs()
    cached_before = fs.cat_file(f"{name}/train/cats/001.jpg")
    (fresh_origin / "train/cats/001.jpg").write_bytes(b"new cat")
    (fresh_origin / "val/big.bin").write_bytes(b"new big")

    with pytest.raises(OriginChanged, match="refresh"):
        fs.cat_file(f"{name}/val/big.bin")
    # what was cached is the snapshot's bytes: still served, never the new or a mix
    assert fs.cat_file(f"{name}/train/cats/001.jpg") == cached_before

    async def refresh():
        async with cachefs_cluster.admin() as a:
            return await a.wait(await a.refresh_dataset(name), timeout=60)

    op = asyncio.run(refresh())
    assert op.state == "succeeded" and op.result["changed"] is True
    assert op.result["snapshot"] != old_info.snapshot
    fresh = cachefs_cluster.fs()
    assert fresh.cat_file(f"{name}/train/cats/001.jpg") == b"new cat"
    assert fresh.cat_file(f"{name}/val/big.bin") == b"new big"
    # a reader holding the old snapshot never gets the new one's bytes: it fails loudly, until it moves on
    with pytest.raises(OSError, match="refresh"):
        fs.cat_file(f"{name}/val/big.bin")
    fs.invalidate_cache()
    assert fs.cat_file(f"{name}/val/big.bin") == b"new big"


def test_a_dead_cache_node_costs_a_refetch_never_a_failed_read(cachefs_cluster, tmp_path) -> None:
    files = {f"f{i:02d}.bin": bytes([i]) * (200_000 + i) for i in range(40)}
    origin = write_tree(tmp_path / "o", files)
    name = cachefs_cluster.unique("death")
    cachefs_cluster.add_dataset(name, f"file://{origin}")
    assert cachefs_cluster.warm(name).state == "succeeded"
    status = cachefs_cluster.status()
    epoch = status["epoch"]
    victim = max(status["nodes"], key=lambda n: n["datasets"].get(name, 0))
    misses = cachefs_cluster.totals("misses")

    fs = cachefs_cluster.fs(connect_timeout=2.0)

    def every_file() -> None:
        for rel, data in files.items():
            assert fs.cat_file(f"{name}/{rel}") == data, rel

    errors = cachefs_cluster.kill_a_node_while(every_file, victim["id"])
    assert not errors, errors
    after = wait_until(lambda: (s := cachefs_cluster.status())["epoch"] > epoch and len(s["nodes"]) == 2 and s,
                       what="the ring to drop the dead node")
    assert fs.blocks.origin_reads == 0  # the surviving nodes served everything
    refetched = sum(n["misses"] for n in after["nodes"]) - (misses - victim["misses"])
    assert 0 < refetched <= sum(1 for _ in files)  # its share, once
    assert fs.cat([f"{name}/{p}" for p in files]) and fs.blocks.ring.epoch >= after["epoch"]
    cachefs_cluster.ensure_nodes()
    wait_until(lambda: len(cachefs_cluster.status()["nodes"]) == 3, what="the node to come back")
    cachefs_cluster.remove_dataset(name)


def _write_legacy_record(state_dir: Path, name: str, origin: Path) -> None:
    """A dataset as cachefs 0.1 left it on disk: no packs, a manifest of three columns."""
    import json

    from cachefs.common.manifest import build_table, snapshot_id, to_ipc
    from cachefs.common.origin import Origin
    from server.listing import list_origin

    table = build_table(list_origin(Origin(f"file://{origin}")).files).select(["path", "size", "version"])
    snap = snapshot_id(table)
    info = {"name": name, "origin": f"file://{origin}", "snapshot": snap, "files": table.num_rows,
            "bytes": sum(table.column("size").to_pylist()), "replicas": 1, "block_size": 1024 * 1024,
            "allowed_namespaces": [], "created": 1.0}
    (state_dir / "datasets" / f"{name}.{snap}.arrow").write_bytes(to_ipc(table))
    (state_dir / "datasets" / f"{name}.json").write_text(json.dumps({"info": info, "storage_options": {}}))


def test_a_restarted_coordinator_keeps_every_dataset(cachefs_cluster, sample_origin) -> None:
    from server import hosting

    name = cachefs_cluster.unique("persist")
    info = cachefs_cluster.add_dataset(name, f"file://{sample_origin}")
    legacy = cachefs_cluster.unique("legacy")
    _write_legacy_record(Path(cachefs_cluster.config.state_dir), legacy, sample_origin)
    epoch = cachefs_cluster.status()["epoch"]
    ray.kill(ray.get_actor(hosting.COORDINATOR, namespace=NAMESPACE), no_restart=True)
    hosting.up(cachefs_cluster.config, cachefs_cluster.env)
    status = wait_until(lambda: (s := cachefs_cluster.status()) and len(s["nodes"]) == 3 and s,
                        what="nodes to rejoin the new coordinator")
    assert status["epoch"] > epoch
    d = next(d for d in status["datasets"] if d["name"] == name)
    assert d["snapshot"] == info.snapshot
    assert cachefs_cluster.fs().cat_file(f"{name}/README.txt") == b"a small dataset for tests\n"
    old = cachefs_cluster.fs()  # a snapshot taken before packing existed is served as it was
    assert old.dataset_info(legacy).packs == 0
    assert old.cat_file(f"{legacy}/train/cats/001.jpg") == (sample_origin / "train/cats/001.jpg").read_bytes()
    assert old.cat_file(f"{legacy}/val/big.bin") == (sample_origin / "val/big.bin").read_bytes()


def test_a_changed_s3_object_is_refused_by_the_conditional_read(cachefs_cluster, s3_server) -> None:
    import boto3

    s3 = boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing", **s3_server["client_kwargs"])
    s3.create_bucket(Bucket="changing")
    s3.put_object(Bucket="changing", Key="d/a.bin", Body=b"a" * 5000)
    s3.put_object(Bucket="changing", Key="d/b.bin", Body=b"b" * 5000)
    name = cachefs_cluster.unique("s3changed")
    cachefs_cluster.add_dataset(name, "s3://changing/d", storage_options=s3_server)
    fs = cachefs_cluster.fs()
    s3.put_object(Bucket="changing", Key="d/b.bin", Body=b"B" * 5000)  # same size, new ETag
    # a.bin and b.bin share a pack: the read of a.bin fetches both, and b.bin is refused
    assert fs.cat_file(f"{name}/a.bin") == b"a" * 5000
    with pytest.raises(OriginChanged, match="refresh"):
        fs.cat_file(f"{name}/b.bin")

    async def refresh():
        async with cachefs_cluster.admin() as a:
            return await a.wait(await a.refresh_dataset(name), timeout=60)

    assert asyncio.run(refresh()).result["changed"] is True
    assert cachefs_cluster.fs().cat_file(f"{name}/b.bin") == b"B" * 5000


def test_a_long_listing_can_be_cancelled_and_registers_nothing(cachefs_cluster, tmp_path) -> None:
    origin = tmp_path / "wide"
    for d in range(200):
        (origin / f"d{d:03d}").mkdir(parents=True)
        for f in range(100):
            (origin / f"d{d:03d}" / f"{f}.bin").touch()
    name = cachefs_cluster.unique("cancel")

    async def add_then_cancel():
        async with cachefs_cluster.admin() as a:
            op = await a.add_dataset(name, f"file://{origin}")
            await a.cancel(op.id)
            return await a.wait(op, timeout=60), await a.list_datasets()

    op, datasets = asyncio.run(add_then_cancel())
    assert op.state == "cancelled", op
    assert name not in [d.name for d in datasets]


def test_metrics_count_hits_misses_and_bytes_per_dataset_and_node(cachefs_cluster, tmp_path) -> None:
    from cachefs.admin import AdminClient

    origin = write_tree(tmp_path / "o", {"m.bin": b"m" * 3000})
    name = cachefs_cluster.unique("metrics")
    cachefs_cluster.add_dataset(name, f"file://{origin}")
    fs = cachefs_cluster.fs()
    fs.cat_file(f"{name}/m.bin")
    fs.cat_file(f"{name}/m.bin")

    async def scrape() -> str:
        texts = []
        for url in cachefs_cluster.endpoints:  # one registry per node
            async with AdminClient(cachefs_cluster.client_config.__class__(endpoint=url, token=cachefs_cluster.token)) as a:
                texts.append(await a.metrics())
        return "\n".join(texts)

    text = asyncio.run(scrape())
    lines = [line for line in text.splitlines() if f'dataset="{name}"' in line]
    assert any(line.startswith("cachefs_misses_total") and line.endswith(" 1.0") for line in lines), lines
    assert any(line.startswith("cachefs_hits_total") and 'tier="memory"' in line for line in lines), lines
    assert any(line.startswith("cachefs_origin_bytes_total") and line.endswith(" 3000.0") for line in lines)
    assert any(line.startswith("cachefs_served_bytes_total") and line.endswith(" 6000.0") for line in lines)
