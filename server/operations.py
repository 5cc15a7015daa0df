"""Long operations (add, refresh, warm): an id to poll, progress, a result, cancellation.

The coordinator starts each as an asyncio task; clients poll GET /v1/operations/{id}
and cancel with DELETE. Finished operations are kept (the last KEEP) so a slow poller
still learns the outcome.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from cachefs.common.errors import CachefsError, Cancelled, NotFound
from cachefs.common.wire import OperationInfo

KEEP = 200


@dataclass
class Operation:
    info: OperationInfo
    cancelled: threading.Event = field(default_factory=threading.Event)  # threads poll it
    task: asyncio.Task[None] | None = None


class Operations:
    def __init__(self) -> None:
        self._ops: OrderedDict[str, Operation] = OrderedDict()

    def start(self, kind: str, dataset: str, run: Callable[[Operation], Awaitable[None]]) -> OperationInfo:
        """Run `run(op)` as a task; it fills op.info (progress, result); its outcome sets the state."""
        op = Operation(OperationInfo(uuid.uuid4().hex[:12], kind, dataset, started=time.time()))
        self._ops[op.info.id] = op
        while len(self._ops) > KEEP:
            self._ops.popitem(last=False)
        op.task = asyncio.ensure_future(self._run(op, run))
        return op.info

    async def _run(self, op: Operation, run: Callable[[Operation], Awaitable[None]]) -> None:
        try:
            await run(op)
            if op.info.state == "running":
                op.info.state = "cancelled" if op.cancelled.is_set() else "succeeded"
        except (Cancelled, asyncio.CancelledError):
            op.info.state, op.info.message = "cancelled", "cancelled by request"
        except CachefsError as e:
            op.info.state, op.info.message = "failed", str(e)
            op.info.result = {"error": e.code}
        except Exception as e:  # an unexpected failure still ends the operation, with its reason
            op.info.state, op.info.message = "failed", f"{type(e).__name__}: {e}"
        op.info.finished = time.time()

    def get(self, op_id: str) -> Operation:
        try:
            return self._ops[op_id]
        except KeyError:
            raise NotFound(f"no operation {op_id!r} (finished operations are kept for a while only)") from None

    def cancel(self, op_id: str) -> Operation:
        op = self.get(op_id)
        if op.info.running:
            op.cancelled.set()
            if op.task is not None and op.info.kind not in ("warm", "drain"):  # these watch op.cancelled and clean up
                op.task.cancel()
        return op

    def running(self, dataset: str, kind: str) -> OperationInfo | None:
        for op in self._ops.values():
            if op.info.dataset == dataset and op.info.kind == kind and op.info.running:
                return op.info
        return None
