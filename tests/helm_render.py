"""Render the Helm chart offline and find things in the result (for tests/test_helm_*.py).

Rendering uses helm-python-sdk (Helm's own Go engine through its C ABI): no cluster,
no `helm` binary. `lookup` answers nothing offline, as with `helm template`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

CHART_DIR = Path(__file__).resolve().parent.parent / "helm" / "cachefs"
RELEASE = "demo"
NAMESPACE = "ml"

# Named value sets the chart is rendered with; each says which situation it stands for.
CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu_nodes": {
        "ray": {
            "workers": {
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                    {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoExecute"},
                ],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpressions": [
                                {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]},
                            ]}],
                        },
                    },
                },
            },
            "head": {"nodeSelector": {"node-role/system": "true"}},
        },
    },
    "csi_off": {"csi": {"enabled": False}},
    "existing_token_secret": {"token": {"existingSecret": "cachefs-token", "existingSecretKey": "tok"}},
    "pvc_disk_tier": {"cache": {"diskTier": {"type": "pvc", "pvc": {"storageClassName": "local-nvme", "size": "200Gi"}}}},
    "hostpath_disk_tier": {"cache": {"diskTier": {"type": "hostPath", "hostPath": {"path": "/mnt/nvme0/cachefs"}}}},
    "operator_all_namespaces": {"operator": {"watchAllNamespaces": True}},
    "tls_and_network_clients": {
        "tls": {"enabled": True, "secretName": "cachefs-tls"},
        "origins": {"allowed": ["s3://team-bucket/", "file:///mnt/datasets/"], "allowedHosts": ["10.0.0.0/8"]},
        "networkPolicy": {"clientNamespaceSelector": {"matchLabels": {"team": "ml"}},
                          "extraClients": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
    "security_features_off": {"networkPolicy": {"enabled": False}, "ray": {"auth": {"enabled": False}}},
    "operator_off_metrics_origin_secret": {
        "operator": {"enabled": False},
        "origin": {"existingSecret": "s3-credentials"},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    },
}

# Kinds that are not Kubernetes built-ins: no schema in kubernetes-validate.
CUSTOM_KINDS = {("ray.io/v1", "RayCluster"), ("monitoring.coreos.com/v1", "ServiceMonitor")}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@dataclass
class Rendered:
    docs: list[dict[str, Any]]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]

    def has(self, kind: str) -> bool:
        return bool(self.of_kind(kind))

    @property
    def ray_cluster(self) -> dict[str, Any]:
        return self.one("RayCluster")

    @property
    def head_pod(self) -> dict[str, Any]:
        return self.ray_cluster["spec"]["headGroupSpec"]["template"]

    @property
    def worker_group(self) -> dict[str, Any]:
        (group,) = self.ray_cluster["spec"]["workerGroupSpecs"]
        return group

    @property
    def worker_pod(self) -> dict[str, Any]:
        return self.worker_group["template"]

    @property
    def csi_pod(self) -> dict[str, Any]:
        return self.one("DaemonSet")["spec"]["template"]

    def pod_templates(self) -> dict[str, dict[str, Any]]:
        pods = {"head": self.head_pod, "worker": self.worker_pod}
        if self.has("DaemonSet"):
            pods["csi"] = self.csi_pod
        return pods


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    for c in pod["spec"].get("containers", []) + pod["spec"].get("initContainers", []):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name} in {[c['name'] for c in pod['spec']['containers']]}")


def containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod["spec"].get("initContainers", [])
    yield from pod["spec"]["containers"]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    for v in pod["spec"]["volumes"]:
        if v["name"] == name:
            return v
    raise AssertionError(f"no volume {name}")


def render(chart: Any, values: dict[str, Any]) -> Rendered:
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return Rendered(docs, notes)

