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

from cachefs.common import wire
from cachefs.config import ClientConfig
from cachefs.common.errors import CachefsError, Forbidden
from cachefs.transport import Endpoints, Transport
from cachefs.common.wire import DatasetInfo, OperationInfo

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

    async def call(self, name: str, *args: Any) -> Any:
        """One call of the admin API (wire.ADMIN_CALLS): the route's parameters, then the
        body if the call takes one; the answer read as the table says."""
        c = wire.ADMIN_CALL[name]
        path = wire.route(c.route, **dict(zip(c.params, args)))
        doc = await self._call(c.method, path, args[len(c.params)] if c.body else None)
        return c.reads(doc[c.wrap] if c.wrap else doc)

    # -- the calls with arguments worth naming; the others are made from the table below ---
    async def add_dataset(self, name: str, origin: str, storage_options: dict[str, Any] | None = None,
                          replicas: int = 1, allowed_namespaces: Sequence[str] = (),
                          pack_threshold: int | None = None, lease: float | None = None,
                          refresh: dict[str, Any] | None = None) -> OperationInfo:
        body: dict[str, Any] = {"name": name, "origin": origin, "storage_options": storage_options or {},
                                "replicas": replicas, "allowed_namespaces": list(allowed_namespaces)}
        if pack_threshold is not None:
            body["pack_threshold"] = pack_threshold
        if lease is not None:
            body["lease"] = lease
        if refresh is not None:
            body["refresh"] = refresh
        return await self.call("add_dataset", body)

    async def refresh_dataset(self, name: str, warm: bool = False) -> OperationInfo:
        """A new snapshot of the origin; with `warm`, made current only once it is cached."""
        return await self.call("refresh_dataset", name, {"warm": True} if warm else {})

    async def update_dataset(self, name: str, *, replicas: int | None = None,
                             allowed_namespaces: Sequence[str] | None = None,
                             storage_options: dict[str, Any] | None = None, lease: float | None = None,
                             refresh: dict[str, Any] | None = None) -> DatasetInfo:
        """Change settings in place: same snapshot, cached blocks kept."""
        body: dict[str, Any] = {k: v for k, v in (("replicas", replicas), ("storage_options", storage_options),
                                                  ("lease", lease), ("refresh", refresh)) if v is not None}
        if allowed_namespaces is not None:
            body["allowed_namespaces"] = list(allowed_namespaces)
        return await self.call("update_dataset", name, body)

    async def get_dataset(self, name: str) -> DatasetInfo:
        return DatasetInfo.from_json(await self._call("GET", wire.route(wire.DATASET, name=name)))

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

    async def ring(self) -> dict[str, Any]:
        return await self._call("GET", wire.RING)

    async def health(self) -> dict[str, Any]:
        return await self._call("GET", wire.HEALTH)

    async def metrics(self) -> str:
        body, _ = await self.endpoints.call(self.transport, "GET", wire.METRICS, raw=True)
        return body.decode()


def _admin_method(call: wire.AdminCall) -> Callable[..., Any]:
    async def method(self: AdminClient, *args: Any) -> Any:
        return await self.call(call.name, *args)

    method.__name__ = method.__qualname__ = call.name
    method.__doc__ = f"{call.method} {call.route} (wire.ADMIN_CALLS)"
    return method


for _call in wire.ADMIN_CALLS:  # list_datasets, remove_dataset, refresh_dataset, warm_dataset, operation, ...
    if not hasattr(AdminClient, _call.name):
        setattr(AdminClient, _call.name, _admin_method(_call))
del _call
