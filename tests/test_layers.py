"""The layers of the code, as docs/architecture.md draws them, hold: no import runs
upward, no two modules import each other, and the fsspec filesystem imports none of Ray,
Kubernetes, gRPC, FUSE or torch (a training pod installs the client alone)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shard", "cachefs", "server", "csi")

# layer → the layers it may import (itself included). First match wins, most specific first.
LAYERS = [
    ("shard", {"shard"}),
    ("cachefs.common", {"shard", "cachefs.common"}),
    ("cachefs.cli", {"*"}),  # the top: the one place that reaches every part, command by command
    ("cachefs.torch", {"shard", "cachefs.common", "cachefs", "cachefs.torch"}),
    ("cachefs", {"shard", "cachefs.common", "cachefs"}),
    ("server.k8s", {"cachefs.common", "cachefs", "server.k8s"}),  # the operator drives the admin client
    ("server", {"shard", "cachefs.common", "server"}),
    ("csi", {"shard", "cachefs.common", "cachefs", "csi"}),
]


def layer_of(module: str) -> str:
    for name, _ in LAYERS:
        if module == name or module.startswith(name + "."):
            return name
    raise AssertionError(f"{module} is in no layer")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "proto" in path.parts:
                continue  # generated gRPC code
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, module: str, top_level_only: bool = False) -> set[str]:
    """Modules of ours that `module` imports (anywhere in it, or only at its top level)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative
                base = module.rsplit(".", node.level)[0] if path.name != "__init__.py" or node.level > 1 else module
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            found |= {f"{name}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def test_no_import_runs_upward() -> None:
    allowed = dict(LAYERS)
    known = modules()
    wrong = []
    for module, path in sorted(known.items()):
        mine = layer_of(module)
        if "*" in allowed[mine]:
            continue
        for target in imports(path, module):
            if target not in known and target.rsplit(".", 1)[0] not in known:
                continue
            if layer_of(target) not in allowed[mine]:
                wrong.append(f"{module} ({mine}) imports {target} ({layer_of(target)})")
    assert wrong == [], "\n".join(wrong)


def test_no_two_modules_import_each_other() -> None:
    known = modules()
    graph = {m: {t if t in known else t.rsplit(".", 1)[0] for t in imports(p, m)} & set(known)
             for m, p in known.items()}
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                    if a != b and a in graph.get(b, set()) and not (b.startswith(a + ".") or a.startswith(b + "."))})
    assert pairs == [], pairs


@pytest.mark.parametrize("what", ["import cachefs.filesystem",
                                  "import fsspec; fsspec.get_filesystem_class('cachefs')",
                                  "import cachefs.cli.main; import cachefs.admin"])
def test_the_client_imports_nothing_heavy(what) -> None:
    script = f"""
import sys
{what}
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"ray", "kubernetes", "grpc", "pyfuse3", "trio", "torch",
        "prometheus_client", "s3fs", "server", "csi"}})
print(",".join(heavy))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{what} imported {done.stdout.strip()}"


def test_every_module_compiles() -> None:
    """Benches and tools included: a module no test imports still parses."""
    for path in [*ROOT.glob("bench/*.py"), *(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))]:
        compile(path.read_text(), str(path), "exec")
