"""The one place a client talks HTTP: session, auth, timeouts, and error translation.

Every network call of the client (filesystem, admin, CLI) goes through `Transport`.
Errors are translated once, here: a JSON error body becomes the exception its code
names (cachefs/common/errors.py); a refused or timed-out connection becomes NodeUnavailable.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Mapping, Sequence

import aiohttp

from cachefs.common import wire
from cachefs.blockproto import FrameClient
from cachefs.config import ClientConfig
from cachefs.common.errors import CachefsError, NodeUnavailable, from_body
from cachefs.common.tls import client_context


class Endpoints:
    """The nodes a client may ask metadata of: configured ones first, then those learned
    from the ring. A node that does not answer goes to the back of the line."""

    def __init__(self, configured: list[str]) -> None:
        self.bases = list(dict.fromkeys(configured))

    def learn(self, urls: list[str]) -> None:
        for url in urls:
            url = url.rstrip("/")
            if url and url not in self.bases:
                self.bases.append(url)

    async def call(self, transport: "Transport", method: str, path: str, body: Any = None,
                   raw: bool = False) -> Any:
        last: NodeUnavailable | None = None
        for base in list(self.bases):
            try:
                if raw:
                    return await transport.request(method, base + path)
                return await transport.json(method, base + path, body)
            except NodeUnavailable as e:
                last = e
                self.bases.remove(base)
                self.bases.append(base)
        raise NodeUnavailable(f"no cache node answers (tried {len(self.bases)}): {last}")


class Transport:
    """An aiohttp session bound to the loop it was first used on."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._frames: FrameClient | None = None
        # https:// nodes: verified against ca_bundle (else the system's CAs), by tls_server_name when set
        self.ssl_context = client_context(config.ca_bundle) if config.ca_bundle else None
        self.server_name = config.tls_server_name or None
        self._timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout,
                                              sock_connect=config.connect_timeout, sock_read=config.read_timeout)

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, keepalive_timeout=60,
                                             enable_cleanup_closed=True, ssl=self.ssl_context or True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=False,
                headers=wire.bearer(self.config.token) if self.config.token else {},
            )
        return self._session

    async def close(self) -> None:
        if self._frames is not None:
            self._frames.close()
            self._frames = None
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    @staticmethod
    async def _raise_for(resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        raise from_body(resp.status, await resp.read(), resp.url)

    async def request(self, method: str, url: str, *, json_body: Any = None,
                      params: Mapping[str, str] | None = None) -> tuple[bytes, Mapping[str, str]]:
        """One request; answers (body, headers) or raises the error the server meant."""
        session = await self.session()
        try:
            async with session.request(method, url, json=json_body, params=params,
                                       server_hostname=self.server_name) as resp:
                await self._raise_for(resp)
                return await resp.read(), resp.headers
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
            raise NodeUnavailable(f"cannot reach {url}: {type(e).__name__}: {e}") from e

    async def json(self, method: str, url: str, json_body: Any = None) -> Any:
        body, _ = await self.request(method, url, json_body=json_body)
        try:
            return json.loads(body)
        except ValueError as e:
            raise CachefsError(f"{url} answered something that is not JSON: {body[:200]!r}") from e

    async def read_frames(self, base: str, name: str, body: bytes, epoch: int,
                          dests: Sequence[memoryview]) -> list[CachefsError | None]:
        """One batch read (wire.READ): fills `dests`; per item, its error or None.

        This is the loop that has to run at loopback speed, so it does not go through
        aiohttp: `FrameClient` has the kernel copy each item straight into its destination.
        """
        if self._frames is None:
            self._frames = FrameClient(self.config.token, self.config.connect_timeout, self.config.read_timeout,
                                       self.ssl_context, self.server_name)
        return await self._frames.read(base, name, body, epoch, dests)
