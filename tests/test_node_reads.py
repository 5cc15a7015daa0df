"""A cache node's read path on its own (no cluster, no HTTP): the origin is read once per
unit however readers race, and every item of a batch gets its own outcome."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cachefs.common import wire
from conftest import write_tree
from server.config import NodeConfig
from server.node import CacheNode, OriginSpec
from cachefs.common.errors import SnapshotGone
from server.registry import DatasetSpec, take_snapshot
from server.units import block_unit

KiB = 1024
BLOCK = 16 * KiB
FILES = {"big.bin": bytes(range(256)) * 300, "small.txt": b"tiny file", "other.bin": b"\x07" * 40_000}


class SnapshotDirectory:
    """The `Directory` a node learns datasets from, answering one snapshot of a folder."""

    def __init__(self, origin: Path) -> None:
        self.record = take_snapshot(DatasetSpec("d", f"file://{origin}", block_size=BLOCK, pack_threshold=0))

    async def dataset(self, name: str):
        r = self.record
        return r.info, r.manifest_ipc, OriginSpec(r.info.origin, {})

    async def snapshot(self, name: str, snapshot: str):
        """Only the one snapshot is served: any other was replaced, and no lease keeps it."""
        if snapshot != self.record.info.snapshot:
            raise SnapshotGone(f"snapshot {snapshot} of dataset {name!r} is no longer served")
        return await self.dataset(name)

    async def lease(self, name: str, snapshot: str) -> float:
        return 0.0


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "origin", FILES)


async def started(node: CacheNode) -> CacheNode:
    await node.open()
    return node


def block_wants(state, path: str) -> list[tuple]:
    entry = state.manifest.file(path)
    count = -(-entry.size // BLOCK)
    return [(wire.ITEM_BLOCK, path, i, 0, min(BLOCK, entry.size - i * BLOCK)) for i in range(count)]


async def test_a_reader_that_missed_before_a_fetch_landed_costs_no_second_origin_read(origin) -> None:
    node = await started(CacheNode("n", NodeConfig(memory_bytes=1 << 20), SnapshotDirectory(origin)))
    state = await node.dataset("d")
    unit = block_unit(state.info, state.manifest.file("big.bin"), 1)
    assert (await node.unit(state, unit)).source == "origin"
    assert node.metrics.totals["misses"] == 1
    # A second reader looked the unit up before that fetch landed, awaited something, and
    # only now enters the flight (which has ended): it must find the unit, not read it again.
    again = await node.fetch(state, unit)
    assert again.source == "memory" and again.block.key == unit.key
    assert node.metrics.totals["misses"] == 1
    await node.close()


async def test_racing_readers_of_cold_units_read_each_unit_from_the_origin_once(origin) -> None:
    node = await started(CacheNode("n", NodeConfig(memory_bytes=1 << 20), SnapshotDirectory(origin)))
    state = await node.dataset("d")
    wants = block_wants(state, "big.bin") + block_wants(state, "other.bin")
    batches = await asyncio.gather(*(node.read_ranges("d", state.info.snapshot, wants[i % 3:] + wants[:i % 3])
                                     for i in range(24)))
    for pieces in batches:
        assert all(p.status == 200 for p in pieces)
    assert node.metrics.totals["misses"] == len(wants)  # one origin read per unit, 24 readers
    await node.close()


async def test_restarted_disk_blocks_are_verified_once_and_never_refetched(origin, tmp_path) -> None:
    config = NodeConfig(memory_bytes=0, disk_bytes=1 << 20, disk_dir=str(tmp_path / "disk"))
    first = await started(CacheNode("n", config, SnapshotDirectory(origin)))
    state = await first.dataset("d")
    wants = block_wants(state, "big.bin")
    assert all(p.status == 200 for p in await first.read_ranges("d", state.info.snapshot, wants))
    await first.close()

    restarted = await started(CacheNode("n", config, SnapshotDirectory(origin)))
    batches = await asyncio.gather(*(restarted.read_ranges("d", state.info.snapshot, wants) for _ in range(8)))
    data = FILES["big.bin"]
    for pieces in batches:
        assert b"".join(bytes(p.payload) for p in pieces) == data
    assert restarted.metrics.totals["misses"] == 0  # every reader was served from disk
    await restarted.close()


async def test_every_item_of_a_batch_gets_its_own_outcome(origin) -> None:
    node = await started(CacheNode("n", NodeConfig(memory_bytes=1 << 20), SnapshotDirectory(origin)))
    state = await node.dataset("d")
    (origin / "other.bin").write_bytes(b"changed")  # the origin moved on since the snapshot
    wants = [
        (wire.ITEM_BLOCK, "small.txt", 0, 0, 4),  # served
        (wire.ITEM_BLOCK, "nope.txt", 0, 0, 4),  # no such file
        (wire.ITEM_BLOCK, "small.txt", 3, 0, 1),  # no such block
        (wire.ITEM_BLOCK, "small.txt", 0, 5, 99),  # range outside the block
        (wire.ITEM_BLOCK, "../etc/passwd", 0, 0, 1),  # a path escaping the dataset
        (wire.ITEM_BLOCK, "other.bin", 0, 0, 10),  # changed in the origin
        (wire.ITEM_PACK, 0, 0, 1),  # this snapshot has no packs
        (wire.ITEM_BLOCK, "small.txt", 0, 5, 9),  # served, from the unit read once above
    ]
    pieces = await node.read_ranges("d", state.info.snapshot, wants)
    assert [p.status for p in pieces] == [200, 404, 416, 416, 400, 412, 416, 200]
    assert bytes(pieces[0].payload) == b"tiny" and bytes(pieces[7].payload) == b"file"
    assert b"refresh" in bytes(pieces[5].payload)
    assert node.metrics.totals["misses"] == 1  # small.txt; other.bin's failed read kept nothing
    await node.close()
