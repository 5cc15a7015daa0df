"""Packing small files, on its own and in one cache node: the layout, the manifest that
records it (and the older one without it), and a node reading packs from a real local
origin — whole, with holes where files changed, or file by file when it cannot keep them.
The node learns its dataset through its `Directory` seam, here a snapshot taken by the
real registry code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachefs.common import wire
from server.config import NodeConfig
from cachefs.common.errors import NotFound, OriginChanged
from cachefs.common.manifest import LEGACY_SCHEMA, FileEntry, Manifest, build_table, from_ipc, to_ipc
from conftest import write_tree
from server.node import CacheNode, OriginSpec
from server.registry import DatasetSpec, take_snapshot
from shard import NOT_PACKED, default_threshold, pack_layout

KiB = 1024


def test_small_files_are_laid_end_to_end_in_block_sized_packs() -> None:
    packs, offsets, count = pack_layout([10, 0, 50, 5, 100, 30, 40], block_size=100, threshold=60)
    assert packs == [0, NOT_PACKED, 0, 0, NOT_PACKED, 0, 1]  # empty and large files keep blocks of their own
    assert offsets == [0, 0, 10, 60, 0, 65, 0]  # pack 0 holds 95 bytes; 40 more would not fit
    assert count == 2
    assert pack_layout([5, 5], 100, 0) == ([NOT_PACKED] * 2, [0, 0], 0)  # threshold 0: packing off


def test_the_default_threshold_packs_files_below_a_mebibyte_or_a_quarter_block() -> None:
    assert default_threshold(8 * 1024 * KiB) == 1024 * KiB
    assert default_threshold(1024 * KiB) == 256 * KiB


def test_the_manifest_finds_files_and_directories_by_binary_search() -> None:
    names = ["a/b/c", "a/x", "ü/y", "z", "a/b/d", "a/bb", "a-b"]
    table = build_table([FileEntry(p, 10 + i, f"v{i}") for i, p in enumerate(names)], 64, 20)
    m = Manifest(from_ipc(to_ipc(table)))
    assert m.list_dir("") == [("a", "directory", 0), ("a-b", "file", 16), ("z", "file", 13), ("ü", "directory", 0)]
    assert m.list_dir("a") == [("a/b", "directory", 0), ("a/bb", "file", 15), ("a/x", "file", 11)]
    assert m.list_dir("ü") == [("ü/y", "file", 12)]
    assert m.file("a/x").version == "v1" and m.get("a") is None and m.is_dir("a/b") and not m.is_dir("a/x")
    assert [e.path for e in m.walk_files("a")] == ["a/b/c", "a/b/d", "a/bb", "a/x"]
    with pytest.raises(NotFound):
        m.list_dir("nope")
    members = [m.pack_members(p) for p in range(m.packs)]
    assert sorted(e.path for ms in members for e in ms) == sorted(names)
    for ms in members:  # end to end, in offset order, within a block
        assert [e.offset for e in ms] == [sum(x.size for x in ms[:i]) for i in range(len(ms))]
        assert m.pack_size(ms[0].pack) == sum(e.size for e in ms) <= 64


def test_a_manifest_written_before_packing_still_loads_with_no_file_packed() -> None:
    old = build_table([FileEntry("a", 3, "v"), FileEntry("b/c", 4, "w")]).select(["path", "size", "version"])
    assert old.schema.equals(LEGACY_SCHEMA)
    m = Manifest(from_ipc(to_ipc(old)))
    assert [(e.path, e.pack, e.offset) for e in m.walk_files()] == [("a", NOT_PACKED, 0), ("b/c", NOT_PACKED, 0)]
    assert m.packs == 0


def test_a_million_entries_cost_no_python_object_per_file() -> None:
    table = build_table([FileEntry(f"d{i % 1000:03d}/f{i:07d}", 100, "v") for i in range(200_000)], 8 << 20, 1 << 20)
    m = Manifest(table)
    assert m.file("d123/f0001123").size == 100
    assert len(m.list_dir("d999")) == 200
    root = m.list_dir("")  # 200,000 paths below it: skimmed, one bisection per folder
    assert [n for n, _, _ in root] == [f"d{i:03d}" for i in range(1000)] and {k for _, k, _ in root} == {"directory"}
    assert m.nbytes < 60 * len(m)  # the table's own buffers: paths, sizes, versions, packs, offsets


# -- one node over a real local origin ------------------------------------------------------
class SnapshotDirectory:
    """The node's Directory seam, answered from a snapshot taken by the registry code."""

    def __init__(self, origin: Path, name: str = "d", block_size: int = 16 * KiB, threshold: int = 8 * KiB):
        self.spec = DatasetSpec(name, f"file://{origin}", block_size=block_size, pack_threshold=threshold)
        self.record = take_snapshot(self.spec)

    async def dataset(self, name: str):
        r = self.record
        return r.info, r.manifest_ipc, OriginSpec(r.info.origin, {})


FILES = {f"img/{i:02d}.jpg": bytes([i]) * (3000 + 97 * i) for i in range(12)}


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "origin", FILES)


async def node_for(origin: Path, tmp_path: Path, **config) -> tuple[CacheNode, SnapshotDirectory]:
    directory = SnapshotDirectory(origin)
    node = CacheNode("n", NodeConfig(**config), directory)
    await node.open()
    return node, directory


def wants_for(manifest: Manifest, paths: list[str]) -> list[tuple]:
    return [(wire.ITEM_PACK, e.pack, e.offset, e.offset + e.size) for e in map(manifest.file, paths)]


async def test_a_node_reads_a_pack_once_and_serves_every_member(origin, tmp_path) -> None:
    node, d = await node_for(origin, tmp_path, memory_bytes=1 << 20)
    info = d.record.info
    state = await node.dataset("d")
    assert info.packs == state.manifest.packs >= 2
    pieces = await node.read_ranges("d", info.snapshot, wants_for(state.manifest, list(FILES)))
    assert [bytes(p.payload) for p in pieces] == list(FILES.values())
    assert node.metrics.totals["misses"] == info.packs  # one origin read per pack, not per file
    again = await node.read_ranges("d", info.snapshot, wants_for(state.manifest, list(FILES)))
    assert [p.status for p in again] == [200] * len(FILES) and node.metrics.totals["misses"] == info.packs
    await node.close()


async def test_a_changed_member_leaves_a_hole_and_the_others_are_served(origin, tmp_path) -> None:
    node, d = await node_for(origin, tmp_path, memory_bytes=1 << 20)
    state = await node.dataset("d")
    (origin / "img/03.jpg").write_bytes(b"new bytes")
    (origin / "img/04.jpg").unlink()
    pieces = await node.read_ranges("d", d.record.info.snapshot, wants_for(state.manifest, list(FILES)))
    for (rel, data), piece in zip(FILES.items(), pieces):
        if rel in ("img/03.jpg", "img/04.jpg"):
            assert piece.status == 412 and b"refresh" in bytes(piece.payload), rel
        else:
            assert piece.status == 200 and bytes(piece.payload) == data, rel
    with pytest.raises(OriginChanged):  # the hole is kept: the file stays refused until a refresh
        entry = state.manifest.file("img/03.jpg")
        await node.read_pack("d", d.record.info.snapshot, entry.pack)
    await node.close()


async def test_a_full_sticky_node_reads_only_the_files_asked_for(origin, tmp_path) -> None:
    node, d = await node_for(origin, tmp_path, memory_bytes=8 * KiB, disk_bytes=0, eviction="sticky")
    state = await node.dataset("d")
    wanted = ["img/00.jpg", "img/07.jpg"]
    pieces = await node.read_ranges("d", d.record.info.snapshot, wants_for(state.manifest, wanted))
    assert [bytes(p.payload) for p in pieces] == [FILES[w] for w in wanted]
    assert node.metrics.totals["origin_bytes"] == sum(len(FILES[w]) for w in wanted)  # not whole packs
    assert len(node.memory) == 0
    await node.close()


async def test_bad_items_get_their_own_errors(origin, tmp_path) -> None:
    node, d = await node_for(origin, tmp_path, memory_bytes=1 << 20)
    snap = d.record.info.snapshot
    pieces = await node.read_ranges("d", snap, [
        (wire.ITEM_PACK, 999, 0, 1),
        (wire.ITEM_BLOCK, "img/01.jpg", 0, 0, 10),
        (wire.ITEM_BLOCK, "no/such.jpg", 0, 0, 1),
        (wire.ITEM_BLOCK, "../etc/passwd", 0, 0, 1),
        (wire.ITEM_PACK, 0, 5, 4),
    ])
    assert [p.status for p in pieces] == [416, 200, 404, 400, 416]
    assert bytes(pieces[1].payload) == FILES["img/01.jpg"][:10]  # a packed file's block 0 is its range of its pack
    await node.close()


def test_a_snapshot_records_its_packs(origin) -> None:
    d = SnapshotDirectory(origin)
    info, manifest = d.record.info, Manifest(from_ipc(d.record.manifest_ipc))
    assert info.pack_threshold == 8 * KiB and info.packs == manifest.packs
    assert all(e.packed for e in manifest.walk_files())
    unpacked = SnapshotDirectory(origin, threshold=0).record
    assert unpacked.info.packs == 0 and unpacked.info.snapshot != info.snapshot  # another layout, other blocks
    assert os.path.exists(origin / "img/00.jpg")
