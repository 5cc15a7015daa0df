"""The block fetch at loopback speed: batched reads over an asyncio.BufferedProtocol.

One POST of wire.READ asks a node for many byte ranges; the answer is one frame per item
(wire.FRAME). The caller says up front where each item's bytes go (a slice of the bytes
object `cat` returns, a block buffer, ...), and the parser (`FrameReader`) hands the
kernel exactly that place: each byte is copied once, from the socket into its
destination, with no chunk objects and no joins. Every item's digest is checked as it
lands. `request_head` is the one place the request itself is written.

Only what the data path needs: POST, Content-Length bodies, keep-alive. Every other
request (metadata, admin) goes through aiohttp in `Transport`.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections import defaultdict
from typing import Callable, Sequence
from urllib.parse import urlsplit

import xxhash

from cachefs.common import wire
from cachefs.common.errors import CachefsError, IntegrityError, NodeUnavailable, from_body

HEADER_LIMIT = 64 * 1024
ERROR_LIMIT = 1024 * 1024  # an error body larger than this is not one of ours

_HEAD, _FRAME_HEAD, _PAYLOAD, _ERROR_BODY, _DONE = range(5)


Outcome = list[CachefsError | None]  # per item: its error, or None when its bytes are in place


class FrameReader:
    """The answer to one batch read, parsed as it arrives: `buffer()` says where the next
    bytes go, `received(n)` what came. No I/O of its own: an asyncio protocol drives it
    (FrameConnection), and so does a blocking socket (cachefs/direct.py)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.reusable = True
        self.outcome: Outcome | CachefsError | None = None  # set when the answer is complete (or broken)
        self.on_done: Callable[[], None] | None = None
        self._head = bytearray(HEADER_LIMIT)
        self._head_len = 0
        self._frame = bytearray(wire.FRAME.size)
        self._state = _DONE
        self._dests: Sequence[memoryview] = ()
        self._results: Outcome = []
        self._item = 0  # the frame being received
        self._view: memoryview = memoryview(self._frame)  # where the current receive lands
        self._got = 0
        self._status = 0
        self._digest = 0
        self._left = 0  # body bytes still expected

    def start(self, dests: Sequence[memoryview]) -> None:
        """Expect the answer to a request for len(dests) items, item i landing in dests[i]."""
        self._head_len, self._item, self._results, self._dests = 0, 0, [], dests
        self.outcome, self._state = None, _HEAD

    def buffer(self) -> memoryview:
        if self._state == _HEAD:
            return memoryview(self._head)[self._head_len:]
        if self._state == _DONE:  # bytes nobody asked for: take them, then drop the connection
            self._head_len = 0
            return memoryview(self._head)
        return self._view[self._got:]

    def received(self, nbytes: int) -> None:
        if self._state == _HEAD:
            self._head_len += nbytes
            self._on_head()
        elif self._state == _DONE:
            self.fail(IntegrityError(f"{self.base} sent bytes after its response"))
        else:
            self._got += nbytes
            self._left -= nbytes
            if self._got == len(self._view):
                self._on_filled()

    def fail(self, exc: CachefsError) -> None:
        self.reusable = False
        if self._state != _DONE or self.outcome is None:
            self._finish(exc)

    # -- the state machine ---------------------------------------------------------------
    def _on_head(self) -> None:
        end = self._head.find(b"\r\n\r\n", 0, self._head_len)
        if end < 0:
            if self._head_len >= HEADER_LIMIT:
                self.fail(IntegrityError(f"{self.base} sent response headers larger than 64 KiB"))
            return
        try:
            status, headers = _parse_head(bytes(self._head[:end]))
            length = int(headers["content-length"])
        except (ValueError, KeyError, IndexError) as e:
            self.fail(IntegrityError(f"{self.base} sent a response without a usable Content-Length: {e}"))
            return
        if headers.get("connection", "").lower() == "close":
            self.reusable = False
        self._left = length
        if status != 200 or headers.get("content-type", "") != wire.FRAMES:
            if length > ERROR_LIMIT:
                self.fail(IntegrityError(f"{self.base} answered HTTP {status} with {length} bytes"))
                return
            self._status = status
            self._expect(_ERROR_BODY, memoryview(bytearray(length)))
        else:
            self._expect(_FRAME_HEAD, memoryview(self._frame))
        extra = memoryview(self._head)[end + 4:self._head_len]
        if len(extra) > self._left:
            self.fail(IntegrityError(f"{self.base} sent more than its response's length"))
            return
        self._feed(extra)

    def _feed(self, data: memoryview) -> None:
        """Run bytes that arrived with the head through the state machine (copying them)."""
        while len(data) and self._state not in (_DONE, _HEAD):
            n = min(len(data), len(self._view) - self._got)
            self._view[self._got:self._got + n] = data[:n]
            data = data[n:]
            self._got += n
            self._left -= n
            if self._got == len(self._view):
                self._on_filled()

    def _expect(self, state: int, view: memoryview) -> None:
        self._state, self._view, self._got = state, view, 0
        if len(view) == 0 and state != _FRAME_HEAD:
            self._on_filled()

    def _on_filled(self) -> None:
        if self._state == _ERROR_BODY:
            self._finish(from_body(self._status, bytes(self._view), self.base))
        elif self._state == _FRAME_HEAD:
            if self._item >= len(self._dests):
                self.fail(IntegrityError(f"{self.base} sent more frames than items"))
                return
            status, _, item, length, digest = wire.FRAME.unpack(self._frame)
            if item != self._item:
                self.fail(IntegrityError(f"{self.base} sent frame {item} where {self._item} was due"))
                return
            self._status, self._digest = status, digest
            if status == 200:
                dest = self._dests[item]
                if length != len(dest):
                    self.fail(IntegrityError(f"{self.base} sent {length} bytes for an item of {len(dest)}"))
                    return
                self._expect(_PAYLOAD, dest)
            elif length > ERROR_LIMIT:
                self.fail(IntegrityError(f"{self.base} sent an error of {length} bytes"))
            else:
                self._expect(_PAYLOAD, memoryview(bytearray(length)))
        elif self._state == _PAYLOAD:
            if self._status == 200:
                ok = xxhash.xxh3_64_intdigest(self._view) == self._digest
                self._results.append(None if ok else IntegrityError(
                    f"item {self._item} from {self.base} does not match its digest"))
            else:
                self._results.append(from_body(self._status, bytes(self._view), self.base))
            self._item += 1
            if self._item == len(self._dests):
                if self._left:
                    self.fail(IntegrityError(f"{self.base} sent {self._left} bytes more than its frames"))
                else:
                    self._finish(self._results)
            else:
                self._expect(_FRAME_HEAD, memoryview(self._frame))

    def _finish(self, outcome: Outcome | CachefsError) -> None:
        self._state, self._dests, self.outcome = _DONE, (), outcome
        if self.on_done is not None:
            self.on_done()



class FrameConnection(asyncio.BufferedProtocol):
    """One keep-alive connection carrying one batch request at a time."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(base)
        self._done: asyncio.Future[Outcome] | None = None
        self.reader.on_done = self._resolve

    @property
    def reusable(self) -> bool:
        return self.reader.reusable

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.reader.received(nbytes)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reader.fail(NodeUnavailable(f"{self.base} closed the connection before the response was complete: {exc}"))

    def _resolve(self) -> None:
        done, outcome = self._done, self.reader.outcome
        if not self.reader.reusable and self.transport is not None:
            self.transport.close()
        if done is None or done.done():
            return
        if isinstance(outcome, BaseException):
            done.set_exception(outcome)
        else:
            done.set_result(outcome)  # type: ignore[arg-type]

    async def request(self, raw: bytes, dests: Sequence[memoryview], timeout: float) -> Outcome:
        """Send one request; fill `dests` (one per item); each item's error or None."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        done = self._done = loop.create_future()
        self.reader.start(dests)
        # a timer rather than asyncio.wait_for: no extra task and loop turn per request
        timer = loop.call_later(timeout, self._time_out, done, timeout)
        self.transport.write(raw)
        try:
            return await done
        except BaseException:
            self.reader.reusable = False
            self.transport.close()
            raise
        finally:
            timer.cancel()
            self._done = None

    def _time_out(self, done: asyncio.Future[Outcome], timeout: float) -> None:
        if not done.done():
            done.set_exception(NodeUnavailable(f"{self.base} did not answer within {timeout:.0f} s"))


def address(base: str, context: ssl.SSLContext | None, server_hostname: str | None
            ) -> tuple[str, int, ssl.SSLContext | None, str | None]:
    """Where to connect for a node's URL: (host, port, TLS context, name its certificate is
    checked against); no TLS for http:// (https:// without a context: the system's CAs)."""
    url = urlsplit(base)
    host = url.hostname or "127.0.0.1"
    if url.scheme != "https":
        return host, url.port or 80, None, None
    return host, url.port or 443, context or ssl.create_default_context(), server_hostname or host


def request_head(base: str, name: str, token: str, epoch: int, body: bytes) -> bytes:
    """The whole HTTP request of one batch read (wire.READ), body included."""
    return b"".join((_head_start(base, name, token), b"%d\r\nContent-Length: %d\r\n\r\n" % (epoch, len(body)), body))


def one_item_body(snapshot: str, item: list) -> bytes:
    """`wire.read_body(snapshot, [item])`, formatted without json for a pack range (the
    one-by-one read of a small file: under cProfile, json.dumps cost about as much as
    `plan` or the ring look-up)."""
    if item[0] == wire.ITEM_PACK and snapshot.isalnum() and snapshot.isascii():
        return b'{"snapshot":"%s","items":[["p",%d,%d,%d]]}' % (snapshot.encode(), item[1], item[2], item[3])
    return wire.read_body(snapshot, [item])


@functools.lru_cache(maxsize=256)
def _head_start(base: str, name: str, token: str) -> bytes:
    """What every batch read of `name` from `base` begins with (formatting it cost ~25 µs a read)."""
    return (f"POST {wire.route(wire.READ, name=name)} HTTP/1.1\r\nHost: {urlsplit(base).netloc}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n{wire.EPOCH_HEADER}: ").encode()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


class FrameClient:
    """Keep-alive connections per node, bound to the loop that first uses them."""

    def __init__(self, token: str, connect_timeout: float, read_timeout: float,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None) -> None:
        self.token = token
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl_context = ssl_context  # for https:// bases; None: the system's CAs
        self.server_hostname = server_hostname  # the name certificates are checked against; None: the URL's host
        self._idle: dict[str, list[FrameConnection]] = defaultdict(list)

    async def _connection(self, base: str) -> FrameConnection:
        idle = self._idle[base]
        while idle:
            conn = idle.pop()
            if conn.reusable and conn.transport is not None and not conn.transport.is_closing():
                return conn
        host, port, context, name = address(base, self.ssl_context, self.server_hostname)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: FrameConnection(base), host, port, ssl=context, server_hostname=name),
                self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise NodeUnavailable(f"cannot connect to {base}: {type(e).__name__}: {e}") from e
        return conn

    async def read(self, base: str, name: str, body: bytes, epoch: int,
                   dests: Sequence[memoryview]) -> list[CachefsError | None]:
        """POST one batch to `base`; fills `dests`; per item, its error or None."""
        conn = await self._connection(base)
        try:
            results = await conn.request(request_head(base, name, self.token, epoch, body), dests, self.read_timeout)
        except OSError as e:
            if isinstance(e, CachefsError) and not isinstance(e, NodeUnavailable):
                if conn.reusable:
                    self._idle[base].append(conn)
                raise  # the node's answer for the whole request (epoch, snapshot, token, ...)
            raise NodeUnavailable(f"cannot read from {base}: {e}") from e
        if conn.reusable:
            self._idle[base].append(conn)
        return results

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
