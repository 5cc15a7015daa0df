"""The CachedDataset resource: its names, its spec as a checked value, its status shape.

Pure: no I/O, no Kubernetes client. The CRD (helm/cachefs/crds/) validates the spec at
the API server already; this module checks it again because a cluster may run an older
CRD, and because some rules (the length of the cachefs name) span fields the CRD
cannot see together.

Naming: a resource `NAME` in namespace `NS` becomes the cachefs dataset `NS.NAME`.
A namespace never contains a dot, so the first dot splits the name back unambiguously
(`NS-NAME` would not: team-a/x and team/a-x would collide). Both parts are lowercase
DNS names, so the result fits cachefs' dataset-name rules whenever it fits 63 chars.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, NamedTuple

from cachefs.common.wire import DATASET_NAME_RE

GROUP = "cachefs.io"
VERSION = "v1alpha1"
PLURAL = "cacheddatasets"
KIND = "CachedDataset"
API_VERSION = f"{GROUP}/{VERSION}"

# The operator holds this finalizer on every resource it has seen, so that a delete
# waits until the dataset is removed from cachefs, even if the operator was down then.
FINALIZER = "cachefs.io/dataset"

# Requests that do not change the spec: set the annotation to a new value (a timestamp
# is the usual choice) and the operator acts once per value.
REFRESH_ANNOTATION = "cachefs.io/refresh-request"
WARM_ANNOTATION = "cachefs.io/warm-request"

READY = "Ready"
WARM = "Warm"

MAX_REPLICAS = 8
_ORIGIN_RE = re.compile(r"^([a-z][a-z0-9+.-]*::)*[a-z][a-z0-9+.-]*://\S+$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class InvalidSpec(ValueError):
    """The resource cannot be acted on until its owner changes it."""


class Key(NamedTuple):
    """Identifies a resource; the unit of work of the operator."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def dataset_name(key: Key) -> str:
    """The cachefs dataset name of a resource (see the module docstring)."""
    name = f"{key.namespace}.{key.name}"
    if not DATASET_NAME_RE.match(name):
        raise InvalidSpec(
            f"the cachefs dataset name {name!r} ({len(name)} characters) does not fit cachefs' "
            "rules (lowercase letters, digits, '.', '_', '-'; at most 63 characters): "
            "use a shorter resource name"
        )
    return name


def refresh_policy(doc: Any) -> dict[str, Any]:
    """`spec.refresh` ({interval, onChange, warm}) as the cachefs API takes it; {} for manual."""
    if doc is None:
        return {}
    if not isinstance(doc, dict) or set(doc) - {"interval", "onChange", "warm"}:
        raise InvalidSpec(f"spec.refresh must be {{interval: seconds, onChange: bool, warm: bool}}, not {doc!r}")
    interval = doc.get("interval", 0)
    if isinstance(interval, bool) or not isinstance(interval, int) or not (interval == 0 or 1 <= interval <= 31536000):
        raise InvalidSpec(f"spec.refresh.interval must be 0 or seconds from 1 to a year, not {interval!r}")
    for flag in ("onChange", "warm"):
        if not isinstance(doc.get(flag, False), bool):
            raise InvalidSpec(f"spec.refresh.{flag} must be true or false, not {doc[flag]!r}")
    if not interval and not doc.get("onChange") and not doc.get("warm"):
        return {}
    return {"interval": interval, "on_change": doc.get("onChange", False), "warm": doc.get("warm", False)}


@dataclass(frozen=True)
class DatasetSpec:
    """A CachedDataset's spec, checked."""

    origin: str
    secret_name: str = ""
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    replicas: int = 1
    warm_on_create: bool = False
    allowed_namespaces: tuple[str, ...] = ()
    refresh: Mapping[str, Any] = field(default_factory=dict)  # the dataset's refresh policy, as the API spells it

    @classmethod
    def parse(cls, spec: Any) -> "DatasetSpec":
        """Read and check `.spec`; raise InvalidSpec naming the field and the fix."""
        if not isinstance(spec, dict):
            raise InvalidSpec("spec must be an object with at least spec.origin")
        unknown = set(spec) - {"origin", "secretRef", "storageOptions", "replicas", "warmOnCreate", "allowedNamespaces",
                               "refresh"}
        if unknown:
            raise InvalidSpec(f"unknown spec fields {sorted(unknown)}; check the spelling against the CRD")
        origin = spec.get("origin")
        if not isinstance(origin, str) or not _ORIGIN_RE.match(origin):
            raise InvalidSpec(
                f"spec.origin {origin!r} is not an fsspec URL with a protocol, like s3://bucket/prefix or file:///data"
            )
        secret_name = ""
        if "secretRef" in spec:
            ref = spec["secretRef"]
            secret_name = ref.get("name") if isinstance(ref, dict) else None
            if not isinstance(secret_name, str) or not _DNS_SUBDOMAIN_RE.match(secret_name):
                raise InvalidSpec(f"spec.secretRef must be {{name: <name of a Secret in this namespace>}}, not {ref!r}")
        options = spec.get("storageOptions") or {}
        if not isinstance(options, dict):
            raise InvalidSpec("spec.storageOptions must be an object of fsspec options")
        replicas = spec.get("replicas", 1)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= MAX_REPLICAS:
            raise InvalidSpec(f"spec.replicas must be an integer from 1 to {MAX_REPLICAS}, not {replicas!r}")
        warm = spec.get("warmOnCreate", False)
        if not isinstance(warm, bool):
            raise InvalidSpec(f"spec.warmOnCreate must be true or false, not {warm!r}")
        allowed = spec.get("allowedNamespaces") or []
        if not isinstance(allowed, list) or not all(isinstance(n, str) and _DNS_LABEL_RE.match(n) for n in allowed):
            raise InvalidSpec(f"spec.allowedNamespaces must be a list of namespace names, not {allowed!r}")
        return cls(origin, secret_name, dict(options), replicas, warm, tuple(allowed),
                   refresh_policy(spec.get("refresh")))

    def namespaces(self, own: str) -> tuple[str, ...]:
        """The namespaces allowed to mount the dataset: always its own, then the listed ones."""
        return tuple(sorted({own, *self.allowed_namespaces}))

    def fingerprint(self, own_namespace: str, secret_version: str) -> str:
        """Identifies what was registered: a new fingerprint means an update in place (same
        origin: replicas, namespaces, storage options) or remove and add (another origin).
        Holds the Secret's resourceVersion, never its data."""
        doc = {
            "origin": self.origin,
            "storage_options": self.storage_options,
            "secret": f"{self.secret_name}@{secret_version}" if self.secret_name else "",
            "replicas": self.replicas,
            "namespaces": self.namespaces(own_namespace),
            **({"refresh": dict(self.refresh)} if self.refresh else {}),
        }
        canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Resource:
    """The parts of a CachedDataset object the reconciler reads."""

    key: Key
    generation: int
    resource_version: str
    deleting: bool
    finalizers: tuple[str, ...]
    annotations: Mapping[str, str]
    spec: Any
    status: Mapping[str, Any]

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> "Resource":
        meta = obj.get("metadata") or {}
        return cls(
            key=Key(meta.get("namespace", ""), meta.get("name", "")),
            generation=int(meta.get("generation") or 0),
            resource_version=str(meta.get("resourceVersion") or ""),
            deleting=bool(meta.get("deletionTimestamp")),
            finalizers=tuple(meta.get("finalizers") or ()),
            annotations=dict(meta.get("annotations") or {}),
            spec=obj.get("spec"),
            status=dict(obj.get("status") or {}),
        )

    @property
    def has_finalizer(self) -> bool:
        return FINALIZER in self.finalizers

    def condition(self, kind: str) -> Mapping[str, Any]:
        for c in self.status.get("conditions") or ():
            if c.get("type") == kind:
                return c
        return {}


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return Key(meta.get("namespace", ""), meta.get("name", ""))


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    previous: Mapping[str, Any], kind: str, status: bool | None, reason: str, message: str, generation: int, now: str
) -> dict[str, Any]:
    """A standard condition; lastTransitionTime moves only when the status does."""
    value = "Unknown" if status is None else ("True" if status else "False")
    changed = previous.get("status") != value
    return {
        "type": kind,
        "status": value,
        "observedGeneration": generation,
        "lastTransitionTime": now if changed or not previous.get("lastTransitionTime") else previous["lastTransitionTime"],
        "reason": reason,
        "message": message[:32768],
    }
