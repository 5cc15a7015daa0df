"""Issue #11 at scale, section by section: each prints its tables; one JSON holds them all.

    python bench/scale.py                    # every section
    python bench/scale.py --only sim         # one section (repeat --only for several)
    python bench/scale.py --quick            # small sizes, for CI (well under 20 s)
    python bench/plot.py                     # bench/results/scale.json → docs/img/scale-*.png

A section is a module with `run(quick: bool) -> dict` (JSON-able figures) and
`report(doc: dict) -> str` (the tables); add it to SECTIONS. The JSON is
{"bench": "scale", "quick", "machine", "sections": {name: doc}}, with only the sections
that ran (give `--json` another path to keep an earlier run).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import machine, write_json  # noqa: E402

SECTIONS: dict[str, tuple[str, str]] = {  # name → (module, what it shows)
    "sim": ("bench.scale_sim", "1,000 nodes and 10M blocks through the real ring, against hash mod N"),
    "disk": ("bench.scale_disk", "re-indexing a large disk tier on start, against re-reading every byte"),
    "manifest": ("bench.scale_manifest", "a million files: register, list, load the manifest, warm; a 10M manifest"),
}


def section_main(module: Any) -> int:
    """Run one section module as a script (`python bench/scale_sim.py [--quick]`)."""
    ap = argparse.ArgumentParser(description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    print(module.report(module.run(ap.parse_args().quick)))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for CI")
    ap.add_argument("--only", action="append", choices=sorted(SECTIONS), help="run only this section")
    ap.add_argument("--json", default="bench/results/scale.json", help="where to write the figures")
    args = ap.parse_args()
    doc: dict[str, Any] = {"bench": "scale", "quick": args.quick, "machine": machine(), "sections": {}}
    for name in args.only or list(SECTIONS):
        module_name, what = SECTIONS[name]
        module = importlib.import_module(module_name)
        print(f"\n== {name}: {what}", flush=True)
        t0 = time.perf_counter()
        doc["sections"][name] = module.run(args.quick)
        print(module.report(doc["sections"][name]))
        print(f"({name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"\nwrote {write_json(args.json, doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
