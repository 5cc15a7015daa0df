"""The ring the coordinator publishes for a set of cache nodes: weights from capacities.

Pure (no Ray, no I/O), so that bench/scale_sim.py drives the very code the coordinator
runs. A node's weight is its capacity over a fixed *weight unit*, chosen once for the
cluster (the smallest capacity of the first ring, `choose_unit`) and kept by the
coordinator across epochs and restarts. Weights used to be relative to the biggest node:
a node twice as big joining then halved every other node's points and moved about half
of the dataset. With a fixed unit a joining node adds its own points and nobody loses any,
so only its own share moves.
"""

from __future__ import annotations

from typing import Iterable

from shard import Member, Ring


def choose_unit(capacities: Iterable[int]) -> int:
    """The capacity that weighs 1.0: the smallest node's, so no first node has fewer points
    than `vnodes` (its balance stays as good as with equal nodes)."""
    return max(1, min((c for c in capacities if c > 0), default=1))


def weight_of(capacity: int, unit: int) -> float:
    """Rounded to 4 decimals: the JSON stays short and every process reads the same number."""
    return round(max(capacity, 1) / max(unit, 1), 4)


def build_ring(nodes: Iterable[tuple[str, str, int]], epoch: int, vnodes: int, unit: int | None = None) -> Ring:
    """The ring for `nodes`, given as (id, url, capacity in bytes); `unit` as the
    coordinator keeps it (None: chosen from these nodes, for a first ring)."""
    nodes = list(nodes)
    unit = unit or choose_unit(capacity for _, _, capacity in nodes)
    return Ring.build([Member(node_id, weight_of(capacity, unit), url) for node_id, url, capacity in nodes],
                      epoch, vnodes)
