"""docs/kubernetes.md shows working examples: its values file installs, its
CachedDataset passes the CRD's schema, its Pod is a valid Pod mounting the driver the
chart installs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from helm_render import CHART_DIR, render

DOC = Path(__file__).resolve().parent.parent / "docs" / "kubernetes.md"


def yaml_blocks() -> list[Any]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    return [yaml.safe_load(b) for b in blocks]


def documented(kind: str) -> dict[str, Any]:
    found = [b for b in yaml_blocks() if isinstance(b, dict) and b.get("kind") == kind]
    assert found, f"docs/kubernetes.md shows no {kind}"
    return found[0]


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART_DIR) as c:
        yield c


def test_the_documented_values_file_installs(chart: Any) -> None:
    values = next(b for b in yaml_blocks() if isinstance(b, dict) and "cache" in b and "image" in b)
    chart.validate_schema(values)
    rendered = render(chart, values)
    assert rendered.worker_group["replicas"] == values["ray"]["workers"]["replicas"]


def test_the_documented_cached_dataset_is_valid() -> None:
    crd = yaml.safe_load((CHART_DIR / "crds" / "cacheddatasets.cachefs.io.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.validate(documented("CachedDataset"), schema)


def test_the_documented_pod_is_valid_and_mounts_the_chart_driver(chart: Any) -> None:
    pod = documented("Pod")
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    (volume,) = pod["spec"]["volumes"]
    driver = render(chart, {}).one("CSIDriver")["metadata"]["name"]
    assert volume["csi"]["driver"] == driver
    ns, name = pod["metadata"]["namespace"], documented("CachedDataset")["metadata"]["name"]
    assert volume["csi"]["volumeAttributes"]["dataset"] == f"{ns}.{name}"
