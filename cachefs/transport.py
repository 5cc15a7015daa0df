"""The one place a client talks HTTP: session, auth, timeouts, and error translation.

Every network call of the client (filesystem, admin, CLI) goes through `Transport`.
Errors are translated once, here: a JSON error body becomes the exception its code
names (cachefs/errors.py); a refused or timed-out connection becomes NodeUnavailable.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Mapping

import aiohttp

from cachefs import wire
from cachefs.config import ClientConfig
from cachefs.errors import CachefsError, IntegrityError, NodeUnavailable, from_wire


class Transport:
    """An aiohttp session bound to the loop it was first used on."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout,
                                              sock_connect=config.connect_timeout, sock_read=config.read_timeout)

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, keepalive_timeout=60,
                                             enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=False,
                headers=wire.bearer(self.config.token) if self.config.token else {},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    @staticmethod
    async def _raise_for(resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        body = await resp.read()
        try:
            doc = json.loads(body)
            code, message = doc.pop("error"), doc.pop("message")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CachefsError(f"HTTP {resp.status} from {resp.url}: {body[:300]!r}") from None
        raise from_wire(code, message, **doc)

    async def request(self, method: str, url: str, *, json_body: Any = None,
                      params: Mapping[str, str] | None = None) -> tuple[bytes, Mapping[str, str]]:
        """One request; answers (body, headers) or raises the error the server meant."""
        session = await self.session()
        try:
            async with session.request(method, url, json=json_body, params=params) as resp:
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

    async def read_block(self, base: str, name: str, params: Mapping[str, str], epoch: int,
                         out: memoryview) -> str:
        """GET one whole block into `out` (its exact length); returns the server's digest.

        Reading with iter_any into a preallocated buffer keeps to one copy per byte: this
        is the loop that has to run at loopback speed.
        """
        session = await self.session()
        url = base + wire.route(wire.BLOCK, name=name)
        try:
            async with session.get(url, params=params, headers={wire.EPOCH_HEADER: str(epoch)}) as resp:
                await self._raise_for(resp)
                pos = 0
                async for chunk in resp.content.iter_any():
                    n = len(chunk)
                    if pos + n > len(out):
                        raise IntegrityError(f"{url} sent more than the {len(out)} bytes of the block")
                    out[pos:pos + n] = chunk
                    pos += n
                if pos != len(out):
                    raise IntegrityError(f"{url} sent {pos} of the block's {len(out)} bytes")
                return resp.headers.get(wire.DIGEST_HEADER, "")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
            raise NodeUnavailable(f"cannot read a block from {base}: {type(e).__name__}: {e}") from e
