"""Which snapshot of each dataset a reader reads: the one rule every read path follows.

A reader that holds sizes or offsets from a manifest (a filesystem instance, an open file,
a mount, a torch dataset) must read only from the snapshot that manifest describes;
anything else gives another snapshot's bytes under its sizes (issue #20). So:

- every read carries its `DatasetView`, and the request names the view's snapshot: a node
  serves that snapshot or refuses it (410), never another one's bytes;
- a filesystem keeps the view it first loaded for each dataset (its pin) until it is
  asked to move (`invalidate_cache`): nothing reloads a manifest behind a reader's back;
- a reader can be told which snapshot to hold (`snapshots={name: id}`, what a torch
  dataset hands its workers); loading any other one then fails;
- a snapshot that is no longer served fails loudly (`gone`), saying what to do.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Mapping

from cachefs.blocks import DatasetView
from cachefs.common.errors import SnapshotGone


def gone(name: str, snapshot: str, why: str = "") -> SnapshotGone:
    """The error of a read whose snapshot is no longer served (the wire's 410)."""
    because = f" ({why})" if why else ""
    return SnapshotGone(
        f"snapshot {snapshot} of dataset {name!r} is no longer served{because}: a reader keeps the snapshot it "
        "first loaded so that it never mixes two. To read the current one: reopen the file after "
        "`fs.invalidate_cache()` (or use a new filesystem), rebuild the torch dataset, or remount the volume")


class Pins:
    """The views of one filesystem, by dataset name: loaded once, then held."""

    def __init__(self, wanted: Mapping[str, str] | None = None) -> None:
        self.wanted = dict(wanted or {})  # name → the snapshot this reader must read
        self._views: dict[str, DatasetView] = {}

    def get(self, name: str) -> DatasetView | None:
        """The held view (any thread may ask: one dict look-up)."""
        return self._views.get(name)

    async def view(self, name: str, load: Callable[[str, str | None], Awaitable[DatasetView]]) -> DatasetView:
        """The held view of `name` (a dataset, or `dataset@SNAPSHOT`), or the one `load`
        brings (given the dataset and the snapshot wanted, if any), then held."""
        view = self._views.get(name)
        if view is None:
            dataset, _, at = name.partition("@")
            want = at or self.wanted.get(dataset)
            view = await load(dataset, want)
            if want is not None and view.info.snapshot != want:
                raise gone(dataset, want, f"the cluster serves {view.info.snapshot} instead")
            view = self._views.setdefault(name, view)  # two loads at once: the first one held wins
        return view

    def want(self, name: str, snapshot: str) -> None:
        """Hold `snapshot` of `name` from now on (a view of another one is let go)."""
        self.wanted[name] = snapshot
        held = self._views.get(name)
        if held is not None and held.info.snapshot != snapshot:
            del self._views[name]

    def snapshots(self) -> dict[str, str]:
        """dataset → the snapshot held or wanted: what another process needs to read the same."""
        return {**self.wanted, **{n: v.info.snapshot for n, v in self._views.items() if "@" not in n}}

    def release(self, name: str | None = None) -> None:
        """Move on (the reader asked to): the next read loads the current snapshot."""
        if name is None:
            self._views.clear()
            self.wanted.clear()
        else:
            self._views.pop(name, None)
            self.wanted.pop(name, None)
