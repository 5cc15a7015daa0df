"""The exception tree, shared by server and client.

Every error is an OSError subclass so fsspec users can catch what they already know
(FileNotFoundError, PermissionError); each carries the wire code it travels as, so the
server maps an exception to a status and the client maps a status back, never by
matching message text.
"""

from __future__ import annotations

import errno
import json


class CachefsError(OSError):
    """Base of everything cachefs raises on purpose."""

    code = "internal"
    errno_value = errno.EIO

    def __init__(self, message: str, **extra: object) -> None:
        super().__init__(self.errno_value, message)
        self.message = message
        self.extra = extra

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        # OSError pickles as cls(errno, strerror); ours are built from (message, **extra).
        return (_rebuild, (type(self), self.message, self.extra))


def _rebuild(cls: type["CachefsError"], message: str, extra: dict[str, object]) -> "CachefsError":
    return cls(message, **extra)


class ConfigError(CachefsError, ValueError):
    """A configuration value is missing or malformed."""

    code = "bad_request"
    errno_value = errno.EINVAL


class BadRequest(CachefsError, ValueError):
    """A name, path, index or body is malformed (400)."""

    code = "bad_request"
    errno_value = errno.EINVAL


class Unauthorized(CachefsError, PermissionError):
    """No or wrong cluster token (401)."""

    code = "unauthorized"
    errno_value = errno.EACCES


class Forbidden(CachefsError, PermissionError):
    """A valid token that may not do this (403): the reader token on an admin route, or an
    origin the cluster's allowlist refuses. The message names the token or setting needed."""

    code = "forbidden"
    errno_value = errno.EACCES


class NotFound(CachefsError, FileNotFoundError):
    """Unknown dataset, file, snapshot or operation (404)."""

    code = "not_found"
    errno_value = errno.ENOENT


class Conflict(CachefsError):
    """The request contradicts existing state (409)."""

    code = "conflict"
    errno_value = errno.EEXIST


class StaleEpoch(CachefsError):
    """The client routed with an older ring epoch (409); it refreshes and retries."""

    code = "stale_epoch"
    errno_value = errno.EAGAIN

    @property
    def epoch(self) -> int:
        return int(self.extra.get("epoch", 0))  # type: ignore[arg-type]


class OriginChanged(CachefsError):
    """The origin file no longer matches the snapshot (412)."""

    code = "origin_changed"
    errno_value = errno.ESTALE


class SnapshotGone(CachefsError):
    """The snapshot a reader holds was replaced by `refresh` (410): reopen to read the new one."""

    code = "snapshot_gone"
    errno_value = errno.ESTALE


class RangeNotSatisfiable(CachefsError, ValueError):
    """Block index or byte range outside the file (416)."""

    code = "range_not_satisfiable"
    errno_value = errno.EINVAL


class OriginUnavailable(CachefsError, ConnectionError):
    """The origin could not be read (503)."""

    code = "origin_unavailable"
    errno_value = errno.EIO


class Unavailable(CachefsError, ConnectionError):
    """The cluster cannot answer right now: the coordinator is down or restarting (503)."""

    code = "unavailable"
    errno_value = errno.EAGAIN


class NodeUnavailable(CachefsError, ConnectionError):
    """A cache node did not answer (client side only: connection refused, timeout)."""

    code = "node_unavailable"
    errno_value = errno.EHOSTUNREACH


class ReadOnlyError(CachefsError, PermissionError):
    """cachefs serves immutable snapshots; writes are refused."""

    code = "read_only"
    errno_value = errno.EROFS


class IntegrityError(CachefsError):
    """A block's bytes do not match its digest."""

    code = "integrity"
    errno_value = errno.EIO


class Cancelled(CachefsError):
    """A long operation was cancelled by its user."""

    code = "cancelled"
    errno_value = errno.ECANCELED


_BY_CODE: dict[str, type[CachefsError]] = {
    cls.code: cls
    for cls in (BadRequest, Unauthorized, Forbidden, NotFound, Conflict, StaleEpoch, OriginChanged, SnapshotGone,
                RangeNotSatisfiable, OriginUnavailable, Unavailable)
}


def from_wire(code: str, message: str, **extra: object) -> CachefsError:
    """Rebuild the exception a server sent as {"error": code, "message": ...}."""
    return _BY_CODE.get(code, CachefsError)(message, **extra)


def from_body(status: int, body: bytes, source: object) -> CachefsError:
    """The exception an error response means: ours from its JSON body, else one naming the status."""
    try:
        doc = json.loads(body)
        code, message = doc.pop("error"), doc.pop("message")
    except (ValueError, KeyError, TypeError, AttributeError):
        return CachefsError(f"HTTP {status} from {source}: {body[:300]!r}")
    return from_wire(code, message, **doc)
