"""One port for a node's HTTP: the lean data protocol first, aiohttp for the rest.

Every accepted connection starts with `DataProtocol` (server/dataproto.py); one that
asks for another route is handed to the aiohttp app's own protocol with the bytes it
sent. So clients, `status`, the chart's Service and its NetworkPolicies know one port.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from typing import Any

from aiohttp import web

from server.data_routes import DataRoutes
from server.dataproto import DataProtocol
from server.http_app import Admin, make_app
from server.node import CacheNode


class Listener:
    """A node's HTTP server: `start` listens, `port` is where, `close` stops every connection."""

    def __init__(self, node: CacheNode, admin: Admin, token: str, admin_token: str) -> None:
        self.runner = web.AppRunner(make_app(node, admin, token, admin_token), access_log=None,
                                    handle_signals=False)
        self.routes = DataRoutes(node, token, admin_token)
        self.server: asyncio.base_events.Server | None = None
        self._lean: weakref.WeakSet[DataProtocol] = weakref.WeakSet()

    def _protocol(self) -> DataProtocol:
        proto = DataProtocol(self.routes, self.runner.server)  # type: ignore[arg-type]
        self._lean.add(proto)
        return proto

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                    backlog: int = 1024) -> int:
        if self.runner.server is None:
            await self.runner.setup()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, host or None, port, ssl=ssl_context,
                                               backlog=backlog, reuse_address=True)
        return self.port

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.sockets
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for proto in list(self._lean):
            if proto.transport is not None and not proto.transport.is_closing():
                proto.transport.abort()
        await self.runner.cleanup()  # aiohttp's connections, and the app's cleanup


async def listen(node: CacheNode, admin: Any, token: str, admin_token: str, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None) -> Listener:
    """A started listener (tests and the node actor)."""
    listener = Listener(node, admin, token, admin_token)
    await listener.start(host, port, ssl_context)
    return listener
