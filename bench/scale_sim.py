"""A thousand cache nodes, simulated with the production placement code.

Nothing is copied: keys come from `shard.block_key`/`key_hash`, rings from the
coordinator's `server.placement.build_ring` (weights from capacities), owners from
`Ring.primaries` (the same table and bisect as `Ring.owners`, vectorised; checked against
`Ring.owners` on a sample every run); a node's cache is an LRU, computed an epoch at a
time exactly as `server.policy.LRU` behaves read by read (checked in tests/test_benches.py).

What it measures, for `nodes` equal nodes and `blocks` blocks (one dataset, 10 blocks a
file), side by side with a naive `hash mod N` placement:
  lookup        the cost of placing every block: Python `owners` (timed on a sample,
                extrapolated), `primaries` (all blocks)
  balance       blocks per node / mean: ring, ring with mixed capacities (1× and 2×), mod N
  moves         blocks that change owner when 1 node joins, 10 leave, or 1 twice as big joins
  epochs        origin reads per block over `epochs` shuffled epochs, with `churn` nodes
                leaving and `churn` new ones joining between epochs; each node an LRU of
                `headroom` × (blocks / nodes) blocks, lost when the node leaves
  events        origin reads per block when a warm cluster gets 1 node, drains 1, or restarts
                every node one at a time: as crashes, and handed over (previous owners first)
  coordinator   the work per membership change for 10..1,000 nodes: the coordinator's
                build, with_member, without, JSON; a client's from_json + first look-up

Every figure is exact (all blocks, all nodes) except `owners` per key, which is timed on
`sample` keys. Within an epoch every block is read once, in a fresh global shuffle; a
read goes to the block's primary under that epoch's ring, a miss there is an origin read
(r = 1; churn happens between epochs).

    python bench/scale.py --only sim           # 1,000 nodes, 10M blocks (about 3 min)
    python bench/scale.py --only sim --quick   # 100 nodes, 200k blocks (seconds)
"""

from __future__ import annotations

import bisect
import math
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import table  # noqa: E402
from server.placement import build_ring  # noqa: E402
from shard import DEFAULT_VNODES, Ring, block_key, key_hash  # noqa: E402

TiB = 1024**4


@dataclass(frozen=True)
class Params:
    nodes: int
    blocks: int
    epochs: int = 5
    churn: int = 10  # nodes that leave, and new nodes that join, before each epoch after the first
    join: int = 1
    leave: int = 10
    headroom: float = 1.25  # a node caches headroom × (blocks / nodes) blocks
    sample: int = 100_000  # keys timed and checked through Ring.owners
    sizes: tuple[int, ...] = (10, 100, 300, 1000)  # ring sizes timed for the coordinator
    seed: int = 11


FULL = Params(nodes=1000, blocks=10_000_000)
QUICK = Params(nodes=100, blocks=200_000, churn=2, sample=20_000, sizes=(10, 100))
BLOCKS_PER_FILE = 10


def node_id(i: int) -> str:
    return f"node-{i:04d}"


def url(i: int) -> str:
    return f"http://10.{i // 65536}.{i // 256 % 256}.{i % 256}:8700"


def ring_of(ids: Iterable[int], epoch: int, capacity: Callable[[int], int] = lambda i: TiB) -> Ring:
    """The ring the coordinator would publish for these nodes."""
    return build_ring(((node_id(i), url(i), capacity(i)) for i in ids), epoch, DEFAULT_VNODES)


def owners_by_ring(ring: Ring, positions: np.ndarray) -> np.ndarray:
    """The primary of every block, as node numbers."""
    numbers = np.array([int(n.removeprefix("node-")) for n in ring.node_ids], dtype=np.int32)
    return numbers[ring.primaries(positions)]


def owners_by_mod(ids: Iterable[int], positions: np.ndarray) -> np.ndarray:
    """The naive peer: node (hash mod N) of the members sorted by id."""
    members = np.array(sorted(ids), dtype=np.int32)
    return members[(positions % np.uint64(len(members))).astype(np.int64)]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# -- the parts -------------------------------------------------------------------------
def key_of(b: int) -> str:
    """Block b of the dataset: 10 blocks to a file."""
    f, i = divmod(b, BLOCKS_PER_FILE)
    return block_key("train", "snap-1", f"shards/{f:07d}.tar", i)


def block_positions(blocks: int) -> tuple[np.ndarray, float]:
    """The ring position of every block, and the time it took to hash them all."""
    return timed(lambda: np.fromiter((key_hash(key_of(b)) for b in range(blocks)), dtype=np.uint64, count=blocks))


def lookup(p: Params, ring: Ring, positions: np.ndarray, hash_s: float) -> dict[str, Any]:
    sample = min(p.sample, p.blocks)
    keys = [key_of(b) for b in range(sample)]
    python, owners_s = timed(lambda: [ring.owners(k)[0] for k in keys])
    bulk, primaries_s = timed(lambda: owners_by_ring(ring, positions))
    if [node_id(int(n)) for n in bulk[:sample]] != python:
        raise AssertionError("Ring.primaries disagrees with Ring.owners")
    return {"blocks": p.blocks, "key_hash_s": hash_s, "owners_sample": sample,
            "owners_us_per_key": owners_s / sample * 1e6, "owners_all_s_extrapolated": owners_s / sample * p.blocks,
            "primaries_s": primaries_s, "primaries_us_per_key": primaries_s / p.blocks * 1e6}


def balance_row(placement: str, owners: np.ndarray, share: np.ndarray, ids: list[int]) -> dict[str, Any]:
    """Blocks per node against each node's fair share (blocks × its weight / all weights)."""
    counts = np.bincount(owners, minlength=max(ids) + 1)[ids]
    ratio = counts / share
    return {"placement": placement, "nodes": len(ids), "max": float(ratio.max()),
            "p99": float(np.percentile(ratio, 99)),
            "min": float(ratio.min()), "cv": float(ratio.std() / ratio.mean()),
            "sorted_ratios": [round(float(x), 4) for x in np.sort(ratio)]}


def balance(p: Params, ring: Ring, owners: np.ndarray, positions: np.ndarray) -> list[dict[str, Any]]:
    ids = list(range(p.nodes))
    equal = np.full(p.nodes, p.blocks / p.nodes)
    rows = [balance_row(f"ring ({ring.vnodes} points a node)", owners, equal, ids)]
    big = lambda i: 2 * TiB if i % 2 else TiB  # noqa: E731 - half the nodes twice as big
    mixed = ring_of(ids, 1, big)
    weights = np.array([big(i) for i in ids], dtype=float)
    rows.append(balance_row("ring, capacities 1× and 2×", owners_by_ring(mixed, positions),
                            p.blocks * weights / weights.sum(), ids))
    rows.append(balance_row("hash mod N", owners_by_mod(ids, positions), equal, ids))
    return rows


def moves(p: Params, ring: Ring, owners: np.ndarray, positions: np.ndarray) -> list[dict[str, Any]]:
    """Consistent hashing moves only what must move: blocks to the newcomer, or off the leavers."""
    rng = np.random.default_rng(p.seed)
    ids = list(range(p.nodes))
    joined = list(range(p.nodes, p.nodes + p.join))
    leaving = sorted(int(i) for i in rng.choice(p.nodes, p.leave, replace=False))
    staying = [i for i in ids if i not in set(leaving)]

    bigger = ring
    for i in joined:
        bigger = bigger.with_member(ring_of([i], 0).members[0])
    smaller = ring
    for i in leaving:  # one change at a time, as the coordinator sees deaths
        smaller = smaller.without(node_id(i))
    # The coordinator weighs nodes against the biggest: a bigger newcomer re-weighs everyone.
    twice = ring_of(ids + joined, 2, lambda i: 2 * TiB if i in joined else TiB)
    join_owners, leave_owners = owners_by_ring(bigger, positions), owners_by_ring(smaller, positions)
    twice_owners = owners_by_ring(twice, positions)
    mod_before = owners_by_mod(ids, positions)
    rows = []
    for event, after, must, after_ids, ideal in (
            (f"{p.join} node joins ({p.nodes} → {p.nodes + p.join})", join_owners, np.isin(join_owners, joined),
             ids + joined, p.join / (p.nodes + p.join)),
            (f"{p.leave} nodes leave ({p.nodes} → {p.nodes - p.leave})", leave_owners, np.isin(owners, leaving),
             staying, p.leave / p.nodes),
            (f"{p.join} node of 2× capacity joins", twice_owners, np.isin(twice_owners, joined), ids + joined,
             2 * p.join / (p.nodes + 2 * p.join))):
        moved = after != owners
        rows.append({"event": event, "placement": "ring", "moved": float(moved.mean()), "ideal": ideal,
                     "only_what_must": bool(np.array_equal(moved, must))})
        mod_moved = owners_by_mod(after_ids, positions) != mod_before
        rows.append({"event": event, "placement": "hash mod N", "moved": float(mod_moved.mean()), "ideal": ideal,
                     "only_what_must": False})
    return rows


def memberships(p: Params) -> list[list[int]]:
    """Who is up in each epoch: `churn` random nodes leave and `churn` new ones join between epochs."""
    rng = np.random.default_rng(p.seed + 1)
    alive, next_id, out = list(range(p.nodes)), p.nodes, []
    for e in range(p.epochs):
        if e:
            gone = set(int(i) for i in rng.choice(alive, p.churn, replace=False))
            alive = [i for i in alive if i not in gone] + list(range(next_id, next_id + p.churn))
            next_id += p.churn
        out.append(sorted(alive))
    return out


def first_reads(owners: list[np.ndarray]) -> list[np.ndarray]:
    """Per epoch, the blocks whose reader has never read them before (node ids are never reused)."""
    out = []
    for e, now in enumerate(owners):
        seen = np.zeros(len(now), dtype=bool)
        for before in owners[:e]:
            seen |= before == now
        out.append(~seen)
    return out


def grouped(owners: np.ndarray, order: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reads of `nodes` in the epoch's shuffled order, by node: blocks, and where each node starts."""
    order = order[np.isin(owners[order], nodes)]
    by_node = owners[order]
    # node numbers fit in 16 bits: numpy's stable sort is then a radix sort
    sort = np.argsort(by_node.astype(np.uint16) if by_node.max(initial=0) < 2**16 else by_node, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(by_node, minlength=int(nodes.max(initial=0)) + 1))])
    return order[sort], starts


def lru_misses(epochs: list[np.ndarray], capacity: int) -> list[np.ndarray]:
    """What an LRU of `capacity` equal blocks misses, reading each epoch's blocks in order.

    Exactly `server.policy.LRU` read by read (tests/test_benches.py checks it), an epoch
    at a time: the cache is its blocks by recency, and reading e[:p] puts them in front.
    So a block b read at position p of an epoch that found the cache S is still there iff
    b is in S and p + rank_S(b) - k < capacity, k being the blocks of e[:p] in S that were
    more recent than b; after the epoch the cache is the first `capacity` of
    (the epoch's reads, newest first) + (S less them).
    """
    state = np.zeros(0, dtype=np.int64)  # the cache, most recent first
    out = []
    for reads in epochs:
        reads = reads.astype(np.int64)
        by_block = np.argsort(state)
        at = np.minimum(np.searchsorted(state, reads, sorter=by_block), max(len(state) - 1, 0))
        cached = np.flatnonzero(state[by_block[at]] == reads) if len(state) else np.zeros(0, dtype=np.int64)
        rank = by_block[at[cached]]
        hit = np.zeros(len(reads), dtype=bool)
        earlier: list[int] = []  # ranks of cached blocks read so far this epoch, sorted
        for p, r in zip(cached.tolist(), rank.tolist()):
            if p + r < capacity or p + r - bisect.bisect_left(earlier, r) < capacity:
                hit[p] = True
            bisect.insort(earlier, r)
        out.append(reads[~hit])
        state = np.concatenate([reads[::-1], state[~np.isin(state, reads)]])[:capacity]
    return out


def origin_reads(p: Params, owners: list[np.ndarray], orders: list[np.ndarray],
                 capacity: int) -> tuple[list[np.ndarray], int]:
    """The blocks read from the origin in each epoch, and how many nodes' LRUs were run.

    A node that reads at most `capacity` distinct blocks over the whole run never evicts:
    its misses are exactly its first reads of each block, counted without running its
    LRU. Every other node's LRU runs through its reads in their shuffled order.
    """
    first = first_reads(owners)
    everyone = max(int(o.max()) for o in owners) + 1
    distinct = sum(np.bincount(o[f], minlength=everyone) for o, f in zip(owners, first))
    slow = np.flatnonzero(distinct > capacity)
    plans = [grouped(o, order, slow) for o, order in zip(owners, orders)]
    missed: list[list[np.ndarray]] = [[np.zeros(0, dtype=np.int64)] for _ in owners]
    for g in slow.tolist():  # a node's cache depends only on its own reads: one node at a time
        for e, m in enumerate(lru_misses([blocks[starts[g]:starts[g + 1]] for blocks, starts in plans], capacity)):
            missed[e].append(m)
    exact = [np.concatenate([*m, np.flatnonzero(f & ~np.isin(o, slow))]) for m, f, o in zip(missed, first, owners)]
    return exact, len(slow)


def held_at_end(owners: np.ndarray, order: np.ndarray, capacity: int) -> np.ndarray:
    """Per block: is it still in its owner's LRU after the epoch? Every block is read once
    an epoch, so its owner keeps it iff fewer than `capacity` of its reads came after it."""
    by_node = owners[order]
    sort = np.argsort(by_node, kind="stable")
    counts = np.bincount(by_node)
    starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
    position = np.empty(len(order), dtype=np.int64)  # index of each read among its node's reads
    position[sort] = np.arange(len(order)) - np.repeat(starts, counts)
    after = counts[by_node] - 1 - position
    held = np.zeros(len(owners), dtype=bool)
    held[order] = after < capacity
    return held


def handed_over(owners: list[np.ndarray], orders: list[np.ndarray], missed: list[np.ndarray],
                capacity: int) -> list[np.ndarray]:
    """The origin reads left when a moved block is asked of its previous owner first (what
    a join or a drain does: server/node.py's previous-owner seam, server/rebalance.py): a
    miss whose owner changed is served by the previous owner if its LRU still holds it."""
    out = [missed[0]]
    for e in range(1, len(owners)):
        m = missed[e]
        held = held_at_end(owners[e - 1], orders[e - 1], capacity)
        from_peer = (owners[e - 1][m] != owners[e][m]) & held[m]
        out.append(m[~from_peer])
    return out


def epochs(p: Params, positions: np.ndarray) -> dict[str, Any]:
    members = memberships(p)
    capacity = math.ceil(p.headroom * p.blocks / p.nodes)
    orders = [np.random.default_rng(p.seed + 100 + e).permutation(p.blocks).astype(np.int32) for e in range(p.epochs)]
    placements: dict[str, Callable[[int, list[int]], np.ndarray]] = {
        "ring": lambda e, ids: owners_by_ring(ring_of(ids, e + 1), positions),
        "hash mod N": lambda e, ids: owners_by_mod(ids, positions),
    }
    out: dict[str, Any] = {"capacity_blocks": capacity, "headroom": p.headroom,
                           "alive": [len(m) for m in members], "peers": []}
    for name, place in placements.items():
        t0 = time.perf_counter()
        owners = [place(e, ids) for e, ids in enumerate(members)]
        over = sum(int((np.bincount(o, minlength=max(ids) + 1)[ids] > capacity).sum())
                   for o, ids in zip(owners, members))
        missed, simulated = origin_reads(p, owners, orders, capacity)
        runs = [(name, missed)]
        if name == "ring":  # the same churn as drains and joins: moved blocks come from their previous owner
            runs.append(("ring, hand-over", handed_over(owners, orders, missed, capacity)))
        for label, origin in runs:
            reads = np.bincount(np.concatenate(origin), minlength=p.blocks)
            out["peers"].append({
                "placement": label, "origin_reads_per_epoch": [len(m) / p.blocks for m in origin],
                "mean": float(reads.mean()), "max": int(reads.max()),
                "blocks_read": {str(k): int(v) for k, v in enumerate(np.bincount(reads)) if v},
                "node_epochs_over_capacity": over, "nodes_lru_run": simulated,
                "seconds": time.perf_counter() - t0,
            })
    return out


def events(p: Params, owners: np.ndarray, positions: np.ndarray) -> list[dict[str, Any]]:
    """Origin reads per block of a warm cluster (one epoch read) for one join, one drain and
    a rolling restart of every node, one at a time: as crashes (the moved share is read
    again: today's cost) and with the hand-over (a moved block comes from the node that
    held it, if its LRU still does; a restarted node keeps its disk)."""
    ids = list(range(p.nodes))
    capacity = math.ceil(p.headroom * p.blocks / p.nodes)
    held = held_at_end(owners, np.random.default_rng(p.seed + 100).permutation(p.blocks), capacity)
    rows = []
    for label, after in (("1 node joins", owners_by_ring(ring_of([*ids, p.nodes], 2), positions)),
                         ("1 node drains", owners_by_ring(ring_of(ids[1:], 2), positions))):
        moved = after != owners
        rows.append({"event": label, "crash": float(moved.mean()), "hand_over": float((moved & ~held).mean())})
    # Restarting node i as a crash reads its share again; drained first, its share moves out
    # and back from nodes that hold it (and its own disk): what was not held is all that is read.
    rows.append({"event": f"rolling restart of {p.nodes:,} nodes", "crash": 1.0 * float(held.mean()),
                 "hand_over": float((~held).mean())})
    return rows


def coordinator(p: Params) -> list[dict[str, Any]]:
    """Per membership change: what the coordinator builds and sends, what a client rebuilds."""
    rows = []
    for n in p.sizes:
        repeat = 3 if n <= 300 else 2
        best = lambda fn: min(timed(fn)[1] for _ in range(repeat))  # noqa: E731
        ids = list(range(n))
        ring = ring_of(ids, 1)
        doc = ring.dumps()
        newcomer = ring_of([n], 0).members[0]

        def client() -> None:
            Ring.from_json(doc).owners("any key")  # the first look-up builds the table

        tracemalloc.start()
        client_ring = Ring.from_json(doc)
        client_ring.owners("any key")
        table_bytes = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del client_ring
        rows.append({
            "nodes": n, "points": sum(max(1, round(ring.vnodes * m.weight)) for m in ring.members),
            "build_ring_s": best(lambda: ring_of(ids, 2).dumps()),
            "with_member_s": best(lambda: ring.with_member(newcomer)),
            "without_s": best(lambda: ring.without(node_id(0))),
            "client_from_json_s": best(client), "json_bytes": len(doc), "client_ring_bytes": table_bytes,
        })
    return rows


def run(quick: bool) -> dict[str, Any]:
    p = QUICK if quick else FULL
    t0 = time.perf_counter()
    positions, hash_s = block_positions(p.blocks)
    ring = ring_of(range(p.nodes), 1)
    doc: dict[str, Any] = {"params": asdict(p), "lookup": lookup(p, ring, positions, hash_s)}
    # From here on a block is known by its rank on the ring: sorted look-ups are cache-friendly.
    positions = np.sort(positions)
    owners = owners_by_ring(ring, positions)
    parts: dict[str, Callable[[], Any]] = {
        "balance": lambda: balance(p, ring, owners, positions), "moves": lambda: moves(p, ring, owners, positions),
        "epochs": lambda: epochs(p, positions), "events": lambda: events(p, owners, positions),
        "coordinator": lambda: coordinator(p)}
    doc["part_seconds"] = {}
    for name, part in parts.items():
        doc[name], doc["part_seconds"][name] = timed(part)
    doc["seconds"] = time.perf_counter() - t0
    return doc


# -- the report ------------------------------------------------------------------------
def report(doc: dict[str, Any]) -> str:
    p, lk, ep = doc["params"], doc["lookup"], doc["epochs"]
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in doc["part_seconds"].items())
    out = [f"{p['nodes']:,} nodes, {p['blocks']:,} blocks ({doc['seconds']:.0f} s: {parts})", "",
           "Placing every block",
           table(["step", "total s", "µs / block"],
                 [["key_hash(block_key(...))", f"{lk['key_hash_s']:.1f}",
                   f"{lk['key_hash_s'] / p['blocks'] * 1e6:.2f}"],
                  [f"Ring.owners (timed on {lk['owners_sample']:,}, extrapolated)",
                   f"{lk['owners_all_s_extrapolated']:.1f}", f"{lk['owners_us_per_key']:.2f}"],
                  ["Ring.primaries (numpy, all blocks)", f"{lk['primaries_s']:.1f}",
                   f"{lk['primaries_us_per_key']:.3f}"]]),
           "", "Load: blocks per node / fair share",
           table(["placement", "max", "p99", "min", "stdev"],
                 [[r["placement"], f"{r['max']:.3f}", f"{r['p99']:.3f}", f"{r['min']:.3f}", f"{r['cv']:.3f}"]
                  for r in doc["balance"]]),
           "", "Blocks that change owner",
           table(["event", "placement", "moved", "ideal", "moved / ideal", "only what must"],
                 [[r["event"], r["placement"], f"{r['moved']:.4%}", f"{r['ideal']:.4%}",
                   f"{r['moved'] / r['ideal']:.2f}", "yes" if r["only_what_must"] else "no"] for r in doc["moves"]]),
           "", f"Origin reads per block over {p['epochs']} epochs, {p['churn']} nodes out and {p['churn']} in "
               f"between epochs; a node caches {ep['capacity_blocks']:,} blocks ({p['headroom']}× its share), LRU",
           table(["placement", *[f"epoch {e + 1}" for e in range(p["epochs"])], "mean / block", "max / block",
                  "ideal", "blocks read > once", "LRUs run"],
                 [[r["placement"], *[f"{x:.3f}" for x in r["origin_reads_per_epoch"]], f"{r['mean']:.3f}",
                   r["max"], "1.000", f"{1 - r['blocks_read'].get('1', 0) / p['blocks']:.2%}",
                   f"{r['nodes_lru_run']:,}"] for r in ep["peers"]]),
           "", "Origin reads per block for one change to a warm cluster (as a crash, and handed over)",
           table(["event", "as a crash", "handed over"],
                 [[r["event"], f"{r['crash']:.4f}", f"{r['hand_over']:.4f}"] for r in doc["events"]]),
           "", "Per membership change (best of 2-3; ms)",
           table(["nodes", "points", "coordinator: build + JSON", "with_member", "without", "client: from_json + table",
                  "JSON KiB", "client ring MiB"],
                 [[f"{r['nodes']:,}", f"{r['points']:,}", ms(r["build_ring_s"]), ms(r["with_member_s"]),
                   ms(r["without_s"]), ms(r["client_from_json_s"]), f"{r['json_bytes'] / 1024:.0f}",
                   f"{r['client_ring_bytes'] / 2**20:.1f}"] for r in doc["coordinator"]])]
    return "\n".join(out)


if __name__ == "__main__":  # one section on its own: the same as `bench/scale.py --only ...`
    from bench.scale import section_main

    sys.exit(section_main(sys.modules[__name__]))
