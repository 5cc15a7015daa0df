"""The node plugin's state on disk: one JSON file per published volume.

The contract (version 1), so that a restarted plugin — or a human — can read it:

    STATE_DIR/volumes/<key>.json   key = first 24 hex digits of sha256(target path)
    {
      "version": 1,
      "volume_id": "csi-4f3a...",          # as the CO named it
      "target": "/var/lib/kubelet/pods/.../mount",   # absolute; the record's identity
      "dataset": "imagenet",
      "source": "cachefs://imagenet",      # the fsspec URL the mount process reads
      "endpoint": "http://cachefs:8477",   # the cluster the mount talks to (never the token)
      "pid": 12345,                        # the mount process (its own session)
      "namespace": "team-a",               # pod namespace, "" when the CO sent none
      "ephemeral": true,                   # a CSI inline volume
      "files": 1281167, "bytes": 150000000000,       # the snapshot's size at publish
      "snapshot": "9a1c...", "created": 1700000000.0  # snapshot id and its creation time
    }
    STATE_DIR/logs/<key>.log       stdout and stderr of the mount process

A record is written after the mount process starts (so a crash after that point leaves
a record to re-adopt or clean up) and removed after the mount is gone. Files are
replaced atomically (write, fsync, rename): a reader sees the old or the new record,
never half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator

from cachefs.common.files import write_atomically

log = logging.getLogger("cachefs.csi.state")

VERSION = 1


@dataclass(frozen=True)
class VolumeRecord:
    volume_id: str
    target: str
    dataset: str
    source: str
    endpoint: str
    pid: int
    namespace: str = ""
    ephemeral: bool = False
    files: int = 0
    bytes: int = 0
    snapshot: str = ""
    created: float = 0.0
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "VolumeRecord":
        if d.get("version") != VERSION:
            raise ValueError(f"record version {d.get('version')!r}, this plugin reads version {VERSION}")
        known = {f.name for f in fields(cls)}
        missing = {"volume_id", "target", "dataset", "source", "endpoint", "pid"} - set(d)
        if missing:
            raise ValueError(f"record lacks {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in known})


def key_of(target: str) -> str:
    return hashlib.sha256(os.path.normpath(target).encode()).hexdigest()[:24]


class StateStore:
    """Records by target path, in STATE_DIR; one writer (the plugin) at a time."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.abspath(state_dir)
        self.volumes_dir = os.path.join(self.dir, "volumes")
        self.logs_dir = os.path.join(self.dir, "logs")
        os.makedirs(self.volumes_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.logs_dir, mode=0o700, exist_ok=True)

    def _path(self, target: str) -> str:
        return os.path.join(self.volumes_dir, key_of(target) + ".json")

    def log_path(self, target: str) -> str:
        return os.path.join(self.logs_dir, key_of(target) + ".log")

    def get(self, target: str) -> VolumeRecord | None:
        try:
            with open(self._path(target)) as f:
                record = VolumeRecord.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("unreadable state for %s (%s); treating the target as unrecorded", target, e)
            return None
        return record if os.path.normpath(record.target) == os.path.normpath(target) else None

    def put(self, record: VolumeRecord) -> None:
        data = json.dumps(record.to_json(), indent=2, sort_keys=True).encode()
        write_atomically(self._path(record.target), data, mode=0o644, durable=True)

    def delete(self, target: str) -> None:
        for path in (self._path(target), self.log_path(target)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def all(self) -> Iterator[VolumeRecord]:
        for name in sorted(os.listdir(self.volumes_dir)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.volumes_dir, name)
            try:
                with open(path) as f:
                    yield VolumeRecord.from_json(json.load(f))
            except (OSError, ValueError, TypeError) as e:
                log.error("skipping unreadable state file %s: %s", path, e)
