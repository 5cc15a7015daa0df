"""The node's lean HTTP/1.1 data protocol over real loopback sockets (no cluster): pipelining,
slow and vanishing readers, bad requests answered with a clear 4xx, a fuzzed parser, and the
hand-off of other routes to aiohttp on the same port."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import tracemalloc
from pathlib import Path

import pytest

from cachefs.common import wire
from conftest import write_tree
from server.config import NodeConfig
from server.listener import Listener, listen
from server.node import CacheNode
from test_node_reads import SnapshotDirectory

TOKEN, ADMIN = "reader-token", "admin-token"
BIG = bytes(range(256)) * 4096  # 1 MiB, in 64 blocks of 16 KiB
FILES = {"small.txt": b"tiny file", "big.bin": BIG}


@pytest.fixture
async def served(tmp_path: Path):
    directory = SnapshotDirectory(write_tree(tmp_path / "origin", FILES))
    node = CacheNode("n", NodeConfig(memory_bytes=8 << 20), directory)
    await node.open()
    listener = await listen(node, None, TOKEN, ADMIN, "127.0.0.1", 0)
    yield listener, directory.record.info.snapshot
    await listener.close()
    await node.close()


def post(snapshot: str, items: list, token: str = TOKEN, name: str = "d", extra: str = "") -> bytes:
    body = json.dumps({"snapshot": snapshot, "items": items}).encode()
    return (f"POST /v1/datasets/{name}/read HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def exchange(port: int, raw: bytes, answers: int = 1, half_close: bool = False) -> list[tuple[int, dict, bytes]]:
    """Send raw bytes; read `answers` responses (status, headers, body), or fewer if the node closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    if half_close:
        writer.write_eof()
    out = []
    try:
        for _ in range(answers):
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            except asyncio.IncompleteReadError:
                break
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
            out.append((int(lines[0].split()[1]), headers, body))
    finally:
        writer.close()
    return out


def frames(body: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 0
    while off < len(body):
        status, _, _, length, _ = wire.FRAME.unpack_from(body, off)
        off += wire.FRAME.size
        out.append((status, body[off:off + length]))
        off += length
    return out


async def test_a_pipelined_connection_answers_in_order_when_one_request_fails_in_the_middle(served) -> None:
    listener, snap = served
    raw = post(snap, [["b", "small.txt", 0, 0, 4]]) + post("old-snapshot", [["b", "small.txt", 0, 0, 4]]) \
        + post(snap, [["b", "nope", 0, 0, 1]], name="BadName") + post(snap, [["b", "small.txt", 0, 5, 9]])
    answers = await exchange(listener.port, raw, answers=4)
    assert [a[0] for a in answers] == [200, 410, 400, 200]
    assert frames(answers[0][2]) == [(200, b"tiny")] and frames(answers[3][2]) == [(200, b"file")]
    assert json.loads(answers[1][2])["error"] == wire.SNAPSHOT_GONE
    assert "not a dataset name" in json.loads(answers[2][2])["message"]


async def test_a_connection_that_begins_with_another_route_is_served_by_aiohttp_on_the_same_port(served) -> None:
    listener, snap = served
    health = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    block = (f"GET /v1/blocks/d?snapshot={snap}&path=small.txt&index=0 HTTP/1.1\r\nHost: x\r\n"
             f"Authorization: Bearer {TOKEN}\r\nRange: bytes=5-\r\n\r\n").encode()
    answers = await exchange(listener.port, health + block + post(snap, [["b", "small.txt", 0, 0, 4]]), answers=3)
    assert [a[0] for a in answers] == [200, 206, 200]
    assert json.loads(answers[0][2])["status"] == "ok" and answers[1][2] == b"file"
    assert frames(answers[2][2]) == [(200, b"tiny")]
    lean = await exchange(listener.port, block + health, answers=2)  # and the other way round
    assert [a[0] for a in lean] == [206, 200] and lean[0][1]["content-range"] == "bytes 5-8/9"


@pytest.mark.parametrize("raw, status, says", [
    (b"GET /v1/blocks/d?snapshot=s&path=a&index=0 HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431, "exceed"),
    (b"POST /v1/datasets/d/read HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413, "at most"),
    (b"POST /v1/datasets/d/read HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, "Content-Length"),
    (b"POST /v1/datasets/d/read HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"snapshot\"", 400, "body (11 of the 50"),
    (b"GET /v1/blocks/d?snapshot=s HTTP/1.1\r\nContent-Length: zz\r\n\r\n", 400, "malformed request"),
], ids=["oversized headers", "huge body", "chunked body", "body shorter than announced", "bad header value"])
async def test_a_request_that_cannot_be_framed_gets_its_4xx_and_a_clear_message(served, raw, status, says) -> None:
    listener, _ = served
    (answer,) = await exchange(listener.port, raw, half_close=True)
    assert answer[0] == status and says in json.loads(answer[2])["message"]
    assert answer[1]["connection"] == "close"


async def test_a_body_longer_than_announced_leaves_bytes_that_are_refused_as_the_next_request(served) -> None:
    listener, snap = served
    raw = post(snap, [["b", "small.txt", 0, 0, 4]]) + b'"trailing": "junk"}\r\n\r\n'
    first, second = await exchange(listener.port, raw, answers=2)
    assert first[0] == 200 and second[0] == 400 and "malformed request" in json.loads(second[2])["message"]


@pytest.mark.parametrize("token, says", [("", "needs a cluster token"), ("nope", "wrong token")])
async def test_a_data_route_without_the_right_token_is_refused(served, token, says) -> None:
    listener, snap = served
    raw = post(snap, [["b", "small.txt", 0, 0, 4]], token=token) if token else \
        post(snap, [["b", "small.txt", 0, 0, 4]]).replace(f"Authorization: Bearer {TOKEN}\r\n".encode(), b"")
    ((status, _, body),) = await exchange(listener.port, raw)
    assert status == 401 and says in json.loads(body)["message"]


async def test_a_client_that_disconnects_mid_answer_leaves_the_node_serving(served) -> None:
    listener, snap = served
    items = [["b", "big.bin", i, 0, 16384] for i in range(64)] * 4  # 4 MiB answer
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port, limit=4096)
        writer.write(post(snap, items))
        assert len(await asyncio.wait_for(reader.readexactly(1000), 10)) == 1000
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # a reset in the middle of the answer
    answers = await exchange(listener.port, post(snap, [["b", "small.txt", 0, 0, 9]]))
    assert answers[0][0] == 200 and frames(answers[0][2]) == [(200, b"tiny file")]


async def test_a_slow_reader_costs_the_node_bounded_memory(served) -> None:
    listener, snap = served
    items = [["b", "big.bin", i, 0, 16384] for i in range(64)]
    await exchange(listener.port, post(snap, items))  # cached now
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port, limit=1 << 16)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        writer.write(post(snap, items) * 32)  # 32 MiB of answers asked for at once, read slowly
        got, peak = 0, 0
        while got < 1 << 20:
            got += len(await asyncio.wait_for(reader.read(1 << 14), 10))
            peak = max(peak, tracemalloc.get_traced_memory()[0] - before)
        assert peak < 12 << 20, f"{peak} bytes held for a reader that took {got}"
    finally:
        tracemalloc.stop()
        writer.close()


def malformed(rng: random.Random, valid: bytes) -> bytes:
    cut = bytearray(valid)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(4)
        pos = rng.randrange(len(cut)) if cut else 0
        if op == 0 and cut:
            cut[pos] = rng.randrange(256)
        elif op == 1:
            cut[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2:
            del cut[pos:pos + rng.randint(1, 16)]
        else:
            cut[pos:pos] = rng.choice([b"\r\n", b"\r\n\r\n", b" ", b":", b"\x00", b"%", b"?"])
    return bytes(cut)


async def test_the_parser_answers_fuzzed_requests_with_an_answer_or_a_close_never_a_crash(served) -> None:
    listener, snap = served
    rng = random.Random(16)
    valid = [post(snap, [["b", "small.txt", 0, 0, 4]]),
             f"GET /v1/blocks/d?snapshot={snap}&path=small.txt&index=0 HTTP/1.1\r\nAuthorization: Bearer {TOKEN}"
             "\r\n\r\n".encode()]
    statuses: set[int] = set()
    for n in range(150):
        answers = await exchange(listener.port, malformed(rng, valid[n % 2]), answers=1, half_close=True)
        for status, _, body in answers:
            statuses.add(status)
            assert status < 500, (status, body)
    assert statuses and statuses <= {200, 206, 400, 401, 404, 405, 410, 411, 413, 416, 431}
    ((status, _, body),) = await exchange(listener.port, valid[0])  # still serving
    assert status == 200 and frames(body) == [(200, b"tiny")]


async def test_closing_the_listener_ends_its_idle_connections(served, tmp_path) -> None:
    listener, snap = served
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(post(snap, [["b", "small.txt", 0, 0, 4]]))
    await reader.readuntil(b"\r\n\r\n")
    other = Listener(listener.routes.node, None, TOKEN, ADMIN)
    await other.start("127.0.0.1", 0)
    await other.close()
    await listener.close()
    assert await asyncio.wait_for(reader.read(), 10) is not None  # the end of the stream, not a hang
    writer.close()
