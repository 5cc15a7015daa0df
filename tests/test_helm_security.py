"""The chart's security boundary: which pod holds which token, Ray's token auth, the
NetworkPolicies (who reaches Ray's ports, who reaches the cache port), TLS and the
origin allowlist. Validity of every object against Kubernetes' schemas is proved for
every value set by tests/test_helm_chart.py."""

from __future__ import annotations

import base64
from typing import Any

import helm_python as helm
import pytest

from server.config import DEFAULT_ALLOWED_ORIGINS
from helm_render import CASES, Rendered, container, containers, env_of, render, volume




@pytest.fixture(scope="module")
def tls(chart: Any) -> Rendered:
    return render(chart, CASES["tls_and_network_clients"])


def holders(rendered: Rendered, variable: str) -> dict[str, dict[str, Any]]:
    """container → the secretKeyRef its `variable` comes from."""
    return {f"{role}/{c['name']}": env_of(c)[variable]["secretKeyRef"]
            for role, pod in rendered.pod_templates().items() for c in containers(pod) if variable in env_of(c)}


def secret_of(rendered: Rendered, component: str) -> dict[str, Any]:
    (secret,) = [s for s in rendered.of_kind("Secret") if s["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return secret


# ---- tokens ---------------------------------------------------------------------------------

def test_the_admin_token_goes_to_the_bootstrap_and_the_operator_only(default: Rendered) -> None:
    admin = holders(default, "CACHEFS_ADMIN_TOKEN")
    assert set(admin) == {"head/cachefs", "head/operator"}
    assert {r["name"] for r in admin.values()} == {secret_of(default, "admin-token")["metadata"]["name"]}


def test_pods_and_the_csi_plugin_get_only_the_reader_token(default: Rendered) -> None:
    reader = holders(default, "CACHEFS_TOKEN")
    assert {r["name"] for r in reader.values()} == {secret_of(default, "token")["metadata"]["name"]}
    assert "csi/cachefs-csi" in reader and "csi/cachefs-csi" not in holders(default, "CACHEFS_ADMIN_TOKEN")


def test_the_three_generated_tokens_differ(default: Rendered) -> None:
    tokens = [base64.b64decode(secret_of(default, c)["data"]["token"]) for c in ("token", "admin-token", "ray-token")]
    assert len(set(tokens)) == 3 and all(len(t) == 48 for t in tokens)


def test_one_value_for_both_tokens_is_refused(chart: Any) -> None:
    same = "the-same-token-for-both-roles"
    with pytest.raises(helm.HelmError, match="must differ"):
        chart.render({"token": {"value": same}, "adminToken": {"value": same}}, name="demo", namespace="ml")


def test_an_existing_admin_token_secret_is_used(chart: Any) -> None:
    rendered = render(chart, {"adminToken": {"existingSecret": "ops-admin", "existingSecretKey": "key"}})
    assert {(r["name"], r["key"]) for r in holders(rendered, "CACHEFS_ADMIN_TOKEN").values()} == {("ops-admin", "key")}
    assert not [s for s in rendered.of_kind("Secret") if s["metadata"]["name"].endswith("-admin-token")]


# ---- Ray's token auth -----------------------------------------------------------------------

def test_every_ray_container_runs_with_rays_token_auth(default: Rendered) -> None:
    secret = secret_of(default, "ray-token")["metadata"]["name"]
    ray_containers = {"head/ray-head", "head/cachefs", "worker/ray-worker"}  # Ray itself, and the driver that joins it
    got = holders(default, "RAY_AUTH_TOKEN")
    assert set(got) == ray_containers and {r["name"] for r in got.values()} == {secret}
    for role, pod in default.pod_templates().items():
        for c in containers(pod):
            mode = env_of(c).get("RAY_AUTH_MODE")
            assert mode == ("token" if f"{role}/{c['name']}" in ray_containers else None), f"{role}/{c['name']}"


def test_rays_token_auth_can_be_turned_off(chart: Any) -> None:
    rendered = render(chart, CASES["security_features_off"])
    assert not holders(rendered, "RAY_AUTH_TOKEN")
    assert not [s for s in rendered.of_kind("Secret") if s["metadata"]["name"].endswith("-ray-token")]


# ---- NetworkPolicies ------------------------------------------------------------------------

def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In"
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


def policy(rendered: Rendered, suffix: str) -> dict[str, Any]:
    (found,) = [p for p in rendered.of_kind("NetworkPolicy") if p["metadata"]["name"].endswith(suffix)]
    return found


def test_only_the_releases_ray_pods_reach_rays_ports(default: Rendered) -> None:
    ray = policy(default, "-ray")["spec"]
    head, worker, csi = (default.pod_templates()[r]["metadata"]["labels"] for r in ("head", "worker", "csi"))
    assert selects(ray["podSelector"], head) and selects(ray["podSelector"], worker)
    assert not selects(ray["podSelector"], csi)
    (rule,) = ray["ingress"]
    assert "ports" not in rule  # Ray's ports are many and partly dynamic: all of them, from Ray pods only
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # this namespace only
    assert selects(peer["podSelector"], head) and selects(peer["podSelector"], worker)
    assert not selects(peer["podSelector"], csi) and not selects(peer["podSelector"], {"cachefs.io/client": "true"})


def test_only_csi_the_head_and_labelled_clients_reach_the_cache_port(default: Rendered) -> None:
    cache = policy(default, "-cache-port")["spec"]
    pods = default.pod_templates()
    assert selects(cache["podSelector"], pods["worker"]["metadata"]["labels"])
    assert not selects(cache["podSelector"], pods["head"]["metadata"]["labels"])
    (rule,) = cache["ingress"]
    assert rule["ports"] == [{"port": 8477, "protocol": "TCP"}]
    peers = rule["from"]
    allowed = lambda labels: any(selects(p["podSelector"], labels) for p in peers if "podSelector" in p)  # noqa: E731
    assert allowed(pods["csi"]["metadata"]["labels"]) and allowed(pods["head"]["metadata"]["labels"])
    assert allowed({"cachefs.io/client": "true", "app": "trainer"})
    assert not allowed({"app": "trainer"})
    client = next(p for p in peers if "namespaceSelector" in p)
    assert client["namespaceSelector"] == {}  # labelled pods of every namespace, by default


def test_client_namespaces_and_extra_peers_follow_the_values(tls: Rendered) -> None:
    peers = policy(tls, "-cache-port")["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"team": "ml"}}, "podSelector": {"matchLabels": {
        "cachefs.io/client": "true"}}} in peers
    assert {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}} in peers


def test_network_policies_can_be_turned_off(chart: Any) -> None:
    assert not render(chart, CASES["security_features_off"]).has("NetworkPolicy")


# ---- TLS ------------------------------------------------------------------------------------

def test_tls_mounts_the_certificate_into_the_workers_and_its_ca_into_clients(tls: Rendered) -> None:
    worker = tls.worker_pod
    assert volume(worker, "tls")["secret"]["secretName"] == "cachefs-tls"
    assert {m["name"]: m["mountPath"] for m in container(worker, "ray-worker")["volumeMounts"]}["tls"] == "/cachefs/tls"
    boot = env_of(container(tls.head_pod, "cachefs"))
    assert (boot["CACHEFS_TLS_CERT"], boot["CACHEFS_TLS_KEY"]) == ("/cachefs/tls/tls.crt", "/cachefs/tls/tls.key")
    for role, name in (("csi", "cachefs-csi"), ("head", "operator")):
        c = container(tls.pod_templates()[role], name)
        env = env_of(c)
        assert env["CACHEFS_ENDPOINT"].startswith("https://") and env["CACHEFS_CA_BUNDLE"] == "/cachefs/tls-ca/ca.crt"
        assert env["CACHEFS_TLS_SERVER_NAME"] == "demo-cachefs.ml.svc"
        assert volume(tls.pod_templates()[role], "tls-ca")["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert "tls" not in [v["name"] for v in tls.csi_pod["spec"]["volumes"]]  # clients never get the key


def test_tls_probes_and_scrapes_speak_https(tls: Rendered) -> None:
    assert container(tls.worker_pod, "ray-worker")["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    (endpoint,) = tls.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["serverName"] == "demo-cachefs.ml.svc"


def test_tls_without_a_secret_is_refused(chart: Any) -> None:
    with pytest.raises(helm.HelmError, match="tls.secretName"):
        chart.render({"tls": {"enabled": True}}, name="demo", namespace="ml")


def test_without_tls_everything_is_plain_http(default: Rendered) -> None:
    assert env_of(container(default.csi_pod, "cachefs-csi"))["CACHEFS_ENDPOINT"].startswith("http://")
    assert "CACHEFS_TLS_CERT" not in env_of(container(default.head_pod, "cachefs"))


# ---- the origin allowlist -------------------------------------------------------------------

def test_the_allowlist_reaches_cachefs_up(default: Rendered, tls: Rendered) -> None:
    env = env_of(container(default.head_pod, "cachefs"))
    assert tuple(env["CACHEFS_ALLOWED_ORIGINS"].split(",")) == DEFAULT_ALLOWED_ORIGINS
    assert env["CACHEFS_ALLOWED_ORIGIN_HOSTS"] == ""
    env = env_of(container(tls.head_pod, "cachefs"))
    assert env["CACHEFS_ALLOWED_ORIGINS"] == "s3://team-bucket/,file:///mnt/datasets/"
    assert env["CACHEFS_ALLOWED_ORIGIN_HOSTS"] == "10.0.0.0/8"


def test_the_allowlist_values_load_as_the_cluster_config(tls: Rendered) -> None:
    from server.config import ClusterConfig
    from cachefs.common.settings import load

    env = {k: v for k, v in env_of(container(tls.head_pod, "cachefs")).items() if isinstance(v, str)}
    config = load(ClusterConfig, env=env)
    assert config.allowed_origins == ("s3://team-bucket/", "file:///mnt/datasets/")
    assert config.allowed_origin_hosts == ("10.0.0.0/8",) and config.tls_cert == "/cachefs/tls/tls.crt"
