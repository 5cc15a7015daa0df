"""The ring the coordinator publishes for a set of cache nodes: weights from capacities.

Pure (no Ray, no I/O), so that bench/scale_sim.py drives the very code the coordinator
runs. A node's weight is its capacity over the biggest node's, so a cluster of equal
nodes has weights of 1.0 and `DEFAULT_VNODES` points each.
"""

from __future__ import annotations

from typing import Iterable

from shard import Member, Ring


def weight_of(capacity: int, biggest: int) -> float:
    """Rounded to 4 decimals: the JSON stays short and every process reads the same number."""
    return round(max(capacity, 1) / biggest, 4)


def build_ring(nodes: Iterable[tuple[str, str, int]], epoch: int, vnodes: int) -> Ring:
    """The ring for `nodes`, given as (id, url, capacity in bytes)."""
    nodes = list(nodes)
    biggest = max((capacity for _, _, capacity in nodes), default=1) or 1
    return Ring.build([Member(node_id, weight_of(capacity, biggest), url) for node_id, url, capacity in nodes],
                      epoch, vnodes)
