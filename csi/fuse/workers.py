"""Several processes serving one FUSE session, and the process that holds it.

The holder keeps the session descriptor and one clone of it (FUSE_DEV_IOC_CLONE) per
serving process, and forks the serving processes; each reads requests from its clone.
Because the holder keeps every clone open, a serving process that dies (SIGKILL, OOM,
a crash) does not close its clone: the requests it had read but not answered stay
queued in the kernel on that clone instead of failing. The holder then asks the kernel
to send them again (FUSE_NOTIFY_RESEND, Linux ≥ 6.9) and forks a new process on the
same clone: a reader sees a pause, never an error, and files open across the crash keep
reading (with no-open there is no per-file state to lose).

The session and clones can outlive the holder too: a mount process started with a keeper
hands them to it (csi/keeper.py), and one started to resume takes them back and passes
them in (`clones`, `resume`: the kernel resends what the dead holder's children held).

The holder runs no event loop and holds no thread, so forking it is safe; what the
children serve is the caller's `serve(fd) -> exit code`. A child that exits 0 says the
session ended (unmounted); any other end of a child is a crash, and is replaced.
Knows nothing about datasets.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from csi.fuse import protocol, session

log = logging.getLogger("cachefs.fuse.workers")

Serve = Callable[[int], int]
CRASH_LOOP = 5  # children that exit this many times in a row within FAST seconds of starting: give up
FAST = 1.0


@dataclass
class Slot:
    fd: int  # the clone this slot's children read from
    pid: int = 0
    started: float = 0.0
    fast_deaths: int = 0  # consecutive deaths soon after starting
    restarts: int = 0


@dataclass
class Holder:
    """Forks `count` serving processes on clones of `fd`, replaces those that die."""

    fd: int
    count: int
    serve: Serve
    on_stop: Callable[[], None] = lambda: None  # runs on SIGTERM/SIGINT, before the children are stopped
    # Clones made beforehand (handed to the keeper, or taken back from it); else made in run().
    clones: list[int] = field(default_factory=list)
    resume: bool = False  # a session served before: ask the kernel to resend what was in flight
    # Called every `tick_every` seconds while children run (on the holder's own thread: it
    # has no other); the mount process re-hands its session to a keeper that restarted.
    tick: Callable[[], None] | None = None
    tick_every: float = 5.0
    slots: list[Slot] = field(default_factory=list)
    stopping: bool = False

    def run(self) -> int:
        """Serve until the session ends; 0 when it ended cleanly, 1 if the children crash-loop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        if self.tick is not None:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        clones = self.clones or [session.clone(self.fd) for _ in range(self.count)]
        self.slots = [Slot(fd) for fd in clones]
        for slot in self.slots:
            self._start(slot)
        if self.resume:  # requests the dead holder's children had read wait on their clones
            resend(self.fd)
        code = 0
        while any(slot.pid for slot in self.slots):
            try:
                pid, status = self._wait()
            except ChildProcessError:
                break
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = 0
            if self.stopping or os.waitstatus_to_exitcode(status) == 0:
                self._stop_all()  # the session is over (unmounted): the others will see ENODEV too
                continue
            log.warning("serving process %d %s; resending its requests and starting another",
                        pid, _describe(status))
            if not self._replace(slot, killed=os.WIFSIGNALED(status)):
                log.error("serving processes keep dying within %.0f s of starting; giving up the mount", FAST)
                code = 1
                self._stop_all()
                try:
                    self.on_stop()
                except OSError as e:
                    log.error("unmounting after the crash loop failed: %s", e)
        for slot in self.slots:
            os.close(slot.fd)
        return code

    def _wait(self) -> tuple[int, int]:
        """The next child to end, running `tick` every `tick_every` seconds meanwhile."""
        if self.tick is None:
            return os.wait()
        while True:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                return pid, status
            # SIGCHLD is blocked (run() blocks it when ticking): wait for it, or the next tick.
            if signal.sigtimedwait([signal.SIGCHLD], self.tick_every) is None and not self.stopping:
                try:
                    self.tick()
                except OSError as e:
                    log.warning("periodic check failed: %s", e)

    def _start(self, slot: Slot) -> None:
        slot.started = time.monotonic()
        holder = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: serve, never return into the holder's code
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                _die_with(holder)
                code = self.serve(slot.fd)
            except BaseException as e:  # noqa: BLE001 - a child must exit, whatever happened
                log.exception("serving process failed: %s", e)
            finally:
                os._exit(code)
        slot.pid = pid

    def _replace(self, slot: Slot, killed: bool) -> bool:
        """Resend what the dead child held, start another; False when it is a crash loop:
        children that fail by themselves (not killed from outside) right after starting."""
        resend(self.fd)
        if not killed and time.monotonic() - slot.started < FAST:
            slot.fast_deaths += 1
            if slot.fast_deaths >= CRASH_LOOP:
                return False
            time.sleep(0.1 * slot.fast_deaths)  # a crash loop must not spin
        else:
            slot.fast_deaths = 0
        slot.restarts += 1
        self._start(slot)
        return True

    def _stop(self, signum: int, _frame: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("%s: unmounting", signal.Signals(signum).name)
        try:
            self.on_stop()
        except OSError as e:
            log.error("unmounting failed: %s; stopping the serving processes anyway", e)
        self._stop_all()

    def _stop_all(self) -> None:
        self.stopping = True
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass


def _die_with(holder: int) -> None:
    """SIGKILL this child when the holder dies (PR_SET_PDEATHSIG): without the holder
    nobody replaces a dead child or stops the others, and the session is the holder's."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != holder:  # it died before prctl took effect
        os._exit(1)


def resend(fd: int) -> bool:
    """FUSE_NOTIFY_RESEND: the kernel queues again every request read but not answered."""
    try:
        os.write(fd, protocol.OUT_HEADER.pack(protocol.OUT_HEADER.size, protocol.NOTIFY_RESEND, 0))
        return True
    except OSError as e:
        # An older kernel: the dead child's requests stay unanswered until the unmount.
        log.error("the kernel cannot resend requests (%s); readers waiting on the dead process hang "
                  "until they are interrupted", errno.errorcode.get(e.errno or 0, e))
        return False


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with {os.waitstatus_to_exitcode(status)}"


def default_count(configured: int, cap: int = 8) -> int:
    """0: one per core (at most `cap`)."""
    return configured if configured > 0 else max(1, min(os.cpu_count() or 1, cap))
