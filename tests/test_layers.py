"""The layers of the code, as docs/architecture.md draws them, hold: no import runs
upward, no two modules import each other, and the fsspec filesystem imports none of Ray,
Kubernetes, gRPC, FUSE or torch (a training pod installs the client alone). The commands
are covered too: each group lives with the part it drives, and the parser built with every
group imports no heavy dependency."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shard", "cachefs", "server", "csi")

# layer → the layers it may import (itself included). First match wins, most specific first.
LAYERS = [
    ("shard", {"shard"}),
    ("cachefs.common", {"shard", "cachefs.common"}),
    ("cachefs.cli", {"shard", "cachefs.common", "cachefs", "cachefs.cli"}),  # the client's commands
    ("cachefs.torch", {"shard", "cachefs.common", "cachefs", "cachefs.torch"}),
    ("cachefs", {"shard", "cachefs.common", "cachefs"}),
    ("server.k8s", {"cachefs.common", "cachefs", "server.k8s"}),  # the operator drives the admin client
    # the server's commands (up, down, the demo) drive the server and read through the client
    ("server.cli", {"shard", "cachefs.common", "cachefs", "cachefs.cli", "server"}),
    ("server.cli_demo", {"shard", "cachefs.common", "cachefs", "cachefs.cli", "server"}),
    ("server.cli_nodes", {"shard", "cachefs.common", "cachefs", "cachefs.cli", "server"}),  # node ls|drain
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


def test_the_client_package_holds_no_command_of_another_part() -> None:
    """`cachefs/` is the client alone: nothing in it imports the server, CSI or the operator,
    even inside a function (the layer table says so; this names the culprits plainly)."""
    known = modules()
    wrong = sorted(f"{m} imports {t}" for m, p in known.items() if m.split(".")[0] == "cachefs"
                   for t in imports(p, m) if t.split(".")[0] in ("server", "csi"))
    assert wrong == []


def test_every_command_group_registers_from_the_part_it_drives() -> None:
    from cachefs.cli.main import GROUP, build_parser, command_groups

    groups = command_groups()
    owners = {name: target.partition(":")[0] for name, target in groups.items()}
    assert owners["cluster"].startswith("server.") and owners["demo"].startswith("server.")
    assert owners["csi"].startswith("csi.") and owners["operator"].startswith("server.k8s.")
    assert all(layer_of(m) in dict(LAYERS) for m in owners.values()), f"{GROUP}: a module in no layer"
    parser = build_parser()
    commands = set(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)
    assert {"up", "down", "status", "dataset", "warm", "ls", "cat", "get", "demo", "csi", "mount", "unmount",
            "operator"} <= commands
    for command in sorted(commands):  # every command answers --help without a traceback
        with pytest.raises(SystemExit) as done:
            parser.parse_args([command, "--help"])
        assert done.value.code == 0


def test_the_parser_with_every_group_imports_nothing_heavy() -> None:
    """`cachefs --help` on a client-only install: each group's module imports at most our own
    packages; Ray, Kubernetes, gRPC, FUSE and torch wait for the handler that needs them."""
    script = """
import sys
from cachefs.cli.main import build_parser, command_groups
build_parser()
for target in command_groups().values():
    assert target.partition(":")[0] in sys.modules, target
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"ray", "kubernetes", "grpc", "pyfuse3", "trio", "torch",
        "prometheus_client", "s3fs"})
print(",".join(heavy))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"building the parser imported {done.stdout.strip()}"


def test_the_command_groups_come_from_the_entry_points(tmp_path: Path) -> None:
    """One line in pyproject.toml adds a group (how `cachefs node` joins): a source tree's
    pyproject is read; an installed package's entry points otherwise."""
    from cachefs.cli import main

    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["entry-points"][main.GROUP]
    assert main.command_groups() == declared
    assert [name for name, _ in main._ordered({"zeta": "z", "csi": "c", "alpha": "a", "cluster": "u"})] == [
        "cluster", "csi", "alpha", "zeta"]

