"""The aiohttp app of a cache node: routes in one place, thin handlers.

Handlers parse, call the domain (`CacheNode`, an `Admin` for the registry), and map
domain errors to statuses in one middleware. The data routes (batched read, block GET)
are answered by `server/data_routes.py` and normally never reach aiohttp: the lean
protocol in `server/dataproto.py` serves them, and hands aiohttp only the connections
that begin with another route (`serve`, below, listens for both on one port).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any, Awaitable, Callable, Protocol

from aiohttp import web

from cachefs.common import wire
from cachefs.common.errors import BadRequest, CachefsError, Forbidden, NotFound, Unauthorized
from server.data_routes import DataRoutes
from server.node import CacheNode

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024  # 1 MiB slices keep the socket full without copying the block


class Admin(Protocol):
    """Where the admin API's calls go (wire.ADMIN_CALLS): the coordinator, reached through
    the node's link. Each call takes the route's parameters, then the JSON body if any,
    and answers JSON-able values."""

    async def call(self, method: str, *args: Any) -> Any: ...


NODE = web.AppKey("node", CacheNode)
ADMIN = web.AppKey("admin", object)
TOKENS = web.AppKey("tokens", tuple)  # (reader, admin), as bytes
ROLES = web.AppKey("roles", dict)  # route → wire.OPEN | READER | ADMIN, filled by make_app
ROUTES = web.AppKey("routes", DataRoutes)

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


# -- data routes (served by server/dataproto.py; here for a connection aiohttp already holds) --
def data_handler(route: str) -> Handler:
    """The aiohttp face of a data route: the same `DataRoutes` answer, sent by aiohttp."""
    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k.lower().encode("latin-1"): v.encode("latin-1") for k, v in request.headers.items()}
        body = await request.read() if request.method == "POST" else b""
        answer = await request.app[ROUTES].handle(route, request.path, request.query_string, headers, body)
        resp = web.StreamResponse(status=answer.status, headers=dict(answer.headers))
        resp.content_length = answer.length
        await resp.prepare(request)
        for part in answer.parts:
            for off in range(0, len(part), CHUNK):
                await resp.write(memoryview(part)[off:off + CHUNK])
        if answer.file:
            with open(answer.file, "rb") as f:  # local disk: microseconds, no thread hop needed
                transport = request.transport
                if transport is None:
                    raise ConnectionResetError("client went away")
                await asyncio.get_running_loop().sendfile(transport, f, answer.offset, answer.length)
        await resp.write_eof()
        if answer.dataset:
            request.app[NODE].metrics.served(answer.dataset, answer.length)
        return resp

    handle.__name__ = route
    return handle


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
    app[ROUTES] = DataRoutes(node, token, admin_token)
    routes = [  # (method, route, handler, who may call it): docs/api.md is this table in prose
        ("POST", wire.READ, data_handler("read"), wire.READER),  # served by server/dataproto.py unless a
        ("GET", wire.BLOCK, data_handler("block"), wire.READER),  # connection began with another route
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
