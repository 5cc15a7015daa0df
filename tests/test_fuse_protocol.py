"""The FUSE server without a kernel: every opcode as bytes in and bytes out, laid out as
linux/fuse.h lays them out, through the dispatcher and the dataset's operations over
files in memory (tests/fuse_helpers.py). Malformed, truncated, unknown and random
requests get an errno or are dropped, never a crash, never a request left unanswered.

The layouts are written here again by hand (not imported from csi.fuse.protocol), so a
wrong layout there fails here.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import struct

import pytest

from fuse_helpers import CHUNK, FILES, MiB, MemoryOrigin, tree_of

from csi.chunkcache import ChunkCache
from csi.config import FOREVER, MountConfig
from csi.fuse import protocol as p
from csi.fuse.dispatch import Dispatcher
from csi.fusefs import DatasetOperations
from csi.reader import SnapshotReader
from csi.tree import DIR_MODE, FILE_MODE, ROOT_INODE

pytestmark = pytest.mark.timeout(60)

MTIME = 1_700_000_000
IN_HEADER = "<IIQQIIIHH"  # fuse_in_header: len opcode unique nodeid uid gid pid total_extlen padding
ATTR = "<QQQQQQIIIIIIIIII"  # fuse_attr
ENTRY_OUT = "<QQQQII" + ATTR[1:]  # fuse_entry_out
INIT_FLAGS = (1 << 0) | (1 << 13) | (1 << 17) | (1 << 18) | (1 << 22) | (1 << 24) | (1 << 30)  # what 6.x offers, in part


class Kernel:
    """Plays the kernel's side: sends a request, returns the one reply (or None)."""

    def __init__(self, ops: DatasetOperations) -> None:
        self.replies: list[bytes] = []
        self.dispatcher = Dispatcher(ops, lambda iov: self.replies.append(b"".join(bytes(b) for b in iov)))
        self.unique = 0

    async def send(self, opcode: int, nodeid: int = ROOT_INODE, body: bytes = b"", *,
                   length: int | None = None) -> tuple[int, bytes] | None:
        """(error, payload) of the reply, checked against the request's unique and length."""
        self.unique += 2
        raw = struct.pack(IN_HEADER, length if length is not None else 40 + len(body), opcode, self.unique,
                          nodeid, 0, 0, 1, 0, 0) + body
        before = len(self.replies)
        self.dispatcher.handle(memoryview(raw))
        while self.dispatcher.tasks:
            await asyncio.gather(*self.dispatcher.tasks, return_exceptions=True)
        assert len(self.replies) - before <= 1, "one request, at most one reply"
        if len(self.replies) == before:
            return None
        reply = self.replies[-1]
        size, error, unique = struct.unpack_from("<IiQ", reply)
        assert size == len(reply) and unique == self.unique
        return -error, reply[16:]

    async def init(self, major: int = 7, minor: int = 44, flags: int = INIT_FLAGS) -> tuple[int, bytes] | None:
        return await self.send(p.Op.INIT, 0, struct.pack("<IIIII", major, minor, 128 * 1024, flags, 0) + bytes(44))


@pytest.fixture
def origin() -> MemoryOrigin:
    return MemoryOrigin(FILES)


@pytest.fixture
async def kernel(origin) -> Kernel:
    reader = SnapshotReader(origin.fetch, ChunkCache(16 * MiB), CHUNK, readahead=2, timeout=0.5)
    ops = DatasetOperations(tree_of(FILES), reader, MountConfig(op_timeout=0.5), mtime=MTIME)
    k = Kernel(ops)
    assert (await k.init())[0] == 0
    return k


def lookup_body(name: bytes) -> bytes:
    return name + b"\0"


def read_body(offset: int, size: int, fh: int = 0) -> bytes:
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)  # fuse_read_in


async def inode_of(k: Kernel, path: str) -> int:
    node = ROOT_INODE
    for part in path.split("/"):
        error, out = await k.send(p.Op.LOOKUP, node, lookup_body(part.encode()))
        assert error == 0
        node = struct.unpack_from(ENTRY_OUT, out)[0]
    return node


# ---- INIT -----------------------------------------------------------------------------------

async def test_init_agrees_on_our_minor_and_asks_for_what_a_snapshot_allows(origin):
    k = Kernel(DatasetOperations(tree_of(FILES), SnapshotReader(origin.fetch, ChunkCache(16 * MiB), CHUNK, 2, 1),
                                 MountConfig()))
    error, out = await k.init()
    assert error == 0 and len(out) == 64  # fuse_init_out of 7.23+
    major, minor, readahead, flags, max_bg, congestion, max_write, gran, max_pages, _align, flags2 = \
        struct.unpack_from("<IIIIHHIIHHI", out)
    assert (major, minor, readahead) == (7, 38, 128 * 1024)
    wanted = (1 << 0) | (1 << 13) | (1 << 18) | (1 << 22)  # async read, readdirplus, parallel dirops, max_pages
    assert flags & wanted == wanted and flags & ~INIT_FLAGS == 0  # nothing the kernel did not offer
    assert not flags & (1 << 14) and not flags & (1 << 16)  # readdirplus always; no writeback cache
    assert max_pages == 256 and max_write >= 4096 and max_bg >= 12 and congestion <= max_bg and flags2 == 0


async def test_init_from_an_old_kernel_gets_the_short_reply_and_a_newer_major_gets_ours(origin):
    ops = DatasetOperations(tree_of(FILES), SnapshotReader(origin.fetch, ChunkCache(16 * MiB), CHUNK, 2, 1),
                            MountConfig())
    old = Kernel(ops)
    error, out = await old.init(minor=22, flags=1 << 0)
    assert error == 0 and len(out) == 24 and struct.unpack_from("<II", out) == (7, 22)
    newer = Kernel(ops)
    error, out = await newer.init(major=8)
    assert error == 0 and struct.unpack_from("<II", out) == (7, 38)
    assert newer.dispatcher.init is None  # the kernel sends INIT again, in 7.x
    assert (await newer.init())[0] == 0 and newer.dispatcher.init is not None
    older = Kernel(ops)
    assert (await older.init(major=6))[0] == errno.EINVAL


# ---- entries and attributes -------------------------------------------------------------------

async def test_lookup_answers_an_entry_cached_for_the_life_of_the_mount(kernel):
    error, out = await kernel.send(p.Op.LOOKUP, ROOT_INODE, lookup_body(b"big.bin"))
    assert error == 0 and len(out) == 128
    (nodeid, generation, entry_valid, attr_valid, _ens, _ans, ino, size, blocks, atime, mtime, ctime,
     _a, _m, _c, mode, nlink, uid, gid, rdev, blksize, _flags) = struct.unpack(ENTRY_OUT, out)
    assert nodeid == ino > ROOT_INODE and generation == 0 and entry_valid == attr_valid == int(FOREVER)
    assert size == len(FILES["big.bin"]) and blocks == (size + 511) // 512 and mode == FILE_MODE
    assert nlink == 1 and mtime == atime == ctime == MTIME and (uid, gid, rdev, blksize) == (0, 0, 0, 4096)


async def test_a_missing_name_is_a_miss_the_kernel_caches(kernel):
    error, out = await kernel.send(p.Op.LOOKUP, ROOT_INODE, lookup_body(b"no-such-file"))
    nodeid, _gen, entry_valid = struct.unpack_from("<QQQ", out)
    assert error == 0 and nodeid == 0 and entry_valid == int(FOREVER)


async def test_dot_and_dotdot_and_getattr_of_a_directory(kernel):
    sub = await inode_of(kernel, "sub")
    for name, expected in ((b".", sub), (b"..", ROOT_INODE)):
        assert struct.unpack_from(ENTRY_OUT, (await kernel.send(p.Op.LOOKUP, sub, lookup_body(name)))[1])[0] == expected
    error, out = await kernel.send(p.Op.GETATTR, sub, bytes(16))  # fuse_getattr_in
    assert error == 0 and len(out) == 104
    attr_valid, _nsec, _dummy, ino = struct.unpack_from("<QIIQ", out)
    fields = struct.unpack_from(ATTR, out, 16)
    assert attr_valid == int(FOREVER) and ino == sub and fields[9] == DIR_MODE and fields[10] == 3


async def test_statfs_reports_the_snapshot_and_nothing_free(kernel):
    error, out = await kernel.send(p.Op.STATFS, ROOT_INODE)
    blocks, bfree, bavail, files, ffree, bsize, namelen, frsize = struct.unpack_from("<QQQQQIII", out)
    assert error == 0 and len(out) == 80
    assert blocks == (sum(map(len, FILES.values())) + 4095) // 4096 and files == len(FILES) + 3
    assert bfree == bavail == ffree == 0 and bsize == frsize == 4096 and namelen == 255


def dirents(out: bytes, plus: bool) -> list[tuple[bytes, int, int, int]]:
    """(name, ino, off, type) of each fuse_dirent / fuse_direntplus in a reply."""
    found, at = [], 0
    while at < len(out):
        if plus:
            assert struct.unpack_from("<Q", out, at)[0] != 0  # entry_out.nodeid
            at += 128
        ino, off, namelen, kind = struct.unpack_from("<QQII", out, at)
        found.append((out[at + 24:at + 24 + namelen], ino, off, kind))
        at += 24 + (namelen + 7) // 8 * 8
    return found


@pytest.mark.parametrize("plus", [False, True], ids=["readdir", "readdirplus"])
async def test_a_listing_fills_the_buffer_and_goes_on_from_the_offset(kernel, plus):
    op = p.Op.READDIRPLUS if plus else p.Op.READDIR
    error, out = await kernel.send(op, ROOT_INODE, read_body(0, 4096))
    everything = dirents(out, plus)
    assert error == 0 and [e[0] for e in everything] == [b"small.bin", b"exact.bin", b"big.bin", b"empty.bin",
                                                          b"sub", b"down.bin"]
    assert [e[2] for e in everything] == list(range(1, 7))
    assert everything[4][3] == 4 and everything[0][3] == 8  # DT_DIR, DT_REG
    small = 2 * (128 + 24 + 16) if plus else 2 * (24 + 16)  # room for two 9-byte names
    error, out = await kernel.send(op, ROOT_INODE, read_body(0, small))
    first = dirents(out, plus)
    assert [e[0] for e in first] == [b"small.bin", b"exact.bin"]
    rest = dirents((await kernel.send(op, ROOT_INODE, read_body(first[-1][2], 4096)))[1], plus)
    assert first + rest == everything
    assert (await kernel.send(op, ROOT_INODE, read_body(6, 4096)))[1] == b""  # past the end: empty


# ---- reads ------------------------------------------------------------------------------------

async def test_reads_answer_the_bytes_at_any_offset_and_nothing_past_the_end(kernel):
    small, big = await inode_of(kernel, "small.bin"), await inode_of(kernel, "big.bin")
    assert (await kernel.send(p.Op.READ, small, read_body(0, 128 * 1024))) == (0, FILES["small.bin"])
    assert (await kernel.send(p.Op.READ, small, read_body(8192, 4096))) == (0, FILES["small.bin"][8192:12288])
    assert (await kernel.send(p.Op.READ, small, read_body(20_000, 4096))) == (0, b"")
    kernel.dispatcher.max_pages = 2
    big_read = await kernel.send(p.Op.READ, big, read_body(0, 2**32 - 1))  # more than INIT allowed
    assert big_read == (0, FILES["big.bin"][:2 * 4096])
    kernel.dispatcher.max_pages = 256
    for offset in (0, CHUNK - 100, 3 * CHUNK, 5 * CHUNK + 100):
        assert (await kernel.send(p.Op.READ, big, read_body(offset, 2 * CHUNK)))[1] == \
            FILES["big.bin"][offset:offset + 2 * CHUNK]


async def test_a_read_nobody_can_serve_answers_eio_with_a_log_line_saying_why(kernel, caplog):
    caplog.set_level(logging.ERROR, logger="cachefs.fuse")
    down, stuck = await inode_of(kernel, "down.bin"), await inode_of(kernel, "sub/stuck.bin")
    assert (await kernel.send(p.Op.READ, down, read_body(0, 4096))) == (errno.EIO, b"")
    assert (await kernel.send(p.Op.READ, stuck, read_body(0, 4096))) == (errno.EIO, b"")
    assert "origin is unreachable" in caplog.text and "no answer within 0.5 s" in caplog.text


# ---- everything else: one errno each ------------------------------------------------------------

FILE = ROOT_INODE + 1
ERRNOS = [
    ("getattr_of_an_unknown_node", p.Op.GETATTR, 10_000, bytes(16), errno.ENOENT),
    ("lookup_in_an_unknown_directory", p.Op.LOOKUP, 10_000, b"x\0", errno.ENOENT),
    ("lookup_in_a_file", p.Op.LOOKUP, FILE, b"x\0", errno.ENOTDIR),
    ("readdir_of_a_file", p.Op.READDIRPLUS, FILE, read_body(0, 4096), errno.ENOTDIR),
    ("read_of_a_directory", p.Op.READ, ROOT_INODE, read_body(0, 4096), errno.EISDIR),
    ("readlink_no_symlinks_here", p.Op.READLINK, FILE, b"", errno.EINVAL),
    # Answered ENOSYS once: the kernel then never asks again (and keeps pages and listings).
    *[(op.name.lower(), op, FILE, bytes(64), errno.ENOSYS)
      for op in (p.Op.OPEN, p.Op.OPENDIR, p.Op.FLUSH, p.Op.GETXATTR, p.Op.LISTXATTR, p.Op.ACCESS, p.Op.LSEEK,
                 p.Op.IOCTL, p.Op.GETLK, p.Op.FSYNC, p.Op.STATX)],
    *[(op.name.lower(), op, FILE, bytes(64), errno.EROFS) for op in sorted(p.WRITES)],
    ("unknown_opcode", 4242, FILE, b"", errno.ENOSYS),
    ("lookup_without_its_nul", p.Op.LOOKUP, ROOT_INODE, b"small.bin", errno.EINVAL),
    ("lookup_of_an_empty_name", p.Op.LOOKUP, ROOT_INODE, b"\0", errno.EINVAL),
    ("read_with_a_truncated_argument", p.Op.READ, FILE, read_body(0, 10)[:12], errno.EINVAL),
    ("readdir_with_no_argument", p.Op.READDIR, ROOT_INODE, b"", errno.EINVAL),
]


@pytest.mark.parametrize("case,op,node,body,code", ERRNOS, ids=[e[0] for e in ERRNOS])
async def test_every_other_request_answers_one_errno(kernel, case, op, node, body, code):
    assert await kernel.send(op, node, body) == (code, b"")


@pytest.mark.parametrize("op", [p.Op.FORGET, p.Op.BATCH_FORGET, p.Op.INTERRUPT, p.Op.NOTIFY_REPLY])
async def test_requests_the_kernel_expects_no_answer_to_get_none(kernel, op):
    assert await kernel.send(op, FILE, bytes(16)) is None


async def test_a_process_that_never_saw_init_serves_requests(origin):
    """Of several serving processes one reads INIT; a replacement never sees it."""
    reader = SnapshotReader(origin.fetch, ChunkCache(16 * MiB), CHUNK, readahead=2, timeout=0.5)
    late = Kernel(DatasetOperations(tree_of(FILES), reader, MountConfig(), mtime=MTIME))
    assert (await late.send(p.Op.GETATTR, ROOT_INODE, bytes(16)))[0] == 0


async def test_a_request_whose_header_lies_or_is_cut_is_dropped_and_the_session_goes_on(kernel):
    kernel.dispatcher.handle(memoryview(b"\x28\0\0\0"))  # shorter than a header
    assert await kernel.send(p.Op.GETATTR, FILE, bytes(16), length=999) is None  # length is not the request's
    assert (await kernel.send(p.Op.GETATTR, FILE, bytes(16)))[0] == 0


async def test_a_bug_in_an_operation_costs_that_request_an_eio_never_the_session(kernel, caplog):
    caplog.set_level(logging.ERROR, logger="cachefs.fuse")
    ops = kernel.dispatcher.ops
    tree, ops.tree = ops.tree, None  # a bug anywhere below a handler...
    ops._attrs.clear()
    assert await kernel.send(p.Op.GETATTR, ROOT_INODE, bytes(16)) == (errno.EIO, b"")
    assert "GETATTR of node 1 failed" in caplog.text
    ops.tree = tree
    assert (await kernel.send(p.Op.GETATTR, ROOT_INODE, bytes(16)))[0] == 0


async def test_random_requests_never_crash_and_each_gets_at_most_one_answer(kernel):
    """Fuzz: random opcodes (known and not), nodes and bodies, some cut short."""
    rng = random.Random(15)
    known = [int(op) for op in p.Op if op != p.Op.INIT]
    allowed = {0, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.ENOSYS, errno.EROFS, errno.EIO}
    for _ in range(3000):
        op = rng.choice(known) if rng.random() < 0.8 else rng.randrange(0, 70_000)
        node = rng.choice([0, ROOT_INODE, FILE, 5, 10, 2**64 - 1, rng.randrange(2**64)])
        body = rng.randbytes(rng.choice([0, 1, 7, 8, 16, 39, 40, 64, 200]))
        if op in (p.Op.READ, p.Op.READDIR, p.Op.READDIRPLUS) and rng.random() < 0.5:
            body = struct.pack("<QQIIQII", 0, rng.randrange(2**20), rng.randrange(2**17), 0, 0, 0, 0)
        answer = await kernel.send(op, node, body)
        if op in p.NO_REPLY:
            assert answer is None
        else:
            assert answer is not None and answer[0] in allowed, (op, node, body, answer)
    for _ in range(500):  # garbage that is not even a header, or lies about its length
        raw = bytearray(rng.randbytes(rng.randrange(0, 120)))
        kernel.dispatcher.handle(memoryview(raw))
    assert (await kernel.send(p.Op.READ, await inode_of(kernel, "small.bin"), read_body(0, 100))) == \
        (0, FILES["small.bin"][:100])


async def test_node_ids_are_a_function_of_the_snapshot_not_of_listing_order():
    from csi.tree import SnapshotTree

    found = {f"ds/{path}": {"size": len(data), "type": "file"} for path, data in FILES.items()}
    backwards = dict(reversed(list(found.items())))
    one, two = SnapshotTree.from_find(found, "ds"), SnapshotTree.from_find(backwards, "ds")
    assert all(one.lookup(path).inode == two.lookup(path).inode for path in [*FILES, "sub", "sub/deeper"])


def test_the_layouts_are_those_of_fuse_h():
    """Sizes from linux/fuse.h (7.38)."""
    sizes = {p.IN_HEADER: 40, p.OUT_HEADER: 16, p.ATTR: 88, p.ENTRY_OUT_HEAD: 40, p.ATTR_OUT_HEAD: 16,
             p.READ_IN: 40, p.INIT_OUT: 64, p.KSTATFS: 80, p.DIRENT: 24, p.OPEN_OUT: 16}
    assert {s.format: s.size for s in sizes} == {s.format: n for s, n in sizes.items()}
    assert len(p.entry_out(None, 1.5)) == 128 and os.sep == "/"
