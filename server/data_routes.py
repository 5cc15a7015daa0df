"""The node's two data routes, as plain functions of a parsed request: no web framework.

`server/dataproto.py` parses HTTP and writes what these answer; they check the token,
read the query or body, call the `CacheNode` and say what to send: status, headers, body
parts (views of cached blocks, never copies), or a file range to sendfile. Everything
about routes, tokens, frames, digests and error codes comes from the wire contract
(cachefs/common/wire.py), exactly as the aiohttp routes answered before.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import xxhash

from cachefs.common import wire
from cachefs.common.errors import BadRequest, CachefsError, RangeNotSatisfiable, Unauthorized
from server.node import BlockRead, CacheNode
from server.peers import CACHED_ONLY
from server.stores import read_ranges

log = logging.getLogger(__name__)

COALESCE = 512 * 1024  # batch answers up to this size leave with their headers in one write
READ_PREFIX = "/v1/datasets/"
READ_SUFFIX = "/read"
BLOCK_PREFIX = "/v1/blocks/"
MAX_BODY = 16 * 1024**2  # a batch-read body larger than this is not one of ours


@dataclass
class Answer:
    """What to send back: a status, headers, then `parts` (or `file`'s bytes [offset, offset+count))."""

    status: int
    headers: list[tuple[str, str]]
    parts: list[bytes | memoryview] = field(default_factory=list)
    length: int = 0
    file: str = ""
    offset: int = 0
    dataset: str = ""  # counted as served once sent (block GETs)

    @classmethod
    def error(cls, e: CachefsError) -> "Answer":
        body = wire.error_body(e.code, e.message, **e.extra)
        return cls(wire.STATUS_OF_CODE.get(e.code, 500), [("Content-Type", "application/json")], [body], len(body))

    @classmethod
    def error_status(cls, status: int, message: str) -> "Answer":
        """An HTTP-level refusal (a request that cannot be framed) in the usual JSON error body."""
        body = wire.error_body(wire.BAD_REQUEST, message)
        return cls(status, [("Content-Type", "application/json")], [body], len(body))


def data_route(method: bytes, path: str) -> str:
    """Which data route a request line names ("read", "block"), or "" (aiohttp serves it)."""
    if method == b"POST" and path.startswith(READ_PREFIX) and path.endswith(READ_SUFFIX) \
            and "/" not in path[len(READ_PREFIX):-len(READ_SUFFIX)]:
        return "read"
    if method == b"GET" and path.startswith(BLOCK_PREFIX) and "/" not in path[len(BLOCK_PREFIX):]:
        return "block"
    return ""


class DataRoutes:
    """The handlers, bound to one node and its two tokens."""

    def __init__(self, node: CacheNode, token: str, admin_token: str) -> None:
        self.node = node
        self.tokens = (token.encode(), admin_token.encode())

    def check_token(self, given: bytes | None) -> None:
        """Both data routes are READER routes: the reader or the admin token opens them."""
        if given is None or not given.startswith(b"Bearer "):
            raise Unauthorized("this request needs a cluster token: send `Authorization: Bearer TOKEN` "
                               "(cachefs clients read it from CACHEFS_TOKEN or the file `cachefs up` writes)")
        sent = given[7:].strip()
        reader, admin = self.tokens
        if not (hmac.compare_digest(sent, admin) or hmac.compare_digest(sent, reader)):
            raise Unauthorized("wrong token: it is neither this cluster's reader token nor its admin token")

    async def handle(self, route: str, path: str, query: str, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """The answer to one request; a domain error becomes its status, never a traceback."""
        try:
            self.check_token(headers.get(b"authorization"))
            if route == "read":
                return await self.read_many(_name(path[len(READ_PREFIX):-len(READ_SUFFIX)]), headers, body)
            return await self.block(_name(path[len(BLOCK_PREFIX):]), query, headers)
        except CachefsError as e:
            return Answer.error(e)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:  # a bug of ours: log it whole, answer without a traceback
            log.exception("internal error on %s", path)
            return Answer.error(CachefsError(f"internal error: {type(e).__name__}: {e}"))

    async def read_many(self, name: str, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """POST a batch of byte ranges; one frame per item (wire.FRAME)."""
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise BadRequest(f"the body is not JSON: {e}") from e
        snapshot, wants = wants_of(doc)
        pieces = await self.node.read_ranges(name, snapshot, wants, _epoch(headers))
        parts: list[bytes | memoryview] = []
        frame = wire.FRAME.pack
        total = 0
        for i, p in enumerate(pieces):
            n = len(p.payload)
            parts += (frame(p.status, 0, i, n, p.digest), p.payload)
            total += wire.FRAME.size + n
        if total <= COALESCE:  # one buffer: sent with the headers in one write, one wake-up of the reader
            parts = [b"".join(parts)]
        return Answer(200, [("Content-Type", wire.FRAMES)], parts, total)

    async def block(self, name: str, query: str, headers: dict[bytes, bytes]) -> Answer:
        """GET one block of a file (?path=&index=) or one pack (?pack=), whole or a byte range."""
        q = dict(parse_qsl(query, keep_blank_values=True))
        if "snapshot" not in q or not ("pack" in q or ("path" in q and "index" in q)):
            raise BadRequest("missing query parameter(s): a block is named by snapshot, path and index "
                             "(or snapshot and pack)")
        epoch = _epoch(headers)
        cached = q.get(CACHED_ONLY) == "1"  # a peer asking for a unit that moved (server/peers.py)
        node = self.node
        if "pack" in q:
            read = await node.read_pack(name, q["snapshot"], _int(q["pack"], "pack"), epoch, cached)
        else:
            index = _int(q["index"], "index")
            if index < 0:
                raise RangeNotSatisfiable(f"block index {index} is negative")
            read = await node.read_block(name, q["snapshot"], q["path"], index, epoch, cached)
        return await _block_answer(read, q, headers.get(b"range"))


async def _block_answer(read: BlockRead, q: dict[str, str], range_header: bytes | None) -> Answer:
    size = read.end - read.start  # a packed file's block is its range of the pack
    start, stop = byte_range(q, range_header, size)
    partial = (start, stop) != (0, size)
    lo, hi = read.start + start, read.start + stop
    whole = (lo, hi) == (0, read.block.size)
    body: memoryview | bytes | None = None
    if read.data is not None:
        body = memoryview(read.data)[lo:hi]  # type: ignore[arg-type]
    elif not whole:  # a range of a disk block: its digest needs its bytes
        (body,) = await asyncio.to_thread(read_ranges, [(read.block.path, lo, hi)])
    digest = read.block.digest if whole else xxhash.xxh3_64_hexdigest(body)  # type: ignore[arg-type]
    headers = [(wire.DIGEST_HEADER, digest), (wire.SOURCE_HEADER, read.source), ("Accept-Ranges", "bytes"),
               ("Content-Type", "application/octet-stream")]
    if partial:
        headers.append(("Content-Range", f"bytes {start}-{stop - 1}/{size}"))
    answer = Answer(206 if partial else 200, headers, length=hi - lo, dataset=read.block.dataset)
    if body is not None:
        answer.parts = [body]
    else:
        answer.file, answer.offset = read.block.path, lo
    return answer


def byte_range(q: dict[str, str], header: bytes | None, size: int) -> tuple[int, int]:
    """The part of a block of `size` bytes that is asked for: ?start=&end=, or a Range header."""
    if "start" in q or "end" in q:
        start, stop = _int(q.get("start", "0"), "start"), _int(q.get("end", str(size)), "end")
        if not 0 <= start <= stop <= size:
            raise RangeNotSatisfiable(f"range [{start}, {stop}) is outside the block of {size} bytes")
        return start, stop
    if header is None:
        return 0, size
    first, last = _range_header(header.decode("latin-1"))
    if first is None:  # suffix range: the last `last` bytes
        return max(0, size - (last or 0)), size
    stop = size if last is None else min(last + 1, size)
    if first >= size and size > 0 or first > stop:
        raise RangeNotSatisfiable(f"range {first}-{stop} is outside the block of {size} bytes")
    return first, stop


def _range_header(value: str) -> tuple[int | None, int | None]:
    """`bytes=A-B`, `bytes=A-` or `bytes=-N` (one range only), as (A, B), (A, None), (None, N)."""
    unit, _, spec = value.partition("=")
    first, dash, last = spec.strip().partition("-")
    try:
        if unit.strip() != "bytes" or not dash or "," in spec or not (first or last):
            raise ValueError(value)
        a = int(first) if first else None
        b = int(last) if last else None
        if (a is not None and a < 0) or (b is not None and b < 0) or (a is not None and b is not None and b < a):
            raise ValueError(value)
    except ValueError:
        raise BadRequest(f"malformed Range header: {value!r}; send one range, `bytes=START-END`") from None
    return a, b


def wants_of(doc: Any) -> tuple[str, list[tuple]]:
    """The snapshot and items of a batch read, checked for shape (the node checks meaning).
    Written as a plain loop: it runs once per item of every batch."""
    if not isinstance(doc, dict) or not isinstance(doc.get("snapshot"), str) or not isinstance(doc.get("items"), list):
        raise BadRequest('a batch read is {"snapshot": S, "items": [["b", PATH, INDEX, START, END] or '
                         '["p", PACK, START, END], ...]}')
    items = doc["items"]
    if len(items) > wire.MAX_BATCH_ITEMS:
        raise BadRequest(f"{len(items)} items in one batch; send at most {wire.MAX_BATCH_ITEMS} per request")
    wants: list[tuple] = []
    total = 0
    for n, item in enumerate(items):
        if type(item) is list and len(item) == 4 and item[0] == wire.ITEM_PACK \
                and type(item[1]) is int and type(item[2]) is int and type(item[3]) is int:
            total += item[3] - item[2]
        elif type(item) is list and len(item) == 5 and item[0] == wire.ITEM_BLOCK and type(item[1]) is str \
                and type(item[2]) is int and type(item[3]) is int and type(item[4]) is int:
            total += item[4] - item[3]
        else:
            raise BadRequest(f"item {n} is {item!r}; an item is [\"b\", PATH, INDEX, START, END] "
                             "or [\"p\", PACK, START, END] with integers")
        wants.append(tuple(item))
    if total > wire.MAX_BATCH_BYTES:
        raise BadRequest(f"the batch asks for {total} bytes; split it into requests of at most "
                         f"{wire.MAX_BATCH_BYTES} bytes")
    return doc["snapshot"], wants


def _name(raw: str) -> str:
    name = unquote(raw)
    if not wire.DATASET_NAME_RE.match(name):
        raise BadRequest(f"{name!r} is not a dataset name: use lowercase letters, digits, '.', '_' and '-' "
                         "(at most 63 characters)")
    return name


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{what} must be an integer, not {value!r}") from None


def _epoch(headers: dict[bytes, bytes]) -> int | None:
    value = headers.get(b"x-cachefs-epoch")
    return None if value is None else _int(value.decode("latin-1"), wire.EPOCH_HEADER)
