"""Domain errors of the node plugin, each named by the gRPC status it travels as.

The volume logic raises these and knows nothing of gRPC; csi.rpc turns one into a status
with its message, once, so no error leaves as UNKNOWN.
"""

from __future__ import annotations


class VolumeError(Exception):
    """Base: `code` is a grpc.StatusCode name; the message says what to do."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(VolumeError):
    code = "INVALID_ARGUMENT"


class NotFound(VolumeError):
    code = "NOT_FOUND"


class AlreadyExists(VolumeError):
    code = "ALREADY_EXISTS"


class PermissionDenied(VolumeError):
    code = "PERMISSION_DENIED"


class FailedPrecondition(VolumeError):
    code = "FAILED_PRECONDITION"


class Aborted(VolumeError):
    """Another operation on the same target is under way; the CO retries."""

    code = "ABORTED"


class Unavailable(VolumeError):
    """The cache cluster did not answer; the CO retries with backoff."""

    code = "UNAVAILABLE"


class DeadlineExceeded(VolumeError):
    code = "DEADLINE_EXCEEDED"


class Unimplemented(VolumeError):
    code = "UNIMPLEMENTED"


class Internal(VolumeError):
    code = "INTERNAL"
