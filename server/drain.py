"""Draining a cache node: what may be drained, and waiting until its blocks have moved.

The coordinator (server/coordinator.py) takes the node off the ring and keeps it serving;
the other nodes pull what they now own (server/rebalance.py). This module decides when
that is over: every other node reports a finished rebalance for the new epoch, or the
deadline passes. Pure but for the polling, so that the decision is tested on its own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Mapping

from cachefs.common.errors import BadRequest, NotFound

DRAIN_DEADLINE = 60.0  # seconds; Kubernetes gives a pod 30 s by default (the chart raises it, helm/)
POLL = 0.25  # seconds between looks at the other nodes' rebalance progress


def drain_plan(nodes: Mapping[str, Any], node_id: str, deadline: float) -> Any:
    """The entry of the node to drain, or a clear refusal."""
    if not isinstance(deadline, (int, float)) or not 0 < deadline <= 24 * 3600:
        raise BadRequest(f"a drain deadline is a number of seconds from 0 to 86400, not {deadline!r}")
    entry = nodes.get(node_id)
    if entry is None:
        known = ", ".join(sorted(nodes)) or "none"
        raise NotFound(f"no cache node {node_id!r} (nodes: {known}); `cachefs node ls` lists them")
    if not any(n.id != node_id and not n.draining for n in nodes.values()):
        raise BadRequest(f"node {node_id!r} is the last one serving: its blocks have nowhere to go "
                         "(start another node first, or `cachefs down` to stop the cluster)")
    return entry


def units_left(stats: list[dict[str, Any]], epoch: int) -> int | None:
    """Units still to pull across the nodes, or None while some node has not started on
    `epoch` yet (it may not have received the ring)."""
    left = 0
    for s in stats:
        r = s.get("rebalance", {})
        if r.get("epoch", 0) < epoch:
            if s.get("epoch", 0) < epoch:
                return None
            continue  # on the ring of `epoch` and no rebalance for it: nothing moved to it
        if r.get("state") == "running":
            left += max(1, r.get("units", 0) - r.get("moved", 0) - r.get("missing", 0))
    return left


async def wait_for_rebalance(op: Any, epoch: int, deadline: float,
                             stats: Callable[[], Awaitable[list[dict[str, Any]]]],
                             still_draining: Callable[[], bool]) -> int:
    """Wait until the other nodes have pulled what moved, the deadline, a cancel, or the
    node's death; returns the units left (0 when all moved, -1 when some node never
    reported on `epoch`). Progress goes into `op` (units, in its byte fields)."""
    end = time.monotonic() + deadline
    left = -1
    while not op.cancelled.is_set() and still_draining():
        reports = await stats()
        now = units_left(reports, epoch)
        moving = [s.get("rebalance", {}) for s in reports if s.get("rebalance", {}).get("epoch", 0) >= epoch]
        op.info.total_bytes = sum(r.get("units", 0) for r in moving)  # units, for `cachefs op` progress
        op.info.done_bytes = sum(r.get("moved", 0) + r.get("missing", 0) for r in moving)
        left = -1 if now is None else now
        if left == 0 or time.monotonic() >= end:
            break
        await asyncio.sleep(min(POLL, max(0.0, end - time.monotonic())))
    return left
