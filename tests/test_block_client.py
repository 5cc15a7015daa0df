"""The frame client on its own, against a real aiohttp server on loopback speaking the
batch-read contract (wire.READ, wire.FRAME): every item lands in its own destination,
digests are checked per item, one item's error leaves the others' bytes, a whole-request
error comes back as ours, connections are reused, and a broken answer never hangs."""

from __future__ import annotations

import asyncio
import json

import pytest
import xxhash
from aiohttp import web

from cachefs.common import wire
from conftest import until
from cachefs.blockproto import FrameClient
from cachefs.common.errors import IntegrityError, NodeUnavailable, NotFound, OriginChanged

DATA = bytes(range(256)) * 4096  # 1 MiB the server cuts items from


def _frames(items: list[list], *, corrupt: int = -1, fail: int = -1) -> list[bytes]:
    out = []
    for i, (_, _, start, end) in enumerate(items):
        if i == fail:
            body = wire.error_body(wire.ORIGIN_CHANGED, "x changed in the origin")
            out += [wire.FRAME.pack(412, 0, i, len(body), 0), body]
            continue
        payload = DATA[start:end]
        digest = xxhash.xxh3_64_intdigest(payload) ^ (1 if i == corrupt else 0)
        out += [wire.FRAME.pack(200, 0, i, len(payload), digest), payload]
    return out


@pytest.fixture
async def server():
    async def read(request: web.Request) -> web.StreamResponse:
        assert request.headers["Authorization"] == "Bearer t0k"
        doc = json.loads(await request.read())
        if doc["snapshot"] == "missing":
            return web.Response(status=404, content_type="application/json",
                                body=wire.error_body(wire.NOT_FOUND, "no dataset named 'd'"))
        parts = _frames(doc["items"], corrupt=doc.get("corrupt", -1), fail=doc.get("fail", -1))
        resp = web.StreamResponse(headers={"Content-Type": wire.FRAMES})
        resp.content_length = sum(map(len, parts))
        if doc.get("short"):
            parts[-1] = parts[-1][:-doc["short"]]
        await resp.prepare(request)
        for part in parts:  # in small writes: headers and payloads arrive split across receives
            for off in range(0, len(part), doc.get("piece", 1 << 20)):
                await resp.write(part[off:off + doc.get("piece", 1 << 20)])
                if doc.get("piece"):
                    await asyncio.sleep(0)
        if doc.get("short"):
            request.transport.close()  # hangs up in the middle of the last payload
        return resp

    app = web.Application()
    app.router.add_post(wire.route(wire.READ, name="d"), read)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", runner
    await runner.cleanup()


def _request(items: list[list], **extra) -> tuple[bytes, list[memoryview]]:
    body = json.dumps({"snapshot": "s", "items": items, **extra}).encode()
    return body, [memoryview(bytearray(i[3] - i[2])) for i in items]


ITEMS = [["p", 0, 0, 110_000], ["p", 0, 110_000, 110_000], ["p", 1, 500_000, 1_048_576], ["p", 2, 7, 8]]


@pytest.mark.parametrize("piece", [1 << 20, 7, 4096], ids=["whole writes", "7-byte writes", "4 KiB writes"])
async def test_every_item_lands_in_its_destination_over_one_reused_connection(server, piece) -> None:
    base, _ = server
    client = FrameClient("t0k", 2.0, 10.0)
    for _ in range(2):
        body, dests = _request(ITEMS, piece=piece)
        assert await client.read(base, "d", body, 1, dests) == [None] * len(ITEMS)
        assert [bytes(d) for d in dests] == [DATA[i[2]:i[3]] for i in ITEMS]
    assert sum(len(c) for c in client._idle.values()) == 1  # noqa: SLF001 - one connection, reused
    client.close()


async def test_one_items_error_or_bad_digest_leaves_the_others_bytes(server) -> None:
    base, _ = server
    client = FrameClient("t0k", 2.0, 5.0)
    body, dests = _request(ITEMS, fail=0, corrupt=2)
    results = await client.read(base, "d", body, 1, dests)
    assert isinstance(results[0], OriginChanged) and "changed in the origin" in str(results[0])
    assert results[1] is None and results[3] is None and bytes(dests[3]) == DATA[7:8]
    assert isinstance(results[2], IntegrityError)
    client.close()


async def test_an_error_of_the_whole_request_becomes_our_exception(server) -> None:
    base, _ = server
    client = FrameClient("t0k", 2.0, 5.0)
    body = json.dumps({"snapshot": "missing", "items": ITEMS}).encode()
    with pytest.raises(NotFound, match="no dataset"):
        await client.read(base, "d", body, 1, [memoryview(bytearray(i[3] - i[2])) for i in ITEMS])
    body, dests = _request(ITEMS)  # the connection is still good
    assert await client.read(base, "d", body, 1, dests) == [None] * len(ITEMS)
    client.close()


async def test_an_answer_cut_short_is_a_node_failure_not_a_hang(server) -> None:
    base, _ = server
    client = FrameClient("t0k", 2.0, 5.0)
    body, dests = _request(ITEMS, short=10)
    with pytest.raises(NodeUnavailable):
        await asyncio.wait_for(client.read(base, "d", body, 1, dests), 10)
    with pytest.raises(NodeUnavailable):
        await client.read("http://127.0.0.1:1", "d", body, 1, dests)
    client.close()


async def test_a_connection_closed_after_a_response_is_dropped_without_a_fatal_error(server) -> None:
    base, runner = server
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    client = FrameClient("t0k", 2.0, 5.0)
    body, dests = _request(ITEMS)
    await client.read(base, "d", body, 1, dests)
    await runner.cleanup()  # the server closes its idle keep-alive connections
    idle = list(client._idle[base])
    assert idle, "the connection should have been kept for reuse"
    await until(lambda: not any(c.reusable for c in idle), "the client to see its connection closed")
    assert errors == []
    client.close()
