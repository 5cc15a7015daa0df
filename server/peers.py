"""Fetching a unit from the node that held it under an earlier ring (node to node).

When the ring changes (a node joins, drains, restarts), some units get a new owner. The
new owner asks the previous owner(s) before the origin: over the nodes' own data route
(GET wire.BLOCK) with the reader token, and `cached=1`, so that a previous owner that
does not hold the unit says 404 instead of reading the origin itself. The bytes are
checked against the digest the previous owner sends. Any failure (a dead peer, a
timeout, a 404, a wrong digest) is "not there": the caller goes on to the next peer and
then the origin, so a peer can cost a short delay but never a failed read.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Sequence

import aiohttp
import xxhash

from cachefs.common import wire
from cachefs.common.tls import client_context

log = logging.getLogger(__name__)

CACHED_ONLY = "cached"  # query parameter of wire.BLOCK: "1" = answer from the tiers or 404, never the origin


@dataclass(frozen=True)
class PeerConfig:
    """How a node talks to its peers. Short timeouts on purpose: a dead previous owner
    should cost well under a second before the origin is asked."""

    token: str
    connect_timeout: float = 1.0
    read_timeout: float = 30.0
    tls_ca: str = ""  # PEM the peers' certificates chain to (the nodes' own cert when self-signed)


@dataclass(frozen=True)
class UnitName:
    """What the data route needs to name a unit: a pack, or (path, index) of a file block."""

    dataset: str
    snapshot: str
    pack: int = -1
    path: str = ""
    index: int = 0

    def query(self) -> dict[str, str]:
        q = {"snapshot": self.snapshot, CACHED_ONLY: "1"}
        if self.pack >= 0:
            q["pack"] = str(self.pack)
        else:
            q.update(path=self.path, index=str(self.index))
        return q


class PeerLoader:
    """The `server.node.PreviousOwners` seam, over HTTP. One session per node, opened lazily
    on the node's loop and closed with it."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self.fetched_bytes = 0
        self.misses = 0  # asked a peer that did not have it (or could not answer)

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.config.tls_ca:
            return None
        ctx = client_context(self.config.tls_ca)
        ctx.check_hostname = False  # peers are reached by pod IP, which no certificate names; the chain is checked
        return ctx

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout,
                                            sock_read=self.config.read_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout, headers=wire.bearer(self.config.token),
                                                  connector=aiohttp.TCPConnector(ssl=self._ssl() or True))
        return self._session

    async def fetch(self, name: UnitName, urls: Sequence[str]) -> bytes | None:
        """The unit's bytes from the first peer in `urls` that holds it, or None."""
        for url in urls:
            data = await self._one(url, name)
            if data is not None:
                self.fetched_bytes += len(data)
                return data
            self.misses += 1
        return None

    async def _one(self, url: str, name: UnitName) -> bytes | None:
        target = url.rstrip("/") + wire.route(wire.BLOCK, name=name.dataset)
        try:
            async with self._open().get(target, params=name.query()) as resp:
                if resp.status != 200:
                    return None
                data = await resp.read()
                if xxhash.xxh3_64_hexdigest(data) != resp.headers.get(wire.DIGEST_HEADER):
                    log.warning("peer %s sent a block of %s whose digest does not match; ignored", url, name.dataset)
                    return None
                return data
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            log.info("previous owner %s did not answer (%s): %s", url, type(e).__name__, e)
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
