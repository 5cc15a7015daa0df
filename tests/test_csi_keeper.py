"""The keeper holds each mount's FUSE session apart from the process that serves it.

Real processes, a real FUSE mount, the real cluster: the mount process is SIGKILLed
under readers (the keeper starts another on the kept session: no reader sees an error),
a new keeper takes the sessions over from the old one while a reader reads, both the
keeper and the mount process die (`cachefs mount` mounts again, old descriptors fail
rather than hang), and the keeper's socket is fed malformed requests.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fuse_helpers import cleanup_mounts, origin_files, read_uncached

from csi import keeperwire as wire
from csi import keeping
from csi.mounter import mount_pids
from csi.mounts import find_mount

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def dataset(cachefs_cluster, sample_origin) -> str:
    name = cachefs_cluster.unique("keeper")
    cachefs_cluster.add_dataset(name, f"file://{sample_origin}")
    return name


@pytest.fixture
def env(cachefs_cluster) -> dict[str, str]:
    return {**os.environ, "CACHEFS_ENDPOINT": cachefs_cluster.endpoint, "CACHEFS_TOKEN": cachefs_cluster.token}


def wait_for(what: str, check: Callable[[], object], timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def start_keeper(sock: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, dict]:
    """A keeper process; returns once it listens (its --json line says how many it took over)."""
    with open(log, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "cachefs.cli.main", "csi", "keeper", "--socket", str(sock),
                                 "--json"], env=env, stdout=subprocess.PIPE, stderr=logf)
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    assert line and line[0], f"the keeper did not start: {log.read_text()}"
    return proc, json.loads(line[0])


@pytest.fixture
def kept(tmp_path, env, dataset) -> Iterator[dict]:
    """A keeper and a mount whose session it holds."""
    sock, point, mlog = tmp_path / "run" / "keeper.sock", tmp_path / "mnt", tmp_path / "mount.log"
    point.mkdir()
    keepers = [start_keeper(sock, env, tmp_path / "keeper.log")[0]]
    with open(mlog, "wb") as logf:
        first = subprocess.Popen([sys.executable, "-m", "csi.mount_process", "--source", f"cachefs://{dataset}",
                                  "--target", str(point), "--keeper", str(sock)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=logf, start_new_session=True)
    try:
        wait_for("the mount, kept", lambda: find_mount(str(point)) and str(point) in keeping.sessions(str(sock)))
        yield {"sock": sock, "point": point, "log": mlog, "keepers": keepers, "first": first, "env": env,
               "dir": tmp_path}
    finally:
        subprocess.run(["fusermount3", "-u", str(point)], capture_output=True, timeout=10)
        for proc in keepers:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        cleanup_mounts(tmp_path)
        first.poll()


def serving_pid(k: dict) -> int:
    return keeping.sessions(str(k["sock"])).get(str(k["point"]), 0)


class Readers:
    """`count` threads reading every file again and again, bypassing the page cache."""

    def __init__(self, point: Path, origin: Path, count: int) -> None:
        self.point = point
        self.expected = {n: hashlib.sha256(d).digest() for n, d in origin_files(origin).items()}
        self.names = sorted(self.expected)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.reads = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(k * 7,), daemon=True) for k in range(count)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        while not self.stop.is_set():
            name = self.names[i % len(self.names)]
            i += 1
            try:
                ok = hashlib.sha256(read_uncached(self.point / name)).digest() == self.expected[name]
                problem = "" if ok else f"{name}: bytes differ"
            except OSError as e:
                problem = f"{name}: {e}"
            with self.lock:
                if problem:
                    self.failures.append(problem)
                else:
                    self.reads += 1

    def count(self) -> int:
        with self.lock:
            return self.reads

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def kill_and_wait_resumed(k: dict, readers: Readers, probe: Path | None = None) -> float:
    """SIGKILL the mount process; wait for the keeper's new one and readers going on; the
    seconds a read of `probe` started at the kill took (the pause a reader sees)."""
    victim = serving_pid(k)
    assert victim > 0
    before = readers.count()
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    if probe is not None:
        read_uncached(probe)
    pause = time.monotonic() - killed
    wait_for("a new mount process on the kept session",
             lambda: serving_pid(k) not in (0, victim) and mount_pids(str(k["point"])) == [serving_pid(k)])
    wait_for(f"readers going on after killing {victim}: {readers.failures[:3]}",
             lambda: readers.count() >= before + 8)
    return pause


def test_mount_process_killed_under_readers_resumes_with_no_failed_read(kept, sample_origin):
    point = kept["point"]
    big = max(origin_files(sample_origin).items(), key=lambda kv: len(kv[1]))
    held = os.open(point / big[0], os.O_RDONLY)  # open across every kill
    readers = Readers(point, sample_origin, 4)
    try:
        for kill in range(3):
            pause = kill_and_wait_resumed(kept, readers, point / big[0])
            print(f"a read started at the SIGKILL of the mount process took {pause:.2f} s")
            os.posix_fadvise(held, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(held, 4096, kill * 4096) == big[1][kill * 4096:(kill + 1) * 4096]
    finally:
        readers.close()
        os.close(held)
    assert readers.failures == [] and readers.reads >= 3 * 8
    (session,) = wire.call(str(kept["sock"]), {"op": "list"})[0]["sessions"]
    assert "env" not in session  # the token travels only to a new keeper
    text = kept["log"].read_text()
    assert text.count("resuming the kept session of") == 3 and "is not kept" not in text
    assert kept["keepers"][0].poll() is None and find_mount(str(point)) is not None


def test_new_keeper_takes_sessions_over_while_a_reader_reads(kept, sample_origin):
    old = kept["keepers"][0]
    readers = Readers(kept["point"], sample_origin, 1)
    try:
        new, started = start_keeper(kept["sock"], kept["env"], kept["dir"] / "keeper2.log")
        kept["keepers"].append(new)
        assert started["taken_over"] == 1
        assert str(kept["point"]) in keeping.sessions(str(kept["sock"]))  # answered by the new one
        kill_and_wait_resumed(kept, readers)  # the new keeper serves the session again
        assert old.poll() is None  # the old one idles (a restarted container would take them back)
        old.terminate()
        assert old.wait(timeout=30) == 0
    finally:
        readers.close()
    assert readers.failures == [] and readers.reads > 0


def test_a_restarted_keeper_gets_the_sessions_back_from_their_mount_processes(kept, sample_origin):
    readers = Readers(kept["point"], sample_origin, 1)
    try:
        kept["keepers"][0].kill()  # no hand-over: it holds nothing any more
        kept["keepers"][0].wait(timeout=30)
        new, started = start_keeper(kept["sock"], kept["env"], kept["dir"] / "keeper2.log")
        kept["keepers"].append(new)
        assert started["taken_over"] == 0
        wait_for("the mount process handing its session over again", lambda: serving_pid(kept), timeout=60)
        kill_and_wait_resumed(kept, readers)
    finally:
        readers.close()
    assert readers.failures == [] and readers.reads > 0


def test_keeper_and_mount_process_both_killed_mount_again(kept, dataset, sample_origin):
    point, files = kept["point"], origin_files(sample_origin)
    name = sorted(files)[0]
    held = os.open(point / name, os.O_RDONLY)
    try:
        kept["keepers"][0].kill()
        kept["keepers"][0].wait(timeout=30)
        os.kill(serving_pid_from_table(point), signal.SIGKILL)
        wait_for("the session's end", lambda: not mount_pids(str(point)))
        os.posix_fadvise(held, 0, 0, os.POSIX_FADV_DONTNEED)
        outcome: list[object] = []

        def old_read() -> None:
            try:
                outcome.append(os.pread(held, 100, 0))
            except OSError as e:
                outcome.append(e.errno)

        t = threading.Thread(target=old_read, daemon=True)
        t.start()
        t.join(30)
        assert outcome and outcome[0] in (errno.EIO, errno.ENOTCONN), f"old descriptor: {outcome} (hung if empty)"
        done = subprocess.run([sys.executable, "-m", "cachefs.cli.main", "mount", dataset, str(point)],
                              env=kept["env"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert read_uncached(point / name) == files[name]  # new opens work
        t = threading.Thread(target=old_read, daemon=True)
        t.start()
        t.join(30)
        assert len(outcome) == 2 and outcome[1] in (errno.EIO, errno.ENOTCONN), outcome
        print("old descriptor:", [errno.errorcode.get(o, o) for o in outcome])
    finally:
        try:
            os.close(held)
        except OSError as e:  # the dead session answers its FLUSH with ENOTCONN
            assert e.errno == errno.ENOTCONN


def serving_pid_from_table(point: Path) -> int:
    pids = mount_pids(str(point))
    assert len(pids) == 1, pids
    return pids[0]


def test_keeper_answers_malformed_requests_with_an_error(tmp_path):
    sock = tmp_path / "k.sock"
    proc, started = start_keeper(sock, dict(os.environ), tmp_path / "keeper.log")
    try:
        assert started["taken_over"] == 0
        read_end, write_end = os.pipe()
        rnd = random.Random(15)
        cases: list[tuple[bytes, list[int]]] = [
            (b"", [read_end]), (b"not json", []), (b"\xff\xfe", []), (b"[1, 2]", []), (b"{}", []),
            (b'{"op": "fly"}', []), (b'{"op": 7}', []), (b'{"op": "take"}', []), (b'{"op": "take", "target": 5}', []),
            (b'{"op": "take", "target": "/nowhere"}', []), (b'{"op": "revive", "target": "/nowhere"}', []),
            (b'{"op": "list"}', [read_end]), (b'{"op": "hold", "target": "/x", "argv": []}', []),
            (b'{"op": "hold", "target": "/x", "argv": [], "pid": 1}', [read_end, write_end]),
            (b'{"op": "hold", "target": "rel", "argv": []}', [read_end, write_end]),
            (b'{"op": "hold", "target": "/x", "argv": [1]}', [read_end, write_end]),
            (b'{"op": "hold", "target": "/x", "argv": [], "pid": true}', [read_end, write_end]),
            (b'{"op": "hold", "target": "/x", "argv": [], "env": {"A": 1}}', [read_end, write_end]),
            (b'{"op": "drop", "target": null}', []),
            (b"x" * (wire.MAX_MESSAGE + 10), []),
        ]
        cases += [(rnd.randbytes(rnd.randint(1, 300)), []) for _ in range(200)]
        cases += [(json.dumps({"op": rnd.choice(["hold", "take", "drop", "revive"]), "target": rnd.choice(["/a", 1, None, [], "/"]),
                               "argv": rnd.choice([[], "x", None])}).encode(), []) for _ in range(100)]
        fuse = [os.open("/dev/fuse", os.O_RDWR) for _ in range(2)]  # real FUSE descriptors, no mount
        cases.append((b'{"op": "hold", "target": "/x", "argv": [], "pid": 1}', fuse))
        conn = wire.connect(str(sock))
        for data, fds in cases:
            if data and b"handover" in data:
                continue  # a valid request: the keeper would hand over and leave
            if fds:
                socket.send_fds(conn, [data], fds)
            else:
                conn.send(data)
            answer, got = wire.receive(conn)
            wire.close_all(got)
            assert answer is not None and answer["ok"] is False and answer["error"], (data[:80], answer)
        conn.close()
        wire.close_all([read_end, write_end, *fuse])
        with wire.connect(str(sock)) as half:  # a client that leaves without a word
            half.shutdown(socket.SHUT_WR)
        assert keeping.sessions(str(sock)) == {}  # alive, nothing kept from all that
        assert proc.poll() is None
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_plugin_with_a_keeper_survives_its_mount_process_and_adopts_the_new_one(tmp_path, cachefs_cluster,
                                                                                  sample_origin):
    from csi_helpers import DATASET, Plugin

    info = cachefs_cluster.add_dataset(cachefs_cluster.unique("keeper-csi"), f"file://{sample_origin}",
                                       allowed_namespaces=["*"])
    sock = tmp_path / "k" / "keeper.sock"
    plugin = Plugin(tmp_path / "plugin", cachefs_cluster, {DATASET: info}, kubelet_dir=tmp_path)
    (tmp_path / "plugin").mkdir()
    plugin.env["CACHEFS_KEEPER_SOCKET"] = str(sock)
    pod = tmp_path / "pods" / "p1" / "volumes" / "kubernetes.io~csi" / "data" / "mount"
    pod.parent.mkdir(parents=True)
    keeper, _ = start_keeper(sock, plugin.env, tmp_path / "keeper.log")
    readers: Readers | None = None
    try:
        plugin.start().publish(pod)
        first = plugin.record(pod)["pid"]
        assert keeping.sessions(str(sock)) == {str(pod): first}
        readers = Readers(pod, sample_origin, 2)
        plugin.kill()  # as its container would be, with the mount process in it
        os.kill(first, signal.SIGKILL)
        k = {"sock": sock, "point": pod}
        second = wait_for("the keeper's mount process", lambda: serving_pid(k) not in (0, first) and serving_pid(k))
        before = readers.count()
        wait_for(f"readers going on: {readers.failures[:3]}", lambda: readers.count() >= before + 8)
        plugin.start()
        assert plugin.record(pod)["pid"] == second  # adopted on the kept session, not remounted
        readers.close()
        assert readers.failures == []
        plugin.unpublish(pod)
        assert find_mount(str(pod)) is None and not pod.exists()
        wait_for("the session dropped", lambda: keeping.sessions(str(sock)) == {})
    finally:
        if readers is not None:
            readers.close()
        plugin.stop()
        keeper.terminate()
        keeper.wait(timeout=30)
        cleanup_mounts(tmp_path)
