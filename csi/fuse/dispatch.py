"""Dispatch: one FUSE request to one operation, every exception to an errno, in one place.

The operations (csi/fusefs.py) are inode-based and speak Python: they return `Attr`s,
names and bytes, and raise. Metadata operations are plain functions answered at once;
a read is answered at once when its bytes are at hand (`read_now`) and otherwise on a
task of its own. Every reply is written whole with one writev. A request that fails,
that does not parse, or that we do not know answers an errno: nothing a request does
can take the session down, and no request is left without an answer (the reader that
sent it would hang).

Answered once with ENOSYS, so the kernel never asks again: OPEN and OPENDIR (the kernel
then keeps pages and listings for the life of the mount, see protocol.WANTED), FLUSH,
xattrs, ACCESS, locks, ioctl, lseek. Writes: EROFS.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections import Counter
from typing import Any, Awaitable, Callable, Iterable, Protocol

from csi.fuse import protocol as p

log = logging.getLogger("cachefs.fuse")

Reply = list  # of bytes-like: header first
Write = Callable[[Reply], None]


class FuseError(Exception):
    """An operation's deliberate answer: this errno, no log line."""

    def __init__(self, code: int) -> None:
        super().__init__(errno.errorcode.get(code, str(code)))
        self.errno = code


class Operations(Protocol):
    """What a filesystem offers the dispatcher; every method may raise."""

    timeout: float  # how long the kernel may cache entries, attributes and misses

    def lookup(self, parent: int, name: bytes) -> p.Attr | None: ...
    def getattr(self, inode: int) -> p.Attr: ...
    def listing(self, inode: int, offset: int) -> Iterable[tuple[bytes, p.Attr]]: ...
    def statfs(self) -> tuple[int, int]: ...
    def read_now(self, inode: int, offset: int, size: int) -> bytes | memoryview | None: ...
    def read(self, inode: int, offset: int, size: int) -> Awaitable[bytes | memoryview]: ...
    def deadline(self) -> float: ...


def errno_of(exc: BaseException, what: str, timeout: float) -> int:
    """The one place an exception becomes an errno; EIO always leaves a log line saying why."""
    if isinstance(exc, FuseError):
        return exc.errno
    if isinstance(exc, FileNotFoundError):
        return errno.ENOENT
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.ENOTDIR, errno.EISDIR):
        return exc.errno
    if isinstance(exc, p.ProtocolError):
        log.warning("%s: malformed request, answering EINVAL: %s", what, exc)
        return errno.EINVAL
    if isinstance(exc, TimeoutError):
        log.error("%s: no answer within %g s (cache cluster and origin unreachable?); answering EIO",
                  what, timeout)
    else:
        log.error("%s failed, answering EIO: %s: %s", what, type(exc).__name__, exc)
    return errno.EIO


_ENOSYS = frozenset({p.Op.OPEN, p.Op.OPENDIR, p.Op.FLUSH, p.Op.GETXATTR, p.Op.LISTXATTR, p.Op.ACCESS,
                     p.Op.GETLK, p.Op.SETLK, p.Op.SETLKW, p.Op.IOCTL, p.Op.POLL, p.Op.BMAP, p.Op.LSEEK,
                     p.Op.FSYNC, p.Op.FSYNCDIR, p.Op.SYNCFS, p.Op.STATX, p.Op.SETUPMAPPING,
                     p.Op.REMOVEMAPPING})


class Dispatcher:
    """Answers the requests of one session with `ops`; `write` sends one reply whole."""

    def __init__(self, ops: Operations, write: Write, *, max_pages: int = 256, max_background: int = 64,
                 on_init: Callable[[p.InitAnswer], None] | None = None) -> None:
        self.ops = ops
        self.write = write
        self.max_pages = max_pages
        self.max_background = max_background
        self.on_init = on_init
        self.init: p.InitAnswer | None = None  # set once INIT is answered
        self.tasks: set[asyncio.Task[Any]] = set()  # reads in flight, kept referenced
        self.counts: Counter[int] = Counter()  # requests answered, by opcode (logged when serving ends)
        self._table: dict[int, Callable[[p.Header, memoryview], Reply | None]] = {
            p.Op.INIT: self._init, p.Op.LOOKUP: self._lookup, p.Op.GETATTR: self._getattr,
            p.Op.READ: self._read, p.Op.READDIR: self._readdir, p.Op.READDIRPLUS: self._readdirplus,
            p.Op.STATFS: self._statfs, p.Op.READLINK: self._readlink,
            p.Op.RELEASE: self._ok, p.Op.RELEASEDIR: self._ok, p.Op.DESTROY: self._ok,
        }

    def handle(self, buf: memoryview) -> None:
        """Answer one request (whole, as read from /dev/fuse); never raises."""
        try:
            head = p.parse_header(buf)
        except p.ProtocolError as e:
            # No trustworthy unique to answer to: the kernel never sends this. Drop it.
            log.warning("dropping a request that does not parse: %s", e)
            return
        self.counts[head.opcode] += 1
        if head.opcode in p.NO_REPLY:
            return  # FORGET and friends: nodes live as long as the mount, nothing to count
        try:
            answer = self._answer(head, buf[p.IN_HEADER.size:])
        except Exception as e:  # noqa: BLE001 - a bug must cost one request an errno, never the session
            answer = p.error_reply(head.unique, errno_of(e, self._what(head), self.ops.deadline()))
        if answer is not None:
            self.write(answer)

    def _answer(self, head: p.Header, body: memoryview) -> Reply | None:
        handler = self._table.get(head.opcode)
        if handler is not None:
            # No check that INIT came first: of several processes serving one session only
            # one reads INIT, and a replacement process never sees it.
            return handler(head, body)
        if head.opcode in p.WRITES:
            return p.error_reply(head.unique, errno.EROFS)
        return p.error_reply(head.unique, errno.ENOSYS)  # the _ENOSYS set and anything unknown

    def summary(self) -> str:
        """'READ 120, LOOKUP 8, ...': what this session was asked, most asked first."""
        names = {int(op): op.name for op in p.Op}
        return ", ".join(f"{names.get(op, op)} {n}" for op, n in self.counts.most_common())

    @staticmethod
    def _what(head: p.Header) -> str:
        try:
            name = p.Op(head.opcode).name
        except ValueError:
            name = f"opcode {head.opcode}"
        return f"{name} of node {head.nodeid}"

    # ---- handlers: parse, call the operation, build the reply ------------------------------

    def _init(self, head: p.Header, body: memoryview) -> Reply:
        answer = p.negotiate(p.parse_init(body), max_pages=self.max_pages, max_background=self.max_background)
        if not answer.retry:
            self.init = answer
        out = p.reply(head.unique, answer.payload)
        if not answer.retry and self.on_init is not None:
            self.write(out)  # the hook runs after the kernel has its answer
            try:
                self.on_init(answer)
            except Exception as e:  # noqa: BLE001 - tuning after INIT is best effort
                log.warning("after-INIT hook failed: %s", e)
            return None  # type: ignore[return-value]
        return out

    @staticmethod
    def _ok(head: p.Header, body: memoryview) -> Reply:
        return p.reply(head.unique)

    def _lookup(self, head: p.Header, body: memoryview) -> Reply:
        attr = self.ops.lookup(head.nodeid, p.name_of(body))
        return p.reply(head.unique, p.entry_out(attr, self.ops.timeout))

    def _getattr(self, head: p.Header, body: memoryview) -> Reply:
        return p.reply(head.unique, p.attr_out(self.ops.getattr(head.nodeid), self.ops.timeout))

    def _statfs(self, head: p.Header, body: memoryview) -> Reply:
        blocks, files = self.ops.statfs()
        return p.reply(head.unique, p.statfs_out(blocks, files))

    def _readlink(self, head: p.Header, body: memoryview) -> Reply:
        self.ops.getattr(head.nodeid)  # ENOENT for an unknown node
        return p.error_reply(head.unique, errno.EINVAL)  # a snapshot holds no symlinks

    def _readdir(self, head: p.Header, body: memoryview) -> Reply:
        return self._list(head, body, plus=False)

    def _readdirplus(self, head: p.Header, body: memoryview) -> Reply:
        return self._list(head, body, plus=True)

    def _list(self, head: p.Header, body: memoryview, plus: bool) -> Reply:
        """Entries from `offset` on while they fit the kernel's buffer; entry i has offset i + 1."""
        _fh, offset, size, *_ = p.unpack(p.READ_IN, body)
        out: list[bytes] = []
        used = 0
        timeout = self.ops.timeout
        for i, (name, attr) in enumerate(self.ops.listing(head.nodeid, offset), start=offset + 1):
            one = p.direntplus(attr, i, name, timeout) if plus else p.dirent(attr.ino, i, name, attr.mode)
            if used + len(one) > size:
                break
            out.append(one)
            used += len(one)
        return p.reply(head.unique, b"".join(out))

    def _read(self, head: p.Header, body: memoryview) -> Reply | None:
        _fh, offset, size, *_ = p.unpack(p.READ_IN, body)
        size = min(size, self.max_pages * p.PAGE)  # what INIT allowed: a bogus size costs no memory
        data = self.ops.read_now(head.nodeid, offset, size)
        if data is not None:
            return p.reply(head.unique, data)
        task = asyncio.ensure_future(self._read_later(head, offset, size))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return None

    async def _read_later(self, head: p.Header, offset: int, size: int) -> None:
        try:
            answer = p.reply(head.unique, await self.ops.read(head.nodeid, offset, size))
        except Exception as e:  # noqa: BLE001 - see handle()
            what = f"read of node {head.nodeid} [{offset}, {offset + size})"
            answer = p.error_reply(head.unique, errno_of(e, what, self.ops.deadline()))
        self.write(answer)


def writer(fd: int) -> Write:
    """Replies to /dev/fuse, each with one writev. A reply the kernel no longer wants (the
    request was interrupted: ENOENT; the session is gone: ENODEV) is dropped quietly."""

    def write(iov: Reply) -> None:
        try:
            os.writev(fd, iov)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.error("writing a FUSE reply failed: %s", e)

    return write
