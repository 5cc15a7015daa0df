"""The block fetch at loopback speed: HTTP/1.1 GETs over an asyncio.BufferedProtocol.

The kernel copies a block's bytes straight into the one buffer that will hold it
(`get_buffer` hands out the unfilled rest of it): no intermediate chunk objects, no
joins. Only what the block path needs: GET, Content-Length bodies, keep-alive. Every
other request (metadata, admin) goes through aiohttp in `Transport`.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from ssl import SSLContext
from typing import Mapping
from urllib.parse import urlencode, urlsplit

from cachefs.errors import IntegrityError, NodeUnavailable, from_body

HEADER_LIMIT = 64 * 1024


class BufferPool:
    """Block-sized buffers, reused: a fresh 8 MiB allocation costs zeroing and page faults
    that cost more than receiving the bytes. Safe across threads (deque ops are atomic).

    A buffer goes back with `give` only when nothing refers to it any more: every reader
    copies out what it needs first.
    """

    def __init__(self, size: int, keep: int = 32) -> None:
        self.size = size
        self._free: deque[bytearray] = deque(maxlen=keep)

    def take(self, length: int) -> memoryview:
        """A view of exactly `length` bytes (its `.obj` is what `give` takes back)."""
        if length > self.size:
            return memoryview(bytearray(length))
        try:
            buf = self._free.pop()
        except IndexError:
            buf = bytearray(self.size)
        return memoryview(buf)[:length]

    def give(self, view: memoryview | bytes | bytearray) -> None:
        buf = view.obj if isinstance(view, memoryview) else None
        if isinstance(buf, bytearray) and len(buf) == self.size:
            view.release()  # type: ignore[union-attr]
            self._free.append(buf)


class _Response:
    def __init__(self, status: int, headers: dict[str, str], body: memoryview) -> None:
        self.status, self.headers, self.body = status, headers, body


class BlockConnection(asyncio.BufferedProtocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self._head = bytearray(HEADER_LIMIT)
        self._head_len = 0
        self._view: memoryview | None = None
        self._got = 0
        self._status = 0
        self._headers: dict[str, str] = {}
        self._done: asyncio.Future[_Response] | None = None
        self.reusable = True

    # -- asyncio callbacks ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._view is not None:
            return self._view[self._got:]
        return memoryview(self._head)[self._head_len:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._view is not None:
            self._got += nbytes
            self._maybe_done()
            return
        self._head_len += nbytes
        end = self._head.find(b"\r\n\r\n", 0, self._head_len)
        if end < 0:
            if self._head_len >= HEADER_LIMIT:
                self._fail(IntegrityError("response headers larger than 64 KiB"))
            return
        try:
            self._parse_head(bytes(self._head[:end]))
            length = int(self._headers["content-length"])
        except (ValueError, KeyError) as e:
            self._fail(IntegrityError(f"a response without a usable Content-Length: {e}"))
            return
        self._view = self.pool.take(length)
        extra = self._head_len - (end + 4)
        if extra > length:
            self._fail(IntegrityError("the server sent more than the response's length"))
            return
        self._view[:extra] = memoryview(self._head)[end + 4:self._head_len]
        self._got = extra
        self._maybe_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._fail(NodeUnavailable(f"connection closed before the response was complete: {exc}"))

    # -- helpers ------------------------------------------------------------------------
    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self._status = int(lines[0].split(" ", 2)[1])
        self._headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self._headers[name.strip().lower()] = value.strip()
        if self._headers.get("connection", "").lower() == "close":
            self.reusable = False

    def _maybe_done(self) -> None:
        assert self._view is not None
        if self._got >= len(self._view) and self._done is not None and not self._done.done():
            body, self._view, self._head_len = self._view, None, 0  # the buffer is the caller's now
            self._done.set_result(_Response(self._status, self._headers, body))

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    async def request(self, raw: bytes, timeout: float) -> _Response:
        assert self.transport is not None
        self._head_len, self._view, self._got = 0, None, 0
        self._done = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        try:
            return await asyncio.wait_for(self._done, timeout)
        except BaseException:
            self.reusable = False
            self.transport.close()
            raise


class BlockClient:
    """Keep-alive connections per node, bound to the loop that first uses them."""

    def __init__(self, token: str, connect_timeout: float, read_timeout: float, pool: BufferPool,
                 ssl: SSLContext | None = None, server_hostname: str | None = None) -> None:
        self.token = token
        self.ssl = ssl  # for https:// bases; None: the system's CAs
        self.server_hostname = server_hostname  # the name certificates are checked against; None: the URL's host
        self.pool = pool
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple[str, int], list[BlockConnection]] = defaultdict(list)

    async def _connection(self, host: str, port: int, tls: bool = False) -> BlockConnection:
        idle = self._idle[(host, port)]
        while idle:
            conn = idle.pop()
            if conn.reusable and conn.transport is not None and not conn.transport.is_closing():
                return conn
        loop = asyncio.get_running_loop()
        try:
            tls_args = {"ssl": self.ssl or True, "server_hostname": self.server_hostname or host} if tls else {}
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: BlockConnection(self.pool), host, port, **tls_args),
                self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise NodeUnavailable(f"cannot connect to {host}:{port}: {type(e).__name__}: {e}") from e
        return conn

    async def get(self, base: str, path: str, params: Mapping[str, str],
                  headers: Mapping[str, str]) -> tuple[dict[str, str], memoryview]:
        """GET base+path?params; the body of a 2xx, or the error the server meant."""
        url = urlsplit(base)
        tls = url.scheme == "https"
        host, port = url.hostname or "127.0.0.1", url.port or (443 if tls else 80)
        target = f"{path}?{urlencode(params)}"
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", f"Authorization: Bearer {self.token}",
                 *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        conn = await self._connection(host, port, tls)
        try:
            resp = await conn.request("\r\n".join(lines).encode(), self.read_timeout)
        except asyncio.TimeoutError as e:
            raise NodeUnavailable(f"{base} did not answer within {self.read_timeout:.0f} s") from e
        except OSError as e:
            raise NodeUnavailable(f"cannot read from {base}: {e}") from e
        if conn.reusable:
            self._idle[(host, port)].append(conn)
        if resp.status >= 400:
            body = bytes(resp.body)
            self.pool.give(resp.body)
            raise from_body(resp.status, body, base)
        return resp.headers, resp.body

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
