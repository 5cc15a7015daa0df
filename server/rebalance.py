"""After a ring change, pull the units this node now owns from the nodes that held them.

A join, a drain or a restart gives some units a new owner. A reader's miss on the new
owner already asks the previous owner before the origin (CacheNode._from_previous_owners);
the rebalance does the same ahead of the readers, so the moved share is in place before
anyone asks. It only ever copies from peers: a unit no previous owner holds was not cached
and is left to the first reader (one origin read, as for any miss).

Rate-limited (NodeConfig.rebalance_bytes_per_s, a few units at a time) so readers come
first; cancelled by a newer ring (which starts its own) and by `cancel`; its progress is in
the node's `stats()["rebalance"]`, hence in `cachefs status` and `cachefs node ls`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence

from cachefs.common.errors import CachefsError
from server.units import Unit, all_units

log = logging.getLogger(__name__)


class Node(Protocol):
    """What a rebalance needs of its cache node (server.node.CacheNode)."""

    node_id: str
    ring: Any
    previous_rings: tuple[Any, ...]
    config: Any

    async def dataset_names(self) -> list[str]: ...
    async def dataset(self, name: str) -> Any: ...
    def holds(self, key: str) -> bool: ...
    async def pull(self, state: Any, unit: Unit) -> Any | None: ...


@dataclass
class Progress:
    """One rebalance: `units` moved here, `moved` of them copied from a previous owner,
    `missing` held by none (left to readers); state running | done | cancelled | failed."""

    epoch: int = 0
    state: str = "idle"
    units: int = 0
    moved: int = 0
    missing: int = 0
    moved_bytes: int = 0
    started: float = 0.0
    finished: float = 0.0
    message: str = ""
    failures: dict[str, str] = field(default_factory=dict)  # dataset → why it was skipped

    @property
    def running(self) -> bool:
        return self.state == "running"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def moved_here(state: Any, ring: Any, previous: Sequence[Any], node_id: str) -> list[Unit]:
    """Units this node owns under `ring` and did not under one of the `previous` rings
    (blocking: O(units × rings)). All of them, not only the last: a rebalance cancelled by
    the next ring (two changes at once) must not lose what the first change moved here."""
    r = state.info.replicas
    return [u for u in all_units(state.info, state.manifest)
            if node_id in ring.owners(u.key, r) and any(node_id not in p.owners(u.key, r) for p in previous)]


class Pacer:
    """At most `rate` bytes a second on average: a unit waits until the bytes before it
    would have taken that long."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    async def wait(self, nbytes: int) -> None:
        self.sent += nbytes
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            await asyncio.sleep(ahead)


class Rebalancer:
    def __init__(self, node: Node, plan: Callable[[Any, Any, Sequence[Any], str], list[Unit]] | None = None) -> None:
        """`plan`: which units moved here (`moved_here`; a seam for tests of the pacing)."""
        self.node = node
        self.plan = plan or moved_here
        self.progress = Progress()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Rebalance towards the node's current ring; a running one (an older ring) stops."""
        self.cancel()
        self.progress = Progress(self.node.ring.epoch, "running", started=time.time())
        self._task = asyncio.ensure_future(self._run(self.progress))

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            self.progress.state, self.progress.finished = "cancelled", time.time()
        self._task = None

    async def wait(self) -> Progress:
        """The current rebalance's outcome, once it ends (for tests and the drain)."""
        task = self._task
        if task is not None:
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                pass
        return self.progress

    async def _run(self, progress: Progress) -> None:
        node = self.node
        ring, previous = node.ring, node.previous_rings
        pacer = Pacer(node.config.rebalance_bytes_per_s)
        try:
            for name in await node.dataset_names():
                try:
                    state = await node.dataset(name)
                except CachefsError as e:  # removed meanwhile, or its manifest unreachable
                    progress.failures[name] = str(e)
                    continue
                todo = [u for u in await asyncio.to_thread(self.plan, state, ring, previous, node.node_id)
                        if not node.holds(u.key)]
                progress.units += len(todo)
                units = iter(todo)

                async def worker() -> None:
                    for unit in units:
                        got = await node.pull(state, unit)
                        if got is None:
                            progress.missing += 1
                            continue
                        progress.moved += 1
                        progress.moved_bytes += unit.length
                        await pacer.wait(unit.length)

                await asyncio.gather(*(worker() for _ in range(node.config.rebalance_concurrency)))
            progress.state = "done"
        except asyncio.CancelledError:
            progress.state = "cancelled"
            raise
        except (CachefsError, OSError) as e:
            log.warning("rebalance to epoch %d failed: %s", progress.epoch, e)
            progress.state, progress.message = "failed", str(e)
        finally:
            progress.finished = time.time()
