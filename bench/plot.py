"""Charts from the benches' JSON: PNGs for docs/benchmarks.md.

    python bench/plot.py                       # bench/results/{epoch,accelerators,scale}.json → docs/img/
    python bench/plot.py --epoch E.json --accelerators A.json --scale S.json --out DIR
    python bench/plot.py --tables              # the Markdown tables of docs/benchmarks.md instead

Writes, for what it finds:
  epoch-time.png     time of every epoch, per peer, one panel per dataset
  epoch-origin.png   bytes read from the origin, cumulated over epochs, in datasets
  eviction.png       per-epoch hit ratio of cachefs with LRU and Sticky, against capacity/dataset
  accelerators.png   accelerator utilisation against accelerator count, one panel per workload
  scale-balance.png  1,000 nodes: each node's blocks over its fair share, sorted (bench/scale.py)
  scale-moves.png    blocks moved when nodes join or leave: ring, hash mod N, the ideal
  scale-origin.png   origin reads per block, cumulated over epochs with churn: ring, hash mod N
  scale-ring.png     work per membership change against ring size: coordinator, client

Charts need matplotlib: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLOURS = {"origin": "#c0392b", "pernode": "#e67e22", "cachefs": "#2471a3", "mount": "#17a589"}
DASHED = {"per-node, no budget"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        sys.exit("bench/plot.py needs matplotlib, which is not installed: "
                 "pip install -e '.[bench]' (or pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(record: dict[str, Any]) -> dict[str, Any]:
    return {"color": COLOURS.get(record["kind"], "grey"), "linestyle": "--" if record["peer"] in DASHED else "-"}


def _by(records: list[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r[key], []).append(r)
    return out


def _caption(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    return f"{m['cpus']} cores, {m['memory_bytes'] / 2**30:.0f} GiB, shared" + (" — quick mode" if doc["quick"] else "")


def epoch_charts(doc: dict[str, Any], out: Path) -> list[Path]:
    plt = _pyplot()
    datasets = doc["datasets"]
    k = doc["params"]["nodes"]
    written = []

    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, (name, recs) in zip(axes[0], _by(doc["epochs"], "dataset").items()):
        peers = _by(recs, "peer")
        epochs = sorted({r["epoch"] for r in recs})
        width = 0.8 / len(epochs)
        for j, e in enumerate(epochs):
            xs = [i + (j - (len(epochs) - 1) / 2) * width for i in range(len(peers))]
            ys = [next(r["seconds"] for r in rs if r["epoch"] == e) for rs in peers.values()]
            ax.bar(xs, ys, width, label=f"epoch {e}", alpha=0.45 + 0.55 * (j + 1) / len(epochs),
                   color=[COLOURS.get(rs[0]["kind"], "grey") for rs in peers.values()], edgecolor="black",
                   linewidth=0.3)
        ax.set_xticks(range(len(peers)), [p.replace(" (S3 direct)", "\n(S3 direct)").replace(", ", ",\n")
                                          for p in peers], fontsize=8)
        d = datasets[name]
        ax.set_title(f"{name}: {d['files']} files, {d['bytes'] / 2**20:.0f} MiB; {k} nodes")
        ax.set_ylabel("epoch time (s); bars: epoch 1, 2, ...")
    fig.suptitle(f"Shuffled epochs on {k} nodes, same cache budget per node ({_caption(doc)})", fontsize=10)
    fig.tight_layout()
    written.append(out / "epoch-time.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, (name, recs) in zip(axes[0], _by(doc["epochs"], "dataset").items()):
        size = datasets[name]["bytes"]
        for peer, rs in _by(recs, "peer").items():
            rs = sorted(rs, key=lambda r: r["epoch"])
            total, ys = 0, []
            for r in rs:
                total += r["origin_bytes"]
                ys.append(total / size)
            ax.plot([r["epoch"] for r in rs], ys, marker="o", label=peer, **_style(rs[0]))
        ax.axhline(1, color="grey", linewidth=0.6)
        ax.axhline(k, color="grey", linewidth=0.6, linestyle=":")
        ax.set_title(f"{name}: bytes read from the origin")
        ax.set_xlabel("epoch")
        ax.set_ylabel("cumulated, in datasets (1 = read once)")
        ax.set_xticks(sorted({r["epoch"] for r in recs}))
        ax.legend(fontsize=8)
    fig.suptitle(f"Origin reads: cachefs reads the dataset once ({_caption(doc)})", fontsize=10)
    fig.tight_layout()
    written.append(out / "epoch-origin.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    if doc.get("eviction"):
        ev = doc["eviction"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for peer, rs in _by(ev["epochs"], "peer").items():
            rs = sorted(rs, key=lambda r: r["epoch"])
            ax.plot([r["epoch"] for r in rs], [r["hit_ratio"] for r in rs], marker="o", label=peer,
                    linestyle="-" if "sticky" in peer else "--", color=COLOURS["cachefs"])
        ax.axhline(ev["expected_hit_ratio"], color="grey", linewidth=0.8, linestyle=":", label="capacity / dataset")
        ax.set_ylim(0, 1)
        ax.set_xticks(sorted({r["epoch"] for r in ev["epochs"]}))
        ax.set_xlabel("epoch")
        ax.set_ylabel("hit ratio (bytes)")
        ax.set_title(f"A dataset twice the cache ({ev['dataset_bytes'] / 2**20:.0f} MiB on "
                     f"{ev['cluster_budget_bytes'] / 2**20:.0f} MiB), shuffled epochs", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / "eviction.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def accelerator_chart(doc: dict[str, Any], out: Path) -> list[Path]:
    plt = _pyplot()
    workloads = _by(doc["runs"], "workload")
    threshold = doc["params"]["threshold"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4), squeeze=False)
    for ax, (name, recs) in zip(axes[0], workloads.items()):
        for peer, rs in _by(recs, "peer").items():
            rs = sorted(rs, key=lambda r: r["accelerators"])
            ax.plot([r["accelerators"] for r in rs], [r["au_mean"] for r in rs], marker="o", label=peer,
                    **_style(rs[0]))
        ax.axhline(threshold, color="grey", linewidth=0.8, linestyle=":", label=f"AU {threshold:.0%}")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("emulated accelerators on one node")
        ax.set_ylabel("accelerator utilisation")
        wl = doc["workloads"][name]
        ax.set_title(f"{name} ({wl['sample_bytes'] / 1024:.0f} KiB samples)")
        ax.set_xticks(doc["params"]["counts"])
        ax.legend(fontsize=8)
    fig.suptitle(f"Accelerator utilisation, accelerators = A100 / {doc['params']['slowdown']:g} "
                 f"({_caption(doc)})", fontsize=10)
    fig.tight_layout()
    path = out / "accelerators.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def scale_charts(doc: dict[str, Any], out: Path) -> list[Path]:
    sim = doc["sections"].get("sim")
    if sim is None:
        return []
    plt = _pyplot()
    p, written = sim["params"], []
    ring_colour, mod_colour = COLOURS["cachefs"], COLOURS["origin"]
    caption = f"{p['nodes']:,} nodes, {p['blocks']:,} blocks ({_caption(doc)})"

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for row, colour, style in zip(sim["balance"], (ring_colour, ring_colour, mod_colour), ("-", "--", "-")):
        ratios = row["sorted_ratios"]
        ax.plot([100 * i / (len(ratios) - 1) for i in range(len(ratios))], ratios, label=row["placement"],
                color=colour, linestyle=style)
    ax.axhline(1, color="grey", linewidth=0.6)
    ax.set_xlabel("nodes, least to most loaded (%)")
    ax.set_ylabel("blocks held / fair share")
    ax.set_title(f"Load balance\n{caption}", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "scale-balance.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    events = list(dict.fromkeys(r["event"] for r in sim["moves"]))
    for j, (label, colour) in enumerate((("ideal", "grey"), ("ring", ring_colour), ("hash mod N", mod_colour))):
        ys = [next(r["ideal"] if label == "ideal" else r["moved"] for r in sim["moves"]
                   if r["event"] == e and (label == "ideal" or r["placement"] == label)) for e in events]
        ax.bar([i + (j - 1) * 0.27 for i in range(len(events))], [100 * y for y in ys], 0.27, label=label,
               color=colour)
    ax.set_yscale("log")
    ax.set_xticks(range(len(events)), events, fontsize=8)
    ax.set_ylabel("blocks that change owner (%, log)")
    ax.set_title(f"Membership changes\n{caption}", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "scale-moves.png")

    ep = sim["epochs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in ep["peers"]:
        total, ys = 0.0, []
        for x in r["origin_reads_per_epoch"]:
            total += x
            ys.append(total)
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=f"{r['placement']} (max {r['max']} / block)",
                color=ring_colour if r["placement"] == "ring" else mod_colour)
    ax.axhline(1, color="grey", linewidth=0.6, linestyle=":", label="ideal: each block once")
    ax.set_xticks(range(1, p["epochs"] + 1))
    ax.set_xlabel(f"epoch ({p['churn']} nodes leave and {p['churn']} join before each epoch after the first)")
    ax.set_ylabel("origin reads per block, cumulated")
    ax.set_title(f"Origin reads with churn, each node caching {p['headroom']}× its share\n{caption}", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "scale-origin.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = sim["coordinator"]
    xs = [r["nodes"] for r in rows]
    for key, label, colour in (("client_from_json_s", "client: ring from JSON + first look-up", ring_colour),
                               ("build_ring_s", "coordinator: build the ring + JSON", COLOURS["mount"])):
        ax.plot(xs, [1e3 * r[key] for r in rows], marker="o", label=label, color=colour)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"cache nodes ({rows[0]['points'] // rows[0]['nodes']:,} points a node)")
    ax.set_ylabel("ms per membership change (log)")
    ax.set_title(f"Work per membership change\n{_caption(doc)}", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "scale-ring.png")
    return written



def epoch_tables(doc: dict[str, Any]) -> str:
    rows = ["| dataset | peer | epoch 1 s | later epochs s | samples/s (later) | origin reads | copies held | "
            "hit ratio (later) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in doc["summary"]:
        mine = [r for r in doc["epochs"] if r["dataset"] == s["dataset"] and r["peer"] == s["peer"]]
        later = mine[1:] or mine
        held = mine[-1]["held_bytes"] / doc["datasets"][s["dataset"]]["bytes"]
        rows.append(f"| {s['dataset']} | {s['peer']} | {s['first_epoch_seconds']:.1f} | {s['later_epoch_seconds']:.2f} "
                    f"| {later[0]['samples'] / s['later_epoch_seconds']:.0f} "
                    f"| {s['origin_reads_of_dataset']:.2f} | {held:.2f} | {s['later_hit_ratio']:.2f} |")
    if doc.get("eviction"):
        ev = doc["eviction"]
        peers = _by(ev["epochs"], "peer")
        epochs = sorted({r["epoch"] for r in ev["epochs"]})
        rows += ["", "| eviction | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
                 "|---|" + "---:|" * len(epochs)]
        for peer, rs in peers.items():
            rows.append(f"| {peer.split('=')[-1]} | " + " | ".join(f"{r['hit_ratio']:.2f}" for r in rs) + " |")
    return "\n".join(rows)


def accelerator_table(doc: dict[str, Any]) -> str:
    counts = doc["params"]["counts"]
    rows = ["| workload | peer | " + " | ".join(map(str, counts)) + f" | most at {doc['params']['threshold']:.0%} |",
            "|---|---|" + "---:|" * (len(counts) + 1)]
    for s in doc["summary"]:
        cells = []
        for c in counts:
            au = s["au_by_accelerators"].get(str(c))
            cells.append("" if au is None else f"{au:.2f}" + ("*" if c in s.get("not_counted", []) else ""))
        rows.append(f"| {s['workload']} | {s['peer']} | " + " | ".join(cells) + f" | **{s['max_accelerators']}** |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epoch", default="bench/results/epoch.json")
    ap.add_argument("--accelerators", default="bench/results/accelerators.json")
    ap.add_argument("--scale", default="bench/results/scale.json")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--tables", action="store_true", help="print Markdown tables (no matplotlib needed)")
    args = ap.parse_args()
    if args.tables:
        for path, render in ((args.epoch, epoch_tables), (args.accelerators, accelerator_table)):
            if Path(path).exists():
                print(render(json.loads(Path(path).read_text())) + "\n")
        return 0
    _pyplot()  # fail first, and clearly, without matplotlib
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path, chart in ((args.epoch, epoch_charts), (args.accelerators, accelerator_chart), (args.scale, scale_charts)):
        if Path(path).exists():
            written += chart(json.loads(Path(path).read_text()), out)
        else:
            print(f"no {path}: skipped (run the bench first)", file=sys.stderr)
    for p in written:
        print(f"wrote {p}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
