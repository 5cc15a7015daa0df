"""The keeper's wire: one JSON object per SOCK_SEQPACKET message, descriptors beside it.

A request is `{"op": ..., ...}`, with the descriptors it hands over attached
(SCM_RIGHTS); an answer is `{"ok": true, ...}` (with descriptors for `take` and the
hand-over) or `{"ok": false, "error": "what was wrong"}`. Both ends use these helpers:
the keeper (csi/keeper.py) and the mount process, the plugin and a new keeper (the
client below). Messages are small (a record, never data), so one message is one
datagram: a message that does not fit is refused whole, never read in pieces.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Any

MAX_MESSAGE = 64 * 1024
MAX_FDS = 64  # a session and its clones: serving processes are at most 8
OPS = ("hold", "take", "drop", "list", "revive", "handover")


class KeeperError(OSError):
    """The keeper could not be reached or refused a request; the message says why."""


class BadMessage(ValueError):
    """A message that is not a well-formed request."""


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise BadMessage(f"message of {len(data)} bytes is over {MAX_MESSAGE}")
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """(message, descriptors); (None, []) at end of stream. BadMessage for anything malformed,
    after closing whatever descriptors came with it (a bad message must not leak them)."""
    data, fds, flags, _addr = socket.recv_fds(sock, MAX_MESSAGE + 1, MAX_FDS)
    if not data and not fds:
        return None, []
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE:
            raise BadMessage(f"message over {MAX_MESSAGE} bytes or {MAX_FDS} descriptors")
        try:
            message = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadMessage(f"not a JSON object: {e}") from None
        if not isinstance(message, dict):
            raise BadMessage(f"not a JSON object but {type(message).__name__}")
        return message, fds
    except BadMessage:
        close_all(fds)
        raise


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def field(message: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """A typed field of a request; BadMessage names the field when it is missing or mistyped."""
    value = message.get(name, default)
    if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadMessage(f"field {name!r} must be {getattr(kind, '__name__', kind)}, not {value!r}")
    return value


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    """A connection to the keeper at `path`, retried for `timeout` seconds: while a keeper hands
    over to a new one the socket is briefly absent."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except OSError as e:
            sock.close()
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED) or time.monotonic() >= deadline:
                raise KeeperError(e.errno or errno.EIO, f"cannot reach the keeper at {path}: {e.strerror or e}"
                                                        " (is `cachefs csi keeper` running?)") from None
            time.sleep(0.05)


def call(path: str, message: dict[str, Any], fds: list[int] | None = None,
         timeout: float = 10.0) -> tuple[dict[str, Any], list[int]]:
    """One request, one answer; KeeperError when the keeper refuses or does not answer."""
    with connect(path, timeout) as sock:
        try:
            send(sock, message, fds)
            answer, got = receive(sock)
        except (OSError, BadMessage) as e:
            raise KeeperError(errno.EIO, f"the keeper at {path} did not answer {message.get('op')!r}: {e}") from None
    if answer is None:
        raise KeeperError(errno.EIO, f"the keeper at {path} closed the connection without answering")
    if not answer.get("ok"):
        close_all(got)
        raise KeeperError(errno.EINVAL, f"the keeper refused {message.get('op')!r}: {answer.get('error')}")
    return answer, got
