"""The admin client: datasets, operations and status over the HTTP API (docs/api.md).

Used by the CLI and the Kubernetes operator. Any node answers admin calls, so the
client asks its endpoint and, if that does not answer, the other nodes it knows of.
It sends the admin token when it has one (that token opens the reader routes too), and
the reader token otherwise, so read-only commands work with the reader token alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Callable, Sequence

from cachefs import wire
from cachefs.config import ClientConfig
from cachefs.errors import CachefsError, Forbidden
from cachefs.transport import Endpoints, Transport
from cachefs.wire import DatasetInfo, OperationInfo

Progress = Callable[[OperationInfo], None]


class AdminClient:
    def __init__(self, config: ClientConfig, transport: Transport | None = None) -> None:
        config.require_endpoint()
        self.config = config
        self.transport = transport or Transport(dataclasses.replace(config, token=config.admin_token or config.token))
        self.endpoints = Endpoints(config.endpoints)
        self._learned = False

    async def __aenter__(self) -> "AdminClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.transport.close()

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        if not self._learned:  # know every node, so admin calls survive the loss of the first
            self._learned = True
            ring = await self.endpoints.call(self.transport, "GET", wire.RING)
            self.endpoints.learn([n.get("url", "") for n in ring.get("nodes", [])])
        try:
            return await self.endpoints.call(self.transport, method, path, body)
        except Forbidden as e:
            if e.extra.get("needs") != wire.ADMIN or self.config.admin_token:
                raise
            raise Forbidden(f"{e.message} (this client has only a reader token: no CACHEFS_ADMIN_TOKEN, "
                            "--admin-token or admin_token in the cluster file)", **e.extra) from None

    # -- datasets ------------------------------------------------------------------------
    async def list_datasets(self) -> list[DatasetInfo]:
        doc = await self._call("GET", wire.DATASETS)
        return [DatasetInfo.from_json(d) for d in doc["datasets"]]

    async def get_dataset(self, name: str) -> DatasetInfo:
        return DatasetInfo.from_json(await self._call("GET", wire.route(wire.DATASET, name=name)))

    async def add_dataset(self, name: str, origin: str, storage_options: dict[str, Any] | None = None,
                          replicas: int = 1, allowed_namespaces: Sequence[str] = ()) -> OperationInfo:
        body = {"name": name, "origin": origin, "storage_options": storage_options or {},
                "replicas": replicas, "allowed_namespaces": list(allowed_namespaces)}
        return OperationInfo.from_json((await self._call("POST", wire.DATASETS, body))["operation"])

    async def refresh_dataset(self, name: str) -> OperationInfo:
        doc = await self._call("POST", wire.route(wire.DATASET_REFRESH, name=name))
        return OperationInfo.from_json(doc["operation"])

    async def remove_dataset(self, name: str) -> None:
        await self._call("DELETE", wire.route(wire.DATASET, name=name))

    async def warm_dataset(self, name: str) -> OperationInfo:
        doc = await self._call("POST", wire.route(wire.DATASET_WARM, name=name))
        return OperationInfo.from_json(doc["operation"])

    # -- operations ----------------------------------------------------------------------
    async def operation(self, op_id: str) -> OperationInfo:
        return OperationInfo.from_json(await self._call("GET", wire.route(wire.OPERATION, op_id=op_id)))

    async def cancel(self, op_id: str) -> OperationInfo:
        return OperationInfo.from_json(await self._call("DELETE", wire.route(wire.OPERATION, op_id=op_id)))

    async def wait(self, op: OperationInfo, progress: Progress | None = None, timeout: float | None = None,
                   poll: float = 0.25) -> OperationInfo:
        """Poll until the operation ends; cancelling this coroutine cancels the operation."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while op.running:
                if progress is not None:
                    progress(op)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"operation {op.id} ({op.kind} {op.dataset}) still running after {timeout} s")
                await asyncio.sleep(poll)
                op = await self.operation(op.id)
        except (asyncio.CancelledError, KeyboardInterrupt):
            await asyncio.shield(self._cancel_quietly(op.id))
            raise
        if progress is not None:
            progress(op)
        return op

    async def _cancel_quietly(self, op_id: str) -> None:
        try:
            await self.cancel(op_id)
        except CachefsError:
            pass

    async def status(self) -> dict[str, Any]:
        return await self._call("GET", wire.STATUS)

    async def ring(self) -> dict[str, Any]:
        return await self._call("GET", wire.RING)

    async def health(self) -> dict[str, Any]:
        return await self._call("GET", wire.HEALTH)

    async def metrics(self) -> str:
        body, _ = await self.endpoints.call(self.transport, "GET", wire.METRICS, raw=True)
        return body.decode()
