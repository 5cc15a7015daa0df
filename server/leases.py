"""Old snapshots kept readable while readers hold them (leases).

A reader holds the snapshot it loaded (cachefs/pins.py). Loading a manifest takes a lease
on its snapshot for the dataset's `lease` seconds; a refresh then keeps the replaced
snapshot (its manifest, so nodes can still serve it) until its last lease ends. Past that,
a reader of it gets 410 saying what to do; a snapshot the dataset never had gets 404.

Kept in the coordinator's memory: a coordinator restart ends every lease (readers then get
the 410, never other bytes).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from cachefs.common.errors import NotFound, SnapshotGone

MAX_HISTORY = 1000  # replaced snapshot ids remembered per dataset (to tell 410 from 404)


class Leases:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._until: dict[tuple[str, str], float] = {}  # (dataset, snapshot) → when its last lease ends
        self._kept: dict[tuple[str, str], Any] = {}  # (dataset, snapshot) → its DatasetRecord, once replaced
        self._replaced: dict[str, dict[str, float]] = {}  # dataset → {snapshot: when it was replaced}
        self._pending: dict[tuple[str, str], Any] = {}  # snapshots being warmed before they become current

    def pend(self, record: Any) -> None:
        """`record` is being warmed (`refresh --warm`): nodes may load it, readers not yet."""
        self._pending[(record.info.name, record.info.snapshot)] = record

    def unpend(self, record: Any) -> None:
        self._pending.pop((record.info.name, record.info.snapshot), None)

    def take(self, name: str, snapshot: str, seconds: float) -> float:
        """Hold `snapshot` for `seconds` more (from now); when the lease ends."""
        until = max(self._until.get((name, snapshot), 0.0), self.clock() + seconds)
        self._until[(name, snapshot)] = until
        return until

    def replaced(self, old: Any) -> None:
        """A refresh replaced `old` (a DatasetRecord): kept while a lease on it lasts."""
        name, snapshot = old.info.name, old.info.snapshot
        history = self._replaced.setdefault(name, {})
        history[snapshot] = self.clock()
        while len(history) > MAX_HISTORY:
            del history[next(iter(history))]
        if self._until.get((name, snapshot), 0.0) > self.clock():
            self._kept[(name, snapshot)] = old
        self.prune()

    def find(self, name: str, snapshot: str, current: Any) -> Any:
        """The record of `snapshot` (current or kept); SnapshotGone or NotFound, saying why."""
        if snapshot == current.info.snapshot:
            return current
        self.prune()
        kept = self._kept.get((name, snapshot)) or self._pending.get((name, snapshot))
        if kept is not None:
            return kept
        when = self._replaced.get(name, {}).get(snapshot)
        if when is None:
            raise NotFound(f"dataset {name!r} has no snapshot {snapshot!r} (its current snapshot is "
                           f"{current.info.snapshot}; `cachefs dataset ls` shows it)")
        raise SnapshotGone(
            f"snapshot {snapshot} of dataset {name!r} was replaced by a refresh {self.clock() - when:.0f} s ago and "
            f"no reader's lease holds it any more (a lease lasts {current.info.lease:.0f} s from the reader's load; "
            f"`cachefs dataset update {name} --lease SECONDS` changes it). Reopen the file, rebuild the torch dataset "
            f"or remount the volume to read the current snapshot {current.info.snapshot}")

    def until(self, name: str, snapshot: str) -> float:
        return self._until.get((name, snapshot), 0.0)

    def prune(self) -> None:
        now = self.clock()
        for key in [k for k in self._kept if self._until.get(k, 0.0) <= now]:
            del self._kept[key]
        for key in [k for k, t in self._until.items() if t <= now]:
            del self._until[key]

    def forget(self, name: str) -> None:
        """The dataset was removed: nothing of it is kept."""
        for d in (self._until, self._kept, self._pending):
            for key in [k for k in d if k[0] == name]:
                del d[key]
        self._replaced.pop(name, None)

    def kept(self, name: str) -> list[str]:
        """The replaced snapshots still readable."""
        self.prune()
        return sorted(s for n, s in self._kept if n == name)
