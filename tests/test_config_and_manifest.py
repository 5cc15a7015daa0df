"""Configuration from flags, env and file; manifests and path checks."""

from __future__ import annotations

import pytest

from cachefs.config import ClientConfig
from server.config import ClusterConfig, NodeConfig
from cachefs.common.settings import load, parse_size
from cachefs.common.errors import BadRequest, ConfigError, NotFound, from_wire, OriginChanged
from cachefs.common.manifest import FileEntry, Manifest, build_table, check_path, from_ipc, snapshot_id, to_ipc


@pytest.mark.parametrize("text,value", [("4096", 4096), ("256MiB", 256 << 20), ("1G", 1 << 30), ("2GiB", 2 << 30),
                                        ("1MB", 10**6), ("1.5KiB", 1536), ("0", 0)])
def test_sizes(text, value) -> None:
    assert parse_size(text) == value


def test_a_size_that_is_not_one_says_how_to_write_it() -> None:
    with pytest.raises(ConfigError, match="256MiB"):
        parse_size("lots")


def test_precedence_flags_over_env_over_file_over_cluster_file(tmp_path) -> None:
    (tmp_path / "cluster.json").write_text('{"endpoint": "http://from-cluster-file:1", "token": "t0"}')
    (tmp_path / "config.toml").write_text('[client]\nendpoint = "http://from-file:1"\nread_timeout = 9\n')
    env = {"CACHEFS_HOME": str(tmp_path)}
    assert load(ClientConfig, env=env).endpoint == "http://from-file:1"
    assert load(ClientConfig, env=env).token == "t0"
    env["CACHEFS_ENDPOINT"] = "http://from-env:1"
    assert load(ClientConfig, env=env).endpoint == "http://from-env:1"
    assert load(ClientConfig, {"endpoint": "http://flag:1"}, env=env).endpoint == "http://flag:1"
    assert load(ClientConfig, env=env).read_timeout == 9.0


@pytest.mark.parametrize("cls,overrides,match", [
    (ClientConfig, {"endpoint": "ftp://x"}, "http"),
    (ClientConfig, {"read_timeout": "0"}, "positive"),
    (ClientConfig, {"colour": "red"}, "unknown option"),
    (NodeConfig, {"eviction": "random"}, "lru"),
    (NodeConfig, {"memory_bytes": "0", "disk_bytes": "0"}, "budget"),
    (NodeConfig, {"port": "70000"}, "65535"),
    (ClusterConfig, {"nodes": "-1"}, "nodes"),
    (ClientConfig, {"origin_fallback": "maybe"}, "boolean"),
])
def test_bad_configuration_names_the_option(cls, overrides, match, tmp_path) -> None:
    with pytest.raises(ConfigError, match=match):
        load(cls, overrides, env={"CACHEFS_HOME": str(tmp_path)})


def test_unknown_keys_in_the_config_file_are_refused(tmp_path) -> None:
    (tmp_path / "config.toml").write_text("[client]\nendpont = 'http://x'\n")
    with pytest.raises(ConfigError, match="endpont"):
        load(ClientConfig, env={"CACHEFS_HOME": str(tmp_path)})


def test_missing_endpoint_says_what_to_do(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cachefs up"):
        load(ClientConfig, env={"CACHEFS_HOME": str(tmp_path)}).require_endpoint()


@pytest.mark.parametrize("path", ["../x", "a/../../b", "/etc/passwd", "a\x00b", "\\x"])
def test_paths_that_could_escape_are_refused(path) -> None:
    with pytest.raises(BadRequest):
        check_path(path)


def test_paths_are_normalised() -> None:
    assert check_path("a//b/./c/") == "a/b/c"


def test_manifest_round_trips_as_arrow_ipc_and_indexes_directories() -> None:
    table = build_table([FileEntry("b/c.txt", 3, "v1"), FileEntry("a.txt", 1, "v2"), FileEntry("b/d/e", 0, "v3")])
    again = from_ipc(to_ipc(table))
    assert again.equals(table) and snapshot_id(again) == snapshot_id(table)
    m = Manifest(again)
    assert m.list_dir("") == [("a.txt", "file", 1), ("b", "directory", 0)]
    assert m.list_dir("b") == [("b/c.txt", "file", 3), ("b/d", "directory", 0)]
    assert [e.path for e in m.walk_files("b")] == ["b/c.txt", "b/d/e"]
    with pytest.raises(NotFound):
        m.entry("zzz")


def test_snapshot_ids_change_with_any_version() -> None:
    a = build_table([FileEntry("x", 1, "v1")])
    b = build_table([FileEntry("x", 1, "v2")])
    assert snapshot_id(a) != snapshot_id(b)


def test_errors_cross_the_wire_and_pickle() -> None:
    import pickle

    e = from_wire("origin_changed", "x changed")
    assert isinstance(e, OriginChanged) and str(e) == "x changed"
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is OriginChanged and again.message == "x changed"
    with pytest.raises(BadRequest):
        from_ipc(b"not arrow")
