"""The CachedDataset CRD: a valid CustomResourceDefinition whose OpenAPI schema accepts
good resources and refuses bad ones, in agreement with the operator's own parsing
(server.k8s.crd), and the naming rule that maps a resource to a cachefs dataset."""

from __future__ import annotations

import copy
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from cachefs.common.wire import DATASET_NAME_RE
from helm_render import CHART_DIR
from server.k8s.crd import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    DatasetSpec,
    InvalidSpec,
    Key,
    condition,
    dataset_name,
)

CRD_PATH = CHART_DIR / "crds" / "cacheddatasets.cachefs.io.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def validator(crd: dict[str, Any]) -> jsonschema.protocols.Validator:
    (version,) = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def resource(spec: Any = None, status: Any = None, **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "imagenet", "namespace": "ml"}}
    if spec is not None:
        obj["spec"] = spec
    if status is not None:
        obj["status"] = status
    obj.update(extra)
    return obj


def test_the_crd_is_a_valid_kubernetes_object(crd: dict[str, Any]) -> None:
    for version in ("1.26.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(crd, version, strict=True)


def test_the_crd_names_the_resource_the_operator_watches(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert (spec["group"], spec["names"]["kind"], spec["names"]["plural"], spec["scope"]) == (GROUP, KIND, PLURAL, "Namespaced")
    (version,) = spec["versions"]
    assert version["name"] == VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}  # the operator patches /status


def test_the_chart_ships_the_crd_for_helm_to_install_first() -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        crds = chart.crds
    assert [yaml.safe_load(c["data"])["metadata"]["name"] for c in crds] == [f"{PLURAL}.{GROUP}"]


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path or "/", schema)]
    for key, sub in (schema.get("properties") or {}).items():
        found += _walk(sub, f"{path}/{key}")
    if isinstance(schema.get("items"), dict):
        found += _walk(schema["items"], f"{path}[]")
    return found


def test_the_schema_is_structural(crd: dict[str, Any]) -> None:
    """Kubernetes requires a type on every node, except where unknown fields are kept."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    untyped = [p for p, s in _walk(schema) if "type" not in s]
    assert not untyped


def test_printer_columns_point_at_real_fields(crd: dict[str, Any]) -> None:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    paths = {p for p, _ in _walk(schema)}
    for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
        field = column["jsonPath"].split("[")[0].replace(".", "/")
        assert field in paths or field == "/metadata/creationTimestamp", column


# (spec, accepted?) — named by what each row proves.
SPECS: dict[str, tuple[Any, bool]] = {
    "an s3 origin alone": ({"origin": "s3://bucket/imagenet/"}, True),
    "every field": (
        {
            "origin": "gs://bucket/laion",
            "secretRef": {"name": "gcs-credentials"},
            "storageOptions": {"project": "ml", "requester_pays": True, "nested": {"a": [1, 2]}},
            "replicas": 2,
            "warmOnCreate": True,
            "allowedNamespaces": ["team-a", "team-b"],
        },
        True,
    ),
    "a local origin": ({"origin": "file:///data/coco"}, True),
    "a chained fsspec origin": ({"origin": "simplecache::https://example.com/data/"}, True),
    "no origin": ({"replicas": 1}, False),
    "an origin without a protocol": ({"origin": "/data/coco"}, False),
    "an origin with spaces": ({"origin": "s3://bucket/my data"}, False),
    "zero replicas": ({"origin": "s3://b/p", "replicas": 0}, False),
    "replicas as a string": ({"origin": "s3://b/p", "replicas": "2"}, False),
    "too many replicas": ({"origin": "s3://b/p", "replicas": 9}, False),
    "warmOnCreate as a string": ({"origin": "s3://b/p", "warmOnCreate": "yes"}, False),
    "a secretRef without a name": ({"origin": "s3://b/p", "secretRef": {}}, False),
    "a secretRef as a bare string": ({"origin": "s3://b/p", "secretRef": "creds"}, False),
    "a bad secret name": ({"origin": "s3://b/p", "secretRef": {"name": "Creds_1"}}, False),
    "storageOptions as a list": ({"origin": "s3://b/p", "storageOptions": ["anon"]}, False),
    "a bad namespace in allowedNamespaces": ({"origin": "s3://b/p", "allowedNamespaces": ["Team A"]}, False),
    "allowedNamespaces as a string": ({"origin": "s3://b/p", "allowedNamespaces": "team-a"}, False),
    "an unknown field": ({"origin": "s3://b/p", "replica": 2}, False),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_crd_schema_accepts_good_specs_and_refuses_bad_ones(validator: Any, name: str) -> None:
    spec, accepted = SPECS[name]
    errors = list(validator.iter_errors(resource(spec)))
    if name == "an unknown field":
        # The API server prunes unknown fields instead of refusing them; the operator refuses.
        assert not errors
        return
    assert (not errors) == accepted, [e.message for e in errors]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_operator_reads_specs_as_the_crd_does(name: str) -> None:
    spec, accepted = SPECS[name]
    if accepted:
        parsed = DatasetSpec.parse(spec)
        assert parsed.origin == spec["origin"]
    else:
        with pytest.raises(InvalidSpec):
            DatasetSpec.parse(spec)


def test_a_resource_without_spec_is_refused(validator: Any) -> None:
    assert list(validator.iter_errors(resource()))
    with pytest.raises(InvalidSpec, match="spec.origin"):
        DatasetSpec.parse(None)


def test_a_spec_gets_its_defaults() -> None:
    spec = DatasetSpec.parse({"origin": "s3://b/p"})
    assert (spec.replicas, spec.warm_on_create, spec.allowed_namespaces, spec.secret_name) == (1, False, (), "")


# (status, accepted?)
GOOD_STATUS = {
    "dataset": "ml.imagenet",
    "snapshot": "s-1",
    "files": 3,
    "bytes": 300,
    "cachedFraction": 0.5,
    "observedGeneration": 2,
    "lastError": "",
    "conditions": [
        {"type": "Ready", "status": "True", "observedGeneration": 2, "lastTransitionTime": "2025-01-01T00:00:00Z",
         "reason": "Registered", "message": "snapshot s-1: 3 files, 300 B"},
    ],
}
STATUSES: dict[str, tuple[dict[str, Any], bool]] = {
    "what the operator writes": (GOOD_STATUS, True),
    "a fraction above one": ({**GOOD_STATUS, "cachedFraction": 1.5}, False),
    "negative bytes": ({**GOOD_STATUS, "bytes": -1}, False),
    "a condition status not True/False/Unknown": (
        {**GOOD_STATUS, "conditions": [{**GOOD_STATUS["conditions"][0], "status": "Yes"}]}, False),
    "a condition without a reason": (
        {**GOOD_STATUS, "conditions": [{k: v for k, v in GOOD_STATUS["conditions"][0].items() if k != "reason"}]}, False),
    "a condition time that is not a time": (
        {**GOOD_STATUS, "conditions": [{**GOOD_STATUS["conditions"][0], "lastTransitionTime": "yesterday"}]}, False),
}


@pytest.mark.parametrize("name", sorted(STATUSES))
def test_the_status_schema(validator: Any, name: str) -> None:
    status, accepted = STATUSES[name]
    errors = list(validator.iter_errors(resource({"origin": "s3://b/p"}, copy.deepcopy(status))))
    assert (not errors) == accepted, [e.message for e in errors]


def test_conditions_the_operator_builds_fit_the_schema(validator: Any) -> None:
    ready = condition({}, "Ready", True, "Registered", "ok", 3, "2025-01-01T00:00:00Z")
    warm = condition({}, "Warm", None, "Unknown", "", 3, "2025-01-01T00:00:00Z")
    status = {**GOOD_STATUS, "conditions": [ready, warm]}
    assert not list(validator.iter_errors(resource({"origin": "s3://b/p"}, status)))


def test_a_condition_keeps_its_transition_time_until_its_status_changes() -> None:
    first = condition({}, "Ready", False, "Pending", "waiting", 1, "2025-01-01T00:00:00Z")
    same = condition(first, "Ready", False, "OriginUnavailable", "503", 2, "2025-01-02T00:00:00Z")
    flipped = condition(same, "Ready", True, "Registered", "ok", 2, "2025-01-03T00:00:00Z")
    assert same["lastTransitionTime"] == "2025-01-01T00:00:00Z" and same["reason"] == "OriginUnavailable"
    assert flipped["lastTransitionTime"] == "2025-01-03T00:00:00Z"


# ---- naming ----------------------------------------------------------------------------

# (namespace, name) → dataset name, or None when it cannot fit cachefs' rules.
NAMES: dict[str, tuple[str, str, str | None]] = {
    "namespace dot name": ("ml", "imagenet", "ml.imagenet"),
    "dots in the name stay": ("team-a", "imagenet.v2", "team-a.imagenet.v2"),
    "exactly 63 characters": ("a" * 30, "b" * 32, "a" * 30 + "." + "b" * 32),
    "64 characters is too long": ("a" * 31, "b" * 32, None),
}


@pytest.mark.parametrize("case", sorted(NAMES))
def test_a_resource_maps_to_the_dataset_namespace_dot_name(case: str) -> None:
    namespace, name, expected = NAMES[case]
    if expected is None:
        with pytest.raises(InvalidSpec, match="at most 63"):
            dataset_name(Key(namespace, name))
    else:
        assert dataset_name(Key(namespace, name)) == expected
        assert DATASET_NAME_RE.match(expected)


def test_different_resources_never_share_a_dataset_name() -> None:
    """With a dash, team-a/x and team/a-x would both be team-a-x."""
    assert dataset_name(Key("team-a", "x")) != dataset_name(Key("team", "a-x"))


# ---- registration fingerprint -------------------------------------------------------------

BASE = {"origin": "s3://b/p", "storageOptions": {"anon": False}, "secretRef": {"name": "creds"}, "replicas": 1}
FINGERPRINT_CHANGES = {
    "origin": ({**BASE, "origin": "s3://b/q"}, "v1", True),
    "storage options": ({**BASE, "storageOptions": {"anon": True}}, "v1", True),
    "secret content (its resourceVersion)": (BASE, "v2", True),
    "replicas": ({**BASE, "replicas": 2}, "v1", True),
    "allowed namespaces": ({**BASE, "allowedNamespaces": ["team-b"]}, "v1", True),
    "warmOnCreate only": ({**BASE, "warmOnCreate": True}, "v1", False),
    "own namespace listed again": ({**BASE, "allowedNamespaces": ["ml"]}, "v1", False),
}


@pytest.mark.parametrize("what", sorted(FINGERPRINT_CHANGES))
def test_the_registration_fingerprint_changes_exactly_when_cachefs_must_register_again(what: str) -> None:
    spec, secret_version, changes = FINGERPRINT_CHANGES[what]
    before = DatasetSpec.parse(BASE).fingerprint("ml", "v1")
    after = DatasetSpec.parse(spec).fingerprint("ml", secret_version)
    assert (before != after) == changes


def test_a_dataset_is_always_mountable_from_its_own_namespace() -> None:
    spec = DatasetSpec.parse({**BASE, "allowedNamespaces": ["team-b", "team-a"]})
    assert spec.namespaces("ml") == ("ml", "team-a", "team-b")
