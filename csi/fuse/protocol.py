"""The FUSE kernel protocol: message layouts from linux/fuse.h and the INIT negotiation.

Nothing here knows about datasets or event loops: requests are parsed from bytes and
replies built as lists of byte strings (written whole, with one writev, by the caller).
Layouts are those of protocol 7.38 (`/usr/include/linux/fuse.h`); a newer kernel speaks
our minor version once INIT has told it which that is.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

MAJOR, MINOR = 7, 38  # what we speak; the kernel falls back to it
ROOT_ID = 1
MIN_READ_BUFFER = 8192  # the kernel refuses smaller reads of /dev/fuse
PAGE = 4096


class Op(enum.IntEnum):
    """fuse_opcode."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


# Requests the kernel sends without waiting for an answer: never reply to them.
NO_REPLY = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT, Op.NOTIFY_REPLY})
# Requests that would change the filesystem.
WRITES = frozenset({Op.SETATTR, Op.SYMLINK, Op.MKNOD, Op.MKDIR, Op.UNLINK, Op.RMDIR, Op.RENAME, Op.LINK,
                    Op.WRITE, Op.SETXATTR, Op.REMOVEXATTR, Op.CREATE, Op.FALLOCATE, Op.RENAME2,
                    Op.COPY_FILE_RANGE, Op.TMPFILE})


class InitFlag(enum.IntFlag):
    """fuse_init_in/out flags (bits ≥ 32 travel in flags2, only with INIT_EXT)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    INIT_EXT = 1 << 30


# What an immutable, read-only snapshot lets the kernel do on its own: reads in parallel,
# listings with attributes (one request fills the dentry and attribute caches), directory
# operations in parallel, reads of up to `max_pages`. Open/opendir are skipped when the
# kernel offers it (we answer them ENOSYS; the kernel then keeps pages and listings).
WANTED = (InitFlag.ASYNC_READ | InitFlag.DO_READDIRPLUS | InitFlag.PARALLEL_DIROPS | InitFlag.MAX_PAGES
          | InitFlag.NO_OPEN_SUPPORT | InitFlag.NO_OPENDIR_SUPPORT | InitFlag.ABORT_ERROR
          | InitFlag.CACHE_SYMLINKS)

# ---- layouts (little-endian on every Linux FUSE supports; fuse.h uses native order) -----

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
INIT_IN_FLAGS2 = struct.Struct("<I")  # flags2 (7.36+), after INIT_IN
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ..., max_pages, map_alignment, flags2, unused[7]
INIT_OUT_COMPAT = 24  # fuse_init_out before 7.23
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks atime mtime ctime (nsec x3) mode nlink uid gid rdev blksize flags
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid (nsec x2)
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
GETXATTR_IN = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIII4x24x")  # blocks bfree bavail files ffree bsize namelen frsize
DIRENT = struct.Struct("<QQII")  # ino off namelen type
FORGET_ONE = struct.Struct("<QQ")
BATCH_FORGET_IN = struct.Struct("<II")

NOTIFY_RESEND = 7  # fuse_notify_code: queue again every request read but not answered (Linux 6.9)
UNIQUE_RESEND = 1 << 63  # set in the unique of a request sent again

FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3


class ProtocolError(ValueError):
    """A request that does not parse: answered EINVAL (or dropped if it has no header)."""


@dataclass(frozen=True, slots=True)
class Header:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


def parse_header(buf: bytes | memoryview) -> Header:
    """The request's header; ProtocolError if it is shorter than one or lies about its length."""
    if len(buf) < IN_HEADER.size:
        raise ProtocolError(f"request of {len(buf)} bytes is shorter than a header ({IN_HEADER.size})")
    length, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(buf)
    if length != len(buf):
        raise ProtocolError(f"header says {length} bytes, request has {len(buf)}")
    return Header(length, opcode, unique, nodeid, uid, gid, pid)


def unpack(layout: struct.Struct, body: bytes | memoryview) -> tuple:
    """A fixed-size argument, or ProtocolError if the body is too short for it."""
    if len(body) < layout.size:
        raise ProtocolError(f"argument of {len(body)} bytes, {layout.size} expected")
    return layout.unpack_from(body)


def name_of(body: bytes | memoryview) -> bytes:
    """A NUL-terminated name (LOOKUP); ProtocolError without the NUL or when empty."""
    raw = bytes(body)
    end = raw.find(b"\0")
    if end <= 0:
        raise ProtocolError("name missing or not NUL-terminated")
    return raw[:end]


# ---- replies ------------------------------------------------------------------------------

def reply(unique: int, *payload: bytes | memoryview) -> list[bytes | memoryview]:
    """A successful reply: its header and payload, to be written with one writev."""
    size = OUT_HEADER.size + sum(len(p) for p in payload)
    return [OUT_HEADER.pack(size, 0, unique), *payload]


def error_reply(unique: int, errno_: int) -> list[bytes | memoryview]:
    """A failed request: the header alone, with the negative errno."""
    return [OUT_HEADER.pack(OUT_HEADER.size, -errno_, unique)]


@dataclass(frozen=True, slots=True)
class Attr:
    """What the kernel learns about an inode (fuse_attr); times in nanoseconds."""

    ino: int
    mode: int
    size: int
    nlink: int
    mtime_ns: int
    uid: int = 0
    gid: int = 0
    blksize: int = PAGE

    def pack(self) -> bytes:
        sec, nsec = divmod(self.mtime_ns, 1_000_000_000)
        return ATTR.pack(self.ino, self.size, (self.size + 511) // 512, sec, sec, sec, nsec, nsec, nsec,
                         self.mode, self.nlink, self.uid, self.gid, 0, self.blksize, 0)


def _split(timeout: float) -> tuple[int, int]:
    sec = int(timeout)
    return sec, int((timeout - sec) * 1e9)


def entry_out(attr: Attr | None, timeout: float) -> bytes:
    """fuse_entry_out; `None` is a miss (nodeid 0) that the kernel caches for `timeout`."""
    sec, nsec = _split(timeout)
    if attr is None:
        return ENTRY_OUT_HEAD.pack(0, 0, sec, 0, nsec, 0) + bytes(ATTR.size)
    return ENTRY_OUT_HEAD.pack(attr.ino, 0, sec, sec, nsec, nsec) + attr.pack()


def attr_out(attr: Attr, timeout: float) -> bytes:
    sec, nsec = _split(timeout)
    return ATTR_OUT_HEAD.pack(sec, nsec, 0) + attr.pack()


def open_out(fh: int, flags: int) -> bytes:
    return OPEN_OUT.pack(fh, flags, 0)


def statfs_out(blocks: int, files: int, bsize: int = PAGE, namelen: int = 255) -> bytes:
    return KSTATFS.pack(blocks, 0, 0, files, 0, bsize, namelen, bsize)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def dirent(ino: int, off: int, name: bytes, mode: int) -> bytes:
    """One fuse_dirent, padded to 8 bytes (its `type` is the mode's file type bits >> 12)."""
    head = DIRENT.pack(ino, off, len(name), (mode >> 12) & 0o17)
    return head + name + bytes(_pad8(len(name)) - len(name))


def direntplus(attr: Attr, off: int, name: bytes, timeout: float) -> bytes:
    return entry_out(attr, timeout) + dirent(attr.ino, off, name, attr.mode)


# ---- INIT ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class InitRequest:
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32


def parse_init(body: bytes | memoryview) -> InitRequest:
    major, minor, readahead, flags = unpack(INIT_IN, body)
    if len(body) >= INIT_IN.size + INIT_IN_FLAGS2.size and flags & InitFlag.INIT_EXT:
        flags |= INIT_IN_FLAGS2.unpack_from(body, INIT_IN.size)[0] << 32
    return InitRequest(major, minor, readahead, flags)


@dataclass(frozen=True, slots=True)
class InitAnswer:
    """What was agreed at INIT, and the bytes that say it."""

    payload: bytes
    minor: int
    flags: int
    max_pages: int
    max_write: int
    retry: bool = False  # the kernel's major is newer: it will send INIT again with ours


def negotiate(request: InitRequest, *, max_pages: int = 256, max_background: int = 64,
              max_write: int = 128 * 1024, wanted: int = WANTED) -> InitAnswer:
    """Answer INIT: the flags both sides know (of those we want), our minor if older.

    ProtocolError for a kernel older than 7.x (nothing to agree on)."""
    if request.major < MAJOR:
        raise ProtocolError(f"kernel speaks FUSE {request.major}.{request.minor}, we need {MAJOR}.x")
    if request.major > MAJOR:  # the kernel answers with a new INIT in our major version
        payload = INIT_OUT.pack(MAJOR, MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        return InitAnswer(payload[:INIT_OUT_COMPAT], MINOR, 0, 0, 0, retry=True)
    minor = min(request.minor, MINOR)
    flags = request.flags & wanted & 0xFFFFFFFF  # none of ours needs flags2
    pages = max_pages if flags & InitFlag.MAX_PAGES else 32
    payload = INIT_OUT.pack(MAJOR, minor, request.max_readahead, flags, max_background,
                            max_background * 3 // 4, max_write, 1, pages, 0, 0)
    if minor < 23:
        payload = payload[:INIT_OUT_COMPAT]
    return InitAnswer(payload, minor, flags, pages, max_write)


def buffer_size(max_write: int = 128 * 1024) -> int:
    """How big a buffer a read of /dev/fuse needs: the largest request (a WRITE) and then some."""
    return max(MIN_READ_BUFFER, max_write + PAGE)
