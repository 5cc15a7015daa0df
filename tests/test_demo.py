"""`cachefs demo`, the first Quick start command, end to end in its own process."""

from __future__ import annotations

import json
import os

import pytest

from conftest import run_cli


def test_demo_tells_the_whole_story_and_leaves_nothing_running(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEFS_", "RAY_ADDRESS"))}
    env["CACHEFS_HOME"] = str(tmp_path / "home")
    r = run_cli("demo", "--json", "--small-files", "120", "--memory", "64MiB", "--disk", "256MiB", env=env,
                timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads(r.stdout)
    assert f["verified"] is True
    assert f["warm"]["state"] == "succeeded"
    assert f["warm"]["origin_bytes"] == f["dataset"]["bytes"]  # the origin is read once, while warming
    assert f["origin_bytes_during_reads"] == 0 and f["hit_ratio"] == 1.0
    assert len(f["nodes"]) == 3 and abs(sum(n["share"] for n in f["nodes"]) - 1.0) < 1e-9
    assert [r["round"] for r in f["reads"]] == [1, 2]
    assert f["origin"]["kind"] == "s3 (moto)" and f["origin"]["url"].startswith("s3://")  # moto: the test extra
    size = f["dataset"]["bytes"]
    assert f["per_node_copies"] == {"nodes": 3, "memory_bytes": 3 * size, "origin_bytes": 3 * size}
    assert f["cachefs"]["memory_bytes"] == size and f["cachefs"]["origin_bytes"] == size  # one copy, read once
    assert not (tmp_path / "home" / "cluster.json").exists()


@pytest.mark.parametrize("wanted, have_moto, expected", [
    ("auto", True, (True, "")),
    ("auto", False, (False, "moto is not installed, so the origin is a local folder (pip install 'moto[server]' "
                            "to see an object store as the origin)")),
    ("s3", True, (True, "")),
    ("local", True, (False, "")),
    ("local", False, (False, "")),
])
def test_the_demo_says_where_its_origin_is(wanted: str, have_moto: bool, expected: tuple[bool, str]) -> None:
    from server.cli_demo import choose_origin

    assert choose_origin(wanted, have_moto) == expected


def test_the_demo_refuses_s3_without_moto_clearly() -> None:
    from cachefs.common.errors import CachefsError
    from server.cli_demo import choose_origin

    with pytest.raises(CachefsError, match=r"pip install 'moto\[server\]'"):
        choose_origin("s3", False)

