"""Prometheus metrics of one cache node, in a registry of its own (no process globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

LABELS = ("dataset", "node")


class NodeMetrics:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        # plain totals too, for `cachefs status` (Prometheus counters are for scraping)
        self.totals = {"hits": 0, "misses": 0, "origin_bytes": 0, "served_bytes": 0}
        self.registry = CollectorRegistry()
        r = self.registry
        self.hits = Counter("cachefs_hits", "Block reads served from a tier", LABELS + ("tier",), registry=r)
        self.misses = Counter("cachefs_misses", "Block reads that went to the origin", LABELS, registry=r)
        self.origin_bytes = Counter("cachefs_origin_bytes", "Bytes read from the origin", LABELS, registry=r)
        self.served_bytes = Counter("cachefs_served_bytes", "Block bytes sent to clients", LABELS, registry=r)
        self.evictions = Counter("cachefs_evictions", "Blocks evicted to stay within budget", LABELS + ("tier",),
                                 registry=r)
        self.used = Gauge("cachefs_tier_used_bytes", "Bytes held per tier", ("node", "tier"), registry=r)
        self.budget = Gauge("cachefs_tier_budget_bytes", "Byte budget per tier", ("node", "tier"), registry=r)

    def hit(self, dataset: str, tier: str) -> None:
        self.hits.labels(dataset, self.node_id, tier).inc()
        self.totals["hits"] += 1

    def miss(self, dataset: str, nbytes: int) -> None:
        self.misses.labels(dataset, self.node_id).inc()
        self.origin_bytes.labels(dataset, self.node_id).inc(nbytes)
        self.totals["misses"] += 1
        self.totals["origin_bytes"] += nbytes

    def served(self, dataset: str, nbytes: int) -> None:
        self.served_bytes.labels(dataset, self.node_id).inc(nbytes)
        self.totals["served_bytes"] += nbytes

    def evicted(self, dataset: str, tier: str, count: int = 1) -> None:
        self.evictions.labels(dataset, self.node_id, tier).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
