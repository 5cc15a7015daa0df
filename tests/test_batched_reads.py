"""Batched reads end to end, on the session's 3-node cluster: every read shape returns the
origin's bytes, small files travel in packs, a batch survives a dead node and a missing
or changed file, batches larger than any request are split, and the wire refuses bad
batches with a clear 400. Blocks are 1 MiB here, so files below 256 KiB are packed."""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import pytest

from cachefs.common import wire
from conftest import BLOCK, wait_until, write_tree

KiB = 1024


def shaped_files(seed: int = 11) -> dict[str, bytes]:
    """Small (packed) files, empty ones, one just below and one at the pack threshold, one
    of exactly a block, and one of several blocks."""
    rnd = random.Random(seed)
    files = {f"img/c{i % 4}/{i:03d}.jpg": rnd.randbytes(rnd.randint(1, 120 * KiB)) for i in range(60)}
    files |= {"empty/a": b"", "empty/b": b"", "edge/below": rnd.randbytes(256 * KiB - 1),
              "edge/at": rnd.randbytes(256 * KiB), "edge/block": rnd.randbytes(BLOCK),
              "edge/multi": rnd.randbytes(3 * BLOCK + 777)}
    return files


@pytest.fixture(scope="module")
def shaped(cachefs_cluster, tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    files = shaped_files()
    return cachefs_cluster.dataset_of(files, tmp_path_factory.mktemp("shaped"), "shaped"), files


def test_small_files_are_packed_and_large_ones_are_not(cachefs_cluster, shaped) -> None:
    name, files = shaped
    fs = cachefs_cluster.fs()
    info = fs.dataset_info(name)
    assert info.pack_threshold == 256 * KiB and info.packs >= 4
    manifest = asyncio.run_coroutine_threadsafe(fs._view(name), fs.loop).result(30).manifest
    for rel, data in files.items():
        entry = manifest.file(rel)
        assert entry.packed == (0 < len(data) < 256 * KiB), rel


def test_every_read_shape_equals_the_origin(cachefs_cluster, shaped, tmp_path) -> None:
    name, files = shaped
    fs = cachefs_cluster.fs()
    paths = [f"{name}/{rel}" for rel in files]
    assert all(fs.cat_file(p) == files[p.split("/", 1)[1]] for p in paths)  # one by one
    assert fs.cat(paths) == {p: files[p.split("/", 1)[1]] for p in paths}  # one batch
    rnd = random.Random(3)
    ranges = [(p, rnd.randint(0, len(files[p.split("/", 1)[1]])), None) for p in paths]
    ranges = [(p, a, rnd.randint(a, len(files[p.split("/", 1)[1]]) + 5)) for p, a, _ in ranges]
    got = fs.cat_ranges([r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges])
    assert got == [files[p.split("/", 1)[1]][a:b] for p, a, b in ranges]
    for rel in ("img/c0/000.jpg", "edge/multi", "empty/a"):  # an open file: seek, read, readinto
        with fs.open(f"{name}/{rel}") as f:
            assert f.read() == files[rel]
    fs.get(f"{name}/img/", str(tmp_path / "img"), recursive=True)
    assert all((tmp_path / rel).read_bytes() == data for rel, data in files.items() if rel.startswith("img/"))


def test_a_batch_with_a_missing_and_a_changed_file_fails_just_those(cachefs_cluster, tmp_path) -> None:
    files = {f"f{i}.bin": bytes([i]) * 5000 for i in range(8)}
    origin = write_tree(tmp_path / "o", files)
    name = cachefs_cluster.unique("holes")
    cachefs_cluster.add_dataset(name, f"file://{origin}")
    (origin / "f2.bin").unlink()
    time.sleep(0.01)
    (origin / "f5.bin").write_bytes(b"X" * 5000)  # same size, new mtime
    fs = cachefs_cluster.fs()
    got = fs.cat([f"{name}/{rel}" for rel in files], on_error="return")
    for rel, data in files.items():
        value = got[f"{name}/{rel}"]
        if rel in ("f2.bin", "f5.bin"):
            assert isinstance(value, FileNotFoundError | OSError) and "refresh" in str(value), rel
        else:
            assert value == data, rel
    with pytest.raises(OSError, match="refresh"):
        fs.cat([f"{name}/f2.bin", f"{name}/f3.bin"])
    assert fs.cat([f"{name}/f1.bin", f"{name}/f2.bin"], on_error="omit") == {f"{name}/f1.bin": files["f1.bin"]}


def test_a_batch_larger_than_any_request_is_split_and_whole(cachefs_cluster, shaped) -> None:
    name, files = shaped
    fs = cachefs_cluster.fs(max_batch_bytes="64KiB", max_batch_items=3, node_requests=1)
    paths = [f"{name}/{rel}" for rel in files]
    assert fs.cat(paths) == {p: files[p.split("/", 1)[1]] for p in paths}
    assert sum(len(v) for v in files.values()) > 40 * 64 * KiB  # many requests' worth


def test_a_batch_spanning_a_dead_node_falls_over_and_loses_nothing(cachefs_cluster, tmp_path) -> None:
    files = {f"d{i % 5}/{i:03d}.bin": bytes([i % 251]) * (40_000 + 37 * i) for i in range(150)}
    origin = write_tree(tmp_path / "o", files)
    name = cachefs_cluster.unique("batchdeath")
    cachefs_cluster.add_dataset(name, f"file://{origin}")
    assert cachefs_cluster.warm(name).state == "succeeded"
    victim = max(cachefs_cluster.status()["nodes"], key=lambda n: n["datasets"].get(name, 0))
    fs = cachefs_cluster.fs(connect_timeout=2.0)
    paths = [f"{name}/{rel}" for rel in files]
    expected = {p: files[p.split("/", 1)[1]] for p in paths}
    assert fs.cat(paths) == expected

    def batch() -> None:
        assert fs.cat(paths) == expected

    errors = cachefs_cluster.kill_a_node_while(batch, victim["id"])
    assert not errors, errors
    assert fs.blocks.origin_reads == 0  # the other nodes served every file, refetching the dead one's share
    cachefs_cluster.ensure_nodes()
    wait_until(lambda: len(cachefs_cluster.status()["nodes"]) == 3, what="the node to come back")
    cachefs_cluster.remove_dataset(name)


# -- the wire ---------------------------------------------------------------------------------
async def _post(cluster, name: str, body: object) -> tuple[int, bytes, str]:
    url = cluster.endpoints[0] + wire.route(wire.READ, name=name)
    async with aiohttp.ClientSession(headers=wire.bearer(cluster.token)) as s:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with s.post(url, data=data) as r:
            return r.status, await r.read(), r.headers.get("Content-Type", "")


@pytest.mark.parametrize("body, message", [
    (b"not json", "not JSON"),
    ({"items": []}, "a batch read is"),
    ({"snapshot": "s", "items": [["x", 1, 2, 3]]}, "item 0"),
    ({"snapshot": "s", "items": [["b", "f", "0", 0, 1]]}, "with integers"),
    ({"snapshot": "s", "items": [["p", 0, 0, 1]] * (wire.MAX_BATCH_ITEMS + 1)}, "at most"),
    ({"snapshot": "s", "items": [["p", 0, 0, wire.MAX_BATCH_BYTES + 1]]}, "split it"),
], ids=["not json", "no snapshot", "unknown kind", "string index", "too many items", "too many bytes"])
def test_bad_batches_are_refused_with_a_clear_400(cachefs_cluster, shaped, body, message) -> None:
    name, _ = shaped
    status, data, _ = asyncio.run(_post(cachefs_cluster, name, body))
    assert status == 400 and message in json.loads(data)["message"]


def test_a_batch_answers_frames_with_digests_and_per_item_errors(cachefs_cluster, shaped) -> None:
    import xxhash

    name, files = shaped
    fs = cachefs_cluster.fs()
    view = asyncio.run_coroutine_threadsafe(fs._view(name), fs.loop).result(30)
    entry = view.manifest.file("img/c1/001.jpg")
    body = {"snapshot": view.info.snapshot,
            "items": [["p", entry.pack, entry.offset, entry.offset + entry.size], ["b", "nope", 0, 0, 1]]}
    status, data, ctype = asyncio.run(_post(cachefs_cluster, name, body))
    assert status == 200 and ctype == wire.FRAMES
    st, _, item, length, digest = wire.FRAME.unpack_from(data, 0)
    payload = data[wire.FRAME.size:wire.FRAME.size + length]
    assert (st, item) == (200, 0) and payload == files["img/c1/001.jpg"]
    assert digest == xxhash.xxh3_64_intdigest(payload)
    st, _, item, length, _ = wire.FRAME.unpack_from(data, wire.FRAME.size + len(payload))
    assert (st, item) == (404, 1) and b"no file" in data[-length:]


def test_get_of_a_packed_files_block_and_of_a_pack_still_work(cachefs_cluster, shaped) -> None:
    """Readers that name blocks by path and index (an older client, curl) keep working."""
    name, files = shaped
    fs = cachefs_cluster.fs()
    snapshot = fs.dataset_info(name).snapshot

    async def get(params: dict[str, str]) -> tuple[int, bytes]:
        async with aiohttp.ClientSession(headers=wire.bearer(cachefs_cluster.token)) as s:
            async with s.get(cachefs_cluster.endpoints[0] + wire.route(wire.BLOCK, name=name),
                             params={"snapshot": snapshot, **params}) as r:
                return r.status, await r.read()

    assert asyncio.run(get({"path": "img/c2/002.jpg", "index": "0"})) == (200, files["img/c2/002.jpg"])
    status, pack = asyncio.run(get({"pack": "0"}))
    assert status == 200 and len(pack) <= BLOCK and files["img/c0/000.jpg"] in pack
