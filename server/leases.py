"""Old snapshots kept readable while readers hold them (leases).

A reader holds the snapshot it loaded (cachefs/pins.py). Loading a manifest takes a lease
on its snapshot for the dataset's `lease` seconds; a refresh then keeps the replaced
snapshot (its manifest, so nodes can still serve it) until its last lease ends. Past that,
a reader of it gets 410 saying what to do; a snapshot the dataset never had gets 404.

With a state dir, leases and kept snapshots (their manifests) survive a restart of the
coordinator (STATE_DIR/leases/, 0600); without one, a restart ends them (readers then get
the 410, never other bytes).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from cachefs.common.errors import NotFound, SnapshotGone
from cachefs.common.files import write_atomically
from cachefs.common.wire import DatasetInfo

log = logging.getLogger(__name__)
MAX_HISTORY = 1000  # replaced snapshot ids remembered per dataset (to tell 410 from 404)
SAVE_SLACK = 60.0  # a lease that grows by less than this is not written down again


class Leases:
    def __init__(self, state_dir: str | os.PathLike[str] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.dir = Path(state_dir) / "leases" if state_dir else None
        self._saved: dict[tuple[str, str], float] = {}
        self._until: dict[tuple[str, str], float] = {}  # (dataset, snapshot) → when its last lease ends
        self._kept: dict[tuple[str, str], Any] = {}  # (dataset, snapshot) → its DatasetRecord, once replaced
        self._replaced: dict[str, dict[str, float]] = {}  # dataset → {snapshot: when it was replaced}
        self._pending: dict[tuple[str, str], Any] = {}  # snapshots being warmed before they become current
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
            self._load()

    def pend(self, record: Any) -> None:
        """`record` is being warmed (`refresh --warm`): nodes may load it, readers not yet."""
        self._pending[(record.info.name, record.info.snapshot)] = record

    def unpend(self, record: Any) -> None:
        self._pending.pop((record.info.name, record.info.snapshot), None)

    def take(self, name: str, snapshot: str, seconds: float) -> float:
        """Hold `snapshot` for `seconds` more (from now); when the lease ends."""
        until = max(self._until.get((name, snapshot), 0.0), self.clock() + seconds)
        self._until[(name, snapshot)] = until
        if until > self._saved.get((name, snapshot), 0.0) + SAVE_SLACK:
            self._save()
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
            if self.dir is not None:
                write_atomically(self.dir / f"{name}.{snapshot}.arrow", old.manifest_ipc)
        self.prune()
        self._save()

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
            if self.dir is not None:
                (self.dir / f"{key[0]}.{key[1]}.arrow").unlink(missing_ok=True)
        for key in [k for k, t in self._until.items() if t <= now]:
            del self._until[key]

    def forget(self, name: str) -> None:
        """The dataset was removed: nothing of it is kept."""
        for d in (self._until, self._kept, self._pending):
            for key in [k for k in d if k[0] == name]:
                del d[key]
                if d is self._kept and self.dir is not None:
                    (self.dir / f"{key[0]}.{key[1]}.arrow").unlink(missing_ok=True)
        self._replaced.pop(name, None)
        self._save()

    def kept(self, name: str) -> list[str]:
        """The replaced snapshots still readable."""
        self.prune()
        return sorted(s for n, s in self._kept if n == name)

    # -- on disk ---------------------------------------------------------------------------
    def _save(self) -> None:
        if self.dir is None:
            return
        doc = {"until": [[n, s, t] for (n, s), t in self._until.items()],
               "replaced": self._replaced,
               "kept": [[n, s, r.info.to_json()] for (n, s), r in self._kept.items()]}
        write_atomically(self.dir / "leases.json", json.dumps(doc).encode())
        self._saved = dict(self._until)

    def _load(self) -> None:
        assert self.dir is not None
        try:
            doc = json.loads((self.dir / "leases.json").read_text())
            self._until = {(n, s): float(t) for n, s, t in doc["until"]}
            self._replaced = {n: {s: float(t) for s, t in h.items()} for n, h in doc["replaced"].items()}
            for n, s, info in doc["kept"]:
                ipc = (self.dir / f"{n}.{s}.arrow").read_bytes()
                self._kept[(n, s)] = _Kept(DatasetInfo.from_json(info), ipc)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged file: leases end, readers get 410
            log.warning("ignoring %s: %s", self.dir / "leases.json", e)
        self._saved = dict(self._until)
        self.prune()


class _Kept:
    """A kept snapshot as `find` answers it: its info and manifest (storage options are the
    dataset's current ones)."""

    def __init__(self, info: DatasetInfo, manifest_ipc: bytes) -> None:
        self.info, self.manifest_ipc = info, manifest_ipc
