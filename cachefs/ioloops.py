"""A few event loops in threads of their own, to receive block bytes on several cores.

One event loop receives on one core: the kernel's copy into user space (the bulk of the
cost of a read) runs while the GIL is released, but one loop issues one recv at a time.
Block fetches are spread round-robin over these loops, each with its own HTTP session;
routing, retries and the ring stay on the filesystem's own loop.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Awaitable, Callable, TypeVar

from cachefs.config import ClientConfig
from cachefs.transport import Transport

T = TypeVar("T")


class IOLoops:
    def __init__(self, config: ClientConfig, count: int) -> None:
        self._loops: list[asyncio.AbstractEventLoop] = []
        self._threads: list[threading.Thread] = []
        self.transports: list[Transport] = []
        for i in range(count):
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name=f"cachefs-io-{i}", daemon=True)
            thread.start()
            self._loops.append(loop)
            self._threads.append(thread)
            self.transports.append(Transport(config))
        self._turn = itertools.count()

    def __len__(self) -> int:
        return len(self._loops)

    async def run(self, call: Callable[[Transport], Awaitable[T]]) -> T:
        """Run `call(transport)` on the next loop; cancelling the caller cancels it there."""
        i = next(self._turn) % len(self._loops)
        future = asyncio.run_coroutine_threadsafe(call(self.transports[i]), self._loops[i])  # type: ignore[arg-type]
        return await asyncio.wrap_future(future)

    def close(self, timeout: float = 2.0) -> None:
        for loop, transport, thread in zip(self._loops, self.transports, self._threads, strict=True):
            if loop.is_closed():
                continue
            try:
                asyncio.run_coroutine_threadsafe(transport.close(), loop).result(timeout)
            except Exception:  # closing is best effort: the loop may be stuck or gone
                pass
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if not thread.is_alive():
                loop.close()
        self._loops.clear()


__all__ = ["IOLoops"]
