"""What a cache node's reads are made of: the seams it learns through (`Directory`,
`PreviousOwners`), a dataset's state, and the values a read passes around (`Found`,
`BlockRead`, a batch's `Ask` and `Piece`). Shared by server/node.py and server/batch.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, Sequence

import pyarrow as pa

from cachefs.common import wire
from cachefs.common.errors import CachefsError, OriginChanged
from cachefs.common.manifest import Manifest
from cachefs.common.origin import Origin
from cachefs.common.wire import DatasetInfo
from server.peers import UnitName
from server.stores import StoredBlock
from server.units import Unit

log = logging.getLogger("server.node")


@dataclass(frozen=True)
class OriginSpec:
    url: str
    storage_options: dict[str, Any]


class PreviousOwners(Protocol):
    """Where a unit whose owner changed is looked for before the origin: the nodes that
    held it under earlier rings (server/peers.py, over HTTP). None when none has it."""

    async def fetch(self, name: UnitName, urls: Sequence[str]) -> bytes | None: ...


class Directory(Protocol):
    """Where a node learns what a dataset is: its info, manifest and origin."""

    async def dataset(self, name: str) -> tuple[DatasetInfo, bytes, OriginSpec]: ...

    async def snapshot(self, name: str, snapshot: str) -> tuple[DatasetInfo, bytes, OriginSpec]:
        """A given snapshot: the current one or one a reader's lease keeps (server/leases.py)."""
        ...

    async def lease(self, name: str, snapshot: str) -> float:
        """A reader loaded `snapshot`: keep it readable for the dataset's lease."""
        ...


@dataclass
class DatasetState:
    info: DatasetInfo
    manifest: Manifest
    origin: Origin
    manifest_ipc: bytes  # the snapshot as the coordinator keeps it (version tokens included)
    reader_ipc: bytes  # what readers load: schema 2, no version tokens
    packs: dict[int, Unit] = field(default_factory=dict)  # built once per pack a reader names


@dataclass
class BlockRead:
    """What the HTTP layer sends for one block: bytes [start, end) of a unit in memory, or of
    a file to sendfile; `digest` is of exactly those bytes."""

    block: StoredBlock
    source: str  # memory | disk | origin
    data: pa.Buffer | None = None
    start: int = 0
    end: int = -1

    def __post_init__(self) -> None:
        if self.end < 0:
            self.end = self.block.size


@dataclass
class Piece:
    """One item of a batch, ready to frame: its bytes (or JSON error body) and digest."""

    status: int
    payload: memoryview | bytes
    digest: int = 0

    @classmethod
    def failed(cls, e: CachefsError) -> "Piece":
        return cls(wire.STATUS_OF_CODE.get(e.code, 500), wire.error_body(e.code, e.message, **e.extra))


Want = tuple  # ("b", path, index, start, end) | ("p", pack, start, end): wire.READ items, checked


class Found(NamedTuple):
    """A unit as a read found it: its block and where from, or why there is none."""

    block: StoredBlock | None
    source: str  # memory | disk | origin
    error: CachefsError | None = None


@dataclass(slots=True)
class Ask:
    """One item of a batch: bytes [start, end) of `unit`, and its outcome once known
    (`payload`, or `error`, which an item that names nothing has from the start)."""

    unit: Unit | None
    start: int
    end: int
    error: CachefsError | None = None
    payload: memoryview | bytes | None = None


def hole(block: StoredBlock, start: int, end: int) -> CachefsError | None:
    """A read that touches a member that failed gets that member's error; one past the end
    of this copy (a pack cut short by a newer snapshot) is told that its files changed."""
    if end > block.size:
        return OriginChanged(f"bytes [{start}, {end}) are not in this copy of the pack ({block.size} bytes): their "
                             "files changed at the origin since; read the current snapshot")
    for hole in block.holes:
        if hole.start < end and start < hole.end:
            return hole.error
    return None


def as_error(e: BaseException) -> CachefsError:
    if isinstance(e, CachefsError):
        return e
    log.error("internal error while reading a unit: %s: %s", type(e).__name__, e, exc_info=e)
    return CachefsError(f"internal error: {type(e).__name__}: {e}")
