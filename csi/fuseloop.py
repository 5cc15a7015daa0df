"""Serve one FUSE session on the running asyncio loop, with the cachefs client beside it.

The descriptor is non-blocking: when the loop says it is readable, requests are read
and answered one after another until none is queued (at most `batch` before yielding,
so client fetches and timers are never starved). Metadata and cached reads are answered
inside that loop without a task or a thread hand-off; other reads finish on tasks.
Reading answers ENODEV once the mount is gone (unmounted, or the session aborted):
serving ends there.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os

from csi.fuse import protocol
from csi.fuse.dispatch import Dispatcher

log = logging.getLogger("cachefs.fuse")


async def serve(fd: int, dispatcher: Dispatcher, stop: asyncio.Event | None = None, batch: int = 64) -> None:
    """Answer requests on `fd` until the session ends or `stop` is set (the caller closes `fd`)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    buf = bytearray(protocol.buffer_size())
    view = memoryview(buf)
    os.set_blocking(fd, False)

    def readable() -> None:
        for _ in range(batch):
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENOENT):  # ENOENT: that request was interrupted
                    continue
                if not done.done():
                    if e.errno != errno.ENODEV:
                        log.error("reading /dev/fuse failed: %s; ending the session", e)
                    done.set_result(None)
                loop.remove_reader(fd)
                return
            dispatcher.handle(view[:n])

    loop.add_reader(fd, readable)
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if stopper is not None:
        stopper.add_done_callback(lambda _: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        if stopper is not None:
            stopper.cancel()
        for task in list(dispatcher.tasks):
            task.cancel()
