"""Reads for synchronous callers, on the caller's own thread.

A sync call (`fs.cat_file(path)`, `f.read()` of an open file) would otherwise hand its
read to the filesystem's event-loop thread and wait to be handed the answer back: two
thread wake-ups per read, which on a busy host cost more than reading a 110 KB file. Here
a read that one node can answer goes straight over a blocking keep-alive socket of the
calling thread, parsed by the same `FrameReader` the event loop uses.

It is a fast path only: whenever it cannot tell (no ring or manifest yet, a read spanning
nodes, a node down, any error at all) it answers None, and the caller goes the usual way
(BlockReader on the event loop), which routes, retries, falls over and reports errors.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from typing import Sequence

import xxhash

from cachefs.blockproto import HEADER_LIMIT, FrameReader, Outcome, address, request_head
from cachefs.common import wire
from cachefs.common.errors import NodeUnavailable

_FRAME = wire.FRAME.size
_HEAD_FIRST = 1024  # the first receive of an answer: its head, its frame, a little payload
_FRAMES = b"\r\ncontent-type: " + wire.FRAMES.encode() + b"\r\n"
_LENGTH = b"\r\ncontent-length: "
_CLOSE = b"\r\nconnection: close"


class _Unanswered(NodeUnavailable):
    """A connection kept alive from an earlier read gave no byte of this answer: the node
    closed it meanwhile (idle, restarted). Worth one more try on a new connection."""


class DirectReads:
    """Per-thread blocking connections to cache nodes (one per node a thread has read from)."""

    def __init__(self, token: str, connect_timeout: float, read_timeout: float,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None) -> None:
        self.token = token
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self._local = threading.local()
        self._pid = os.getpid()

    def _connections(self) -> dict[str, tuple[socket.socket, FrameReader]]:
        if os.getpid() != self._pid:  # a forked child: the parent's sockets are not its own
            self._local, self._pid = threading.local(), os.getpid()
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def _connect(self, base: str) -> socket.socket:
        host, port, context, name = address(base, self.ssl_context, self.server_hostname)
        sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=name)
        sock.settimeout(self.read_timeout)
        return sock

    def read(self, base: str, name: str, body: bytes, epoch: int, dests: Sequence[memoryview]) -> Outcome | None:
        """Each item's outcome, or None when this path cannot tell (go the usual way).
        Raises NodeUnavailable when the node did not answer, so the caller can mark it down."""
        try:
            return self._read(base, name, body, epoch, dests)
        except _Unanswered:  # a kept-alive connection the node had closed meanwhile: once more, anew
            return self._read(base, name, body, epoch, dests)

    def _read(self, base: str, name: str, body: bytes, epoch: int, dests: Sequence[memoryview]) -> Outcome | None:
        conns = self._connections()
        conn = conns.get(base)
        reused, answered = conn is not None and len(conn) == 2, False
        try:
            if not reused:
                if conn is not None:
                    self.drop(base)
                conn = conns[base] = (self._connect(base), FrameReader(base))
            sock, reader = conn
            reader.start(dests)
            sock.sendall(request_head(base, name, self.token, epoch, body))
            while reader.outcome is None:
                n = sock.recv_into(reader.buffer())
                if not n:
                    raise ConnectionResetError(f"{base} closed the connection")
                answered = True
                reader.received(n)
        except OSError as e:  # refused, reset, timed out, closed
            self.drop(base)
            if reused and not answered and not isinstance(e, TimeoutError):
                raise _Unanswered(f"{base} had closed a kept-alive connection") from e
            raise NodeUnavailable(f"{base} did not answer: {type(e).__name__}: {e}") from e
        if not reader.reusable:
            self.drop(base)
        outcome = reader.outcome
        return None if isinstance(outcome, BaseException) else outcome

    def read_one(self, base: str, request: bytes, dest: memoryview) -> bool:
        """Send `request` (a whole batch read of one item, `request_head`'s bytes) and land
        the item in `dest`. True when its bytes are in place and match their digest; False
        for any other answer (an error, a stale epoch, a surprise): the caller goes the usual
        way, which asks again and reports it. Raises NodeUnavailable like `read`.

        The one-by-one hot path: no parser object, no header dict, one memoryview per
        receive. Anything it does not expect drops the connection rather than guessing."""
        try:
            return self._read_one(base, request, dest)
        except _Unanswered:  # a kept-alive connection the node had closed meanwhile: once more, anew
            return self._read_one(base, request, dest)

    def _read_one(self, base: str, request: bytes, dest: memoryview) -> bool:
        conns = self._connections()
        conn = conns.get(base)
        reused, n = conn is not None and len(conn) == 3, 0
        try:
            if not reused:
                if conn is not None:
                    self.drop(base)
                head = bytearray(HEADER_LIMIT)
                conn = conns[base] = (self._connect(base), head, memoryview(head))
            sock, head, view = conn
            sock.sendall(request)
            n, end, limit = 0, -1, _HEAD_FIRST  # a head is ~150 bytes: the payload mostly lands in place
            while end < 0:
                got = sock.recv_into(view[n:limit])
                if not got:
                    raise ConnectionResetError(f"{base} closed the connection")
                n += got
                end = head.find(b"\r\n\r\n", 0, n)
                if end < 0 and n == limit:
                    if limit == HEADER_LIMIT:
                        self.drop(base)
                        return False
                    limit = HEADER_LIMIT
            fields = bytes(view[:end + 2]).lower()
            at = fields.find(_LENGTH)
            size = len(dest)
            start = end + 4
            if not fields.startswith(b"http/1.1 200 ") or _FRAMES not in fields or at < 0 \
                    or int(fields[at + 18:fields.index(b"\r\n", at + 2)]) != _FRAME + size or n - start > _FRAME + size:
                self.drop(base)  # not a plain answer of one item: its bytes are left unread
                return False
            while n - start < _FRAME:
                got = sock.recv_into(view[n:start + _FRAME])
                if not got:
                    raise ConnectionResetError(f"{base} closed the connection")
                n += got
            status, _, item, length, digest = wire.FRAME.unpack_from(head, start)
            if status != 200 or item != 0 or length != size:
                self.drop(base)
                return False
            filled = n - start - _FRAME
            if filled:
                dest[:filled] = view[start + _FRAME:n]
            while filled < size:
                got = sock.recv_into(dest[filled:])
                if not got:
                    raise ConnectionResetError(f"{base} closed the connection")
                filled += got
        except (OSError, ValueError) as e:  # refused, reset, timed out; a Content-Length not a number
            self.drop(base)
            if reused and n == 0 and isinstance(e, OSError) and not isinstance(e, TimeoutError):
                raise _Unanswered(f"{base} had closed a kept-alive connection") from e
            raise NodeUnavailable(f"{base} did not answer: {type(e).__name__}: {e}") from e
        if _CLOSE in fields:
            self.drop(base)
        return xxhash.xxh3_64_intdigest(dest) == digest

    def drop(self, base: str) -> None:
        entry = self._connections().pop(base, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        """Close this thread's connections (other threads' close when their thread ends)."""
        for base in list(self._connections()):
            self.drop(base)
