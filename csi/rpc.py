"""The one place a domain error becomes a gRPC status.

Servicer methods are wrapped with `@rpc`: a VolumeError leaves with its own status code
and message; anything else is logged with its traceback and leaves as INTERNAL with a
one-line message. So no error ever reaches the CO as UNKNOWN. Requests are never logged
whole: they may carry secrets.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, TypeVar

import grpc

from csi.errors import VolumeError

log = logging.getLogger("cachefs.csi.rpc")
R = TypeVar("R")


def rpc(fn: Callable[[Any, Any, grpc.ServicerContext], R]) -> Callable[[Any, Any, grpc.ServicerContext], R]:
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> R:
        started = time.monotonic()
        try:
            response = fn(self, request, context)
        except VolumeError as e:
            log.warning("%s → %s: %s", name, e.code, e.message)
            context.abort(grpc.StatusCode[e.code], e.message)
        except Exception as e:  # noqa: BLE001 - the boundary: nothing may leave as UNKNOWN
            log.exception("%s failed unexpectedly", name)
            context.abort(grpc.StatusCode.INTERNAL, f"{name} failed unexpectedly: {type(e).__name__}: {e}")
        log.debug("%s → OK in %.3f s", name, time.monotonic() - started)
        return response

    return wrapper
