"""What each component of the chart does: the Ray cluster and its cache nodes, the CSI
node plugin, the token, origin credentials, RBAC, the Service and metrics."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest

from helm_render import CASES, CHART_DIR, NAMESPACE, Rendered, container, containers, env_of, render, volume

DRIVER = "cachefs.csi.io"
PLUGIN_DIR = "/var/lib/kubelet/plugins/cachefs.csi.io/"




def ray_start_resources(value: str) -> dict[str, Any]:
    """What `ray start --resources=VALUE` receives once KubeRay's shell has unquoted it."""
    (unquoted,) = shlex.split(value)
    return json.loads(unquoted)


def script_of(c: dict[str, Any]) -> str:
    return " ".join(c["command"] + c["args"]).replace("\\\n", " ")


def argv_after(script: str, program: str) -> list[str]:
    """The arguments of the first `program ...` command line in a shell script."""
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line.split("&")[0]) if program in line else []
        if words[:len(program.split())] == program.split():
            return words[len(program.split()):]
    raise AssertionError(f"no `{program}` in {script!r}")


# ---- the Ray cluster -----------------------------------------------------------------


def test_workers_advertise_one_cachefs_node_each_and_the_head_none(default: Rendered) -> None:
    assert ray_start_resources(default.worker_group["rayStartParams"]["resources"]) == {"cachefs_node": 1}
    head = ray_start_resources(default.ray_cluster["spec"]["headGroupSpec"]["rayStartParams"]["resources"])
    assert "cachefs_node" not in head
    assert default.ray_cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_all_ray_start_parameters_are_strings(case_rendered: Rendered) -> None:
    groups = [case_rendered.ray_cluster["spec"]["headGroupSpec"], *case_rendered.ray_cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]


def test_two_cache_nodes_never_share_a_node(case_rendered: Rendered) -> None:
    pod = case_rendered.worker_pod
    terms = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    hostname_terms = [t for t in terms if t["topologyKey"] == "kubernetes.io/hostname"]
    assert hostname_terms
    selector = hostname_terms[0]["labelSelector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()


def test_gpu_node_selector_tolerations_and_affinity_reach_the_workers(chart: Any) -> None:
    values = CASES["gpu_nodes"]["ray"]["workers"]
    pod = render(chart, CASES["gpu_nodes"]).worker_pod["spec"]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"]["nodeAffinity"] == values["affinity"]["nodeAffinity"]
    assert pod["affinity"]["podAntiAffinity"]  # the user's affinity is added to, not replaced


def test_workers_tolerate_the_gpu_taint_by_default(default: Rendered) -> None:
    tolerations = default.worker_pod["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_cache_containers_have_requests_and_limits(case_rendered: Rendered) -> None:
    for role in ("head", "worker"):
        for c in case_rendered.pod_templates()[role]["spec"]["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"], f"{role}/{c['name']}"


# (case, the disk volume it must give the workers)
DISK_TIERS = {
    "defaults": lambda v: v["emptyDir"] == {},
    "hostpath_disk_tier": lambda v: v["hostPath"] == {"path": "/mnt/nvme0/cachefs", "type": "DirectoryOrCreate"},
    "pvc_disk_tier": lambda v: v["ephemeral"]["volumeClaimTemplate"]["spec"]["storageClassName"] == "local-nvme"
    and v["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"] == "200Gi",
}


@pytest.mark.parametrize("name", sorted(DISK_TIERS))
def test_the_disk_tier_is_the_volume_values_choose(chart: Any, name: str) -> None:
    pod = render(chart, CASES[name]).worker_pod
    assert DISK_TIERS[name](volume(pod, "disk"))
    mounts = {m["mountPath"]: m["name"] for m in container(pod, "ray-worker")["volumeMounts"]}
    assert mounts["/cachefs/disk"] == "disk"


def test_a_host_path_disk_tier_is_handed_to_the_cache_user_first(chart: Any) -> None:
    pod = render(chart, CASES["hostpath_disk_tier"]).worker_pod
    init = container(pod, "disk-permissions")
    assert "chown 1000:1000 /cachefs/disk" in " ".join(init["command"])
    assert pod["spec"]["securityContext"]["runAsUser"] == 1000
    assert "initContainers" not in render(chart, {}).worker_pod["spec"]


def test_the_bootstrap_runs_cachefs_up_with_the_values(default: Rendered) -> None:
    c = container(default.head_pod, "cachefs")
    argv = argv_after(script_of(c), "cachefs up")
    assert argv == [
        "--address", "auto", "--nodes", "0", "--port", "8477", "--memory", "8GiB",
        "--disk", "100GiB", "--disk-root", "/cachefs/disk", "--state-dir", "/cachefs/state", "--watch",
    ]
    assert env_of(c)["RAY_ADDRESS"] == "127.0.0.1:6379"
    shared = {m["name"] for m in c["volumeMounts"]} & {m["name"] for m in container(default.head_pod, "ray-head")["volumeMounts"]}
    assert "ray-tmp" in shared  # /tmp/ray: the driver finds the local raylet there


def _commands(rendered: Rendered) -> dict[str, list[str]]:
    """Every cachefs command line the chart runs, as argv after `cachefs`."""
    found = {"up": argv_after(script_of(container(rendered.head_pod, "cachefs")), "cachefs up")}
    found["up"].insert(0, "up")
    if any(c["name"] == "operator" for c in rendered.head_pod["spec"]["containers"]):
        found["operator"] = container(rendered.head_pod, "operator")["args"]
    worker = container(rendered.worker_pod, "ray-worker")
    hook = worker["lifecycle"]["preStop"]["exec"]["command"][-1]
    found["drain"] = ["node", "drain", *argv_after(hook.split("||")[0], "cachefs node drain")]
    if rendered.has("DaemonSet"):
        csi = container(rendered.csi_pod, "cachefs-csi")
        found["csi"] = [a.replace("$(NODE_NAME)", "node-1") for a in csi["args"]]
    return found


def test_every_command_the_chart_runs_is_one_the_cli_accepts(case_rendered: Rendered) -> None:
    from cachefs.cli.main import build_parser

    parser = build_parser()
    for name, argv in _commands(case_rendered).items():
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"`cachefs {' '.join(argv)}` is refused by the CLI")
        assert args.command == argv[0], name
        assert name != "drain" or args.here


def test_the_operator_scope_follows_the_values(chart: Any) -> None:
    from cachefs.cli.main import build_parser
    from server.k8s.cli import namespaces_of

    parser = build_parser()
    table = {
        "release namespace": ({}, [NAMESPACE]),
        "more namespaces": ({"operator": {"watchNamespaces": ["team-a", "team-b"]}}, [NAMESPACE, "team-a", "team-b"]),
        "all namespaces": ({"operator": {"watchAllNamespaces": True}}, None),
    }
    for name, (values, expected) in table.items():
        rendered = render(chart, values)
        args = parser.parse_args(container(rendered.head_pod, "operator")["args"])
        assert namespaces_of(args, env={}) == expected, name
        roles = rendered.of_kind("ClusterRole" if expected is None else "Role")
        assert sorted(r["metadata"].get("namespace", "*") for r in roles) == sorted(expected or ["*"]), name


# ---- token and credentials -----------------------------------------------------------


def _token_refs(rendered: Rendered) -> list[tuple[str, dict[str, Any]]]:
    refs = []
    for role, pod in rendered.pod_templates().items():
        for c in containers(pod):
            value = env_of(c).get("CACHEFS_TOKEN")
            if value is not None:
                refs.append((f"{role}/{c['name']}", value["secretKeyRef"]))
    return refs


def _secret(rendered: Rendered, component: str) -> dict[str, Any]:
    (secret,) = [s for s in rendered.of_kind("Secret") if s["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return secret


def test_a_generated_token_secret_is_what_every_component_reads(default: Rendered) -> None:
    import base64

    secret = _secret(default, "token")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 48 and token.isalnum()
    refs = _token_refs(default)
    assert {r["name"] for _, r in refs} == {secret["metadata"]["name"]} and {r["key"] for _, r in refs} == {"token"}
    assert {who for who, _ in refs} >= {"head/ray-head", "head/cachefs", "head/operator", "worker/ray-worker", "csi/cachefs-csi"}


def test_an_existing_token_secret_is_used_and_none_is_created(chart: Any) -> None:
    rendered = render(chart, CASES["existing_token_secret"])
    assert not [s for s in rendered.of_kind("Secret") if s["metadata"]["labels"]["app.kubernetes.io/component"] == "token"]
    assert {(r["name"], r["key"]) for _, r in _token_refs(rendered)} == {("cachefs-token", "tok")}


def test_a_given_token_is_kept(chart: Any) -> None:
    import base64

    secret = _secret(render(chart, {"token": {"value": "a-token-given-by-the-admin"}}), "token")
    assert base64.b64decode(secret["data"]["token"]).decode() == "a-token-given-by-the-admin"


def test_the_token_template_keeps_the_previous_token_on_upgrade() -> None:
    """Offline rendering cannot run `lookup`; the template must at least ask it first."""
    text = (CHART_DIR / "templates" / "secret-token.yaml").read_text()
    assert text.index("lookup") < text.index("randAlphaNum")


def test_origin_credentials_reach_the_head_and_workers_only(chart: Any) -> None:
    rendered = render(chart, CASES["operator_off_metrics_origin_secret"] | {"operator": {"enabled": True}})
    holders = set()
    for role, pod in rendered.pod_templates().items():
        for c in containers(pod):
            if any(src.get("secretRef", {}).get("name") == "s3-credentials" for src in c.get("envFrom", [])):
                holders.add(f"{role}/{c['name']}")
            assert "s3-credentials" not in json.dumps(c.get("env", [])), f"{role}/{c['name']}"
    assert holders == {"head/ray-head", "worker/ray-worker"}


# ---- RBAC ---------------------------------------------------------------------------


def test_the_operator_may_do_what_it_needs_and_no_more(default: Rendered) -> None:
    (role,) = default.of_kind("Role")
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules == {
        ("cachefs.io", "cacheddatasets"): {"get", "list", "watch", "patch"},
        ("cachefs.io", "cacheddatasets/status"): {"get", "patch"},
        ("", "secrets"): {"get"},
    }
    (binding,) = default.of_kind("RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [s["name"] for s in binding["subjects"]] == [default.head_pod["spec"]["serviceAccountName"]]


def test_only_the_operator_container_gets_a_kubernetes_token(default: Rendered) -> None:
    for role, pod in default.pod_templates().items():
        assert pod["spec"]["automountServiceAccountToken"] is False, role
    for account in default.of_kind("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
    holders = [
        f"{role}/{c['name']}"
        for role, pod in default.pod_templates().items()
        for c in containers(pod)
        if any(m["name"] == "kube-api-access" for m in c.get("volumeMounts", []))
    ]
    assert holders == ["head/operator"]


def test_workers_and_the_csi_plugin_are_bound_to_no_role(default: Rendered) -> None:
    bound = {s["name"] for b in default.of_kind("RoleBinding") + default.of_kind("ClusterRoleBinding") for s in b["subjects"]}
    assert default.worker_pod["spec"]["serviceAccountName"] not in bound
    assert default.csi_pod["spec"]["serviceAccountName"] not in bound


def test_without_the_operator_there_is_no_role_and_no_operator(chart: Any) -> None:
    rendered = render(chart, CASES["operator_off_metrics_origin_secret"])
    assert not (rendered.has("Role") or rendered.has("ClusterRole"))
    assert [c["name"] for c in rendered.head_pod["spec"]["containers"]] == ["ray-head", "cachefs"]


# ---- Service, PDB, metrics ------------------------------------------------------------


def test_the_service_sends_clients_to_the_cache_nodes_on_8477(default: Rendered) -> None:
    (service,) = default.of_kind("Service")
    assert service["spec"]["selector"].items() <= default.worker_pod["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= default.head_pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8477
    worker_ports = {p["name"]: p["containerPort"] for p in container(default.worker_pod, "ray-worker")["ports"]}
    assert worker_ports[port["targetPort"]] == 8477
    probe = container(default.worker_pod, "ray-worker")["readinessProbe"]["httpGet"]
    assert probe == {"path": "/v1/health", "port": port["targetPort"]}
    endpoint = f"http://{service['metadata']['name']}.{NAMESPACE}.svc:8477"
    assert env_of(container(default.head_pod, "operator"))["CACHEFS_ENDPOINT"] == endpoint


def test_a_drain_takes_cache_nodes_one_at_a_time(default: Rendered) -> None:
    (pdb,) = default.of_kind("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= default.worker_pod["metadata"]["labels"].items()


def test_a_worker_drains_on_sigterm_as_its_pre_stop_does(chart: Any) -> None:
    """KubeRay's `ray start` runs wrapped: SIGTERM runs the preStop's drain (bounded), then
    `ray stop`; the Ray port is the head's, also when rayStartParams change it."""
    rendered = render(chart, {"ray": {"head": {"rayStartParams": {"port": "7000"}},
                                      "workers": {"drainDeadlineSeconds": 45}}})
    assert rendered.ray_cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    worker = container(rendered.worker_pod, "ray-worker")
    script = worker["args"][0]
    hook = worker["lifecycle"]["preStop"]["exec"]["command"][-1]
    drain = argv_after(hook.split("||")[0], "cachefs node drain")
    assert drain == ["--here", "--address", "${RAY_ADDRESS:-${FQ_RAY_IP}:7000}", "--deadline", "45"]
    trap = next(line for line in script.splitlines() if line.strip().startswith("trap "))
    assert trap.rstrip().endswith(" TERM") and "timeout -k 5 105 cachefs node drain" in trap
    assert shlex.join(["cachefs", "node", "drain", *drain]).replace("'", '"') in trap
    assert 'eval "${KUBERAY_GEN_RAY_START_CMD//' in script
    assert env_of(worker)["CACHEFS_HOST"] == "$(POD_IP)"
    head = rendered.head_pod
    assert head["spec"]["shareProcessNamespace"] is True
    assert env_of(container(head, "cachefs"))["RAY_ADDRESS"] == "127.0.0.1:7000"
    assert "KUBERAY_GEN_RAY_START_CMD" in container(head, "ray-head")["args"][0]


def test_the_service_monitor_scrapes_metrics_with_the_token(chart: Any) -> None:
    rendered = render(chart, CASES["operator_off_metrics_origin_secret"])
    monitor = rendered.one("ServiceMonitor")
    (service,) = rendered.of_kind("Service")
    secret = _secret(rendered, "token")  # the reader token: metrics need no more
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/v1/metrics" and endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": secret["metadata"]["name"], "key": "token"}}
    assert not render(chart, {}).has("ServiceMonitor")


# ---- CSI -----------------------------------------------------------------------------


def test_the_csi_driver_object(default: Rendered) -> None:
    driver = default.one("CSIDriver")
    assert driver["metadata"]["name"] == DRIVER
    assert driver["spec"]["attachRequired"] is False and driver["spec"]["podInfoOnMount"] is True
    assert driver["spec"]["volumeLifecycleModes"] == ["Persistent", "Ephemeral"]


def test_the_csi_plugin_mounts_into_kubelet_dirs_with_bidirectional_propagation(default: Rendered) -> None:
    pod = default.csi_pod
    plugin = container(pod, "cachefs-csi")
    mounts = {m["name"]: m for m in plugin["volumeMounts"]}
    assert volume(pod, "plugin-dir")["hostPath"]["path"] == PLUGIN_DIR
    assert volume(pod, "pods-dir")["hostPath"]["path"] == "/var/lib/kubelet/pods"
    assert mounts["pods-dir"]["mountPath"] == "/var/lib/kubelet/pods"  # kubelet's target paths, as on the host
    assert mounts["pods-dir"]["mountPropagation"] == "Bidirectional"
    assert mounts["plugin-dir"]["mountPropagation"] == "Bidirectional"
    assert volume(pod, "fuse-device")["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert mounts["fuse-device"]["mountPath"] == "/dev/fuse"
    assert plugin["securityContext"]["privileged"] is True


def test_the_csi_plugin_serves_kubelet_under_the_driver_name(default: Rendered) -> None:
    pod = default.csi_pod
    args = container(pod, "cachefs-csi")["args"]
    assert args[:5] == ["csi", "--endpoint", "unix:///csi/csi.sock", "--node-id", "$(NODE_NAME)"]
    assert args[args.index("--kubelet-dir") + 1] == "/var/lib/kubelet"
    assert args[args.index("--driver-name") + 1] == DRIVER
    env = env_of(container(pod, "cachefs-csi"))
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert {"CACHEFS_ENDPOINT", "CACHEFS_TOKEN", "CACHEFS_HOME"} <= env.keys()
    registrar = container(pod, "node-driver-registrar")["args"]
    assert "--csi-address=/csi/csi.sock" in registrar
    assert f"--kubelet-registration-path={PLUGIN_DIR}csi.sock" in registrar
    assert volume(pod, "registration-dir")["hostPath"]["path"] == "/var/lib/kubelet/plugins_registry/"


def test_the_csi_plugin_is_restarted_when_it_stops_answering(default: Rendered) -> None:
    pod = default.csi_pod
    probe_port = container(pod, "liveness-probe")["args"]
    assert "--csi-address=/csi/csi.sock" in probe_port and "--health-port=9808" in probe_port
    liveness = container(pod, "cachefs-csi")["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container(pod, "cachefs-csi")["ports"]}
    assert liveness["path"] == "/healthz" and ports[liveness["port"]] == 9808


def test_the_csi_plugin_runs_on_tainted_gpu_nodes_and_survives_eviction(default: Rendered) -> None:
    spec = default.csi_pod["spec"]
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert default.one("DaemonSet")["spec"]["updateStrategy"] == {"type": "OnDelete"}


def test_without_csi_there_is_no_plugin_and_no_driver(chart: Any) -> None:
    rendered = render(chart, CASES["csi_off"])
    assert not rendered.has("DaemonSet") and not rendered.has("CSIDriver")
    assert not any(a["metadata"]["name"].endswith("-csi") for a in rendered.of_kind("ServiceAccount"))


@pytest.fixture(scope="module", params=sorted(CASES))
def case_rendered(request: pytest.FixtureRequest, chart: Any) -> Rendered:
    return render(chart, CASES[request.param])
