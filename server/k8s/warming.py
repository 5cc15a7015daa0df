"""Warm operations followed in the background, and how much of a dataset is cached.

A warm can take hours, so no reconcile waits for one: `WarmFollower` polls it in a task
of its own and asks for another reconcile when it ends (and now and then while it runs,
so status shows progress). It polls with GET /v1/operations/{id} rather than
AdminClient.wait, because cancelling wait() cancels the operation, and these tasks are
cancelled whenever the operator stops: an operator restart must not stop a warm half
way (the next operator finds the operation by the id kept in status and follows it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Protocol

from cachefs.common import errors
from cachefs.common.wire import DatasetInfo, OperationInfo
from server.k8s.crd import Key

log = logging.getLogger("cachefs.operator")


class _Operations(Protocol):
    async def operation(self, op_id: str) -> OperationInfo: ...
    async def status(self) -> dict[str, Any]: ...


class WarmFollower:
    def __init__(self, admin: _Operations, on_change: Callable[[Key], None], poll: float = 2.0, report: float = 15.0) -> None:
        self.admin = admin
        self.on_change = on_change
        self.poll = poll  # seconds between polls of an operation
        self.report = report  # seconds between reconciles asked for while it runs
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._last: dict[Key, OperationInfo] = {}  # last progress, or the final state

    def running(self, key: Key) -> bool:
        return key in self._tasks

    def last(self, key: Key) -> OperationInfo | None:
        return self._last.get(key)

    def follow(self, key: Key, op: OperationInfo) -> None:
        self.forget(key)
        self._tasks[key] = asyncio.create_task(self._follow(key, op), name=f"warm {key}")

    def forget(self, key: Key) -> None:
        """Stop following (the operation itself goes on) and drop what was seen."""
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
        self._last.pop(key, None)

    def close(self) -> None:
        for key in list(self._tasks):
            self.forget(key)

    async def _follow(self, key: Key, op: OperationInfo) -> None:
        current = op
        last_report = time.monotonic()
        while current.running:
            await asyncio.sleep(self.poll)
            try:
                current = await self.admin.operation(op.id)
            except errors.NotFound:
                current = OperationInfo(id=op.id, kind="warm", dataset=op.dataset, state="failed",
                                        message="the cache cluster no longer knows this operation (restarted?)")
            except errors.CachefsError as e:
                log.debug("%s: cannot read warm operation %s: %s", key, op.id, e)
                continue
            self._last[key] = current
            if time.monotonic() - last_report > self.report:
                last_report = time.monotonic()
                self.on_change(key)
        self._last[key] = current
        self._tasks.pop(key, None)
        log.info("%s: warm of %s %s", key, op.dataset, current.state)
        self.on_change(key)


class CachedFraction:
    """The fraction of a snapshot's bytes the cache holds, from GET /v1/status.

    One status answer serves every dataset for `ttl` seconds: a resync over a hundred
    resources asks the cluster once, not a hundred times."""

    def __init__(self, admin: _Operations, ttl: float = 2.0) -> None:
        self.admin = admin
        self.ttl = ttl
        self._at = 0.0
        self._doc: dict[str, Any] = {}

    async def _status(self) -> dict[str, Any] | None:
        if time.monotonic() - self._at > self.ttl:
            try:
                self._doc = await self.admin.status()
            except errors.CachefsError as e:
                log.debug("cannot read cluster status: %s", e)
                return None
            self._at = time.monotonic()
        return self._doc

    async def last_refresh(self, name: str) -> dict[str, Any] | None:
        """The dataset's last refresh or policy check, as `cachefs status` shows it (None: none yet)."""
        doc = await self._status()
        found = next((d for d in (doc or {}).get("datasets") or () if d.get("name") == name), None)
        return (found or {}).get("last_refresh")

    async def of(self, info: DatasetInfo) -> float | None:
        """None when the cluster cannot say."""
        if await self._status() is None:
            return None
        for d in self._doc.get("datasets") or ():
            if d.get("name") == info.name and "cached_bytes" in d:
                wanted = info.bytes * max(1, info.replicas)  # cached_bytes counts every copy
                if not wanted:
                    return 1.0
                return round(min(1.0, max(0.0, d["cached_bytes"] / wanted)), 4)
        return None
