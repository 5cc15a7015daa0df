"""Processes, read from /proc: which are alive, which are whose, and stopping them.

`cachefs down` stops the Ray it started (and not another Ray on the machine), and the CSI
plugin stops the mount processes it started: both find theirs by command line and
parentage, and stop them with a deadline, escalating from SIGTERM to SIGKILL.
"""

from __future__ import annotations

import os
import signal
from typing import Iterable

from cachefs.common.waiting import wait_until


def alive(pid: int) -> bool:
    """True for a live process; a zombie (exited, not yet reaped) counts as dead."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def command_line(pid: int) -> list[bytes]:
    """The process's argv (empty if it is gone or not ours to read)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return []


def processes() -> dict[int, tuple[int, bytes]]:
    """Every visible process: pid → (parent pid, raw command line)."""
    table: dict[int, tuple[int, bytes]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(name)] = (ppid, cmdline)
    return table


def with_descendants(roots: Iterable[int], table: dict[int, tuple[int, bytes]] | None = None) -> set[int]:
    """`roots` and every process below them."""
    table = processes() if table is None else table
    found = set(roots)
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


def terminate(pids: Iterable[int], grace: float, kill_grace: float = 5.0) -> list[int]:
    """SIGTERM, wait up to `grace` s, then SIGKILL the rest and wait `kill_grace` s; the
    pids still alive after that (none, normally)."""
    left = [p for p in pids if alive(p)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_grace)):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        wait_until(lambda: not any(alive(p) for p in left), wait)
        left = [p for p in left if alive(p)]
        if not left:
            break
    return left
