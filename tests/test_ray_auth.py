"""`cachefs up` on a local Ray with and without Ray's token auth, as users meet it.

Ray writes ~/.ray/auth_token the first time anything calls `ray.init()` locally; from then
on a `ray start --head` wants the token. Each case runs the real CLI in a HOME of its own,
starts a real local Ray, reads the cluster's status through it, and stops it again,
leaving no Ray process behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli
from server.hosting import _local_ray_pids
from server.ray_auth import RayAuth, default_token_path

pytestmark = pytest.mark.slow


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "CACHEFS_", "RAY_ADDRESS"))}
    return {**env, "HOME": str(home), "CACHEFS_HOME": str(home / ".cachefs"), **extra}


def _gcs_environ(port: int) -> dict[str, str]:
    for pid in _local_ray_pids(port):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"gcs_server" in cmdline:
                raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)
        except OSError:
            continue
    raise AssertionError(f"no gcs_server of the Ray on port {port}")


def _up_status_down(env: dict[str, str]) -> tuple[dict, dict[str, str], dict]:
    """up → status → down; returns the cluster file, the Ray head's environment and the status."""
    r = run_cli("up", "--nodes", "1", "--memory", "32MiB", "--disk", "0", "--json", env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    recorded = json.loads(Path(env["CACHEFS_HOME"], "cluster.json").read_text())
    port = int(recorded["ray_address"].rsplit(":", 1)[1])
    try:
        head_env = _gcs_environ(port)
        status = run_cli("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        assert len(doc["nodes"]) == 1
    finally:
        down = run_cli("down", "--json", env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["stopped"] is True
    assert _local_ray_pids(port) == [], "down left Ray processes behind"
    return recorded, head_env, doc


def test_up_with_a_ray_token_file_present_runs_ray_with_token_auth(tmp_path: Path) -> None:
    token_file = default_token_path({"HOME": str(tmp_path)})
    token_file.parent.mkdir(parents=True)
    token_file.write_text("a-token-that-ray-init-wrote-earlier")
    # and node settings from the config file and the environment, as a client's are read
    (tmp_path / ".cachefs").mkdir()
    (tmp_path / ".cachefs" / "config.toml").write_text('[node]\nwarm_concurrency = 3\nmemory_bytes = "48MiB"\n')
    recorded, head_env, status = _up_status_down(_env(tmp_path, CACHEFS_ORIGIN_TIMEOUT="7"))
    settings = status["nodes"][0]["settings"]
    assert settings["warm_concurrency"] == 3 and settings["origin_timeout"] == 7.0
    assert settings["memory_bytes"] == 32 * 1024 * 1024  # `up --memory` wins over the file
    assert recorded["ray_auth"] == "token"
    assert head_env.get("RAY_AUTH_MODE") == "token"
    assert token_file.read_text() == "a-token-that-ray-init-wrote-earlier", "the user's token must be kept"


def test_up_without_a_token_creates_a_private_one_and_uses_it(tmp_path: Path) -> None:
    recorded, head_env, _ = _up_status_down(_env(tmp_path))
    token_file = default_token_path({"HOME": str(tmp_path)})
    assert recorded["ray_auth"] == "token" and head_env.get("RAY_AUTH_MODE") == "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert len(token_file.read_text()) >= 32


def test_up_with_ray_auth_mode_token_and_a_token_in_the_environment(tmp_path: Path) -> None:
    recorded, head_env, _ = _up_status_down(_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="t" * 40))
    assert recorded["ray_auth"] == "token" and head_env.get("RAY_AUTH_TOKEN") == "t" * 40
    assert not default_token_path({"HOME": str(tmp_path)}).exists()


def test_up_with_ray_auth_mode_disabled_runs_ray_without_auth_even_with_a_token_file(tmp_path: Path) -> None:
    token_file = default_token_path({"HOME": str(tmp_path)})
    token_file.parent.mkdir(parents=True)
    token_file.write_text("present-but-unwanted")
    recorded, head_env, _ = _up_status_down(_env(tmp_path, RAY_AUTH_MODE="disabled"))
    assert recorded["ray_auth"] == "disabled" and head_env.get("RAY_AUTH_MODE") == "disabled"


def test_a_failing_up_stops_the_ray_it_started(tmp_path: Path) -> None:
    env = _env(tmp_path)
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    r = run_cli("up", "--nodes", "1", "--memory", "0", "--disk", "0", env=env, timeout=240)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "memory budget" in r.stderr
    assert not Path(env["CACHEFS_HOME"], "cluster.json").exists()
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and p not in before
                 and b"cachefs-ray-" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert leftovers == [], f"a failed up left Ray processes: {leftovers}"


@pytest.mark.parametrize("env, starting, message", [
    ({"RAY_AUTH_MODE": "on"}, True, "is not a Ray auth mode"),
    ({"RAY_AUTH_MODE": "token"}, False, "there is no token"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/nonexistent/token"}, True, "holds no token"),
], ids=["unknown mode", "joining without a token", "token path without a token"])
def test_bad_ray_auth_settings_say_what_to_change(tmp_path: Path, env, starting, message) -> None:
    from cachefs.common.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        RayAuth.decide({"HOME": str(tmp_path), **env}, starting=starting)


def test_joining_uses_the_token_when_there_is_one(tmp_path: Path) -> None:
    assert RayAuth.decide({"HOME": str(tmp_path)}, starting=False).mode == "disabled"
    assert RayAuth.decide({"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "x"}, starting=False).mode == "token"
