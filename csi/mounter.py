"""Start, check and stop mount processes; the only module that runs fusermount3.

A mount is one detached process (csi.mount_process) in its own session, so the process
that started it (the CSI plugin, the CLI) may die or restart without taking the mount
with it. Whether a mount is healthy is read from /proc/self/mountinfo and the process
table, never by touching the mount point, which would block on a hung FUSE server; the
one place that does touch it (readiness) does so on a helper thread with a deadline.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Mapping

from cachefs.common import procs
from cachefs.common.errors import CachefsError
from cachefs.common.waiting import wait_until
from csi.config import MountConfig
from csi.mounts import find_mount

log = logging.getLogger("cachefs.csi.mounter")

FUSERMOUNT = "fusermount3"
MOUNT_MODULE = "csi.mount_process"


class MountError(CachefsError):
    """A mount could not be started, checked or stopped; the message says why."""


class MountTimeout(MountError):
    """The mount did not answer in time."""


class Health(enum.Enum):
    OK = "ok"  # mounted, and its process is alive
    BROKEN = "broken"  # mounted but its process is gone: "transport endpoint is not connected"
    ABSENT = "absent"  # nothing of ours is mounted there


def is_mount_process(pid: int, target: str) -> bool:
    """Is `pid` our mount process for `target` (and not a reused pid)?"""
    argv = procs.command_line(pid)
    return MOUNT_MODULE.encode() in argv and os.fsencode(target) in argv and procs.alive(pid)


def log_tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


class Mounter:
    """Owns the mount processes it started (to reap them) and the fusermount3 calls."""

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self._children: dict[int, subprocess.Popen] = {}
        self._children_lock = threading.Lock()  # guards _children

    # ---- start ---------------------------------------------------------------------

    def spawn(self, source: str, target: str, *, log_path: str, env: Mapping[str, str], config: MountConfig,
              fsname: str = "", mtime: float = 0.0, keeper: str = "") -> int:
        """Start a detached mount process on `target` (created if missing); returns its pid.
        `keeper`: the keeper's socket, to hand the session to (csi/keeper.py)."""
        os.makedirs(target, exist_ok=True)
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        from csi.mount_process import config_args

        argv = [self.python, "-m", MOUNT_MODULE, "--source", source, "--target", target,
                "--fsname", fsname or source, "--mtime", str(mtime), *config_args(config)]
        if keeper:
            argv += ["--keeper", keeper]
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=dict(env),
                                    start_new_session=True, close_fds=True, cwd="/")
        with self._children_lock:
            self._children[proc.pid] = proc
        log.info("started mount process %d for %s on %s (log %s)", proc.pid, source, target, log_path)
        return proc.pid

    def start(self, source: str, target: str, *, log_path: str, env: Mapping[str, str], config: MountConfig,
              fsname: str = "", mtime: float = 0.0, timeout: float = 30.0, keeper: str = "") -> int:
        """spawn, then wait until the mount answers; on failure nothing is left behind."""
        pid = self.spawn(source, target, log_path=log_path, env=env, config=config, fsname=fsname, mtime=mtime,
                         keeper=keeper)
        try:
            self.wait_ready(target, pid, timeout=timeout, log_path=log_path)
        except MountError:
            self.stop(target, pid, timeout=5.0)
            raise
        return pid

    def wait_ready(self, target: str, pid: int, *, timeout: float, log_path: str = "") -> None:
        """Wait until `target` is our FUSE mount and answers a stat, or raise MountError."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive(pid):
                raise MountError(f"the mount process for {target} exited before the mount was ready: "
                                 f"{log_tail(log_path) or 'no log'}")
            if find_mount(target) is not None:
                remaining = deadline - time.monotonic()
                if _stat_within(target, max(remaining, 0.1)):
                    return
            if time.monotonic() >= deadline:
                raise MountTimeout(f"the mount on {target} did not answer within {timeout:.0f} s: "
                                   f"{log_tail(log_path) or 'no log'}")
            time.sleep(0.05)

    # ---- check ---------------------------------------------------------------------

    def alive(self, pid: int) -> bool:
        with self._children_lock:
            proc = self._children.get(pid)
        if proc is not None and proc.poll() is not None:  # reaps our own exited child
            with self._children_lock:
                self._children.pop(pid, None)
            return False
        return procs.alive(pid)

    def health(self, target: str, pid: int) -> Health:
        mounted = find_mount(target) is not None
        if not mounted:
            return Health.ABSENT
        return Health.OK if self.alive(pid) and is_mount_process(pid, target) else Health.BROKEN

    # ---- stop ----------------------------------------------------------------------

    def unmount(self, target: str, lazy: bool = False, timeout: float = 10.0) -> None:
        """fusermount3 -u (or -uz); a target that is not mounted is not an error."""
        if find_mount(target) is None:
            return
        argv = [FUSERMOUNT, "-uz" if lazy else "-u", target]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise MountError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from e
        except FileNotFoundError as e:
            raise MountError(f"{FUSERMOUNT} is not installed (apt-get install fuse3)") from e
        if done.returncode != 0 and find_mount(target) is not None:
            raise MountError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.returncode}")

    def stop(self, target: str, pid: int, timeout: float = 10.0) -> None:
        """Unmount `target` and make sure its process is gone; safe to call again."""
        try:
            self.unmount(target, timeout=timeout)
        except MountError as e:
            log.warning("%s; unmounting lazily", e)
            self.unmount(target, lazy=True, timeout=timeout)
        if (pid > 0 and is_mount_process(pid, target)) or self._is_child(pid):
            self._wait_exit(pid, timeout)

    def _is_child(self, pid: int) -> bool:
        with self._children_lock:
            return pid in self._children

    def _wait_exit(self, pid: int, timeout: float) -> None:
        """Unmounting ends the FUSE loop at once; a process that lingers (a lazy unmount with
        files still open keeps its session) gets SIGTERM after a short grace, then SIGKILL."""
        if wait_until(lambda: not self.alive(pid), min(timeout, 2.0)):
            return
        log.info("mount process %d still serves files opened before the unmount; stopping it", pid)
        if procs.terminate([pid], grace=min(timeout, 5.0)):
            raise MountError(f"mount process {pid} survived SIGKILL")


def _stat_within(path: str, timeout: float) -> bool:
    """os.stat on a helper thread: a hung FUSE server must not hang the caller."""
    result: list[bool] = []

    def probe() -> None:
        try:
            os.stat(path)
            result.append(True)
        except OSError as e:
            result.append(False)
            if e.errno != errno.ENOTCONN:
                log.debug("stat %s: %s", path, e)

    t = threading.Thread(target=probe, daemon=True, name="stat-probe")
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def mount_pids(target: str) -> list[int]:
    """Pids of our mount processes holding `target` (for `cachefs unmount`, which has no
    records); not the serving processes they forked, which end with them."""
    ours = {pid for pid in procs.processes() if is_mount_process(pid, target)}
    table = procs.processes()
    return sorted(pid for pid in ours if table.get(pid, (0, b""))[0] not in ours)
