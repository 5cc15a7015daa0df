"""The benches of bench/ keep working: each runs in --quick mode in its own process, writes
JSON of the promised shape, and shows the facts that do not depend on timing (bytes read
from the origin, bytes held, hit ratios fixed by the cache's capacity). No timing is
asserted: this machine is shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(660)]


def run_bench(script: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / f"{script}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEFS_", "RAY_ADDRESS"))}
    done = subprocess.run([sys.executable, f"bench/{script}.py", "--quick", "--json", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def by_peer(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["peer"], []).append(r)
    return out


@pytest.fixture(scope="module")
def epoch_doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_bench("epoch", tmp_path_factory.mktemp("epoch"))


@pytest.fixture(scope="module")
def scale_doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_bench("scale", tmp_path_factory.mktemp("scale"))


@pytest.fixture(scope="module")
def accelerators_doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_bench("accelerators", tmp_path_factory.mktemp("accelerators"))


def test_epoch_bench_reports_every_peer_and_epoch_on_both_datasets(epoch_doc: dict[str, Any]) -> None:
    epochs = epoch_doc["params"]["epochs"]
    assert set(epoch_doc["datasets"]) == {"images", "shards"}
    for name, ds in epoch_doc["datasets"].items():
        assert ds["node_budget_bytes"] < ds["bytes"] < ds["cluster_budget_bytes"]
        peers = by_peer([r for r in epoch_doc["epochs"] if r["dataset"] == name])
        assert set(peers) == {"origin (S3 direct)", "per-node cache", "per-node, no budget", "cachefs"}
        for records in peers.values():
            assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
            for r in records:
                assert r["bytes_read"] == ds["bytes"] and r["seconds"] > 0 and r["samples_per_s"] > 0
                assert 0 <= r["hit_ratio"] <= 1
                assert r["origin_bytes"] == r["origin_bytes_metered"]  # every peer's count matches the origin's meter


def test_cachefs_reads_the_origin_once_and_holds_one_copy(epoch_doc: dict[str, Any]) -> None:
    for name, ds in epoch_doc["datasets"].items():
        cachefs = by_peer([r for r in epoch_doc["epochs"] if r["dataset"] == name])["cachefs"]
        assert sum(r["origin_bytes"] for r in cachefs) == ds["bytes"]
        assert cachefs[0]["origin_bytes"] == ds["bytes"] and all(r["hit_ratio"] == 1 for r in cachefs[1:])
        assert all(r["held_bytes"] == ds["bytes"] for r in cachefs)


def test_the_origin_is_read_every_epoch_and_per_node_caches_read_it_more_than_once(epoch_doc: dict[str, Any]) -> None:
    for name, ds in epoch_doc["datasets"].items():
        peers = by_peer([r for r in epoch_doc["epochs"] if r["dataset"] == name])
        assert all(r["origin_bytes"] == ds["bytes"] and r["held_bytes"] == 0 for r in peers["origin (S3 direct)"])
        cachefs_total = sum(r["origin_bytes"] for r in peers["cachefs"])
        for peer in ("per-node cache", "per-node, no budget"):
            assert sum(r["origin_bytes"] for r in peers[peer]) > cachefs_total
        nodes = epoch_doc["params"]["nodes"]
        assert all(r["held_bytes"] <= nodes * ds["node_budget_bytes"] for r in peers["per-node cache"])
        assert max(r["held_bytes"] for r in peers["per-node, no budget"]) > ds["bytes"]  # copies on several nodes


def test_sticky_eviction_hits_about_capacity_over_dataset_where_lru_thrashes(epoch_doc: dict[str, Any]) -> None:
    ev = epoch_doc["eviction"]
    assert ev["cluster_budget_bytes"] * 2 <= ev["dataset_bytes"] + 3 * 1024
    peers = by_peer(ev["epochs"])
    sticky, lru = peers["cachefs eviction=sticky"][1:], peers["cachefs eviction=lru"][1:]
    assert all(abs(r["hit_ratio"] - ev["expected_hit_ratio"]) < 0.1 for r in sticky)
    assert max(r["hit_ratio"] for r in lru) < min(r["hit_ratio"] for r in sticky)
    assert all(r["held_bytes"] <= ev["cluster_budget_bytes"] for r in lru + sticky)


def test_accelerator_bench_reports_utilisation_per_peer_and_count(accelerators_doc: dict[str, Any]) -> None:
    doc = accelerators_doc
    peers = {"origin (S3 direct)", "per-node cache", "cachefs (fsspec)"}
    if doc["mount"] == "measured":
        peers.add("cachefs (mount)")
    assert {s["peer"] for s in doc["summary"]} == peers
    assert {s["workload"] for s in doc["summary"]} == {"resnet50", "cosmoflow"}
    steps = doc["params"]["steps"]
    for r in doc["runs"]:
        assert r["accelerators"] in doc["params"]["counts"] and len(r["au"]) == r["accelerators"]
        assert all(0 < au <= 1 for au in r["au"])
        assert r["samples"] == r["accelerators"] * steps * r["batch"]
    for s in doc["summary"]:
        assert s["max_accelerators"] in [0, *doc["params"]["counts"]]


def test_warm_cachefs_serves_accelerators_without_touching_the_origin(accelerators_doc: dict[str, Any]) -> None:
    runs = accelerators_doc["runs"]
    assert all(r["origin_bytes"] == 0 == r["origin_bytes_metered"] for r in runs if r["kind"] in ("cachefs", "mount"))
    assert all(r["origin_bytes"] == r["bytes"] == r["origin_bytes_metered"] for r in runs if r["kind"] == "origin")


def test_scale_sim_places_with_the_real_ring_and_moves_only_what_must(scale_doc: dict[str, Any]) -> None:
    sim = scale_doc["sections"]["sim"]  # the bench itself checks primaries against Ring.owners
    p = sim["params"]
    assert {r["placement"] for r in sim["balance"]} >= {"hash mod N"} and len(sim["balance"]) == 3
    assert all(r["min"] <= 1 <= r["max"] and len(r["sorted_ratios"]) == p["nodes"] for r in sim["balance"])
    equal = [r for r in sim["moves"] if "2×" not in r["event"]]  # nodes of equal capacity join or leave
    ring = [r for r in equal if r["placement"] == "ring"]
    mod = [r for r in equal if r["placement"] == "hash mod N"]
    assert len(ring) == len(mod) == 2 and all(r["only_what_must"] for r in ring)
    assert all(r["moved"] < 2 * r["ideal"] for r in ring) and all(r["moved"] > 0.5 for r in mod)
    assert [r["nodes"] for r in sim["coordinator"]] == list(p["sizes"])


def test_scale_sim_counts_origin_reads_per_block_against_the_ideal(scale_doc: dict[str, Any]) -> None:
    sim = scale_doc["sections"]["sim"]
    p, peers = sim["params"], {r["placement"]: r for r in sim["epochs"]["peers"]}
    assert set(peers) == {"ring", "ring, hand-over", "hash mod N"}
    for r in peers.values():
        assert r["origin_reads_per_epoch"][0] == 1.0  # the first epoch reads every block once
        assert sum(r["blocks_read"].values()) == p["blocks"] and "0" not in r["blocks_read"]
        assert r["mean"] == pytest.approx(sum(r["origin_reads_per_epoch"]))
    assert 1 < peers["ring"]["mean"] < 1.5 < peers["hash mod N"]["mean"]
    # moved blocks asked of their previous owner first: churn costs (almost) no origin read
    assert 1 <= peers["ring, hand-over"]["mean"] < peers["ring"]["mean"]
    events = {r["event"].split(" of ")[0]: r for r in sim["events"]}
    assert all(r["hand_over"] <= r["crash"] for r in events.values()) and events["1 node joins"]["crash"] > 0


def test_the_epochwise_lru_of_the_sim_is_exactly_the_servers_lru_read_by_read() -> None:
    import numpy as np

    from bench.scale_sim import lru_misses
    from server.policy import LRU

    rng = np.random.default_rng(3)
    for _ in range(300):
        capacity, universe = int(rng.integers(1, 60)), int(rng.integers(5, 150))
        epochs = [rng.permutation(universe)[:int(rng.integers(0, universe))] for _ in range(int(rng.integers(1, 6)))]
        lru, expected = LRU(capacity), []
        for reads in epochs:
            missed = []
            for b in reads.tolist():
                if b in lru:
                    lru.touch(b)
                else:
                    missed.append(b)
                    lru.admit(b, 1)
            expected.append(missed)
        assert [m.tolist() for m in lru_misses(epochs, capacity)] == expected


def test_scale_disk_reopens_every_block_without_reading_it(scale_doc: dict[str, Any]) -> None:
    for tier in scale_doc["sections"]["disk"]["tiers"]:  # the bench checks that open() indexed every block
        assert [r["page_cache"] for r in tier["runs"]] in (["warm", "cold"], ["warm"])
        assert tier["bytes"] == tier["blocks"] * tier["block_bytes"]
        assert all(r["open_s"] > 0 and r["reread_s"] > 0 for r in tier["runs"])


def test_plot_fails_clearly_without_matplotlib_or_draws_every_chart(epoch_doc: dict[str, Any],
                                                                    accelerators_doc: dict[str, Any],
                                                                    scale_doc: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    (tmp_path / "e.json").write_text(json.dumps(epoch_doc))
    (tmp_path / "a.json").write_text(json.dumps(accelerators_doc))
    (tmp_path / "s.json").write_text(json.dumps(scale_doc))
    done = subprocess.run([sys.executable, "bench/plot.py", "--epoch", str(tmp_path / "e.json"), "--accelerators",
                           str(tmp_path / "a.json"), "--scale", str(tmp_path / "s.json"), "--out",
                           str(tmp_path / "img")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert done.returncode != 0 and "pip install matplotlib" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        "accelerators.png", "epoch-origin.png", "epoch-time.png", "eviction.png", "scale-balance.png",
        "scale-moves.png", "scale-origin.png", "scale-ring.png"]
