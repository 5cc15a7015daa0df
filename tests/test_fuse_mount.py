"""The FUSE volume itself, through `cachefs mount` / `cachefs unmount`, on the real cluster.

The same mount the CSI plugin starts for a pod: a read-only view of one snapshot,
listings from the manifest, bytes through the cachefs client, kernel page cache kept.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from fuse_helpers import cleanup_mounts, origin_files

from cachefs.common.procs import alive as pid_alive
from csi.mounter import mount_pids
from csi.mounts import find_mount

pytestmark = pytest.mark.timeout(180)

CLI_TIMEOUT = 90


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cachefs.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT)





@pytest.fixture(scope="module")
def env(cachefs_cluster, tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("fuse-home")
    return {**os.environ, "CACHEFS_ENDPOINT": cachefs_cluster.endpoint, "CACHEFS_TOKEN": cachefs_cluster.token,
            "CACHEFS_HOME": str(home), "CACHEFS_CONFIG": str(home / "no-config.toml")}


@pytest.fixture(scope="module")
def dataset(cachefs_cluster, sample_origin) -> str:
    name = cachefs_cluster.unique("fuse-sample")
    cachefs_cluster.add_dataset(name, f"file://{sample_origin}")
    return name


@pytest.fixture(scope="module")
def mounts_root(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("fuse-mounts")
    yield root
    cleanup_mounts(root)


@pytest.fixture(scope="module")
def mount(env, dataset, mounts_root) -> Iterator[Path]:
    """One mount shared by the read-only tests of this module."""
    point = mounts_root / "shared"
    done = cli(env, "mount", dataset, str(point))
    assert done.returncode == 0, done.stderr
    yield point
    cli(env, "unmount", str(point))


# ---- mount and unmount --------------------------------------------------------------------

def test_mount_shows_the_snapshot_and_unmount_leaves_nothing(env, dataset, mounts_root, sample_origin):
    point = mounts_root / "own"
    done = cli(env, "mount", dataset, str(point))
    assert done.returncode == 0, done.stderr
    assert "unmount" in done.stdout
    pids = mount_pids(str(point))
    assert len(pids) == 1 and find_mount(str(point)) is not None

    seen = {}
    for dirpath, _dirs, files in os.walk(point):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                seen[os.path.relpath(os.path.join(dirpath, name), point)] = f.read()
    assert seen == origin_files(sample_origin)

    done = cli(env, "unmount", str(point))
    assert done.returncode == 0, done.stderr
    assert find_mount(str(point)) is None and not pid_alive(pids[0])
    again = cli(env, "unmount", str(point))
    assert again.returncode == 2 and "nothing of cachefs is mounted" in again.stderr


def _serve(env: dict[str, str], dataset: str, point: Path) -> subprocess.Popen:
    """The mount process itself (our child, so its exit code can be read), once it answers."""
    point.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "csi.mount_process", "--source", f"cachefs://{dataset}",
                             "--target", str(point)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while find_mount(str(point)) is None:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the mount did not appear"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("how", ["sigterm", "fusermount3"])
def test_sigterm_or_fusermount_unmounts_and_the_process_exits_0(env, dataset, mounts_root, sample_origin, how):
    point = mounts_root / f"stop-{how}"
    proc = _serve(env, dataset, point)
    try:
        assert (point / "README.txt").read_bytes() == (sample_origin / "README.txt").read_bytes()
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            subprocess.run(["fusermount3", "-u", str(point)], check=True, timeout=10)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert find_mount(str(point)) is None and "unmounted" in err
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="sysfs tuning needs root")
def test_the_mount_raises_kernel_readahead_and_requests_in_flight(mount):
    device = find_mount(str(mount)).device
    with open(f"/sys/class/bdi/{device}/read_ahead_kb") as f:
        assert int(f.read()) == 8 * 1024
    connection = Path(f"/sys/fs/fuse/connections/{device.partition(':')[2]}")
    if connection.exists():  # only where fusectl is mounted (systemd hosts mount it)
        assert int((connection / "max_background").read_text()) == 64


def test_mounting_an_unknown_dataset_fails_with_a_message_and_mounts_nothing(env, mounts_root):
    point = mounts_root / "unknown"
    done = cli(env, "mount", "no-such-dataset", str(point))
    assert done.returncode == 2
    assert "no-such-dataset" in done.stderr and "Traceback" not in done.stderr
    assert find_mount(str(point)) is None


def test_every_command_has_help(env):
    for command in ("csi", "mount", "unmount"):
        done = cli(env, command, "--help")
        assert done.returncode == 0 and "usage:" in done.stdout


# ---- what a reader sees -------------------------------------------------------------------

def test_attributes_and_listings_match_the_manifest(mount, sample_origin):
    for path in sample_origin.rglob("*"):
        rel = path.relative_to(sample_origin)
        st = os.stat(mount / rel)
        if path.is_dir():
            assert st.st_mode & 0o7777 == 0o555 and (mount / rel).is_dir()
            assert sorted(os.listdir(mount / rel)) == sorted(os.listdir(path))
        else:
            assert st.st_mode & 0o7777 == 0o444 and st.st_size == path.stat().st_size


KINDS = [("empty", "empty.bin"), ("one_byte", "train/cats/002.jpg"), ("small", "train/cats/001.jpg"),
         ("exactly_one_block", "train/dogs/deep/er/x.bin"), ("several_blocks_last_partial", "val/big.bin"),
         ("odd_name", "val/name with spaces & ünïcode.txt")]


@pytest.mark.parametrize("kind,name", KINDS, ids=[k[0] for k in KINDS])
def test_every_kind_of_file_reads_back_byte_for_byte(mount, sample_origin, kind, name):
    expected = (sample_origin / name).read_bytes()
    with open(mount / name, "rb") as f:
        assert f.read() == expected
    with open(mount / name, "rb", buffering=0) as f:  # again, in small reads
        assert b"".join(iter(lambda: f.read(65536), b"")) == expected


def test_reads_at_any_offset_return_the_origin_bytes(mount, sample_origin):
    rng = random.Random(3)
    big = max(sample_origin.rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else -1)
    expected = big.read_bytes()
    fd = os.open(mount / big.relative_to(sample_origin), os.O_RDONLY)
    try:
        for _ in range(50):
            offset = rng.randrange(0, len(expected) + 10)
            length = rng.choice([1, 4096, 100_000, 1 << 20, 3 << 20])
            assert os.pread(fd, length, offset) == expected[offset:offset + length]
    finally:
        os.close(fd)


def test_missing_paths_are_enoent(mount):
    for path in ("no-such-file", "train/no-such-file", "no/such/dir/file"):
        with pytest.raises(FileNotFoundError):
            os.stat(mount / path)
        with pytest.raises(FileNotFoundError):
            open(mount / path, "rb")


WRITES = [
    ("create_file", lambda m: open(m / "new.txt", "w")),
    ("open_for_writing", lambda m: open(m / "README.txt", "r+b")),
    ("append", lambda m: open(m / "README.txt", "ab")),
    ("mkdir", lambda m: os.mkdir(m / "newdir")),
    ("unlink", lambda m: os.unlink(m / "README.txt")),
    ("rmdir", lambda m: os.rmdir(m / "val")),
    ("rename", lambda m: os.rename(m / "README.txt", m / "renamed.txt")),
    ("chmod", lambda m: os.chmod(m / "README.txt", 0o777)),
    ("truncate", lambda m: os.truncate(m / "README.txt", 0)),
    ("symlink", lambda m: os.symlink("README.txt", m / "link")),
    ("utime", lambda m: os.utime(m / "README.txt", (0, 0))),
]


@pytest.mark.parametrize("case,write", WRITES, ids=[w[0] for w in WRITES])
def test_every_write_is_refused_with_erofs(mount, case, write):
    with pytest.raises(OSError) as err:
        write(mount)
    assert err.value.errno == errno.EROFS


# ---- many readers -------------------------------------------------------------------------

def test_many_threads_read_through_one_mount_at_once(mount, sample_origin):
    expected = origin_files(sample_origin)
    names = sorted(expected) * 4
    random.Random(5).shuffle(names)

    def read(name: str) -> bool:
        with open(mount / name, "rb") as f:
            return f.read() == expected[name]

    with ThreadPoolExecutor(max_workers=16) as pool:
        assert all(pool.map(read, names, timeout=120))


_HASH_ALL = """
import hashlib, json, os, sys
root = sys.argv[1]
out = {}
for dirpath, _, files in os.walk(root):
    for name in files:
        path = os.path.join(dirpath, name)
        with open(path, "rb") as f:
            out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
print(json.dumps(out))
"""


def test_many_processes_read_through_one_mount_at_once(mount, sample_origin):
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in origin_files(sample_origin).items()}
    procs = [subprocess.Popen([sys.executable, "-c", _HASH_ALL, str(mount)], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and json.loads(out) == expected


# ---- caching ------------------------------------------------------------------------------

def _resident_pages(path: Path) -> tuple[int, int]:
    """(resident, total) pages of `path` in the page cache, by mincore(2) on a mapping."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
            return sum(v & 1 for v in vec), pages


def test_the_page_cache_survives_a_reopen(mount, sample_origin):
    name = str(next(p for p in sorted(sample_origin.rglob("*")) if p.is_file() and p.stat().st_size > 65536)
               .relative_to(sample_origin))
    with open(mount / name, "rb") as f:
        f.read()
    # Opening again must not drop the cached pages (keep_cache): the snapshot cannot change.
    resident, total = _resident_pages(mount / name)
    assert resident == total


# ---- failures -----------------------------------------------------------------------------

def test_a_read_nobody_can_serve_answers_eio_with_a_reason_instead_of_hanging(cachefs_cluster, env, mounts_root,
                                                                             tmp_path):
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "ok.bin").write_bytes(os.urandom(1000))
    (origin / "doomed.bin").write_bytes(os.urandom(50_000))
    name = cachefs_cluster.unique("fuse-broken")
    cachefs_cluster.add_dataset(name, f"file://{origin}")
    point = mounts_root / name
    mount_env = {**env, "CACHEFS_ORIGIN_FALLBACK": "false"}
    done = cli(mount_env, "mount", name, str(point), "--op-timeout", "20")
    assert done.returncode == 0, done.stderr
    try:
        # The origin loses the file after the snapshot: no cache node holds it yet, and
        # no origin can serve it any more, so the read must fail loudly and quickly.
        (origin / "doomed.bin").unlink()
        (origin / "doomed.bin").mkdir()
        started = time.monotonic()
        with pytest.raises(OSError) as err:
            with open(point / "doomed.bin", "rb") as f:
                f.read()
        assert err.value.errno == errno.EIO
        assert time.monotonic() - started < 25
        logs = "".join(p.read_text() for p in (Path(env["CACHEFS_HOME"]) / "logs").glob("*.log"))
        assert "doomed.bin" in logs and "EIO" in logs
        assert (point / "ok.bin").read_bytes() == (origin / "ok.bin").read_bytes()
    finally:
        cli(env, "unmount", "--lazy", str(point))
        shutil.rmtree(origin, ignore_errors=True)


# ---- tools no one here wrote, against the origin --------------------------------------------

def _run(*argv: str, cwd: Path | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def test_diff_finds_no_difference_from_the_origin(mount, sample_origin):
    assert _run("diff", "-r", str(sample_origin), str(mount)) == ""


def test_tar_of_the_mount_unpacks_to_the_origin(mount, sample_origin, tmp_path):
    archive = tmp_path / "mount.tar"
    _run("tar", "cf", str(archive), "-C", str(mount), ".")
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    _run("tar", "xf", str(archive), "-C", str(unpacked))
    assert _run("diff", "-r", str(sample_origin), str(unpacked)) == ""


def test_find_and_du_see_the_origin_s_names_types_and_sizes(mount, sample_origin):
    listing = "%P %y %s\n"
    files_only = lambda out: sorted(line for line in out.splitlines() if " f " in line)  # noqa: E731
    assert files_only(_run("find", str(mount), "-printf", listing)) == \
        files_only(_run("find", str(sample_origin), "-printf", listing))
    dirs = lambda root: sorted(_run("find", str(root), "-type", "d", "-printf", "%P\n").splitlines())  # noqa: E731
    assert dirs(mount) == dirs(sample_origin)
    modes = set(_run("find", str(mount), "-printf", "%y%m\n").split())
    assert modes <= {"f444", "d555"}
    names = sorted(_run("find", ".", "-type", "f", cwd=sample_origin).splitlines())
    assert _run("du", "-b", *names, cwd=mount) == _run("du", "-b", *names, cwd=sample_origin)


def test_mmap_and_sendfile_out_of_the_mount_give_the_origin_bytes(mount, sample_origin, tmp_path):
    for path in sorted(p for p in sample_origin.rglob("*") if p.is_file() and p.stat().st_size):
        relative = path.relative_to(sample_origin)
        expected = path.read_bytes()
        with open(mount / relative, "rb") as f:
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
                assert mapped[:] == expected, relative
            with open(tmp_path / "copy", "wb") as out:
                sent = 0
                while sent < len(expected):
                    n = os.sendfile(out.fileno(), f.fileno(), sent, len(expected) - sent)
                    assert n > 0
                    sent += n
        assert (tmp_path / "copy").read_bytes() == expected, relative


def test_a_mount_through_fusermount3_serves_the_same_bytes(env, dataset, mounts_root, sample_origin):
    """The unprivileged path: fusermount3 mounts and hands the session over _FUSE_COMMFD."""
    point = mounts_root / "via-fusermount3"
    point.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "csi.mount_process", "--source", f"cachefs://{dataset}",
                             "--target", str(point), "--mount-with", "fusermount3"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while find_mount(str(point)) is None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the mount did not appear"
            time.sleep(0.05)
        assert _run("diff", "-r", str(sample_origin), str(point)) == ""
        subprocess.run(["fusermount3", "-u", str(point)], check=True, timeout=10)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_unmount_with_files_open_says_busy_and_lazy_unmount_leaves_nothing_behind(env, dataset, mounts_root,
                                                                                 sample_origin):
    point = mounts_root / "busy"
    done = cli(env, "mount", dataset, str(point))
    assert done.returncode == 0, done.stderr
    pids = mount_pids(str(point))
    expected = (sample_origin / "README.txt").read_bytes()
    held = open(point / "README.txt", "rb")
    try:
        assert held.read(10) == expected[:10]
        done = cli(env, "unmount", str(point))
        assert done.returncode == 2 and "busy" in done.stderr and "Traceback" not in done.stderr
        assert held.read() == expected[10:]  # still served
        done = cli(env, "unmount", "--lazy", str(point))
        assert done.returncode == 0, done.stderr
        assert find_mount(str(point)) is None and not any(pid_alive(pid) for pid in pids)
    finally:
        held.close()
