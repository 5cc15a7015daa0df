"""Warm-up on one node: fetch every unit this node owns under the current ring.

Which units a node owns grows with the dataset (a million files), so it is computed in a
thread, never on the event loop that serves readers. A few workers then pull units from
one iterator: memory stays flat however many there are, and readers keep being served.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from cachefs.common.errors import CachefsError
from cachefs.common.wire import OperationInfo
from server.units import Unit, all_units


class Node(Protocol):
    """What a warm-up needs of its cache node (server.node.CacheNode)."""

    node_id: str
    ring: Any
    config: Any

    async def dataset(self, name: str, snapshot: str | None = None) -> Any: ...
    async def unit(self, state: Any, unit: Unit) -> tuple[Any, str]: ...

KEEP_WARMS = 100  # warm-up reports kept per node, for the coordinator to collect


@dataclass
class Warm:
    task: asyncio.Task[Any] | None
    progress: OperationInfo
    cancelled: bool = False


def owned_units(state: Any, ring: Any, node_id: str) -> list[Unit]:
    """The units this node holds a replica of (blocking: O(files) hashing and ring walks)."""
    replicas = state.info.replicas
    return [u for u in all_units(state.info, state.manifest) if node_id in ring.owners(u.key, replicas)]


class Warmups:
    """The warm-ups a node runs, with their progress and cancellation."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._warms: dict[str, Warm] = {}

    async def run(self, op_id: str, name: str, snapshot: str | None = None) -> OperationInfo:
        """Fetch every unit this node owns (of `snapshot`: the current one if None, or the
        one a refresh --warm is about to make current); failures are counted by file."""
        progress = OperationInfo(op_id, "warm", name, started=time.time())
        warm = self._warms[op_id] = Warm(None, progress)
        while len(self._warms) > KEEP_WARMS:  # the oldest reports go first
            del self._warms[next(iter(self._warms))]
        try:
            state = await self.node.dataset(name, snapshot)
            owned = await asyncio.to_thread(owned_units, state, self.node.ring, self.node.node_id)
            progress.total_files = len({m.path for u in owned for m in u.members})
            progress.total_bytes = sum(u.length for u in owned)
            left_per_file: dict[str, int] = {}
            for u in owned:
                for m in u.members:
                    left_per_file[m.path] = left_per_file.get(m.path, 0) + 1
            todo = iter(owned)

            async def worker() -> None:
                for unit in todo:
                    if warm.cancelled:
                        return
                    try:
                        block = (await self.node.unit(state, unit)).block
                        assert block is not None  # unit() raises rather than answer no block
                        progress.done_bytes += block.size
                        for hole in block.holes:  # a member's failure; dead space of older snapshots is none
                            failed = next((m.path for m in unit.members if m.offset == hole.start), None)
                            if failed is not None:
                                progress.failures[failed] = str(hole.error)
                    except CachefsError as e:
                        for m in unit.members:
                            progress.failures[m.path] = str(e)
                    for m in unit.members:
                        left_per_file[m.path] -= 1
                        if left_per_file[m.path] == 0:
                            progress.done_files += 1

            workers = self.node.config.warm_concurrency
            warm.task = asyncio.ensure_future(asyncio.gather(*(worker() for _ in range(workers))))
            await warm.task
            progress.state = "cancelled" if warm.cancelled else ("failed" if progress.failures else "succeeded")
        except asyncio.CancelledError:
            progress.state = "cancelled"
        except CachefsError as e:
            progress.state, progress.message = "failed", str(e)
        progress.finished = time.time()
        return progress

    def progress(self, op_id: str) -> OperationInfo | None:
        w = self._warms.get(op_id)
        return w.progress if w else None

    def cancel(self, op_id: str) -> None:
        w = self._warms.get(op_id)
        if w is not None:
            w.cancelled = True
            if w.task is not None:
                w.task.cancel()

    def cancel_all(self) -> None:
        for op_id in list(self._warms):
            self.cancel(op_id)
