"""The dataset registry: what is registered, its snapshot, and where that is kept on disk.

Persisted under STATE_DIR/datasets/ so that `cachefs down` then `up` keeps every dataset:
NAME.json holds the record (origin, storage options, DatasetInfo) and NAME.SNAPSHOT.arrow
the manifest as Arrow IPC. Files are written whole and renamed, and are mode 0600 because
storage options may hold origin credentials (they never leave the cache cluster).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from cachefs.common.files import write_atomically
from cachefs.common.errors import BadRequest, Conflict, NotFound
from cachefs.common.manifest import Manifest, build_table, from_ipc, leaf_folders, snapshot_id, to_ipc
from cachefs.common.wire import (ALL_NAMESPACES, DATASET_NAME_RE, DEFAULT_BLOCK_SIZE, DEFAULT_LEASE, NAMESPACE_RE,
                                 DatasetInfo)
from cachefs.common.origin import Origin, split_origin
from server.listing import list_origin
from server.refresh_policy import RefreshPolicy
from shard import default_threshold


@dataclass(frozen=True)
class DatasetSpec:
    """What a user asks for when registering a dataset; validated on construction."""

    name: str
    origin: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    replicas: int = 1
    allowed_namespaces: tuple[str, ...] = ()
    block_size: int = DEFAULT_BLOCK_SIZE
    pack_threshold: int = -1  # files below this many bytes share packs; -1: the default for the block size
    lease: float = DEFAULT_LEASE  # seconds a replaced snapshot stays readable after a reader loaded it
    refresh: dict[str, Any] = field(default_factory=dict)  # its refresh policy (server/refresh_policy.py)

    def __post_init__(self) -> None:
        if self.pack_threshold < 0:
            object.__setattr__(self, "pack_threshold", default_threshold(self.block_size))

    @classmethod
    def parse(cls, body: dict[str, Any], block_size: int = DEFAULT_BLOCK_SIZE) -> "DatasetSpec":
        unknown = set(body) - {"name", "origin", "pack_threshold", *SETTINGS}
        if unknown:
            raise BadRequest(f"unknown field(s) {sorted(unknown)}; a dataset takes name, origin, "
                             f"pack_threshold, {', '.join(SETTINGS)}")
        name, origin = body.get("name"), body.get("origin")
        if not isinstance(name, str) or not DATASET_NAME_RE.match(name):
            raise BadRequest(f"{name!r} is not a dataset name: use lowercase letters, digits, '.', '_' and '-' "
                             "(at most 63 characters, starting and ending with a letter or digit)")
        if not isinstance(origin, str) or not origin:
            raise BadRequest("origin must be a URL such as s3://bucket/prefix or file:///data/set")
        split_origin(origin)
        threshold = body.get("pack_threshold", -1)
        if threshold is None:
            threshold = -1
        if not isinstance(threshold, int) or isinstance(threshold, bool) or not -1 <= threshold <= block_size:
            raise BadRequest(f"pack_threshold must be a number of bytes from 0 (no packing) to the block size "
                             f"({block_size}), not {threshold!r}")
        settings = parse_settings({k: body[k] for k in SETTINGS if k in body})
        return cls(name, origin, settings.get("storage_options", {}), settings.get("replicas", 1),
                   settings.get("allowed_namespaces", ()), block_size, threshold, settings.get("lease", DEFAULT_LEASE),
                   settings.get("refresh", {}))


SETTINGS = ("replicas", "allowed_namespaces", "storage_options", "lease", "refresh")  # what an update changes in place


def parse_settings(body: dict[str, Any]) -> dict[str, Any]:
    """The settings a dataset keeps across snapshots, checked: `add` takes them, and
    `update` changes them in place (same snapshot, cached blocks kept)."""
    unknown = set(body) - set(SETTINGS)
    if unknown:
        raise BadRequest(f"unknown or unchangeable field(s) {sorted(unknown)}: an update changes "
                         f"{', '.join(SETTINGS)}; to change the origin or the packing, remove the dataset and add it")
    out: dict[str, Any] = {}
    if "storage_options" in body:
        opts = body["storage_options"] or {}
        if not isinstance(opts, dict):
            raise BadRequest("storage_options must be a JSON object")
        out["storage_options"] = opts
    if "replicas" in body:
        replicas = body["replicas"]
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= 16:
            raise BadRequest(f"replicas must be an integer from 1 to 16, not {replicas!r}")
        out["replicas"] = replicas
    if "allowed_namespaces" in body:
        allowed = body["allowed_namespaces"] or []
        if not isinstance(allowed, list) or not all(
                isinstance(x, str) and (x == ALL_NAMESPACES or NAMESPACE_RE.match(x)) for x in allowed):
            raise BadRequest(f"allowed_namespaces must be a list of Kubernetes namespace names, or ['*'] for every "
                             f"namespace, not {allowed!r}")
        out["allowed_namespaces"] = tuple(allowed)
    if "lease" in body:
        lease = body["lease"]
        if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not 0 <= lease <= 365 * 86400:
            raise BadRequest(f"lease must be a number of seconds from 0 (a replaced snapshot is dropped at once) "
                             f"to a year, not {lease!r}")
        out["lease"] = float(lease)
    if "refresh" in body:
        out["refresh"] = RefreshPolicy.parse(body["refresh"]).to_json()
    return out


@dataclass(frozen=True)
class DatasetRecord:
    info: DatasetInfo
    storage_options: dict[str, Any]
    manifest_ipc: bytes


def take_snapshot(spec: DatasetSpec, progress: Callable[[int, int], None] | None = None,
                  cancelled: threading.Event | None = None, previous: DatasetRecord | None = None) -> DatasetRecord:
    """List the origin once and freeze it as a manifest. Blocking: run it in a thread. With
    the `previous` snapshot (a refresh), unchanged small files keep their packs, so their
    cached bytes stay valid."""
    listing = list_origin(Origin(spec.origin, spec.storage_options), progress, cancelled)
    entries = listing.files
    before = Manifest(from_ipc(previous.manifest_ipc), previous.info.snapshot) if previous is not None else None
    if before is not None and before.table.num_rows and previous is not None \
            and (previous.info.block_size, previous.info.pack_threshold) != (spec.block_size, spec.pack_threshold):
        before = None  # packed otherwise: nothing to keep
    table = build_table(entries, spec.block_size, spec.pack_threshold, before, listing.folders)
    layout = f"packed:{spec.block_size}:{spec.pack_threshold}" if spec.pack_threshold else ""
    packs = Manifest(table).packs
    info = DatasetInfo(
        name=spec.name, origin=spec.origin, snapshot=snapshot_id(table, layout), files=len(entries),
        bytes=sum(e.size for e in entries), replicas=spec.replicas, block_size=spec.block_size,
        allowed_namespaces=spec.allowed_namespaces, created=time.time(), packs=packs,
        pack_threshold=spec.pack_threshold, lease=spec.lease, refresh=dict(spec.refresh),
    )
    return DatasetRecord(info, dict(spec.storage_options), to_ipc(table))


def origin_differs(record: DatasetRecord, cancelled: threading.Event | None = None) -> bool:
    """Does the origin list other files, sizes or version tokens (or empty folders) than the
    snapshot? (An on-change policy's check: a listing, no manifest built.) Blocking: run it
    in a thread."""
    listing = list_origin(Origin(record.info.origin, record.storage_options), None, cancelled)
    entries = listing.files
    manifest = Manifest(from_ipc(record.manifest_ipc), record.info.snapshot)
    if len(entries) != len(manifest) or leaf_folders(listing.folders, sorted(e.path for e in entries)) != manifest.folders:
        return True
    for e in entries:
        old = manifest.get(e.path)
        if old is None or old.size != e.size or old.version != e.version:
            return True
    return False


class Registry:
    """Registered datasets, in memory and (with a state dir) on disk."""

    def __init__(self, state_dir: str | os.PathLike[str] | None) -> None:
        self.dir = Path(state_dir) / "datasets" if state_dir else None
        self._records: dict[str, DatasetRecord] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
            self._load()

    def _load(self) -> None:
        assert self.dir is not None
        for f in sorted(self.dir.glob("*.json")):
            try:
                doc = json.loads(f.read_text())
                info = DatasetInfo.from_json(doc["info"])
                ipc = (self.dir / f"{info.name}.{info.snapshot}.arrow").read_bytes()
            except (OSError, ValueError, KeyError):
                continue  # a half-written or foreign file: the origin is the truth, re-add it
            self._records[info.name] = DatasetRecord(info, doc.get("storage_options", {}), ipc)

    def names(self) -> list[str]:
        return sorted(self._records)

    def get(self, name: str) -> DatasetRecord:
        try:
            return self._records[name]
        except KeyError:
            raise NotFound(f"no dataset named {name!r}; `cachefs dataset ls` lists them") from None

    def list(self) -> list[DatasetInfo]:
        return [self._records[n].info for n in self.names()]

    def check_add(self, spec: DatasetSpec) -> DatasetRecord | None:
        """The existing record when this add repeats an earlier one; Conflict, saying what
        differs and what to do, when it contradicts it."""
        old = self._records.get(spec.name)
        if old is None:
            return None
        if old.info.origin.rstrip("/") != spec.origin.rstrip("/"):
            raise Conflict(f"dataset {spec.name!r} already exists with origin {old.info.origin}; "
                           f"remove it first (`cachefs dataset rm {spec.name}`) or pick another name")
        differ: dict[str, str] = {}
        if old.info.replicas != spec.replicas:
            differ["replicas"] = f"replicas {old.info.replicas} (asked: {spec.replicas})"
        if sorted(old.info.allowed_namespaces) != sorted(spec.allowed_namespaces):
            differ["allowed_namespaces"] = (f"allowed namespaces {list(old.info.allowed_namespaces)} "
                                            f"(asked: {list(spec.allowed_namespaces)})")
        if old.storage_options != spec.storage_options:
            differ["storage_options"] = "other storage options"
        if differ:
            raise Conflict(f"dataset {spec.name!r} already exists with {', '.join(differ.values())}; change it in "
                           f"place, keeping what is cached, with `cachefs dataset update {spec.name}` (PATCH "
                           f"/v1/datasets/{spec.name})", differs=sorted(differ))
        return old

    def update(self, name: str, settings: dict[str, Any]) -> DatasetRecord:
        """The dataset with new settings: same snapshot, same manifest, so every cached block
        stays valid (block keys name the snapshot, not the settings)."""
        old = self.get(name)
        info = replace(old.info, **{k: v for k, v in settings.items() if k != "storage_options"})
        record = replace(old, info=info, storage_options=settings.get("storage_options", old.storage_options))
        self.put(record)
        return record

    def put(self, record: DatasetRecord) -> None:
        old = self._records.get(record.info.name)
        self._records[record.info.name] = record
        if self.dir is None:
            return
        name, snap = record.info.name, record.info.snapshot
        write_atomically(self.dir / f"{name}.{snap}.arrow", record.manifest_ipc)
        doc = {"info": record.info.to_json(), "storage_options": record.storage_options}
        write_atomically(self.dir / f"{name}.json", json.dumps(doc).encode())
        if old is not None and old.info.snapshot != snap:
            (self.dir / f"{name}.{old.info.snapshot}.arrow").unlink(missing_ok=True)

    def remove(self, name: str) -> DatasetRecord:
        record = self.get(name)
        del self._records[name]
        if self.dir is not None:
            (self.dir / f"{name}.json").unlink(missing_ok=True)
            (self.dir / f"{name}.{record.info.snapshot}.arrow").unlink(missing_ok=True)
        return record
