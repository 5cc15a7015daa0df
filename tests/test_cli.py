"""The `cachefs` command as a user runs it: every command has --help, state has --json,
errors are one clear line with a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os

import pytest

from cachefs.cli.main import build_parser
from conftest import NAMESPACE, run_cli, write_tree


@pytest.fixture(scope="module")
def env(cachefs_cluster) -> dict[str, str]:
    return {**cachefs_cluster.env, "CACHEFS_NAMESPACE": NAMESPACE, "CACHEFS_BLOCK_SIZE": "1MiB"}


def all_commands() -> list[list[str]]:
    parser = build_parser()
    out = []
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - walking argparse's own tree
        for name, sub in action.choices.items():
            out.append([name])
            for a in sub._actions:
                if a.__class__.__name__ == "_SubParsersAction":
                    out += [[name, n] for n in a.choices]
    return out


@pytest.mark.parametrize("command", all_commands(), ids=" ".join)
def test_every_command_has_help(command) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*command, "--help"])
    assert exit_.value.code == 0


def test_dataset_life_cycle_with_json(env, cachefs_cluster, tmp_path) -> None:
    origin = write_tree(tmp_path / "o", {"a/x.bin": b"x" * 3000, "b.txt": b"hello\n"})
    name = cachefs_cluster.unique("cli")
    r = run_cli("dataset", "add", name, f"file://{origin}", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["result"]["files"] == 2

    r = run_cli("dataset", "ls", "--json", env=env)
    assert name in [d["name"] for d in json.loads(r.stdout)]

    r = run_cli("warm", name, "--json", env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["state"] == "succeeded" and report["done_bytes"] == 3006 and report["failures"] == {}

    status = json.loads(run_cli("status", "--json", env=env).stdout)
    assert len(status["nodes"]) == 3
    assert next(d for d in status["datasets"] if d["name"] == name)["cached_bytes"] == 3006

    listing = json.loads(run_cli("ls", name, "--json", env=env).stdout)
    assert sorted((e["name"], e["type"]) for e in listing) == [(f"{name}/a", "directory"), (f"{name}/b.txt", "file")]
    assert run_cli("cat", f"{name}/b.txt", env=env).stdout == "hello\n"
    assert run_cli("cat", f"{name}/b.txt", "--range", "1-3", env=env).stdout == "el"
    assert run_cli("get", f"{name}/a", str(tmp_path / "got"), "-r", env=env).returncode == 0
    assert (tmp_path / "got" / "x.bin").read_bytes() == b"x" * 3000

    (origin / "b.txt").write_bytes(b"changed\n")
    r = run_cli("dataset", "refresh", name, "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["result"]["changed"] is True
    assert run_cli("cat", f"{name}/b.txt", env=env).stdout == "changed\n"

    assert run_cli("dataset", "rm", name, env=env).returncode == 0
    r = run_cli("cat", f"{name}/b.txt", env=env)
    assert r.returncode == 2 and "no dataset" in r.stderr


def test_warm_with_failures_exits_non_zero_and_names_the_file(env, cachefs_cluster, tmp_path) -> None:
    origin = write_tree(tmp_path / "o", {"good.bin": b"g" * 100, "bad.bin": b"b" * 100})
    name = cachefs_cluster.unique("clifail")
    cachefs_cluster.add_dataset(name, f"file://{origin}")
    (origin / "bad.bin").unlink()
    r = run_cli("warm", name, env=env)
    assert r.returncode == 1
    assert "bad.bin" in r.stdout and "failed" in r.stdout and "good.bin" not in r.stdout


@pytest.mark.parametrize("args,message", [
    (["dataset", "add", "Bad_Name", "file:///tmp"], "not a dataset name"),
    (["dataset", "add", "okname", "/not/a/url"], "not a URL"),
    (["dataset", "add", "okname", "file:///tmp", "--storage-options", "{nope"], "not JSON"),
    (["dataset", "rm", "no-such-dataset"], "no dataset"),
    (["warm", "no-such-dataset"], "no dataset"),
    (["cat", "no-such-dataset/x"], "no dataset"),
    (["cat", "x/../../etc/passwd"], "'..'"),
])
def test_bad_input_is_one_clear_line(env, args, message) -> None:
    r = run_cli(*args, env=env)
    assert r.returncode == 2, r
    assert message in r.stderr and "Traceback" not in r.stderr


def test_without_a_cluster_the_error_says_to_run_up(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    env["CACHEFS_HOME"] = str(tmp_path)
    r = run_cli("status", env=env)
    assert r.returncode == 2 and "cachefs up" in r.stderr and "Traceback" not in r.stderr


def test_up_again_is_idempotent(env, cachefs_cluster) -> None:
    before = cachefs_cluster.status()
    r = run_cli("up", "--address", cachefs_cluster.ray_cluster.address, "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sorted(doc["endpoints"]) == sorted(n["url"] for n in before["nodes"])
    assert sorted(doc["endpoint"].split(",")) == sorted(doc["endpoints"])  # clients can fail over
    assert "token" not in doc and "admin_token" not in doc
    recorded = json.loads((cachefs_cluster.home / "cluster.json").read_text())
    assert (recorded["token"], recorded["admin_token"]) == (cachefs_cluster.token, cachefs_cluster.admin_token)
    assert recorded["token"] != recorded["admin_token"]
    assert (cachefs_cluster.home / "cluster.json").stat().st_mode & 0o077 == 0  # the token file is private
    assert cachefs_cluster.status()["epoch"] == before["epoch"]


def test_settings_change_in_place_and_a_contradicting_add_says_how(env, cachefs_cluster, tmp_path) -> None:
    origin = write_tree(tmp_path / "o", {f"f{i}.bin": bytes([i]) * 4000 for i in range(6)})
    name = cachefs_cluster.unique("update")
    assert run_cli("dataset", "add", name, f"file://{origin}", env=env).returncode == 0
    assert run_cli("warm", name, env=env).returncode == 0
    before = json.loads(run_cli("status", "--json", env=env).stdout)
    cached = next(d for d in before["datasets"] if d["name"] == name)["cached_bytes"]

    r = run_cli("dataset", "add", name, f"file://{origin}", "--replicas", "2", env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "already exists with replicas 1 (asked: 2)" in r.stderr and f"cachefs dataset update {name}" in r.stderr
    assert run_cli("dataset", "add", name, f"file://{origin}", env=env).returncode == 0  # the same add again: fine

    r = run_cli("dataset", "update", name, "--replicas", "2", "--allow-namespace", "team-a", "--json", env=env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["replicas"] == 2 and info["allowed_namespaces"] == ["team-a"]
    after = json.loads(run_cli("status", "--json", env=env).stdout)
    d = next(d for d in after["datasets"] if d["name"] == name)
    assert d["snapshot"] == info["snapshot"] and d["cached_bytes"] >= cached  # same snapshot, nothing dropped
    misses = sum(n["misses"] for n in after["nodes"])
    assert run_cli("cat", f"{name}/f3.bin", env=env).stdout.encode("latin-1") == bytes([3]) * 4000
    assert sum(n["misses"] for n in json.loads(run_cli("status", "--json", env=env).stdout)["nodes"]) == misses

    for bad, message in ((["--replicas", "0"], "replicas must be"), ([], "nothing to update"),
                         (["--storage-options", "[1]"], "JSON object")):
        r = run_cli("dataset", "update", name, *bad, env=env)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
