"""A mount whose serving processes are SIGKILLed under its readers: no reader sees an error.

The mount process holds the FUSE session and a clone per serving process; a killed one
is replaced and the requests it held are sent again by the kernel (csi/fuse/workers.py).
Readers drop the pages they read (fadvise DONTNEED), so every read reaches the serving
processes while they are being killed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from fuse_helpers import cleanup_mounts, origin_files, read_uncached

from cachefs.common import procs
from csi.mounts import find_mount

pytestmark = pytest.mark.timeout(240)

KILLS = 10


@pytest.fixture(scope="module")
def dataset(cachefs_cluster, sample_origin) -> str:
    name = cachefs_cluster.unique("fuse-respawn")
    cachefs_cluster.add_dataset(name, f"file://{sample_origin}")
    return name


@pytest.fixture(params=[2, 1], ids=["2-serving", "1-serving"])
def mounted(request, cachefs_cluster, dataset, tmp_path_factory) -> Iterator[tuple[Path, subprocess.Popen, Path]]:
    serving_processes, name = request.param, dataset
    root = tmp_path_factory.mktemp("respawn")
    point = root / "mnt"
    point.mkdir()
    env = {**os.environ, "CACHEFS_ENDPOINT": cachefs_cluster.endpoint, "CACHEFS_TOKEN": cachefs_cluster.token}
    log = root / "mount.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "csi.mount_process", "--source", f"cachefs://{name}",
                                 "--target", str(point), "--serving-processes", str(serving_processes)],
                                env=env,
                                stdout=subprocess.DEVNULL, stderr=logf)
    try:
        deadline = time.monotonic() + 60
        while find_mount(str(point)) is None or len(serving(proc.pid)) < serving_processes:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the mount did not appear"
            time.sleep(0.05)
        yield point, proc, log, serving_processes
    finally:
        subprocess.run(["fusermount3", "-u", str(point)], capture_output=True, timeout=10)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        cleanup_mounts(root)


def serving(holder: int) -> list[int]:
    return sorted(pid for pid, (ppid, _) in procs.processes().items() if ppid == holder)


def test_readers_see_no_error_while_serving_processes_are_killed_again_and_again(mounted, sample_origin):
    point, holder, log, count = mounted
    expected = {name: hashlib.sha256(data).digest() for name, data in origin_files(sample_origin).items()}
    names = sorted(expected)
    stop = threading.Event()
    reads = [0]
    failures: list[str] = []
    lock = threading.Lock()

    def reader(offset: int) -> None:
        i = offset
        while not stop.is_set():
            name = names[i % len(names)]
            i += 1
            try:
                data = read_uncached(point / name)
            except OSError as e:
                with lock:
                    failures.append(f"{name}: {e}")
                continue
            with lock:
                if hashlib.sha256(data).digest() != expected[name]:
                    failures.append(f"{name}: bytes differ")
                reads[0] += 1

    big = max(names, key=lambda n: (sample_origin / n).stat().st_size)
    held = os.open(point / big, os.O_RDONLY)  # open across every kill
    threads = [threading.Thread(target=reader, args=(k * 7,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for kill in range(KILLS):
            victims = serving(holder.pid)
            assert victims, "no serving process"
            os.kill(victims[kill % len(victims)], signal.SIGKILL)
            with lock:
                before = reads[0]
            deadline = time.monotonic() + 30
            # Replaced, and readers going on: a few more whole files read after the kill.
            while not (len(serving(holder.pid)) == count and victims[kill % len(victims)] not in serving(holder.pid)
                       and reads[0] >= before + 8):
                assert time.monotonic() < deadline, f"readers stalled after kill {kill}: {failures[:3]}"
                time.sleep(0.02)
            os.posix_fadvise(held, 0, 0, os.POSIX_FADV_DONTNEED)
            piece = os.pread(held, 4096, kill * 4096)
            assert piece == (sample_origin / big).read_bytes()[kill * 4096:(kill + 1) * 4096]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        os.close(held)
    assert failures == [] and reads[0] >= KILLS * 8
    assert holder.poll() is None and find_mount(str(point)) is not None
    assert log.read_text().count("killed by SIGKILL; resending its requests") == KILLS
