"""pyfuse3 on asyncio, with the wait for the next FUSE request made cheap under load.

pyfuse3 runs on trio unless `pyfuse3.asyncio.enable()` swaps in its asyncio shim. That
shim waits for /dev/fuse with add_reader → future → remove_reader: two epoll_ctl calls
and a trip round the event loop for every request, about 40% of the mount's CPU for an
open/close pair on this class of machine. Under load the next request is usually queued
already, so the wait first asks poll() with a zero timeout, and when a request is there
pyfuse3 reads it straight away. Every `yield_every`-th time it takes the shim's own path
anyway, which yields to the loop: client fetches and timers are never starved by a
stream of requests that never await.

This replaces one function of pyfuse3's asyncio shim (`wait_readable`), the way
`pyfuse3.asyncio.enable()` itself replaces pyfuse3's trio module; if a pyfuse3 release
no longer has it, the mount keeps the shim's own wait (correct, only slower).
"""

from __future__ import annotations

import logging
import select

log = logging.getLogger("cachefs.fuse")


def enable(yield_every: int = 16) -> None:
    """Run pyfuse3 on asyncio (call once per process, before `pyfuse3.main()`)."""
    import pyfuse3.asyncio as shim

    shim.enable()
    slow = getattr(shim, "wait_readable", None)
    if slow is None:
        log.warning("pyfuse3.asyncio has no wait_readable; serving with the shim's own wait")
        return
    if getattr(slow, "cachefs_fast_path", False):
        return  # enabled before in this process
    poller = select.poll()
    registered: set[int] = set()
    streak = 0  # requests taken without yielding to the loop

    async def wait_readable(fd: int) -> None:
        nonlocal streak
        if fd not in registered:
            poller.register(fd, select.POLLIN)
            registered.add(fd)
        if streak < yield_every and poller.poll(0):
            streak += 1
            return
        streak = 0
        await slow(fd)

    wait_readable.cachefs_fast_path = True  # type: ignore[attr-defined]
    shim.wait_readable = wait_readable
