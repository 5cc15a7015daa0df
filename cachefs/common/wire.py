"""The wire contract between cache nodes and their clients, defined once.

Server and client both import this module; it must stay a leaf (no Ray, no aiohttp
server, nothing of ours but `cachefs.common.errors`). docs/api.md is its prose twin.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

API_PREFIX = "/v1"

# Routes (aiohttp-style patterns; the client formats them with `route()`).
HEALTH = "/v1/health"
RING = "/v1/ring"
STATUS = "/v1/status"
METRICS = "/v1/metrics"
DATASETS = "/v1/datasets"
DATASET = "/v1/datasets/{name}"
DATASET_MANIFEST = "/v1/datasets/{name}/manifest"
DATASET_REFRESH = "/v1/datasets/{name}/refresh"
DATASET_WARM = "/v1/datasets/{name}/warm"
OPERATION = "/v1/operations/{op_id}"
NODES = "/v1/nodes"
NODE_DRAIN = "/v1/nodes/{node_id}/drain"
BLOCK = "/v1/blocks/{name}"
READ = "/v1/datasets/{name}/read"  # POST: many byte ranges of blocks and packs, answered as frames

# Who may call a route (each route declares one where it is registered; docs/api.md lists
# them): OPEN needs no token (health probes), READER the reader token (blocks, manifests,
# listings: what training pods hold), ADMIN the admin token (datasets, warm-up, refresh;
# the CLI and the operator). The admin token opens every READER route too.
OPEN = "open"
READER = "reader"
ADMIN = "admin"

# Headers.
AUTHORIZATION = "Authorization"
EPOCH_HEADER = "X-Cachefs-Epoch"  # the ring epoch the client routed with
DIGEST_HEADER = "X-Cachefs-Digest"  # xxh3_64 hex digest of the whole block
SOURCE_HEADER = "X-Cachefs-Source"  # memory | disk | origin
SNAPSHOT_HEADER = "X-Cachefs-Snapshot"
BLOCK_SIZE_HEADER = "X-Cachefs-Block-Size"

ARROW_STREAM = "application/vnd.apache.arrow.stream"
FRAMES = "application/vnd.cachefs.frames"

DEFAULT_BLOCK_SIZE = 8 * 1024 * 1024  # 8 MiB: large enough to reach the loopback ceiling
DEFAULT_PORT = 8477

# -- batched reads (POST READ) -------------------------------------------------------------
# Body: {"snapshot": S, "items": [ITEM, ...]}, header X-Cachefs-Epoch. An ITEM is
#   ["b", PATH, INDEX, START, END]: bytes [START, END) of block INDEX of file PATH
#   ["p", PACK, START, END]:        bytes [START, END) of pack PACK (small files laid end to end)
# The answer is 200 with one frame per item, in item order: a FRAME header, then LENGTH
# bytes: the item's bytes when STATUS is 200 (DIGEST is their xxh3-64), else that item's
# JSON error body (DIGEST 0). An error of the whole request (token, epoch, snapshot) is an
# ordinary JSON error response instead.
FRAME = struct.Struct("<HHIQQ")  # status, reserved (0), item index, length, digest


def read_body(snapshot: str, items: list[list]) -> bytes:
    """The JSON body of a batch read (POST READ)."""
    return json.dumps({"snapshot": snapshot, "items": items}, separators=(",", ":")).encode()
ITEM_BLOCK = "b"
ITEM_PACK = "p"
MAX_BATCH_ITEMS = 4096
MAX_BATCH_BYTES = 256 * 1024 * 1024  # a client splits larger reads into several requests

DATASET_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
NAMESPACE_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a Kubernetes namespace (DNS label)
ALL_NAMESPACES = "*"  # in allowed_namespaces: every namespace may mount the dataset (none named: none may)

# Error codes carried in JSON error bodies: {"error": CODE, "message": TEXT}.
BAD_REQUEST = "bad_request"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
NOT_FOUND = "not_found"
CONFLICT = "conflict"
STALE_EPOCH = "stale_epoch"
ORIGIN_CHANGED = "origin_changed"
SNAPSHOT_GONE = "snapshot_gone"
RANGE_NOT_SATISFIABLE = "range_not_satisfiable"
ORIGIN_UNAVAILABLE = "origin_unavailable"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"

STATUS_OF_CODE = {
    BAD_REQUEST: 400,
    UNAUTHORIZED: 401,
    FORBIDDEN: 403,
    NOT_FOUND: 404,
    CONFLICT: 409,
    STALE_EPOCH: 409,
    SNAPSHOT_GONE: 410,
    ORIGIN_CHANGED: 412,
    RANGE_NOT_SATISFIABLE: 416,
    ORIGIN_UNAVAILABLE: 503,
    UNAVAILABLE: 503,
    INTERNAL: 500,
}


DEFAULT_LEASE = 24 * 3600.0  # a day: a training job's snapshot outlives the refresh made during it
SNAPSHOT_ID_RE = re.compile(r"^[0-9a-f]{1,64}$")  # what `name@SNAPSHOT` may name


def route(pattern: str, **params: str) -> str:
    """Fill a route pattern; parameters are quoted so a name can never add a segment."""
    from urllib.parse import quote

    return pattern.format(**{k: quote(str(v), safe="") for k, v in params.items()})


def bearer(token: str) -> dict[str, str]:
    return {AUTHORIZATION: f"Bearer {token}"}


def error_body(code: str, message: str, **extra: Any) -> bytes:
    return json.dumps({"error": code, "message": message, **extra}).encode()


@dataclass(frozen=True)
class DatasetInfo:
    """What the cluster knows of a registered dataset (GET /v1/datasets/{name})."""

    name: str
    origin: str
    snapshot: str
    files: int
    bytes: int
    replicas: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE
    allowed_namespaces: tuple[str, ...] = ()
    created: float = 0.0
    packs: int = 0  # packs of small files in this snapshot (manifest columns `pack`, `offset`)
    pack_threshold: int = 0  # files below this many bytes were packed (0: none)
    lease: float = DEFAULT_LEASE  # seconds a replaced snapshot stays readable after a reader loaded it
    refresh: dict[str, Any] = field(default_factory=dict)  # its refresh policy ({} manual: server/refresh_policy.py)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["allowed_namespaces"] = list(self.allowed_namespaces)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DatasetInfo":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["allowed_namespaces"] = tuple(known.get("allowed_namespaces") or ())
        return cls(**known)


@dataclass
class OperationInfo:
    """A long operation (add, refresh, warm): progress, outcome and cancellation."""

    id: str
    kind: str
    dataset: str
    state: str = "running"  # running | succeeded | failed | cancelled
    done_files: int = 0
    total_files: int = 0
    done_bytes: int = 0
    total_bytes: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    message: str = ""
    started: float = 0.0
    finished: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def finished_ok(self) -> bool:
        return self.state == "succeeded"

    @property
    def running(self) -> bool:
        return self.state == "running"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "OperationInfo":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# -- the admin API, written once -----------------------------------------------------------
# Every admin operation is one row: the coordinator implements a method of that name (with
# JSON-able arguments and answer), a node's link to the coordinator forwards it, the HTTP
# app serves it at its route, and the admin client calls it, reading the answer with
# `reads`. Arguments are the route's parameters in order, then the JSON body if `body`.
def _same(doc: Any) -> Any:
    return doc


def _datasets(doc: Any) -> list[DatasetInfo]:
    return [DatasetInfo.from_json(d) for d in doc]


@dataclass(frozen=True)
class AdminCall:
    name: str
    method: str
    route: str
    role: str
    params: tuple[str, ...] = ()
    body: bool = False
    wrap: str = ""  # the key the answer travels under in the response body, if any
    status: int = 200
    reads: Callable[[Any], Any] = _same  # the answer as the client returns it


ADMIN_CALLS: tuple[AdminCall, ...] = (
    AdminCall("list_datasets", "GET", DATASETS, READER, wrap="datasets", reads=_datasets),
    AdminCall("add_dataset", "POST", DATASETS, ADMIN, body=True, wrap="operation", status=202,
              reads=OperationInfo.from_json),
    AdminCall("update_dataset", "PATCH", DATASET, ADMIN, ("name",), body=True, reads=DatasetInfo.from_json),
    AdminCall("remove_dataset", "DELETE", DATASET, ADMIN, ("name",)),
    AdminCall("refresh_dataset", "POST", DATASET_REFRESH, ADMIN, ("name",), body=True, wrap="operation", status=202,
              reads=OperationInfo.from_json),  # body {"warm": bool}, or none
    AdminCall("warm_dataset", "POST", DATASET_WARM, ADMIN, ("name",), wrap="operation", status=202,
              reads=OperationInfo.from_json),
    AdminCall("operation", "GET", OPERATION, READER, ("op_id",), reads=OperationInfo.from_json),
    AdminCall("cancel", "DELETE", OPERATION, ADMIN, ("op_id",), reads=OperationInfo.from_json),
    AdminCall("status", "GET", STATUS, READER),
    AdminCall("list_nodes", "GET", NODES, READER, wrap="nodes"),
    AdminCall("drain_node", "POST", NODE_DRAIN, ADMIN, ("node_id",), body=True, wrap="operation", status=202,
              reads=OperationInfo.from_json),
)
ADMIN_CALL = {c.name: c for c in ADMIN_CALLS}
