"""The block client on its own, against a real aiohttp server on loopback: bodies land in
pooled buffers, connections are reused, errors come back as ours, and a connection the
server closes after a response is dropped cleanly."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from cachefs.blockproto import BlockClient, BufferPool
from cachefs.errors import NodeUnavailable, NotFound

BODY = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
async def server():
    async def block(request: web.Request) -> web.StreamResponse:
        if request.query.get("missing"):
            return web.Response(status=404, content_type="application/json",
                                body=json.dumps({"error": "not_found", "message": "no such block"}).encode())
        assert request.headers["Authorization"] == "Bearer t0k"
        resp = web.StreamResponse(headers={"X-Test": request.query["n"]})
        resp.content_length = len(BODY)
        await resp.prepare(request)
        for off in range(0, len(BODY), 100_000):
            await resp.write(BODY[off:off + 100_000])
        return resp

    app = web.Application()
    app.router.add_get("/b", block)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", runner
    await runner.cleanup()


async def test_bodies_arrive_whole_in_pooled_buffers_over_one_reused_connection(server) -> None:
    base, _ = server
    pool = BufferPool(2 * len(BODY))
    client = BlockClient("t0k", 2.0, 5.0, pool)
    for n in range(3):
        headers, body = await client.get(base, "/b", {"n": str(n)}, {})
        assert bytes(body) == BODY and headers["x-test"] == str(n)
        pool.give(body)
    assert sum(len(c) for c in client._idle.values()) == 1  # noqa: SLF001 - one connection, reused
    client.close()


async def test_an_error_body_becomes_our_exception(server) -> None:
    base, _ = server
    client = BlockClient("t0k", 2.0, 5.0, BufferPool(1024))
    with pytest.raises(NotFound, match="no such block"):
        await client.get(base, "/b", {"missing": "1"}, {})
    client.close()


async def test_a_connection_closed_after_a_response_is_dropped_without_a_fatal_error(server) -> None:
    base, runner = server
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    client = BlockClient("t0k", 2.0, 5.0, BufferPool(len(BODY)))
    _, body = await client.get(base, "/b", {"n": "1"}, {})
    client.pool.give(body)
    await runner.cleanup()  # the server closes its idle keep-alive connections
    await asyncio.sleep(0.2)
    assert errors == []
    with pytest.raises(NodeUnavailable):
        await client.get("http://127.0.0.1:1", "/b", {"n": "2"}, {})
    client.close()
