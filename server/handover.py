"""Who held a unit before the ring changed, and how the data route names it: the pure half
of the hand-over (the other half is server/peers.py, the HTTP fetch, and
CacheNode._from_previous_owners, the seam of the miss path). No I/O here.
"""

from __future__ import annotations

from typing import Any, Sequence

from server.peers import UnitName
from server.units import Unit
from shard import Ring

MAX_PEERS = 3  # previous owners asked for one unit: each dead one costs a connect timeout


def previous_owner_urls(node_id: str, previous: Sequence[Ring], key: str, replicas: int) -> list[str]:
    """Who held `key` under the earlier rings (newest first), if `node_id` did not under
    every one of them: a unit this node always owned is a plain miss, with no hop."""
    if not previous or all(node_id in r.owners(key, replicas) for r in previous):
        return []
    urls: list[str] = []
    for ring in previous:
        for owner in ring.owners(key, replicas):
            url = ring.member(owner).url
            if owner != node_id and url and url not in urls:
                urls.append(url)
    return urls[:MAX_PEERS]


def unit_name(info: Any, unit: Unit) -> UnitName:
    """How the data route names `unit` (a pack by number, a block by path and index);
    `info` is the dataset's DatasetInfo."""
    if unit.pack >= 0:
        return UnitName(info.name, info.snapshot, pack=unit.pack)
    return UnitName(info.name, info.snapshot, path=unit.members[0].path, index=unit.start // info.block_size)
