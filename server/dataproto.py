"""A lean HTTP/1.1 server for the data routes, on asyncio (uvloop where installed).

The web framework cost a node ~115-150 µs of CPU per request; the data routes need only
a fraction of it. Each connection starts here: requests are framed by us (head up to
CRLFCRLF, body by Content-Length), each head parsed by httptools' C parser (llhttp, as
uvicorn uses), and answered in order (pipelining), one at a time. The first request that
is not a data route hands the connection, with the bytes not yet answered, to aiohttp's
own protocol: admin, manifest and metrics routes keep their framework, on the same port.

Memory stays bounded per connection: a head is at most HEAD_LIMIT, a body MAX_BODY; the
next request is not read while one is answered (reading pauses once BUFFER_LIMIT bytes
wait); and answers are written in pieces, each after the socket drained the last.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from http import HTTPStatus
from typing import Callable

import httptools

from server.data_routes import MAX_BODY, Answer, DataRoutes, data_route

log = logging.getLogger(__name__)

HEAD_LIMIT = 64 * 1024  # request line and headers
BUFFER_LIMIT = 256 * 1024  # bytes received ahead of the request being answered before reading pauses
WRITE_PIECE = 1024 * 1024  # large payloads leave in pieces this size, each once the socket drained
HIGH_WATER = 4 * 1024 * 1024  # unsent bytes a connection may hold before it waits for the reader
REQUEST_LINE = re.compile(rb"^[A-Z]{1,16} [\x21-\x7e]+ HTTP/1\.[01]$")
REQUEST_TIMEOUT = 30.0  # a request begun must arrive whole within this many seconds


class _Head:
    """httptools callbacks for one request's head: headers, lowercased."""

    __slots__ = ("headers", "url", "done")

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.url = b""
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.done = True


def _status_line(status: int) -> str:
    try:
        return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
    except ValueError:
        return f"HTTP/1.1 {status} Status\r\n"


class DataProtocol(asyncio.Protocol):
    """One connection: data routes served here, anything else handed to `fallback`."""

    def __init__(self, routes: DataRoutes, fallback: Callable[[], asyncio.Protocol]) -> None:
        self.routes = routes
        self.fallback = fallback
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._busy: asyncio.Task[None] | None = None  # the request being answered
        self._drained: asyncio.Future[None] | None = None  # set while writing is paused
        self._paused_writing = False
        self._paused_reading = False
        self._eof = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._busy is None:
            self._next()
        elif len(self._buf) > BUFFER_LIMIT and not self._paused_reading:
            self._paused_reading = True  # a client pipelining faster than it reads: wait for it
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self._eof = True
        if self._busy is None:
            self._next()
        return True  # keep the transport open to finish an answer; closed by us

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_timer()
        if self._busy is not None:
            self._busy.cancel()  # the client went away mid-answer: stop producing it
        self._wake()

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._wake()

    def _wake(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- framing -------------------------------------------------------------------------
    def _next(self) -> None:
        """Start answering the next whole request in the buffer, if there is one."""
        buf = self._buf
        if self._closed:
            return
        if not buf:
            if self._eof:
                self.transport.close()  # type: ignore[union-attr]
            return
        end = buf.find(b"\r\n\r\n", 0, HEAD_LIMIT + 4)
        if end < 0:
            if len(buf) > HEAD_LIMIT:
                return self._refuse(431, f"the request's line and headers exceed {HEAD_LIMIT // 1024} KiB")
            return self._wait_for_more("its headers")
        line_end = buf.find(b"\r\n")
        line = bytes(buf[:line_end])
        if not REQUEST_LINE.match(line):
            return self._refuse(400, f"malformed request: {line[:80]!r} is not an HTTP/1.1 request line "
                                     "(METHOD TARGET HTTP/1.1)")
        method, _, rest = line.partition(b" ")
        target = rest.rpartition(b" ")[0]
        path, _, query = target.decode("latin-1").partition("?")
        route = data_route(method, path)
        if not route:
            return self._hand_off()
        head = _Head()
        parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(bytes(buf[:end + 4]))
        except httptools.HttpParserError as e:
            return self._refuse(400, f"malformed request: {e}")
        if not head.done:
            return self._refuse(400, "malformed request: its head is incomplete")
        if b"transfer-encoding" in head.headers:
            return self._refuse(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        length = parser.get_method() == b"POST" and int(head.headers.get(b"content-length", b"0") or 0) or 0
        if length > MAX_BODY:
            return self._refuse(413, f"a body of {length} bytes; a batch read is at most {MAX_BODY} bytes")
        if len(buf) < end + 4 + length:
            return self._wait_for_more(f"its body ({len(buf) - end - 4} of the {length} bytes announced)")
        body = bytes(buf[end + 4:end + 4 + length])
        del buf[:end + 4 + length]
        self._cancel_timer()
        keep = parser.should_keep_alive()
        self._busy = asyncio.ensure_future(self._answer(route, path, query, head.headers, body, keep))

    def _wait_for_more(self, what: str) -> None:
        if self._eof:
            return self._refuse(400, f"the connection ended before the request's {what} arrived")
        if self._paused_reading:
            self._paused_reading = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(REQUEST_TIMEOUT, self._refuse, 408,
                                          f"the request did not arrive whole within {REQUEST_TIMEOUT:.0f} s")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request we cannot frame, then close: the stream cannot be trusted after it."""
        self._cancel_timer()
        if self._closed or self.transport is None:
            return
        self._write_answer(Answer.error_status(status, message), keep=False)
        self._buf.clear()
        self.transport.close()
        self._closed = True

    def _hand_off(self) -> None:
        """The rest of this connection goes to aiohttp, starting with the bytes not answered."""
        self._cancel_timer()
        transport, data = self.transport, bytes(self._buf)
        assert transport is not None
        self._buf.clear()
        self._closed = True
        protocol = self.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._paused_reading:
            transport.resume_reading()
        protocol.data_received(data)
        if self._eof:
            protocol.eof_received()

    # -- answering -----------------------------------------------------------------------
    async def _answer(self, route: str, path: str, query: str, headers: dict[bytes, bytes], body: bytes,
                      keep: bool) -> None:
        try:
            answer = await self.routes.handle(route, path, query, headers, body)
            if self._closed:
                return
            if answer.parts and answer.length <= WRITE_PIECE and len(answer.parts) == 1:
                self._write_answer(answer, keep)  # the common small answer: one write, no await
            else:
                await self._write_long(answer, keep)
            if answer.dataset:
                self.routes.node.metrics.served(answer.dataset, answer.length)
        except (ConnectionError, asyncio.CancelledError):
            self._closed = True
            if self.transport is not None:
                self.transport.abort()
            return
        finally:
            self._busy = None
        if not keep:
            self.transport.close()  # type: ignore[union-attr]
            self._closed = True
        elif self._paused_reading and len(self._buf) < BUFFER_LIMIT:
            self._paused_reading = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        self._next()

    @staticmethod
    def _head(answer: Answer, keep: bool) -> bytes:
        lines = [_status_line(answer.status)]
        lines += [f"{k}: {v}\r\n" for k, v in answer.headers]
        lines.append(f"Content-Length: {answer.length}\r\n")
        if not keep:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _write_answer(self, answer: Answer, keep: bool) -> None:
        self.transport.write(self._head(answer, keep) + b"".join(answer.parts))  # type: ignore[union-attr]

    async def _drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("the client went away")
        if self._paused_writing:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
            self._drained = None
            if self._closed:
                raise ConnectionResetError("the client went away")

    async def _write_long(self, answer: Answer, keep: bool) -> None:
        """Headers, then the parts in pieces (large views unjoined), waiting on a slow reader."""
        transport = self.transport
        assert transport is not None
        transport.write(self._head(answer, keep))
        small: list[bytes | memoryview] = []
        size = 0
        for part in answer.parts:
            if len(part) < WRITE_PIECE // 4:
                small.append(part)
                size += len(part)
                if size < WRITE_PIECE:
                    continue
                part, small, size = b"".join(small), [], 0
            elif small:
                transport.write(b"".join(small))
                small, size = [], 0
            view = memoryview(part)
            for off in range(0, len(view), WRITE_PIECE):
                await self._drain()
                transport.write(view[off:off + WRITE_PIECE])
        if small:
            await self._drain()
            transport.write(b"".join(small))
        if answer.file:
            await self._send_file(answer.file, answer.offset, answer.length)

    async def _send_file(self, path: str, offset: int, count: int) -> None:
        """A disk block's range: sendfile where the loop can, else read in pieces (page cache)."""
        transport = self.transport
        assert transport is not None
        with open(path, "rb") as f:  # local disk: microseconds, no thread hop needed
            try:
                await self._drain()
                await asyncio.get_running_loop().sendfile(transport, f, offset, count)
                return
            except (NotImplementedError, RuntimeError):
                pass  # uvloop, or a TLS transport without the fallback: copy it ourselves
            fd = f.fileno()
            end = offset + count
            while offset < end:
                data = os.pread(fd, min(WRITE_PIECE, end - offset), offset)
                if not data:
                    raise ConnectionResetError(f"{path} shrank while it was sent")
                await self._drain()
                transport.write(data)
                offset += len(data)
