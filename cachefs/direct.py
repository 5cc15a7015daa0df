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

from cachefs.blockproto import FrameReader, Outcome, address, request_head
from cachefs.common.errors import NodeUnavailable


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
        conns = self._connections()
        try:
            if base not in conns:
                conns[base] = (self._connect(base), FrameReader(base))
            sock, reader = conns[base]
            reader.start(dests)
            sock.sendall(request_head(base, name, self.token, epoch, body))
            while reader.outcome is None:
                n = sock.recv_into(reader.buffer())
                if n:
                    reader.received(n)
                else:
                    reader.fail(NodeUnavailable(f"{base} closed the connection"))
        except OSError as e:  # refused, reset, timed out
            self.drop(base)
            raise NodeUnavailable(f"{base} did not answer: {type(e).__name__}: {e}") from e
        if not reader.reusable:
            self.drop(base)
        outcome = reader.outcome
        return None if isinstance(outcome, BaseException) else outcome

    def drop(self, base: str) -> None:
        entry = self._connections().pop(base, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        """Close this thread's connections (other threads' close when their thread ends)."""
        for base in list(self._connections()):
            self.drop(base)
