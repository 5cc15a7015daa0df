"""server/ parts on their own: policies, stores (budgets, re-index), single-flight."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest

from server.policy import LRU, Sticky, make_policy
from server.singleflight import Group
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


async def test_disk_store_reindexes_on_restart_and_drops_corrupt_blocks(tmp_path) -> None:
    store = DiskStore(tmp_path, 100)
    await store.open()
    for i in range(3):
        await store.put(block(f"key{i}", bytes([i]) * 20), pa.py_buffer(bytes([i]) * 20))
    corrupt = store.get("key1")
    assert corrupt is not None
    with open(corrupt.path, "r+b") as f:
        f.write(b"X")
    again = DiskStore(tmp_path, 100)
    await again.open()
    assert sorted(b.key for b in again.blocks()) == ["key0", "key2"]
    assert again.dropped_on_reindex == 1 and again.used == 40
    assert open(again.get("key2").path, "rb").read() == bytes([2]) * 20


async def test_disk_store_evicts_files_to_stay_within_budget(tmp_path) -> None:
    store = DiskStore(tmp_path, 50)
    await store.open()
    for i in range(4):
        await store.put(block(f"key{i}", bytes(20)), pa.py_buffer(bytes(20)))
    files = [f for f in tmp_path.rglob("*.*") if ".tmp" not in f.parts]
    assert store.used == 40 and len(files) == 2


async def test_single_flight_runs_one_load_for_concurrent_callers() -> None:
    group: Group[int] = Group()
    calls = 0

    async def load() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return 42

    assert await asyncio.gather(*(group.do("k", load) for _ in range(32))) == [42] * 32
    assert calls == 1 and len(group) == 0


async def test_single_flight_survives_a_caller_giving_up() -> None:
    group: Group[int] = Group()

    async def load() -> int:
        await asyncio.sleep(0.05)
        return 7

    first = asyncio.ensure_future(group.do("k", load))
    second = asyncio.ensure_future(group.do("k", load))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second == 7


async def test_single_flight_shares_a_failure() -> None:
    group: Group[int] = Group()

    async def load() -> int:
        await asyncio.sleep(0.01)
        raise OSError("origin down")

    results = await asyncio.gather(*(group.do("k", load) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)


def test_buffer_pool_reuses_block_buffers_and_sizes_views_exactly() -> None:
    from cachefs.blockproto import BufferPool

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


def test_the_coordinators_ring_weighs_nodes_by_capacity_relative_to_the_biggest() -> None:
    from server.placement import build_ring

    ring = build_ring([("small", "http://a", 100), ("big", "http://b", 300), ("empty", "http://c", 0)], 7, 64)
    assert ring.epoch == 7 and ring.vnodes == 64
    assert {m.id: m.weight for m in ring.members} == {"small": 0.3333, "big": 1.0, "empty": 0.0033}
    assert ring.member("big").url == "http://b"
