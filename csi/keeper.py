"""The keeper: holds every mount's FUSE session apart from the process that serves it.

`cachefs csi keeper --socket DIR/keeper.sock` (in the chart, a container of its own in the
plugin's pod). A mount process started with `--keeper` hands it the session descriptor
and the clone of every serving process (SCM_RIGHTS), with what starting it again needs
(its arguments, the CACHEFS_* environment, its log, the snapshot it pinned). Because the
keeper keeps those descriptors open, a mount process that dies (SIGKILL, its container
restarted) does not end the session: the kernel keeps the requests its serving processes
had read queued on their clones, and the keeper starts a new mount process with
`--resume`, which takes the descriptors back, asks the kernel to resend those requests
and serves them. Readers see a pause, never ENOTCONN; node ids are a function of the
snapshot, so open files and cached entries stay valid.

A new keeper started on the same socket path asks the old one to hand over: the old one
sends every session with its record, stops listening and closes them, and waits to be
stopped (a smooth upgrade; exiting would get its container restarted, and the restarted
keeper would take the sessions back). Requests: see
csi/keeperwire.py. Bad requests are answered with an error, never a crash.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from csi import keeperwire as wire
from csi.mounts import FSTYPE, read_mounts

log = logging.getLogger("cachefs.csi.keeper")

FUSE_DEVICE = os.makedev(10, 229)
MAX_CLONES = 8
CRASH_LOOP = 8  # mount processes that die this many times in a row within FAST s of starting: give up
FAST = 10.0
BACKOFF = 0.25  # seconds before starting again after the first quick death; doubles, at most MAX_BACKOFF
MAX_BACKOFF = 30.0


@dataclass
class Kept:
    """One session: its descriptors ([session, clone, ...]) and how to serve it again."""

    target: str
    fds: list[int]
    argv: list[str]
    env: dict[str, str]
    log: str = ""
    pins: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    pidfd: int = -1
    started: float = 0.0
    fast_deaths: int = 0
    retry_at: float = 0.0  # when to start a mount process again (0: not waiting to)
    child: subprocess.Popen | None = None

    def record(self, with_env: bool = False) -> dict[str, Any]:
        """What a client may see; the environment (the token among it) only for a new keeper."""
        out = {"target": self.target, "argv": self.argv, "log": self.log, "pins": self.pins, "pid": self.pid}
        return {**out, "env": self.env} if with_env else out


class Keeper:
    def __init__(self, path: str, python: str = sys.executable) -> None:
        self.path = os.path.abspath(path)
        self.python = python
        self.kept: dict[str, Kept] = {}
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.retired = False  # handed everything over: idle until stopped
        self.terminated = False  # SIGTERM or SIGINT arrived
        self.listener: socket.socket | None = None

    # ---- life ------------------------------------------------------------------------

    def start(self) -> int:
        """Take over from a keeper already on the socket, if any, then listen; sessions taken."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        taken = self._take_over()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the socket hands out sessions: its owner only
        try:
            listener.bind(self.path)
        finally:
            os.umask(old)
        listener.listen(64)
        listener.setblocking(False)
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ, ("accept", None))
        log.info("keeper listening on %s with %d sessions", self.path, taken)
        return taken

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            while not self.stopping:
                self._retry_due()
                for key, _ in self.selector.select(timeout=self._wait()):
                    kind, what = key.data
                    if kind == "accept":
                        self._accept()
                    elif kind == "conn":
                        self._serve(what)
                    elif kind == "pid" and what in self.kept:
                        self._on_exit(self.kept[what])
                    if self.stopping:
                        break
        finally:
            self.close()
        if self.retired:
            self._idle()
        return 0

    def _wait(self) -> float:
        """Seconds to wait for events: at most 1, less when a start again is due sooner."""
        due = [k.retry_at for k in self.kept.values() if k.retry_at]
        return max(0.0, min([1.0, *(d - time.monotonic() for d in due)]))

    def _retry_due(self) -> None:
        now = time.monotonic()
        for kept in list(self.kept.values()):
            if kept.retry_at and now >= kept.retry_at:
                self._respawn(kept)

    def _idle(self) -> None:
        """After a hand-over, wait to be stopped rather than exit: in a pod, an exited keeper's
        container is restarted, and the restarted keeper would take the sessions back."""
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # mount processes we started: reaped as they end
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        stops = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        if not self.terminated:
            log.info("holding nothing now; waiting to be stopped")
            signal.sigwait(stops)

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("%s: stopping; mount processes keep serving their sessions", signal.Signals(signum).name)
        self.stopping = self.terminated = True

    def close(self) -> None:
        for kept in self.kept.values():
            self._forget(kept)
        self.kept.clear()
        for key in list(self.selector.get_map().values()):  # the listener and connections
            self.selector.unregister(key.fileobj)
            if isinstance(key.fileobj, socket.socket):
                key.fileobj.close()

    # ---- hand-over -------------------------------------------------------------------

    def _take_over(self) -> int:
        """Ask a keeper already listening on our path for its sessions (it retires after)."""
        if not os.path.exists(self.path):
            return 0
        try:
            sock = wire.connect(self.path, timeout=0)
        except wire.KeeperError:
            return 0  # a stale socket file: nobody to take over from
        taken = 0
        with sock:
            sock.settimeout(30)
            wire.send(sock, {"op": "handover"})
            while True:
                message, fds = wire.receive(sock)
                if message is None:
                    raise wire.KeeperError(errno.EIO, "the old keeper ended the hand-over early")
                if message.get("done") is not None or not message.get("ok", True):
                    if not message.get("ok"):
                        raise wire.KeeperError(errno.EIO, f"the old keeper refused to hand over: {message}")
                    break
                try:
                    self._adopt(message.get("record") or {}, fds)
                    taken += 1
                except wire.BadMessage as e:
                    log.error("dropping a session the old keeper sent: %s", e)
        log.info("took over %d sessions from the keeper at %s", taken, self.path)
        return taken

    # ---- requests --------------------------------------------------------------------

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (0, os.geteuid()):
            log.warning("refused a connection from uid %d", uid)
            conn.close()
            return
        conn.settimeout(5.0)
        self.selector.register(conn, selectors.EVENT_READ, ("conn", conn))

    def _serve(self, conn: socket.socket) -> None:
        """Answer one request on `conn`; end the connection at its end or on a socket error."""
        try:
            message, fds = wire.receive(conn)
        except wire.BadMessage as e:
            self._answer(conn, {"ok": False, "error": str(e)})
            return
        except OSError as e:
            log.info("a connection failed: %s", e)
            message, fds = None, []
        if message is None:
            self.selector.unregister(conn)
            conn.close()
            return
        try:
            answer, out = self._handle(message, fds, conn)
        except wire.BadMessage as e:
            wire.close_all(fds)
            answer, out = {"ok": False, "error": str(e)}, []
        except OSError as e:
            wire.close_all(fds)
            answer, out = {"ok": False, "error": f"{type(e).__name__}: {e}"}, []
        if answer is not None:
            self._answer(conn, answer, out)

    def _answer(self, conn: socket.socket, answer: dict[str, Any], fds: list[int] | None = None) -> None:
        try:
            wire.send(conn, answer, fds)
        except OSError as e:
            log.info("could not answer a client: %s", e)

    def _handle(self, message: dict[str, Any], fds: list[int],
                conn: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
        op = message.get("op")
        if op not in wire.OPS:
            raise wire.BadMessage(f"unknown op {op!r}; one of {', '.join(wire.OPS)}")
        if op != "hold" and fds:
            raise wire.BadMessage(f"{op!r} takes no descriptors")
        if op == "hold":
            kept = self._adopt(message, fds)
            return {"ok": True, "target": kept.target}, []
        if op == "list":
            return {"ok": True, "sessions": [k.record() for k in self.kept.values()]}, []
        if op == "handover":
            self._hand_over(conn)
            return None, []
        kept = self.kept.get(wire.field(message, "target", str))
        if kept is None:
            return {"ok": False, "error": f"no session is kept for {message['target']!r}"}, []
        if op == "take":
            return {"ok": True, "record": kept.record(), "clones": len(kept.fds) - 1}, list(kept.fds)
        if op == "drop":
            self._forget(kept)
            del self.kept[kept.target]
            log.info("dropped the session of %s", kept.target)
            return {"ok": True}, []
        # revive: a mount process serving it, now
        if kept.child is not None:
            kept.child.poll()  # reap our own child, so a dead one does not look alive
        if not _alive(kept.pid):
            self._respawn(kept)
        return {"ok": True, "pid": kept.pid}, []

    def _adopt(self, record: dict[str, Any], fds: list[int]) -> Kept:
        """Keep a session (from a mount process's `hold` or the old keeper's hand-over)."""
        target = wire.field(record, "target", str)
        if not os.path.isabs(target) or "\x00" in target:
            raise wire.BadMessage(f"target {target!r} is not an absolute path")
        argv = wire.field(record, "argv", list)
        env = wire.field(record, "env", dict, {})
        pins = wire.field(record, "pins", dict, {})
        if not all(isinstance(a, str) for a in argv) or not all(
                isinstance(k, str) and isinstance(v, str) for d in (env, pins) for k, v in d.items()):
            raise wire.BadMessage("argv, env and pins hold strings only")
        pid = wire.field(record, "pid", int)
        if pid <= 0:
            raise wire.BadMessage(f"pid {pid} is not a process")
        if not _mounted(target):
            raise wire.BadMessage(f"{target} is not a cachefs mount: there is no session to keep")
        if not 2 <= len(fds) <= MAX_CLONES + 1:
            raise wire.BadMessage(f"a session comes with its descriptor and 1 to {MAX_CLONES} clones, "
                                  f"not {len(fds)} descriptors")
        for fd in fds:
            st = os.fstat(fd)
            if not stat.S_ISCHR(st.st_mode) or st.st_rdev != FUSE_DEVICE:
                raise wire.BadMessage("a descriptor handed over is not /dev/fuse")
        kept = Kept(target=target, fds=list(fds), argv=list(argv), env=dict(env),
                    log=wire.field(record, "log", str, ""), pins=dict(pins),
                    pid=pid, started=time.monotonic())
        old = self.kept.pop(target, None)
        if old is not None:
            self._forget(old)
        self.kept[target] = kept
        self._watch(kept)
        log.info("keeping the session of %s (mount process %d, %d clones)", target, kept.pid, len(fds) - 1)
        return kept

    def _hand_over(self, conn: socket.socket) -> None:
        """Send every session to the new keeper, then stop (its fds close with us)."""
        conn.settimeout(30)
        for kept in self.kept.values():
            wire.send(conn, {"ok": True, "record": kept.record(with_env=True)}, kept.fds)
        wire.send(conn, {"ok": True, "done": len(self.kept)})
        log.info("handed %d sessions over to a new keeper", len(self.kept))
        self.stopping = self.retired = True

    # ---- mount processes -------------------------------------------------------------

    def _watch(self, kept: Kept) -> None:
        if kept.pid <= 0:
            return
        try:
            kept.pidfd = os.pidfd_open(kept.pid)
        except ProcessLookupError:
            kept.pidfd = -1
            self._on_exit(kept)
            return
        self.selector.register(kept.pidfd, selectors.EVENT_READ, ("pid", kept.target))

    def _unwatch(self, kept: Kept) -> None:
        if kept.pidfd >= 0:
            self.selector.unregister(kept.pidfd)
            os.close(kept.pidfd)
            kept.pidfd = -1
        if kept.child is not None:
            kept.child.poll()  # reaps it when it is our own child and gone

    def _forget(self, kept: Kept) -> None:
        self._unwatch(kept)
        wire.close_all(kept.fds)
        kept.fds = []

    def _on_exit(self, kept: Kept) -> None:
        self._unwatch(kept)
        if not _mounted(kept.target):
            log.info("mount process %d of %s ended and nothing is mounted there; dropping its session",
                     kept.pid, kept.target)
            self._forget(kept)
            self.kept.pop(kept.target, None)
            return
        # Killed by a signal (from outside: kill, a container stopped), or not our child, so
        # unknown: start again at once. Dying by itself soon after starting counts to a crash loop.
        code = kept.child.returncode if kept.child is not None else None
        if code is None or code < 0 or time.monotonic() - kept.started >= FAST:
            kept.fast_deaths = 0
            log.warning("mount process %d of %s is gone; starting another on the kept session", kept.pid,
                        kept.target)
            self._respawn(kept)
            return
        kept.fast_deaths += 1
        if kept.fast_deaths >= CRASH_LOOP:
            log.error("mount processes of %s keep dying within %.0f s of starting; giving the session up "
                      "(readers get ENOTCONN; the plugin mounts it again): see %s", kept.target, FAST,
                      kept.log or "their log")
            self._forget(kept)
            self.kept.pop(kept.target, None)
            return
        # The new ones fail (the cluster unreachable?): back off, readers wait meanwhile.
        delay = min(BACKOFF * 2 ** (kept.fast_deaths - 1), MAX_BACKOFF)
        log.warning("mount process %d of %s is gone (%d quick deaths); starting another on the kept session "
                    "in %.2f s", kept.pid, kept.target, kept.fast_deaths, delay)
        kept.retry_at = time.monotonic() + delay

    def _respawn(self, kept: Kept) -> None:
        kept.retry_at = 0.0
        argv = [self.python, "-m", "csi.mount_process", *kept.argv, "--keeper", self.path, "--resume"]
        env = {**os.environ, **kept.env}
        try:
            logf = open(kept.log, "ab") if kept.log else open(os.devnull, "wb")
        except OSError as e:
            log.warning("cannot open %s (%s); the new mount process logs nowhere", kept.log, e)
            logf = open(os.devnull, "wb")
        with logf:
            kept.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                                          start_new_session=True, close_fds=True, cwd="/")
        kept.pid, kept.started = kept.child.pid, time.monotonic()
        self._watch(kept)
        log.info("started mount process %d to serve %s again", kept.pid, kept.target)


def _mounted(target: str) -> bool:
    """Is `target` a cachefs mount? From the mount table only: never touch the mount point,
    whose server may be the one waiting for us (before its first request, or dead)."""
    entry = read_mounts().get(target)
    return entry is not None and entry.fstype == FSTYPE


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

