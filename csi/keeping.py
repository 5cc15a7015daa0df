"""What a mount process and the plugin ask the keeper (csi/keeper.py), over csi/keeperwire.py.

A mount process hands its session over once mounted (`hold`), takes it back when it was
started to resume one (`take`), and lets it go when the mount ended cleanly (`drop`).
The plugin asks which sessions are kept and for a mount process to serve one (`revive`).
Handing over is best effort: a keeper that does not answer costs the mount its
protection, never the mount itself.
"""

from __future__ import annotations

import logging
import os
import stat

from csi import keeperwire as wire
from csi.keeperwire import KeeperError

log = logging.getLogger("cachefs.csi.keeping")

__all__ = ["KeeperError", "Held", "hold", "take", "drop", "sessions", "revive", "own_argv"]

# What a resumed mount process needs from the environment (the token among them: the
# keeper holds it in memory only, behind a socket only its own uid and root may use).
ENV_PREFIX = "CACHEFS_"


def own_argv(argv: list[str]) -> list[str]:
    """A mount process's arguments without the keeper's own (--keeper PATH, --resume)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--keeper":
            skip = True
        elif arg != "--resume" and not arg.startswith("--keeper="):
            out.append(arg)
    return out


def _log_path() -> str:
    """Where this process logs (its stderr, when that is a file): the resumed one logs there too."""
    try:
        if stat.S_ISREG(os.fstat(2).st_mode):
            return os.readlink("/proc/self/fd/2")
    except OSError:
        pass
    return ""


def hold(path: str, target: str, fd: int, clones: list[int], argv: list[str], pins: dict[str, str]) -> bool:
    """Hand the session (and every clone) to the keeper; False (logged) when it cannot take it."""
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    message = {"op": "hold", "target": target, "argv": argv, "env": env, "log": _log_path(), "pins": pins,
               "pid": os.getpid()}
    try:
        wire.call(path, message, [fd, *clones])
    except KeeperError as e:
        log.warning("the session of %s is not kept (%s): it ends with this process", target, e)
        return False
    log.info("the keeper at %s holds the session of %s", path, target)
    return True


class Held:
    """A mount's session as handed to the keeper, handed again to a keeper that lost it.

    `check` runs every few seconds in the mount process (workers.Holder's tick): one `list`
    on the socket (a round trip of microseconds); when the keeper there does not hold our
    target (it was restarted without a hand-over), the session is handed over again.
    """

    def __init__(self, path: str, target: str, fd: int, clones: list[int], argv: list[str],
                 pins: dict[str, str]) -> None:
        self.path, self.target, self.fd, self.clones, self.argv, self.pins = path, target, fd, clones, argv, pins
        self.unreachable = False  # said once in the log, not every tick

    def hold(self) -> bool:
        return hold(self.path, self.target, self.fd, self.clones, self.argv, self.pins)

    def check(self) -> None:
        try:
            kept = self.target in sessions(self.path, timeout=2.0)
        except KeeperError as e:
            if not self.unreachable:
                log.warning("the keeper does not answer (%s); the session is not kept until it does", e)
            self.unreachable = True
            return
        self.unreachable = False
        if not kept:
            log.info("the keeper at %s does not hold %s (it was restarted?); handing the session over again",
                     self.path, self.target)
            self.hold()


def take(path: str, target: str) -> tuple[int, list[int], dict[str, str]]:
    """(session fd, clones, pins) of `target`, from the keeper."""
    answer, fds = wire.call(path, {"op": "take", "target": target})
    if len(fds) < 2:
        wire.close_all(fds)
        raise KeeperError(0, f"the keeper sent {len(fds)} descriptors for {target}, not a session and its clones")
    for fd in fds:
        os.set_inheritable(fd, True)  # the serving processes fork from us
    pins = (answer.get("record") or {}).get("pins") or {}
    return fds[0], fds[1:], dict(pins)


def drop(path: str, target: str) -> None:
    try:
        wire.call(path, {"op": "drop", "target": target}, timeout=5.0)
    except KeeperError as e:
        log.info("the keeper did not drop %s: %s", target, e)


def sessions(path: str, timeout: float = 5.0) -> dict[str, int]:
    """target → pid of the mount process serving it, for every session the keeper holds."""
    answer, _ = wire.call(path, {"op": "list"}, timeout=timeout)
    return {s["target"]: int(s.get("pid") or 0) for s in answer.get("sessions", []) if isinstance(s, dict)}


def revive(path: str, target: str, timeout: float = 10.0) -> int:
    """The pid of a mount process serving `target`'s kept session (started now if none)."""
    answer, _ = wire.call(path, {"op": "revive", "target": target}, timeout=timeout)
    return int(answer.get("pid") or 0)
