"""The FUSE operations without a kernel mount: the promises a mount cannot show quickly.

A read that never returns must answer EIO within the op deadline (a hung FUSE request
hangs the reader); every failure must become an errno, never a crash. The filesystem
under the operations is an fsspec memory filesystem, with one subclass that blocks or
fails on purpose.
"""

from __future__ import annotations

import errno
import threading
import time

import mfusepy as fuse
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from cachefs.errors import NodeUnavailable
from csi.config import MountConfig
from csi.fusefs import DatasetOperations
from csi.tree import SnapshotTree

pytestmark = pytest.mark.timeout(60)


class FileInfo:
    """Stands in for libfuse's fuse_file_info (raw_fi): flags in, fh and keep_cache out."""

    def __init__(self, flags: int = 0) -> None:
        self.flags, self.fh, self.keep_cache = flags, 0, 0


class TroubledFS(MemoryFileSystem):
    """Reads of 'stuck' block until released; reads of 'down' fail as an unreachable cluster does."""

    protocol = "troubled"
    release = threading.Event()

    def cat_file(self, path, start=None, end=None, **kwargs):
        if "stuck" in path:
            self.release.wait(30)
        if "down" in path:
            raise NodeUnavailable("no cache node answered and the origin is unreachable")
        return super().cat_file(path, start, end, **kwargs)

    def open(self, path, mode="rb", **kwargs):
        if mode != "rb":
            return super().open(path, mode, **kwargs)
        fs = self

        class File:
            def seek(self, offset):
                self.offset = offset

            def read(self, size):
                return fs.cat_file(path, self.offset, self.offset + size)

            def close(self):
                pass

        return File()


@pytest.fixture
def ops():
    fs = TroubledFS(skip_instance_cache=True)
    fs.store.clear()
    for name in ("ds/ok.bin", "ds/sub/stuck.bin", "ds/down.bin"):
        fs.pipe_file(name, b"x" * 10_000)
    tree = SnapshotTree.from_fs(fs, "ds")
    operations = DatasetOperations(fs, "ds", tree, MountConfig(op_timeout=1.0), mtime=1_700_000_000.0)
    yield operations
    TroubledFS.release.set()
    operations.destroy("/")
    TroubledFS.release.clear()


def _open(ops: DatasetOperations, path: str, flags: int = 0) -> FileInfo:
    fi = FileInfo(flags)
    ops.open(path, fi)
    return fi


def test_the_tree_comes_from_one_listing_and_answers_attributes(ops):
    assert sorted(name if isinstance(name, str) else name[0] for name in ops.readdir("/", 0)) == \
        [".", "..", "down.bin", "ok.bin", "sub"]
    assert ops.getattr("/ok.bin")["st_size"] == 10_000
    assert ops.getattr("/sub")["st_mode"] & 0o777 == 0o555
    assert ops.statfs("/")["f_files"] == 3 + 2  # files + directories (root, sub)


def test_open_keeps_the_page_cache_and_reads_return_the_bytes(ops):
    fi = _open(ops, "/ok.bin")
    assert fi.keep_cache == 1
    assert ops.read("/ok.bin", 4096, 8192, fi) == b"x" * (10_000 - 8192)
    assert ops.read("/ok.bin", 4096, 20_000, fi) == b""
    ops.release("/ok.bin", fi)


def test_a_read_that_never_returns_answers_eio_at_the_deadline(ops):
    fi = _open(ops, "/sub/stuck.bin")
    started = time.monotonic()
    with pytest.raises(fuse.FuseOSError) as err:
        ops.read("/sub/stuck.bin", 4096, 0, fi)
    assert err.value.errno == errno.EIO
    assert 0.9 < time.monotonic() - started < 5


def test_a_cluster_and_origin_failure_answers_eio_with_a_log_line(ops, caplog):
    fi = _open(ops, "/down.bin")
    with pytest.raises(fuse.FuseOSError) as err:
        ops.read("/down.bin", 4096, 0, fi)
    assert err.value.errno == errno.EIO
    assert "down.bin" in caplog.text and "origin is unreachable" in caplog.text


ERRNOS = [
    ("missing_file", lambda o: o.getattr("/nope"), errno.ENOENT),
    ("missing_dir_listing", lambda o: list(o.readdir("/nope", 0)), errno.ENOENT),
    ("open_for_writing", lambda o: _open(o, "/ok.bin", flags=1), errno.EROFS),  # O_WRONLY
    ("open_a_directory", lambda o: _open(o, "/sub"), errno.EISDIR),
    ("write", lambda o: o.write("/ok.bin", b"y", 0, 0), errno.EROFS),
    ("mkdir", lambda o: o.mkdir("/new", 0o755), errno.EROFS),
    ("unlink", lambda o: o.unlink("/ok.bin"), errno.EROFS),
    ("access_for_writing", lambda o: o.access("/ok.bin", 2), errno.EROFS),  # W_OK
]


@pytest.mark.parametrize("case,call,code", ERRNOS, ids=[e[0] for e in ERRNOS])
def test_errors_are_errnos(ops, case, call, code):
    with pytest.raises(fuse.FuseOSError) as err:
        call(ops)
    assert err.value.errno == code
