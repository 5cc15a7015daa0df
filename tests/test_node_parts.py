"""server/ parts on their own: policies, stores (budgets, re-index), single-flight."""

from __future__ import annotations

import asyncio
import os

import pyarrow as pa
import pytest

from conftest import until
from server.policy import LRU, Sticky, make_policy
from server.singleflight import Group
from server import stores
from server.stores import DiskStore, MemoryStore, StoredBlock, digest_of


def block(key: str, data: bytes, dataset: str = "d", snapshot: str = "s") -> StoredBlock:
    return StoredBlock(key, dataset, snapshot, len(data), digest_of(data), buffer=pa.py_buffer(data))


def test_lru_evicts_the_least_recently_used_and_never_exceeds_its_budget() -> None:
    lru = LRU(30)
    for k in "abc":
        assert lru.admit(k, 10) == (True, [])
    lru.touch("a")
    assert lru.admit("d", 10) == (True, ["b"])
    assert lru.used == 30
    assert lru.admit("huge", 31) == (False, [])


def test_sticky_keeps_its_resident_set_once_full() -> None:
    sticky = Sticky(20)
    assert sticky.admit("a", 10)[0] and sticky.admit("b", 10)[0]
    assert sticky.admit("c", 10) == (False, [])
    assert "a" in sticky and "b" in sticky and sticky.used == 20


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="lru"):
        make_policy("fifo", 10)


def test_memory_store_stays_within_budget_and_purges_by_snapshot() -> None:
    store = MemoryStore(25)
    for i in range(5):
        store.put(block(f"k{i}", bytes(10), snapshot="old" if i < 4 else "new"))
    assert store.used <= 25 and store.evictions == 3
    assert store.purge("d", keep_snapshot="new") == 1
    assert [b.key for b in store.blocks()] == ["k4"]


async def filled_store(root, n: int = 3, size: int = 20) -> DiskStore:
    store = DiskStore(root, 100 * size)
    await store.open()
    for i in range(n):
        data = bytes([i]) * size
        await store.put(block(f"key{i}", data), pa.py_buffer(data))
    return store


def corrupt(path: str) -> None:
    with open(path, "r+b") as f:
        f.write(b"X")  # same size: only the bytes tell


async def test_disk_store_reopens_from_names_alone_and_drops_a_corrupt_block_on_first_read(tmp_path) -> None:
    corrupt((await filled_store(tmp_path)).get("key1").path)
    again = DiskStore(tmp_path, 2000)
    await again.open()
    assert sorted(b.key for b in again.blocks()) == ["key0", "key1", "key2"]  # the corrupt one too: not read
    assert again.used == 60 and not any(b.verified for b in again.blocks())
    bad = again.get("key1").path
    assert await again.get_verified("key1") is None
    assert again.get("key1") is None and again.used == 40 and again.dropped_on_verify == 1
    assert not os.path.exists(bad)
    good = await again.get_verified("key2")
    assert good.verified and open(good.path, "rb").read() == bytes([2]) * 20


async def test_a_checked_block_is_never_read_again_and_concurrent_readers_share_one_check(tmp_path,
                                                                                           monkeypatch) -> None:
    await filled_store(tmp_path)
    reads: list[str] = []
    real = stores._file_digest
    monkeypatch.setattr(stores, "_file_digest", lambda path: reads.append(path) or real(path))
    again = DiskStore(tmp_path, 2000)
    await again.open()
    assert reads == []
    first = await asyncio.gather(*(again.get_verified("key0") for _ in range(8)))
    assert len(reads) == 1 and all(b is not None and b.verified for b in first)
    assert (await again.get_verified("key0")).verified and len(reads) == 1
    data = b"fresh" * 4
    await again.put(block("key9", data), pa.py_buffer(data))
    assert (await again.get_verified("key9")).verified and len(reads) == 1  # written here: trusted


async def test_reopen_drops_stray_files_and_leaves_the_rest_of_the_disk_dir_alone(tmp_path) -> None:
    store = await filled_store(tmp_path, n=1)
    snapshot_dir = os.path.dirname(store.get("key0").path)
    for stray in ("notes.txt", "key5.not-a-digest", ".hidden"):
        (tmp_path / "d" / "s" / stray).write_bytes(b"x")
    (tmp_path / ".port").write_text("8700")
    again = DiskStore(tmp_path, 2000)
    await again.open()
    assert [b.key for b in again.blocks()] == ["key0"] and again.dropped_on_reindex == 3
    assert sorted(os.listdir(snapshot_dir)) == [os.path.basename(store.get("key0").path)]
    assert (tmp_path / ".port").read_text() == "8700"


async def test_a_node_restarted_on_a_corrupted_disk_tier_refetches_that_block_and_never_serves_it(tmp_path) -> None:
    from server.config import NodeConfig
    from server.node import CacheNode, OriginSpec
    from server.registry import DatasetSpec, take_snapshot

    origin = tmp_path / "origin"
    origin.mkdir()
    data = bytes(range(256)) * 64  # 16 KiB: four blocks of 4 KiB
    (origin / "f.bin").write_bytes(data)
    record = take_snapshot(DatasetSpec("ds", f"file://{origin}", block_size=4096))

    class Directory:
        async def dataset(self, name: str):
            return record.info, record.manifest_ipc, OriginSpec(record.info.origin, {})

    config = NodeConfig(memory_bytes=1 << 20, disk_bytes=1 << 20, disk_dir=str(tmp_path / "disk"), block_size=4096)

    async def read_all(node: CacheNode) -> list[tuple[str, bytes]]:
        out = []
        for i in range(4):
            got = await node.read_block("ds", record.info.snapshot, "f.bin", i)
            body = got.data.to_pybytes() if got.data is not None else open(got.block.path, "rb").read()
            out.append((got.source, body))
        return out

    first = CacheNode("n1", config, Directory())
    await first.open()
    assert [src for src, _ in await read_all(first)] == ["origin"] * 4
    await first.close()
    victim = first.disk.blocks()[2]
    corrupt(victim.path)

    restarted = CacheNode("n1", config, Directory())
    await restarted.open()
    assert len(restarted.disk) == 4  # the corrupt block was indexed: its bytes were not read
    served = await read_all(restarted)
    assert b"".join(got for _, got in served) == data
    assert sorted(src for src, _ in served) == ["disk", "disk", "disk", "origin"]
    assert restarted.disk.dropped_on_verify == 1 and victim.key in {b.key for b in restarted.disk.blocks()}
    await restarted.close()


async def test_disk_store_evicts_files_to_stay_within_budget(tmp_path) -> None:
    store = DiskStore(tmp_path, 50)
    await store.open()
    for i in range(4):
        await store.put(block(f"key{i}", bytes(20)), pa.py_buffer(bytes(20)))
    files = [f for f in tmp_path.rglob("*.*") if ".tmp" not in f.parts]
    assert store.used == 40 and len(files) == 2


async def test_single_flight_runs_one_load_for_concurrent_callers() -> None:
    group: Group[int] = Group()
    calls, release = 0, asyncio.Event()

    async def load() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    callers = [asyncio.ensure_future(group.do("k", load)) for _ in range(32)]
    await until(lambda: calls, "the load to start")  # every caller has asked by then (they ran first)
    release.set()
    assert await asyncio.gather(*callers) == [42] * 32
    assert calls == 1 and len(group) == 0


async def test_single_flight_survives_a_caller_giving_up() -> None:
    group: Group[int] = Group()

    started, release = asyncio.Event(), asyncio.Event()

    async def load() -> int:
        started.set()
        await release.wait()
        return 7

    first = asyncio.ensure_future(group.do("k", load))
    second = asyncio.ensure_future(group.do("k", load))
    await asyncio.wait_for(started.wait(), 10)
    first.cancel()
    release.set()
    assert await second == 7 and first.cancelled()


async def test_single_flight_shares_a_failure() -> None:
    group: Group[int] = Group()

    calls, release = 0, asyncio.Event()

    async def load() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        raise OSError("origin down")

    callers = [asyncio.ensure_future(group.do("k", load)) for _ in range(3)]
    await until(lambda: calls, "the load to start")
    release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert calls == 1 and all(isinstance(r, OSError) for r in results)


def test_buffer_pool_reuses_block_buffers_and_sizes_views_exactly() -> None:
    from cachefs.buffers import BufferPool

    pool = BufferPool(1024, keep=2)
    a = pool.take(1000)
    assert len(a) == 1000
    base = a.obj
    pool.give(a)
    b = pool.take(10)
    assert b.obj is base and len(b) == 10  # the same buffer, a view of the asked length
    big = pool.take(4096)  # larger than a block: its own buffer, never pooled
    pool.give(big)
    assert pool.take(1024).obj is not big.obj


def test_the_coordinators_ring_weighs_nodes_by_capacity_over_a_fixed_unit() -> None:
    from server.placement import build_ring

    ring = build_ring([("small", "http://a", 100), ("big", "http://b", 300), ("empty", "http://c", 0)], 7, 64)
    assert ring.epoch == 7 and ring.vnodes == 64
    assert {m.id: m.weight for m in ring.members} == {"small": 1.0, "big": 3.0, "empty": 0.01}
    kept = build_ring([("small", "http://a", 100), ("huge", "http://d", 1000)], 8, 64, unit=100)
    assert kept.member("small").weight == 1.0  # a bigger node joining changes nobody else's weight
    assert ring.member("big").url == "http://b"
