"""`cachefs operator`: its flags, and which namespaces it watches."""

from __future__ import annotations

import pytest

from cachefs.cli.main import build_parser
from cachefs.common.errors import ConfigError
from conftest import run_cli
from server.k8s.cli import namespaces_of

# (argv after `cachefs operator`, environment, namespaces watched; None = all)
SCOPES = {
    "one namespace": (["--namespace", "ml"], {}, ["ml"]),
    "several, deduplicated": (["-n", "ml", "-n", "team-a", "-n", "ml"], {}, ["ml", "team-a"]),
    "all namespaces": (["--all-namespaces"], {}, None),
    "the pod's own namespace by default": ([], {"POD_NAMESPACE": "cachefs"}, ["cachefs"]),
}


@pytest.mark.parametrize("case", sorted(SCOPES))
def test_the_namespaces_watched(case: str) -> None:
    argv, env, expected = SCOPES[case]
    args = build_parser().parse_args(["operator", *argv])
    assert namespaces_of(args, env=env) == expected


def test_no_namespace_to_watch_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr("server.k8s.cli.SERVICE_ACCOUNT_NAMESPACE", tmp_path / "absent")
    args = build_parser().parse_args(["operator"])
    with pytest.raises(ConfigError, match="--namespace NS or --all-namespaces"):
        namespaces_of(args, env={})


def test_one_namespace_and_all_namespaces_do_not_mix() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "--namespace", "ml", "--all-namespaces"])


def test_help_explains_the_naming_and_the_connection() -> None:
    result = run_cli("operator", "--help", timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "NS.NAME" in text and "CACHEFS_ENDPOINT" in text and "--all-namespaces" in text


def test_without_an_endpoint_it_says_what_to_set(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CACHEFS_HOME": str(tmp_path)}
    import os
    import sys

    env["PATH"] = os.path.dirname(sys.executable) + ":" + env["PATH"]
    result = run_cli("operator", "--namespace", "ml", env=env, timeout=60)
    assert result.returncode == 2 and "CACHEFS_ENDPOINT" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_the_admin_token_it_says_what_to_set(tmp_path) -> None:
    """The operator registers and removes datasets: a reader token alone is not enough."""
    import os
    import sys

    env = {"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin", "HOME": str(tmp_path),
           "CACHEFS_HOME": str(tmp_path), "CACHEFS_ENDPOINT": "http://127.0.0.1:9", "CACHEFS_TOKEN": "a-reader-token"}
    result = run_cli("operator", "--namespace", "ml", env=env, timeout=60)
    assert result.returncode == 2 and "CACHEFS_ADMIN_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr
