"""`pip install cachefs` is the client alone: in a fresh virtual environment, with no Ray,
no Kubernetes client, no gRPC and no FUSE binding, it reads a dataset from the session's
running cluster, byte for byte. What a training pod installs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install .` (no extras) of a copy of the source (a build leaves
    files behind); pip's wheel cache makes it quick."""
    base = tmp_path_factory.mktemp("light")
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "tests", "bench", "docs", "helm", "build",
                                                                "*.egg-info", "__pycache__"))
    where = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    done = subprocess.run([str(where / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return where


def _size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def test_the_client_install_has_nothing_of_the_cluster(venv) -> None:
    script = """
import importlib.util
absent = [m for m in ("ray", "kubernetes", "grpc", "pyfuse3", "trio", "torch", "prometheus_client", "s3fs")
          if importlib.util.find_spec(m) is not None]
print(absent)
"""
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)
    size = _size_mib(venv)
    print(f"client venv: {size:.0f} MiB")
    assert size < 400, f"the client install is {size:.0f} MiB"


def test_the_client_alone_reads_a_dataset_from_a_running_cluster(venv, cachefs_cluster, sample_origin,
                                                                 tmp_path) -> None:
    name = cachefs_cluster.unique("light")
    cachefs_cluster.add_dataset(name, f"file://{sample_origin}")
    script = f"""
import fsspec, hashlib, sys
fs = fsspec.filesystem("cachefs")
files = sorted(p.split("/", 1)[1] for p in fs.find("{name}"))
digests = {{p: hashlib.sha256(fs.cat_file(f"{name}/" + p)).hexdigest() for p in files}}
batch = fs.cat([f"{name}/" + p for p in files])
assert {{k.split("/", 1)[1]: hashlib.sha256(v).hexdigest() for k, v in batch.items()}} == digests
with fsspec.open("cachefs://{name}/val/big.bin", "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == digests["val/big.bin"]
for p, d in sorted(digests.items()):
    print(p, d)
assert "ray" not in sys.modules
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(CACHEFS_ENDPOINT=cachefs_cluster.endpoint, CACHEFS_TOKEN=cachefs_cluster.token,
               CACHEFS_HOME=str(tmp_path))
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Unclosed" not in done.stderr, done.stderr
    import hashlib

    got = dict(line.rsplit(" ", 1) for line in done.stdout.strip().splitlines())
    expected = {str(p.relative_to(sample_origin)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sample_origin.rglob("*") if p.is_file()}
    assert got == expected

    cli = subprocess.run([str(venv / "bin" / "cachefs"), "up"], capture_output=True, text=True, timeout=60, env=env)
    assert cli.returncode == 2 and "pip install 'cachefs[server]'" in cli.stderr and "Traceback" not in cli.stderr


def test_every_command_group_registers_from_an_install_and_names_its_extra(venv, tmp_path) -> None:
    """Installed (no pyproject.toml beside the code), the groups come from the package's
    `cachefs.commands` entry points; each command whose extra is missing says which."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(CACHEFS_HOME=str(tmp_path), CACHEFS_ENDPOINT="http://127.0.0.1:9", CACHEFS_TOKEN="t")
    run = lambda *argv: subprocess.run([str(venv / "bin" / "cachefs"), *argv], capture_output=True,  # noqa: E731
                                       text=True, timeout=60, env=env, cwd=tmp_path)
    usage = run("--help")
    assert usage.returncode == 0, usage.stderr
    for command in ("up", "down", "status", "dataset", "ls", "demo", "csi", "mount", "operator"):
        assert f"    {command} " in usage.stdout, (command, usage.stdout)
    for argv, extra in ((["csi"], "csi"), (["mount", "ds", str(tmp_path / "mnt")], "csi"), (["operator"], "operator"),
                        (["down"], "server")):
        done = run(*argv)
        assert done.returncode == 2 and f"pip install 'cachefs[{extra}]'" in done.stderr, (argv, done.stderr)
        assert "Traceback" not in done.stderr
