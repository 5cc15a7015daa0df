"""Hosting a cache node in a Ray actor: the node and its HTTP server run on a loop of their own.

Ray runs an async actor's methods on its own event loop (uvloop), alongside Ray's own
work; measured there, a single-file request cost the node ~4x the CPU it costs on a plain
asyncio loop in a thread of its own. So the node, its stores and its aiohttp server live
on one dedicated loop (`cachefs-node`), and every actor method hands its work to that
loop: node state is still touched by one loop only, without locks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import ray

from cachefs.common import wire
from server.config import NodeConfig
from cachefs.common.settings import load
from cachefs.common.errors import Unavailable
from server.tls import server_context
from cachefs.common.wire import DatasetInfo
from server.coordinator import cachefs_error_or_raise
from server.listener import Listener
from server.node import CacheNode, OriginSpec
from server.peers import PeerConfig, PeerLoader
from shard import Ring

log = logging.getLogger(__name__)
T = TypeVar("T")


class CoordinatorLink:
    """The coordinator seen from a node: the `Directory` for datasets, and the admin API
    (wire.ADMIN_CALLS) forwarded as is, for the node's HTTP app to serve."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        """Call the coordinator; its errors arrive as ours (they pickle across Ray)."""
        try:
            return await getattr(self.handle, method).remote(*args)
        except ray.exceptions.RayActorError as e:
            raise Unavailable("the coordinator is not running; run `cachefs up` to restart the cluster") from e
        except ray.exceptions.RayTaskError as e:
            raise cachefs_error_or_raise(e) from None

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name not in wire.ADMIN_CALL:
            raise AttributeError(name)
        return functools.partial(self.call, name)

    async def dataset(self, name: str) -> tuple[DatasetInfo, bytes, OriginSpec]:
        info, ipc, url, opts = await self.call("node_dataset", name)
        return DatasetInfo.from_json(info), ipc, OriginSpec(url, opts)

    async def snapshot(self, name: str, snapshot: str) -> tuple[DatasetInfo, bytes, OriginSpec]:
        info, ipc, url, opts = await self.call("node_snapshot", name, snapshot)
        return DatasetInfo.from_json(info), ipc, OriginSpec(url, opts)

    async def lease(self, name: str, snapshot: str) -> float:
        return await self.call("lease_snapshot", name, snapshot)


def _set_priority(nice: int) -> None:
    """Serve at `nice` rather than Ray's 15 for actors, if this process may (NodeConfig.nice).

    On Linux a nice value belongs to a thread, so every thread of the worker is set (the
    event loop that serves readers is not necessarily the one running this)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError as e:  # not allowed (or the thread ended): serve at Ray's priority
            log.info("keeping the priority of thread %d (could not set nice %d: %s)", tid, nice, e)


def _new_loop() -> asyncio.AbstractEventLoop:
    """The node's loop: uvloop where it is installed (less CPU per request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class CacheNodeActor:
    """One cache node. Created by the coordinator's placement (server/hosting.py)."""

    def __init__(self, node_id: str, overrides: dict[str, Any], coordinator_name: str, namespace: str) -> None:
        logging.basicConfig(level=logging.INFO)
        # `up` decides some settings; the rest come from this host's [node] table and CACHEFS_* variables
        config = load(NodeConfig, overrides)
        _set_priority(config.nice)
        self.node_id = node_id
        self.config = config
        self.coordinator_name, self.namespace = coordinator_name, namespace
        self.coordinator = ray.get_actor(coordinator_name, namespace=namespace)
        self.link = CoordinatorLink(self.coordinator)
        self.node = CacheNode(node_id, config, self.link)
        self.peers = PeerLoader(PeerConfig(config.token, tls_ca=config.tls_cert))
        self.node.previous_owners = self.peers  # a moved unit is asked of its previous owner first
        self.node.dataset_names = self._dataset_names
        self.listener: Listener | None = None
        self.url = ""
        self._stopped = asyncio.Event()  # on Ray's loop: `wait_forever` waits on it there
        self._closing = False  # set first thing by `stop`: later calls are refused, never left hanging
        self.loop = _new_loop()
        threading.Thread(target=self.loop.run_forever, name="cachefs-node", daemon=True).start()

    async def _on_node_loop(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run `call()` on the node's loop and wait for it from Ray's."""
        if self._closing:  # stopping (a drain ended, `down`): its loop may never run the call
            raise Unavailable(f"cache node {self.node_id} has stopped")

        async def run() -> T:
            return await call()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self.loop))

    async def start(self) -> str:
        """Open the stores, listen, and join the ring; returns the URL clients use.

        Called again by every `cachefs up`: a running node then only re-registers, which
        is how nodes find a coordinator that was restarted.
        """
        return await self._on_node_loop(self._start)

    async def _start(self) -> str:
        if self.listener is not None:
            await self._join()
            return self.url
        await self.node.open()
        self.listener = Listener(self.node, self.link, self.config.token, self.config.admin_token)
        port = await self._listen()
        host = self.config.advertise_host or (
            self.config.host if self.config.host not in ("0.0.0.0", "::", "") else ray.util.get_node_ip_address())
        self.url = f"{'https' if self.config.tls_cert else 'http'}://{host}:{port}"
        await self._join()
        return self.url

    async def _listen(self) -> int:
        """Listen on the configured port; with port 0, on the port this node's disk used last
        time, so that a restarted node comes back at the same URL (clients keep working)."""
        assert self.listener is not None
        remembered = Path(self.config.disk_dir) / ".port" if self.config.disk_dir else None
        wanted = self.config.port
        if wanted == 0 and remembered is not None and remembered.exists():
            try:
                wanted = int(remembered.read_text())
            except ValueError:
                wanted = 0
        tls = server_context(self.config.tls_cert, self.config.tls_key) if self.config.tls_cert else None
        try:
            port = await self.listener.start(self.config.host, wanted, tls)
        except OSError:
            if self.config.port:
                raise
            port = await self.listener.start(self.config.host, 0, tls)
        if remembered is not None:
            remembered.parent.mkdir(parents=True, exist_ok=True)
            remembered.write_text(str(port))
        return port

    async def _join(self) -> None:
        self.coordinator = ray.get_actor(self.coordinator_name, namespace=self.namespace)
        self.link.handle = self.coordinator
        me = ray.get_runtime_context().current_actor
        # our epoch goes along: a coordinator that lost its own never publishes below it
        ring = await self.coordinator.register_node.remote(self.node_id, self.url, self.config.capacity, me,
                                                           self.node.ring.epoch)
        history = await self.coordinator.ring_history.remote()
        await self.node.change_ring(Ring.from_json(ring), [Ring.from_json(h) for h in history])

    async def _dataset_names(self) -> list[str]:
        return [d["name"] for d in await self.link.call("list_datasets")]

    async def wait_forever(self) -> None:
        """Held open by the coordinator: it fails exactly when this actor dies."""
        await self._stopped.wait()

    async def set_ring(self, doc: dict[str, Any], previous: dict[str, Any] | None = None) -> int:
        ring = Ring.from_json(doc)  # built here: a large ring takes a while, the node's loop keeps serving
        history = [Ring.from_json(previous)] if previous else []

        async def apply() -> int:
            await self.node.change_ring(ring, history)
            return self.node.ring.epoch

        return await self._on_node_loop(apply)

    async def dataset_changed(self, name: str) -> None:
        await self._on_node_loop(lambda: self.node.forget(name))

    async def dataset_updated(self, name: str) -> None:
        await self._on_node_loop(lambda: self.node.reload(name))

    async def warm(self, op_id: str, name: str, snapshot: str | None = None) -> dict[str, Any]:
        return (await self._on_node_loop(lambda: self.node.warm(op_id, name, snapshot))).to_json()

    async def warm_progress(self, op_id: str) -> dict[str, Any] | None:
        async def progress() -> dict[str, Any] | None:
            p = self.node.warm_progress(op_id)
            return p.to_json() if p else None

        return await self._on_node_loop(progress)

    async def cancel_warm(self, op_id: str) -> None:
        async def cancel() -> None:
            self.node.cancel_warm(op_id)

        await self._on_node_loop(cancel)

    async def stats(self) -> dict[str, Any]:
        async def stats() -> dict[str, Any]:
            return {**self.node.stats(), "url": self.url}

        return await self._on_node_loop(stats)

    async def cancel_rebalance(self) -> None:
        async def cancel() -> None:
            self.node.rebalance.cancel()

        await self._on_node_loop(cancel)

    async def leave(self) -> None:
        """The end of a drain: stop serving and end this actor (its work has moved)."""
        await self.stop()
        ray.actor.exit_actor()

    async def stop(self) -> None:
        if self._closing:
            return

        async def stop() -> None:
            await self.node.close()
            await self.peers.close()
            if self.listener is not None:
                await self.listener.close()
                self.listener = None

        await self._on_node_loop(stop)
        self._closing = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._stopped.set()
