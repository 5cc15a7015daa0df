"""Prometheus metrics of one cache node, in a registry of its own (no process globals).

Label lookups (`.labels(...)`) cost microseconds each; the read path counts several
things per request, so each dataset's counters are looked up once and kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

LABELS = ("dataset", "node")


@dataclass(frozen=True)
class _DatasetCounters:
    memory_hits: Any
    disk_hits: Any
    misses: Any
    origin_bytes: Any
    served_bytes: Any


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
        self._datasets: dict[str, _DatasetCounters] = {}

    def _of(self, dataset: str) -> _DatasetCounters:
        c = self._datasets.get(dataset)
        if c is None:
            labels = (dataset, self.node_id)
            c = self._datasets[dataset] = _DatasetCounters(
                self.hits.labels(*labels, "memory"), self.hits.labels(*labels, "disk"), self.misses.labels(*labels),
                self.origin_bytes.labels(*labels), self.served_bytes.labels(*labels))
        return c

    def hit(self, dataset: str, tier: str) -> None:
        c = self._of(dataset)
        (c.memory_hits if tier == "memory" else c.disk_hits).inc()
        self.totals["hits"] += 1

    def miss(self, dataset: str, nbytes: int) -> None:
        c = self._of(dataset)
        c.misses.inc()
        c.origin_bytes.inc(nbytes)
        self.totals["misses"] += 1
        self.totals["origin_bytes"] += nbytes

    def served(self, dataset: str, nbytes: int) -> None:
        self._of(dataset).served_bytes.inc(nbytes)
        self.totals["served_bytes"] += nbytes

    def tiers(self, used: dict[str, int], budget: dict[str, int]) -> None:
        """Set the tier gauges (called before each scrape)."""
        for tier, n in used.items():
            self.used.labels(self.node_id, tier).set(n)
        for tier, n in budget.items():
            self.budget.labels(self.node_id, tier).set(n)

    def evicted(self, dataset: str, tier: str, count: int = 1) -> None:
        self.evictions.labels(dataset, self.node_id, tier).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
