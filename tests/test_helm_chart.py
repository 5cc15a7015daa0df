"""The Helm chart as a whole: it lints clean, renders valid Kubernetes objects for every
value set in helm_render.CASES, labels and documents everything, and refuses bad values
with a message that names the value."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from helm_render import CASES, CHART_DIR, CUSTOM_KINDS, NAMESPACE, RELEASE, Rendered, merged, render

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema at hand.
KUBE_VERSIONS = ("1.26.0", kubernetes_validate.latest_version())

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/component",
    "helm.sh/chart",
)


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART_DIR) as c:
        yield c


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest, chart: Any) -> tuple[str, Rendered]:
    return request.param, render(chart, CASES[request.param])


# ---- lint and schemas ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_chart_lints_clean_in_strict_mode(name: str) -> None:
    report = helm.lint(CHART_DIR, CASES[name], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_built_in_manifests_are_valid_kubernetes(case: tuple[str, Rendered], version: str) -> None:
    name, rendered = case
    for doc in rendered.docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_ray_pod_templates_are_valid_pods(case: tuple[str, Rendered], version: str) -> None:
    """kubernetes-validate has no RayCluster schema, but the pods inside it are plain pods."""
    name, rendered = case
    for role, template in rendered.pod_templates().items():
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role}, "template": template}
        try:
            kubernetes_validate.validate(wrapper, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {role} pod template: {e.message} at {list(e.path)}")


def test_only_ray_clusters_and_service_monitors_escape_schema_validation(case: tuple[str, Rendered]) -> None:
    """Every other kind must have a schema in kubernetes-validate, so that the test
    above really checks it; the two custom kinds get structural checks here."""
    name, rendered = case
    for doc in rendered.docs:
        if (doc["apiVersion"], doc["kind"]) not in CUSTOM_KINDS:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSIONS[-1])
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"{name}: {doc['apiVersion']} {doc['kind']} is neither built in nor known as custom")
    rc = rendered.ray_cluster["spec"]
    assert rc["rayVersion"] and rc["headGroupSpec"]["rayStartParams"] and rc["workerGroupSpecs"]
    for group in rc["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_every_resource_carries_the_standard_labels(case: tuple[str, Rendered]) -> None:
    name, rendered = case
    for doc in rendered.docs:
        labels = doc["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, f"{name}: {doc['kind']} {doc['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE


def test_every_namespaced_resource_lands_in_the_release_namespace(case: tuple[str, Rendered]) -> None:
    name, rendered = case
    cluster_scoped = {"CSIDriver", "ClusterRole", "ClusterRoleBinding"}
    for doc in rendered.docs:
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"]
        elif doc["kind"] not in ("Role", "RoleBinding"):  # those go to each watched namespace
            assert doc["metadata"]["namespace"] == NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"


def test_pod_selectors_never_change_with_the_chart_version(case: tuple[str, Rendered]) -> None:
    """Selectors are immutable: a label that changes on upgrade (version, chart) would
    make `helm upgrade` fail on the DaemonSet and orphan pods behind the Service."""
    _, rendered = case
    selectors = [d["spec"]["selector"] for d in rendered.of_kind("Service")]
    selectors += [d["spec"]["selector"]["matchLabels"] for d in rendered.of_kind("DaemonSet") + rendered.of_kind("PodDisruptionBudget")]
    for selector in selectors:
        assert not {"app.kubernetes.io/version", "helm.sh/chart"} & set(selector)


# ---- values ------------------------------------------------------------------------------

# (values, what the message must say): each row is a mistake a user could make.
BAD_VALUES = {
    "misspelt top-level key": ({"csii": {"enabled": False}}, "additional properties 'csii' not allowed"),
    "misspelt nested key": ({"ray": {"workers": {"replica": 3}}}, "additional properties 'replica' not allowed"),
    "unknown disk tier": ({"cache": {"diskTier": {"type": "nvme"}}}, "'emptyDir', 'hostPath', 'pvc'"),
    "size without a number": ({"cache": {"memory": "lots"}}, "/cache/memory"),
    "port out of range": ({"cache": {"port": 70000}}, "/cache/port"),
    "rayStartParams value not a string": ({"ray": {"workers": {"rayStartParams": {"num-cpus": 4}}}}, "/ray/workers/rayStartParams/num-cpus"),
    "token too short": ({"token": {"value": "secret"}}, "/token/value"),
    "relative hostPath": ({"cache": {"diskTier": {"hostPath": {"path": "cachefs"}}}}, "/cache/diskTier/hostPath/path"),
    "bad namespace to watch": ({"operator": {"watchNamespaces": ["Team_A"]}}, "/operator/watchNamespaces/0"),
    "unknown CSI update strategy": ({"csi": {"updateStrategy": {"type": "Recreate"}}}, "/csi/updateStrategy/type"),
    "pvc size not a quantity": ({"cache": {"diskTier": {"pvc": {"size": "200 gigs"}}}}, "/cache/diskTier/pvc/size"),
}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_bad_values_are_refused_with_a_message_naming_the_value(chart: Any, name: str) -> None:
    values, expected = BAD_VALUES[name]
    with pytest.raises(helm.HelmError) as caught:
        chart.validate_schema(values)
    assert expected in str(caught.value)
    with pytest.raises(helm.HelmError):  # rendering checks the schema too
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# Mistakes the schema cannot see, caught by the templates: (values, message).
BAD_COMBINATIONS = {
    "worker resources without cachefs_node": (
        {"ray": {"workers": {"rayStartParams": {"resources": '"{\\"mine\\": 1}"'}}}}, "must keep the custom resource cachefs_node"),
    "more replicas than maxReplicas": ({"ray": {"workers": {"replicas": 9, "maxReplicas": 8}}}, "minReplicas ≤ replicas ≤ maxReplicas"),
    "fewer replicas than minReplicas": ({"ray": {"workers": {"replicas": 1, "minReplicas": 2}}}, "not 2 ≤ 1 ≤ 64"),
}


@pytest.mark.parametrize("name", sorted(BAD_COMBINATIONS))
def test_bad_combinations_of_values_are_refused_with_a_message(chart: Any, name: str) -> None:
    values, expected = BAD_COMBINATIONS[name]
    with pytest.raises(helm.HelmError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert expected in str(caught.value)


def test_worker_resources_may_add_to_cachefs_node(chart: Any) -> None:
    ok = {"ray": {"workers": {"rayStartParams": {"resources": '"{\\"cachefs_node\\": 1, \\"mine\\": 1}"'}}}}
    assert render(chart, ok).worker_group["rayStartParams"]["resources"] == ok["ray"]["workers"]["rayStartParams"]["resources"]


def test_default_values_satisfy_the_schema(chart: Any) -> None:
    chart.validate_schema({})
    for values in CASES.values():
        chart.validate_schema(merged(chart.values, values))


def _objects(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if "properties" in schema:
        found.append((path or "/", schema))
        for key, sub in schema["properties"].items():
            found += _objects(sub, f"{path}/{key}")
    for sub in schema.get("oneOf", []) + ([schema["items"]] if isinstance(schema.get("items"), dict) else []):
        found += _objects(sub, path)
    return found


def test_the_values_schema_refuses_unknown_keys_at_every_level() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    open_objects = [path for path, s in _objects(schema) if s.get("additionalProperties") is not False]
    assert not open_objects


def _value_lines(text: str) -> list[tuple[int, int, str, bool, list[str]]]:
    """(line number, indent, key, is a block parent, comments just above) for each key."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not m:
            continue
        comments, j = [], i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            comments.insert(0, lines[j].strip())
            j -= 1
        parent = m.group(3).strip() == "" and i + 1 < len(lines) and lines[i + 1].startswith(m.group(1) + " ")
        out.append((i + 1, len(m.group(1)), m.group(2), parent, comments))
    return out


def test_every_value_is_documented_where_it_stands() -> None:
    """A value is documented by a `# --` comment right above it, or above the block
    (resources, tolerations, ...) it belongs to. Section headings just group values."""
    lines = _value_lines((CHART_DIR / "values.yaml").read_text())
    undocumented = []
    documented_blocks: list[tuple[int, int]] = []  # (indent, line) of a documented block parent
    for number, indent, key, parent, comments in lines:
        documented_blocks = [(ind, n) for ind, n in documented_blocks if ind < indent]
        documented = any(c.startswith("# --") for c in comments)
        if parent:
            if documented:
                documented_blocks.append((indent, number))
            continue
        if not documented and not documented_blocks:
            undocumented.append(f"line {number}: {key}")
    assert not undocumented


def test_every_helper_is_prefixed_with_the_chart_name() -> None:
    names = []
    for path in (CHART_DIR / "templates").glob("*.tpl"):
        names += re.findall(r'define\s+"([^"]+)"', path.read_text())
    assert names and all(n.startswith("cachefs.") for n in names), names


def test_notes_say_what_was_installed_and_how_to_mount_a_dataset(chart: Any) -> None:
    notes = render(chart, {}).notes
    assert "RayCluster" in notes and f"{NAMESPACE}.imagenet" in notes
    assert "driver: cachefs.csi.io" in notes and "kind: CachedDataset" in notes
    assert "docs/kubernetes.md" in notes
    assert "driver: cachefs.csi.io" not in render(chart, {"csi": {"enabled": False}}).notes


def test_the_chart_metadata_names_a_kubernetes_floor_and_the_app_version(chart: Any) -> None:
    meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["kubeVersion"] and meta["appVersion"]
