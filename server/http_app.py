"""The aiohttp app of a cache node: routes in one place, thin handlers.

Handlers parse, call the domain (`CacheNode` for blocks, an `Admin` for the registry),
and map domain errors to statuses in one middleware. Block bytes leave through the
fastest path: memoryview slices from RAM, or sendfile from the disk tier.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from typing import Any, Awaitable, Callable, Protocol

import xxhash
from aiohttp import web

from cachefs.common import wire
from cachefs.common.errors import BadRequest, CachefsError, Forbidden, NotFound, RangeNotSatisfiable, Unauthorized
from server.node import BlockRead, CacheNode
from server.peers import CACHED_ONLY
from server.stores import read_ranges

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024  # 1 MiB slices keep the socket full without copying the block
COALESCE = 512 * 1024  # batch answers up to this size are copied into one buffer and sent in one write


class Admin(Protocol):
    """Where the admin API's calls go (wire.ADMIN_CALLS): the coordinator, reached through
    the node's link. Each call takes the route's parameters, then the JSON body if any,
    and answers JSON-able values."""

    async def call(self, method: str, *args: Any) -> Any: ...


NODE = web.AppKey("node", CacheNode)
ADMIN = web.AppKey("admin", object)
TOKENS = web.AppKey("tokens", tuple)  # (reader, admin), as bytes
ROLES = web.AppKey("roles", dict)  # route → wire.OPEN | READER | ADMIN, filled by make_app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.Response(body=wire.error_body(code, message, **extra), status=status,
                        content_type="application/json")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as JSON with a status that says whose fault it was."""
    try:
        return await handler(request)
    except CachefsError as e:
        return error_response(wire.STATUS_OF_CODE.get(e.code, 500), e.code, e.message, **e.extra)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: wire.NOT_FOUND, 405: wire.BAD_REQUEST}.get(e.status, wire.BAD_REQUEST)
        return error_response(e.status, code, f"{e.reason}: {request.method} {request.path}")
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:  # a bug of ours: log it whole, answer without a traceback
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, wire.INTERNAL, f"internal error: {type(e).__name__}: {e}")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The token sent decides the role held; the route (make_app) decides the role needed."""
    match = request.match_info
    # A route registered without a role is a bug: fail closed. No route at all (404, 405)
    # still needs a token, so unauthenticated callers learn nothing about the API.
    needed = request.app[ROLES].get(match.route, wire.READER if match.http_exception is not None else wire.ADMIN)
    if needed == wire.OPEN:
        return await handler(request)
    given = request.headers.get(wire.AUTHORIZATION, "")
    if not given.startswith("Bearer "):
        raise Unauthorized("this request needs a cluster token: send `Authorization: Bearer TOKEN` "
                           "(cachefs clients read it from CACHEFS_TOKEN or the file `cachefs up` writes)")
    sent = given[7:].strip().encode()
    reader, admin = request.app[TOKENS]
    is_admin = hmac.compare_digest(sent, admin)
    if not (is_admin or hmac.compare_digest(sent, reader)):
        raise Unauthorized("wrong token: it is neither this cluster's reader token nor its admin token")
    if needed == wire.ADMIN and not is_admin:
        raise Forbidden(f"{request.method} {request.path} "
                        "needs the admin token; the reader token opens blocks, manifests and listings only. "
                        "Use the admin token (CACHEFS_ADMIN_TOKEN, --admin-token, or admin_token in the file "
                        "`cachefs up` writes)", needs=wire.ADMIN)
    return await handler(request)


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not wire.DATASET_NAME_RE.match(name):
        raise BadRequest(f"{name!r} is not a dataset name: use lowercase letters, digits, '.', '_' and '-' "
                         "(at most 63 characters)")
    return name


# -- cluster -----------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return json_response({"status": "ok", "node": node.node_id, "epoch": node.ring.epoch})


async def ring(request: web.Request) -> web.Response:
    return json_response(request.app[NODE].ring.to_json())


async def metrics(request: web.Request) -> web.Response:
    node = request.app[NODE]
    tiers = {"memory": node.memory} | ({"disk": node.disk} if node.disk is not None else {})
    node.metrics.tiers({t: s.used for t, s in tiers.items()}, {t: s.budget for t, s in tiers.items()})
    return web.Response(body=node.metrics.render(), content_type="text/plain")


# -- datasets ----------------------------------------------------------------------------
def admin_handler(call: wire.AdminCall) -> Handler:
    """The handler of one admin call: parameters and body in, the coordinator's answer out."""
    async def handle(request: web.Request) -> web.Response:
        args: list[Any] = [_name(request) if p == "name" else request.match_info[p] for p in call.params]
        if call.body:
            try:
                raw = await request.read()
                args.append(json.loads(raw) if raw.strip() else {})  # no body: no options
            except ValueError as e:
                raise BadRequest(f"the body is not JSON: {e}") from e
            if not isinstance(args[-1], dict):
                raise BadRequest(f"the body of {call.method} {call.route} must be a JSON object")
        answer = await request.app[ADMIN].call(call.name, *args)
        return json_response({call.wrap: answer} if call.wrap else answer, status=call.status)

    handle.__name__ = call.name
    return handle


def _snapshot_asked(request: web.Request) -> str | None:
    """`?snapshot=ID`: a reader pinned to that snapshot (`cachefs://name@ID`); None: the current one."""
    snapshot = request.query.get("snapshot")
    if snapshot is not None and not wire.SNAPSHOT_ID_RE.match(snapshot):
        raise BadRequest(f"{snapshot[:80]!r} is not a snapshot id (hex digits, as `cachefs dataset ls` shows them)")
    return snapshot


async def get_dataset(request: web.Request) -> web.Response:
    state = await request.app[NODE].dataset(_name(request), _snapshot_asked(request))
    return json_response(state.info.to_json())


async def manifest(request: web.Request) -> web.Response:
    """The snapshot's manifest; `?lease=1` (what readers send): keep that snapshot readable
    for the dataset's lease even once a refresh replaces it (server/leases.py)."""
    node = request.app[NODE]
    state = await node.dataset(_name(request), _snapshot_asked(request))
    if request.query.get("lease") == "1":
        await node.lease(state.info.name, state.info.snapshot)
    versions = request.query.get("versions", "1") != "0"  # readers ask for ?versions=0: a third smaller
    return web.Response(body=state.manifest_ipc if versions else state.reader_ipc, content_type=wire.ARROW_STREAM,
                        headers={wire.SNAPSHOT_HEADER: state.info.snapshot})


# -- blocks ------------------------------------------------------------------------------
def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{what} must be an integer, not {value!r}") from None


def _epoch(request: web.Request) -> int | None:
    value = request.headers.get(wire.EPOCH_HEADER)
    return None if value is None else _int(value, wire.EPOCH_HEADER)


async def block(request: web.Request) -> web.StreamResponse:
    """GET one block of a file (?path=&index=) or one pack (?pack=), whole or a byte range."""
    node = request.app[NODE]
    name, q = _name(request), request.query
    if "snapshot" not in q or not ("pack" in q or ("path" in q and "index" in q)):
        raise BadRequest("missing query parameter(s): a block is named by snapshot, path and index "
                         "(or snapshot and pack)")
    epoch = _epoch(request)
    cached = q.get(CACHED_ONLY) == "1"  # a peer asking for a unit that moved (server/peers.py)
    if "pack" in q:
        read_it = lambda: node.read_pack(name, q["snapshot"], _int(q["pack"], "pack"), epoch, cached)  # noqa: E731
    else:
        index = _int(q["index"], "index")
        if index < 0:
            raise RangeNotSatisfiable(f"block index {index} is negative")
        read_it = lambda: node.read_block(name, q["snapshot"], q["path"], index, epoch, cached)  # noqa: E731
    read = await read_it()
    try:
        return await _send_block(request, read)
    except FileNotFoundError:  # evicted between lookup and open: read it again (now a miss)
        return await _send_block(request, await read_it())


def _byte_range(request: web.Request, size: int) -> tuple[int, int]:
    """The part of a block of `size` bytes that is asked for: ?start=&end=, or a Range header."""
    q = request.query
    if "start" in q or "end" in q:
        start, stop = _int(q.get("start", "0"), "start"), _int(q.get("end", str(size)), "end")
        if not 0 <= start <= stop <= size:
            raise RangeNotSatisfiable(f"range [{start}, {stop}) is outside the block of {size} bytes")
        return start, stop
    try:
        rng = request.http_range
    except ValueError as e:
        raise BadRequest(f"malformed Range header: {e}") from e
    start, stop = rng.start, rng.stop
    if start is None and stop is None:
        return 0, size
    if start is not None and start < 0:  # suffix range: the last -start bytes
        start, stop = max(0, size + start), size
    start = start or 0
    stop = size if stop is None else min(stop, size)
    if start >= size and size > 0 or start > stop:
        raise RangeNotSatisfiable(f"range {start}-{stop} is outside the block of {size} bytes")
    return start, stop


async def _send_block(request: web.Request, read: BlockRead) -> web.StreamResponse:
    size = read.end - read.start  # a packed file's block is its range of the pack
    start, stop = _byte_range(request, size)
    partial = (start, stop) != (0, size)
    lo, hi = read.start + start, read.start + stop
    whole = (lo, hi) == (0, read.block.size)
    body: memoryview | bytes | None = None
    if read.data is not None:
        body = memoryview(read.data)[lo:hi]
    elif not whole:  # a range of a disk block: its digest needs its bytes
        (body,) = await asyncio.to_thread(read_ranges, [(read.block.path, lo, hi)])
    digest = read.block.digest if whole else xxhash.xxh3_64_hexdigest(body)  # type: ignore[arg-type]
    resp = web.StreamResponse(status=206 if partial else 200, headers={
        wire.DIGEST_HEADER: digest,
        wire.SOURCE_HEADER: read.source,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    })
    if partial:
        resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    resp.content_length = hi - lo
    if body is not None:
        await resp.prepare(request)
        for off in range(0, len(body), CHUNK):
            await resp.write(body[off:off + CHUNK])
    else:
        fd = os.open(read.block.path, os.O_RDONLY)  # local disk: microseconds, no thread hop needed
        with os.fdopen(fd, "rb") as f:
            await resp.prepare(request)
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("client went away")
            await asyncio.get_running_loop().sendfile(transport, f, lo, hi - lo)
    await resp.write_eof()
    request.app[NODE].metrics.served(read.block.dataset, hi - lo)
    return resp


def _wants(doc: Any) -> tuple[str, list[tuple]]:
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


async def read_many(request: web.Request) -> web.StreamResponse:
    """POST a batch of byte ranges; the answer streams one frame per item (wire.FRAME)."""
    name = _name(request)
    try:
        doc = json.loads(await request.read())
    except ValueError as e:
        raise BadRequest(f"the body is not JSON: {e}") from e
    snapshot, wants = _wants(doc)
    pieces = await request.app[NODE].read_ranges(name, snapshot, wants, _epoch(request))
    total = sum(wire.FRAME.size + len(p.payload) for p in pieces)
    if total <= COALESCE:  # one buffer, sent with the headers in one write: one wake-up of the reader
        parts: list[bytes | memoryview] = []
        for i, p in enumerate(pieces):
            parts += (wire.FRAME.pack(p.status, 0, i, len(p.payload), p.digest), p.payload)
        return web.Response(body=b"".join(parts), headers={"Content-Type": wire.FRAMES})
    resp = web.StreamResponse(status=200, headers={"Content-Type": wire.FRAMES})
    resp.content_length = total
    await resp.prepare(request)
    small: list[bytes | memoryview] = []  # frame headers and small payloads go out together
    size = 0
    for i, p in enumerate(pieces):
        small.append(wire.FRAME.pack(p.status, 0, i, len(p.payload), p.digest))
        big = len(p.payload) >= COALESCE // 4
        if not big:
            small.append(p.payload)
        size += wire.FRAME.size + (0 if big else len(p.payload))
        if big or size >= COALESCE:
            await resp.write(b"".join(small))
            small, size = [], 0
        if big:  # a large payload leaves as the view it is, no copy
            await resp.write(p.payload)
    if small:
        await resp.write(b"".join(small))
    await resp.write_eof()
    return resp


def make_app(node: CacheNode, admin: Admin, token: str, admin_token: str) -> web.Application:
    """The app of one node: `token` is the reader token, `admin_token` the admin one."""
    if not token or not admin_token:
        raise ValueError("a cache node needs a reader token and an admin token; unauthenticated clusters "
                         "are not supported")
    if hmac.compare_digest(token.encode(), admin_token.encode()):
        raise ValueError("the admin token must differ from the reader token, or readers could administer")
    app = web.Application(middlewares=[errors_middleware, auth_middleware], client_max_size=16 * 1024**2)
    app[NODE] = node
    app[ADMIN] = admin
    app[TOKENS] = (token.encode(), admin_token.encode())
    app[ROLES] = {}
    routes = [  # (method, route, handler, who may call it): docs/api.md is this table in prose
        ("POST", wire.READ, read_many, wire.READER),  # first: aiohttp tries routes in order, and this is the hot one
        ("GET", wire.BLOCK, block, wire.READER),
        ("GET", wire.HEALTH, health, wire.OPEN),  # kubelet probes carry no token
        ("GET", wire.RING, ring, wire.READER),
        ("GET", wire.METRICS, metrics, wire.READER),
        ("GET", wire.DATASET, get_dataset, wire.READER),  # the node's own view of the dataset
        ("GET", wire.DATASET_MANIFEST, manifest, wire.READER),
        *((c.method, c.route, admin_handler(c), c.role) for c in wire.ADMIN_CALLS),  # relayed to the coordinator
    ]
    for method, path, handler, role in routes:
        app[ROLES][app.router.add_route(method, path, handler)] = role
    return app


__all__ = ["make_app", "Admin", "NotFound"]
