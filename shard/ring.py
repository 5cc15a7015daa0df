"""A consistent-hash ring with weighted virtual nodes, replicas and an epoch.

Pure and deterministic: the same JSON gives the same owners in every process. Each node
gets `round(vnodes * weight)` points at xxh3("node#i"); colliding points are kept and
ordered by node id (never silently overwritten), and removing a node removes exactly its
points, so only the keys it owned move.

The point table is built on first use, not when the ring is: the coordinator builds a
ring per membership change and never looks a key up, and at 1,000 nodes the table is a
million points. It is built with numpy (hashing stays in Python, sorting does not): a
sort of a million (point, id) tuples took 3 s, an argsort takes 0.1 s (bench/scale.py).
"""

from __future__ import annotations

import bisect
import json
from array import array
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import xxhash

from shard.keys import key_hash

DEFAULT_VNODES = 1024  # points per unit of weight: 16 equal nodes land within ~5% of the mean load


@dataclass(frozen=True)
class Member:
    """A node on the ring: its id, relative weight, and the URL clients reach it at."""

    id: str
    weight: float = 1.0
    url: str = ""


@dataclass(frozen=True)
class _Table:
    """The sorted points and, for each, the index of its node in `ids` (sorted node ids)."""

    ids: tuple[str, ...]
    points: array  # array('Q'): 8 bytes a point where a tuple of ints costs 40, and bisect reads it fast
    owners: array  # array('I')

    def as_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """Views of the same memory, for bulk look-ups."""
        return np.frombuffer(self.points, dtype=np.uint64), np.frombuffer(self.owners, dtype=np.uint32)


def _build_table(ids: list[str], counts: list[int]) -> _Table:
    """Points of every node, sorted; ties ordered by node id (`ids` is sorted by id).

    The concatenation is in id order and the argsort is stable, so equal points keep the
    id order: the same table the first implementation got by sorting (point, id) tuples.
    """
    digest = xxhash.xxh3_64_intdigest
    suffixes = [f"#{i}".encode() for i in range(max(counts, default=0))]
    hashes = np.fromiter((digest(prefix + suffix) for node_id, count in zip(ids, counts)
                          for prefix in (node_id.encode(),) for suffix in suffixes[:count]),
                         dtype=np.uint64, count=sum(counts))
    order = np.argsort(hashes, kind="stable")
    node_of_point = np.repeat(np.arange(len(ids), dtype=np.uint32), counts)
    return _Table(tuple(ids), array("Q", hashes[order].tobytes()), array("I", node_of_point[order].tobytes()))


@dataclass(frozen=True)
class Ring:
    members: tuple[Member, ...] = ()
    epoch: int = 0
    vnodes: int = DEFAULT_VNODES

    def __post_init__(self) -> None:
        ids = [m.id for m in self.members]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate node ids on the ring: {sorted(ids)}")
        for m in self.members:
            if not m.weight > 0:
                raise ValueError(f"node {m.id!r} has weight {m.weight}; weights must be positive")

    @property
    def node_ids(self) -> tuple[str, ...]:
        """The members' ids in id order: what `primaries` indexes into."""
        return tuple(sorted(m.id for m in self.members))

    @property
    def _table(self) -> _Table:
        # Built once, on first use. Two threads racing here build the same table twice;
        # either one is kept, and both are right.
        table = self.__dict__.get("_built")
        if table is None:
            members = sorted(self.members, key=lambda m: m.id)
            table = _build_table([m.id for m in members],
                                 [max(1, round(self.vnodes * m.weight)) for m in members])
            object.__setattr__(self, "_built", table)
        return table

    @property
    def _points(self) -> array:  # the sorted points, for tests of the table's invariants
        return self._table.points

    # -- building ------------------------------------------------------------
    @classmethod
    def build(cls, members: Iterable[Member], epoch: int = 0, vnodes: int = DEFAULT_VNODES) -> "Ring":
        return cls(tuple(sorted(members, key=lambda m: m.id)), epoch, vnodes)

    def with_member(self, member: Member) -> "Ring":
        """A new ring, one epoch later, with `member` added (or replaced)."""
        rest = [m for m in self.members if m.id != member.id]
        return Ring.build([*rest, member], self.epoch + 1, self.vnodes)

    def without(self, node_id: str) -> "Ring":
        """A new ring, one epoch later, without `node_id`."""
        return Ring.build([m for m in self.members if m.id != node_id], self.epoch + 1, self.vnodes)

    # -- placement -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.members)

    def member(self, node_id: str) -> Member:
        for m in self.members:
            if m.id == node_id:
                return m
        raise KeyError(node_id)

    def owners(self, key: str, r: int = 1) -> list[str]:
        """The first `r` distinct nodes clockwise from the key: primary first, then replicas.

        Asking for r = len(ring) gives the full preference list, which is what a reader
        walks when owners do not answer.
        """
        if not self.members:
            return []
        table = self._table
        want = min(r, len(self.members))
        found: list[str] = []
        i = bisect.bisect_left(table.points, key_hash(key))
        n = len(table.points)
        for step in range(n):
            node = table.ids[table.owners[(i + step) % n]]
            if node not in found:
                found.append(node)
                if len(found) == want:
                    break
        return found

    def primaries(self, positions: np.ndarray) -> np.ndarray:
        """`owners(key)[0]` for many keys at once, as indexes into `node_ids`.

        `positions` are the keys' `key_hash` as uint64. For simulations and bulk checks
        (bench/scale_sim.py): the same table and the same bisect-left as `owners`.
        """
        if not self.members:
            raise ValueError("an empty ring has no owners")
        points, owners = self._table.as_numpy()
        i = np.searchsorted(points, np.asarray(positions, dtype=np.uint64), side="left")
        return owners[i % len(points)]

    # -- serialisation -----------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "vnodes": self.vnodes,
            "nodes": [{"id": m.id, "weight": m.weight, "url": m.url} for m in self.members],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, doc: dict[str, Any] | str) -> "Ring":
        d = json.loads(doc) if isinstance(doc, str) else doc
        try:
            members = [Member(str(n["id"]), float(n.get("weight", 1.0)), str(n.get("url", ""))) for n in d["nodes"]]
            return cls.build(members, int(d.get("epoch", 0)), int(d.get("vnodes", DEFAULT_VNODES)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a ring document: {e}") from e
