"""The client's read path without a cluster: planning, routing by the ring, batching per node,
stale epochs, failover to the next owner and to the origin, and direct sync reads, against
two real cache nodes served over loopback HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cachefs.batching import NodeQueue
from cachefs.blocks import BlockReader, DatasetView
from cachefs.common import wire
from cachefs.common.errors import BadRequest, NodeUnavailable
from cachefs.common.manifest import Manifest, from_ipc
from cachefs.config import ClientConfig
from cachefs.blockproto import one_item_body, request_head
from cachefs.direct import DirectReads
from cachefs.plan import Moved, plan
from cachefs.transport import Transport
from conftest import write_tree
from server.config import NodeConfig
from server.listener import listen
from server.node import CacheNode
from shard import Member, Ring
from test_node_reads import BLOCK, SnapshotDirectory

TOKEN, ADMIN = "reader-token", "admin-token"
FILES = {f"f{i}.bin": bytes([i]) * (3 * BLOCK + 100 * i) for i in range(6)}


class TwoNodes:
    def __init__(self, origin: Path) -> None:
        self.directory = SnapshotDirectory(origin)
        self.nodes = [CacheNode(f"n{i}", NodeConfig(memory_bytes=8 << 20), self.directory) for i in range(2)]
        self.listeners: list = []
        self.urls: list[str] = []

    async def start(self) -> None:
        for node in self.nodes:
            await node.open()
            listener = await listen(node, None, TOKEN, ADMIN, "127.0.0.1", 0)
            self.listeners.append(listener)
            self.urls.append(f"http://127.0.0.1:{listener.port}")
        self.set_epoch(2)

    def set_epoch(self, epoch: int) -> Ring:
        ring = Ring.build([Member(n.node_id, 1.0, u) for n, u in zip(self.nodes, self.urls)], epoch=epoch)
        for node in self.nodes:
            node.ring = ring  # pushed by the coordinator in production (set_ring only moves forward)
        return ring

    async def view(self) -> DatasetView:
        state = await self.nodes[0].dataset("d")
        return DatasetView(state.info, Manifest(from_ipc(state.reader_ipc), state.info.snapshot))

    async def close(self) -> None:
        for listener in self.listeners:
            await listener.close()
        for node in self.nodes:
            await node.close()


@pytest.fixture
async def cluster(tmp_path: Path):
    two = TwoNodes(write_tree(tmp_path / "origin", FILES))
    await two.start()
    yield two
    await two.close()


@pytest.fixture
async def reader(cluster):
    config = ClientConfig(endpoint=cluster.urls[0], token=TOKEN, io_threads=0, connect_timeout=2, read_timeout=10)
    transport = Transport(config)
    blocks = BlockReader(config, transport)
    yield blocks
    await blocks.close()
    await transport.close()


def slices_of(view: DatasetView, path: str, start: int = 0, end: int | None = None):
    entry = view.manifest.file(path)
    end = entry.size if end is None else end
    buf = bytearray(end - start)
    return buf, plan(view.info, entry, start, end, memoryview(buf))


async def test_a_range_is_planned_as_block_slices_landing_in_views_of_one_buffer(cluster) -> None:
    view = await cluster.view()
    buf, slices = slices_of(view, "f2.bin", BLOCK - 10, 2 * BLOCK + 10)
    assert [s.item[2:] for s in slices] == [[0, BLOCK - 10, BLOCK], [1, 0, BLOCK], [2, 0, 10]]
    assert [len(s.dest) for s in slices] == [10, BLOCK, 10] and sum(map(len, (s.dest for s in slices))) == len(buf)
    assert len({s.key for s in slices}) == 3


async def test_each_slice_is_read_from_its_ring_owner_once(cluster, reader) -> None:
    view = await cluster.view()
    ring = await reader.get_ring()
    work = [slices_of(view, path) for path in FILES]
    outcomes = await reader.read(view, [s for _, slices in work for s in slices])
    assert outcomes == [None] * len(outcomes)
    assert [bytes(buf) for buf, _ in work] == list(FILES.values())
    owned = {n.node_id: 0 for n in cluster.nodes}
    for _, slices in work:
        for s in slices:
            owned[ring.owners(s.key, 1)[0]] += 1
    assert {n.node_id: n.metrics.totals["misses"] for n in cluster.nodes} == owned
    assert reader.origin_reads == 0


async def test_a_stale_ring_is_refreshed_and_the_read_routed_again(cluster, reader) -> None:
    view = await cluster.view()
    assert (await reader.get_ring()).epoch == 2
    cluster.set_epoch(5)
    buf, slices = slices_of(view, "f1.bin")
    assert await reader.read(view, slices) == [None] * len(slices)
    assert bytes(buf) == FILES["f1.bin"] and reader.ring.epoch == 5


async def test_a_dead_node_costs_its_slices_a_read_from_their_next_owner(cluster, reader) -> None:
    view = await cluster.view()
    ring = await reader.get_ring()
    await cluster.listeners[1].close()  # n1 stops answering
    work = [slices_of(view, path) for path in FILES]
    flat = [s for _, slices in work for s in slices]
    assert any(ring.owners(s.key, 1)[0] == "n1" for s in flat)
    assert await reader.read(view, flat) == [None] * len(flat)
    assert [bytes(buf) for buf, _ in work] == list(FILES.values())
    assert reader.origin_reads == 0 and cluster.nodes[0].metrics.totals["misses"] == len(flat)


async def test_with_no_node_answering_the_slices_come_from_the_origin(cluster, reader) -> None:
    state = await cluster.nodes[0].dataset("d")
    view = DatasetView(state.info, state.manifest)  # with version tokens: the origin is read checked
    await reader.get_ring()
    for listener in cluster.listeners:
        await listener.close()
    buf, slices = slices_of(view, "f3.bin")
    assert await reader.read(view, slices) == [None] * len(slices)
    assert bytes(buf) == FILES["f3.bin"] and reader.origin_reads == len(slices)


async def test_reads_arriving_while_a_node_is_busy_leave_together_and_keep_their_outcomes() -> None:
    chunks: list[list[int]] = []
    release = asyncio.Event()

    async def send(url: str, chunk: list) -> list:
        chunks.append([s for s in chunk])
        if len(chunks) == 1:
            await release.wait()  # the first request is in flight while the others arrive
        return [None if s % 3 else Moved("n1") for s in chunk]

    queue = NodeQueue("http://n", send, senders=1, max_items=10, max_bytes=1 << 30)

    class Item(int):
        dest = b"x"

    reads = [asyncio.ensure_future(queue.read([Item(i)])) for i in range(25)]
    await asyncio.sleep(0)  # (one turn: the first read leaves, the others queue up)
    release.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*reads), 10)
    assert [o for (o,) in outcomes] == [None if i % 3 else Moved("n1") for i in range(25)]
    assert [len(c) for c in chunks] == [1, 10, 10, 4]  # batches formed under load, within max_items


async def test_a_direct_read_fills_its_destination_and_says_when_a_node_is_gone(cluster, reader) -> None:
    view = await cluster.view()
    direct = DirectReads(TOKEN, 2.0, 10.0)
    buf, (s,) = slices_of(view, "f0.bin", 5, 105)
    url = cluster.urls[0]
    body = wire.read_body(view.info.snapshot, [s.item])
    outcome = await asyncio.to_thread(direct.read, url, "d", body, 2, [s.dest])
    assert outcome == [None] and bytes(buf) == FILES["f0.bin"][5:105]
    await cluster.listeners[0].close()
    with pytest.raises(NodeUnavailable):
        await asyncio.to_thread(direct.read, url, "d", body, 2, [s.dest])
    direct.close()


async def test_cat_ranges_into_fills_the_callers_buffers_and_refuses_one_too_small(cluster) -> None:
    from cachefs.filesystem import CachefsFileSystem

    fs = CachefsFileSystem(endpoint=cluster.urls[0], token=TOKEN, asynchronous=True, skip_instance_cache=True,
                           io_threads=0)
    pool = [bytearray(3 * BLOCK + 150) for _ in range(3)]
    got = await fs._cat_ranges_into(["d/f1.bin", "d/f2.bin", "d/f3.bin", "d/f4.bin"], [None, 10, None, 0],
                                    [None, 20, None, 1], [*pool, b"read-only"])
    assert got[:2] == [len(FILES["f1.bin"]), 10] and isinstance(got[3], BadRequest)
    assert pool[0][:got[0]] == FILES["f1.bin"] and pool[1][:10] == FILES["f2.bin"][10:20]
    assert isinstance(got[2], BadRequest) and "needs" in str(got[2])  # f3 is longer than its buffer
    again = await fs._cat_ranges_into(["d/f1.bin"], [BLOCK], [BLOCK + 5], [pool[2]])  # the same memory, reused
    assert again == [5] and pool[2][:5] == FILES["f1.bin"][BLOCK:BLOCK + 5]
    await fs._close()


async def test_read_one_lands_an_item_and_leaves_any_other_answer_to_the_usual_path(cluster) -> None:
    """The one-by-one hot path (DirectReads.read_one): one item in place; a refused request
    (another snapshot, a stale epoch) or an item error is False, and the next read still works."""
    view = await cluster.view()
    direct = DirectReads(TOKEN, 2.0, 10.0)
    url = cluster.urls[0]
    buf, (s,) = slices_of(view, "f1.bin", 7, 3007)

    def request(snapshot: str, epoch: int, item: list) -> bytes:
        return request_head(url, "d", TOKEN, epoch, wire.read_body(snapshot, [item]))

    ok = request(view.info.snapshot, 2, s.item)
    assert await asyncio.to_thread(direct.read_one, url, ok, s.dest)
    assert bytes(buf) == FILES["f1.bin"][7:3007]
    refused = [request("0" * 16, 2, s.item), request(view.info.snapshot, 1, s.item),
               request(view.info.snapshot, 2, [wire.ITEM_BLOCK, "nope.bin", 0, 0, 3000])]
    for bad in refused:
        buf[:] = bytes(len(buf))
        assert not await asyncio.to_thread(direct.read_one, url, bad, s.dest)
        assert await asyncio.to_thread(direct.read_one, url, ok, s.dest)  # the connection (or a new one) serves on
        assert bytes(buf) == FILES["f1.bin"][7:3007]
    await cluster.listeners[0].close()
    with pytest.raises(NodeUnavailable):
        await asyncio.to_thread(direct.read_one, url, ok, s.dest)
    direct.close()


async def test_a_remembered_whole_file_read_follows_the_pinned_view(tmp_path: Path) -> None:
    """`cat_file` keeps a whole-file read's request bytes, but only for the view it was made
    for: after `invalidate_cache` the next read is planned afresh (the snapshot rule)."""
    from cachefs.filesystem import CachefsFileSystem

    small = {"s.bin": bytes(range(256)) * 40}  # one block: read on the caller's thread
    two = TwoNodes(write_tree(tmp_path / "small", small))
    await two.start()
    fs = CachefsFileSystem(endpoint=two.urls[0], token=TOKEN, skip_instance_cache=True, io_threads=0)
    try:
        for _ in range(3):
            assert await asyncio.to_thread(fs.cat_file, "d/s.bin") == small["s.bin"]
        assert "d/s.bin" in fs._direct_known
        assert await asyncio.to_thread(fs.cat, ["d/s.bin", "d/s.bin"]) == {"d/s.bin": small["s.bin"]}
        view = fs.pins.get("d")
        assert fs._held("d/s.bin") == (view, view.manifest.get("s.bin"))
        fs.invalidate_cache()
        assert fs._direct_known == {} and fs._resolved == {}
        for _ in range(2):  # the first loads the current view (the usual path), the next goes direct
            assert await asyncio.to_thread(fs.cat_file, "d/s.bin") == small["s.bin"]
        assert fs.pins.get("d") is not view and fs._direct_known["d/s.bin"][1] is fs.pins.get("d")
    finally:
        await asyncio.to_thread(fs.close)
        await two.close()


def test_one_item_body_says_what_read_body_says() -> None:
    for snapshot, item in (("0a1b2c", [wire.ITEM_PACK, 3, 10, 1 << 40]), ("0a1b2c", [wire.ITEM_BLOCK, 'a "q"/\\é.bin', 2, 0, 9]),
                           ('odd"snap', [wire.ITEM_PACK, 0, 0, 1])):
        assert json.loads(one_item_body(snapshot, item)) == json.loads(wire.read_body(snapshot, [item]))


async def test_a_kept_alive_connection_the_node_closed_is_replaced_not_reported(cluster) -> None:
    """The node may close an idle keep-alive connection: the next direct read finds it closed
    before any byte came back and asks again on a new one, instead of calling the node down."""
    import socket

    view = await cluster.view()
    direct = DirectReads(TOKEN, 2.0, 10.0)
    url = cluster.urls[0]
    buf, (s,) = slices_of(view, "f3.bin", 0, 4000)
    request = request_head(url, "d", TOKEN, 2, wire.read_body(view.info.snapshot, [s.item]))
    body = wire.read_body(view.info.snapshot, [s.item])

    def closed_by_its_peer() -> socket.socket:
        with socket.create_server(("127.0.0.1", 0)) as server:
            sock = socket.create_connection(server.getsockname())
            server.accept()[0].close()
        return sock

    def read_both() -> tuple[bool, object]:
        conns = direct._connections()
        head = bytearray(64 * 1024)
        conns[url] = (closed_by_its_peer(), head, memoryview(head))
        one = direct.read_one(url, request, s.dest)
        from cachefs.blockproto import FrameReader
        conns[url] = (closed_by_its_peer(), FrameReader(url))
        return one, direct.read(url, "d", body, 2, [s.dest])

    one, batch = await asyncio.to_thread(read_both)
    assert one and batch == [None] and bytes(buf) == FILES["f3.bin"][:4000]
    direct.close()
