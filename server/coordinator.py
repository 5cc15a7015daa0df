"""The coordinator: membership, ring epochs, the dataset registry and long operations.

Hosted as a named Ray actor (server/hosting.py). Cache nodes register with it; it learns
that one died because the `wait_forever` call it keeps open on every node fails (Ray
tells it), and then publishes a new ring epoch to the others. It is never on the data
path: clients fetch blocks from the nodes directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachefs.common.errors import BadRequest, CachefsError, Cancelled, NotFound, Unavailable
from cachefs.common.wire import DatasetInfo, OperationInfo
from server.leases import Leases
from server.operations import Operation, Operations
from server.origin_policy import OriginPolicy
from server import epoch_state
from server.drain import DRAIN_DEADLINE, drain_plan, wait_for_rebalance
from server.placement import build_ring, choose_unit
from server.refresh_policy import PolicyLoop, RefreshPolicy
from server.registry import SETTINGS, DatasetSpec, Registry, origin_differs, parse_settings, take_snapshot
from shard import Ring

log = logging.getLogger(__name__)

CALL_TIMEOUT = 30.0  # a node that takes longer to answer a control call is skipped, not waited on


@dataclass
class NodeEntry:
    id: str
    url: str
    capacity: int
    handle: Any  # the node's Ray actor handle
    watch: asyncio.Task[None] | None = None
    draining: bool = False  # off the ring, still serving its blocks to their new owners


class Coordinator:
    def __init__(self, state_dir: str | None, block_size: int, policy: OriginPolicy) -> None:
        self.registry = Registry(state_dir)
        self.leases = Leases(state_dir)
        self.last_refresh: dict[str, dict[str, Any]] = {}  # dataset → its last refresh (or policy check)
        self.policy_loop = PolicyLoop(self._policies, self._origin_changed, self._policy_refresh, self._record_refresh)
        self.block_size = block_size
        self.policy = policy
        # The epoch survives a coordinator restart: nodes and clients ignore older epochs.
        self._epoch_file = Path(state_dir) / "epoch" if state_dir else None
        saved = epoch_state.load(self._epoch_file)
        self.ring = Ring(epoch=saved.epoch)
        self.weight_unit = saved.weight_unit  # capacity that weighs 1.0, fixed once (server/placement.py)
        self.state_problem = saved.problem
        self.history: list[Ring] = []  # the rings before this one, newest first: who held what
        self.nodes: dict[str, NodeEntry] = {}
        self._leaving: set[str] = set()  # drained nodes being stopped: not welcome back until they have
        self.ops = Operations()
        self.deaths = 0

    # -- membership --------------------------------------------------------------------
    async def register_node(self, node_id: str, url: str, capacity: int, handle: Any,
                            node_epoch: int = 0) -> dict[str, Any]:
        """A node joins (or rejoins after a restart); everyone gets the new ring. `node_epoch`
        is the ring the node last had: a coordinator that lost its state never goes below it."""
        self.policy_loop.start()  # on the actor's loop, once there is one
        if node_id in self._leaving:
            raise Unavailable(f"cache node {node_id} is leaving after a drain; it can start again once it has "
                              "stopped (the next `cachefs up`)")
        if node_epoch > self.ring.epoch:
            self.ring = Ring(self.ring.members, node_epoch, self.ring.vnodes)
        same = self.nodes.get(node_id)
        if same is not None and (same.url, same.capacity) == (url, capacity) and same.watch and not same.watch.done():
            return self.ring.to_json()  # a repeated `up`: nothing changed
        old = self.nodes.pop(node_id, None)
        if old is not None and old.watch is not None:
            old.watch.cancel()
        entry = NodeEntry(node_id, url, capacity, handle)
        self.nodes[node_id] = entry
        entry.watch = asyncio.ensure_future(self._watch(entry))
        await self._publish_ring()
        return self.ring.to_json()

    async def _watch(self, entry: NodeEntry) -> None:
        try:
            await entry.handle.wait_forever.remote()
        except asyncio.CancelledError:
            return
        except Exception as e:  # RayActorError and kin: the node is gone
            log.warning("cache node %s died: %s", entry.id, type(e).__name__)
        if self.nodes.get(entry.id) is entry:
            del self.nodes[entry.id]
            self.deaths += 1
            await self._publish_ring()

    def _build_ring(self) -> Ring:
        serving = [(n.id, n.url, n.capacity) for n in self.nodes.values() if not n.draining]
        if not self.weight_unit and serving:
            self.weight_unit = choose_unit(c for _, _, c in serving)
        return build_ring(serving, self.ring.epoch + 1, self.ring.vnodes, self.weight_unit)

    async def _publish_ring(self) -> None:
        previous = self.ring
        self.ring = self._build_ring()
        if previous.members:
            self.history = [previous, *self.history][:4]
        epoch_state.save(self._epoch_file, self.ring.epoch, self.weight_unit)
        await self._broadcast("set_ring", self.ring.to_json(), previous.to_json() if previous.members else None)

    def ring_history(self) -> list[dict[str, Any]]:
        """The earlier rings, for a node that (re)joins: who held what before it came."""
        return [r.to_json() for r in self.history]

    async def _broadcast(self, method: str, *args: Any) -> list[Any]:
        """Call `method` on every node; a node that fails or is slow is left to its watcher."""
        entries = list(self.nodes.values())

        async def call(e: NodeEntry) -> Any:
            try:
                return await asyncio.wait_for(getattr(e.handle, method).remote(*args), CALL_TIMEOUT)
            except Exception as exc:  # a dying node: its watcher removes it
                log.warning("%s on node %s failed: %s", method, e.id, exc)
                return None

        return list(await asyncio.gather(*(call(e) for e in entries)))

    def get_ring(self) -> dict[str, Any]:
        return self.ring.to_json()

    def node_ids(self) -> list[str]:
        return sorted(self.nodes)

    # -- drain ---------------------------------------------------------------------------
    async def list_nodes(self) -> list[dict[str, Any]]:
        """Every node: on the ring or draining, its URL, weight, bytes held, rebalance."""
        stats = {s["id"]: s for s in await self._broadcast("stats") if s}
        on_ring = {m.id: m.weight for m in self.ring.members}
        return [{"id": n.id, "url": n.url, "state": "draining" if n.draining else "serving",
                 "weight": on_ring.get(n.id, 0.0), "capacity": n.capacity,
                 "cached_bytes": sum(stats.get(n.id, {}).get("datasets", {}).values()),
                 "rebalance": stats.get(n.id, {}).get("rebalance", {})}
                for n in sorted(self.nodes.values(), key=lambda n: n.id)]

    async def drain_node(self, node_id: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Hand a node's blocks to their next owners, then end it: an operation to follow.

        The node leaves the ring first but keeps serving; every other node pulls what it now
        owns from it (server/rebalance.py) while readers' misses ask it too. When all have
        finished, or `deadline` seconds passed (what is left is read from the origin later,
        nothing fails), the node is stopped."""
        deadline = (body or {}).get("deadline", DRAIN_DEADLINE)
        entry = drain_plan(self.nodes, node_id, deadline)
        running = self.ops.running(node_id, "drain")
        if running is not None:
            return running.to_json()

        async def run(op: Operation) -> None:
            entry.draining = True
            await self._publish_ring()
            epoch = self.ring.epoch
            others = lambda: [n for n in self.nodes.values() if n.id != node_id]  # noqa: E731
            left = await wait_for_rebalance(op, epoch, deadline,
                                            lambda: self._stats_of(others()), lambda: self.nodes.get(node_id) is entry)
            if op.cancelled.is_set():  # back on the ring: nothing was lost
                entry.draining = False
                await self._publish_ring()
                op.info.state = "cancelled"
                return
            await self._end(entry)
            op.info.result = {"node": node_id, "epoch": epoch, "units_left": left}
            if left:
                op.info.message = (f"the deadline of {deadline:g} s passed with {left if left > 0 else 'some'} "
                                   "unit(s) not moved yet; "
                                   "readers will read them from the origin once")

        return self.ops.start("drain", node_id, run).to_json()

    async def _stats_of(self, entries: list[NodeEntry]) -> list[dict[str, Any]]:
        async def one(e: NodeEntry) -> dict[str, Any] | None:
            try:
                return await asyncio.wait_for(e.handle.stats.remote(), CALL_TIMEOUT)
            except Exception:  # a dead node: its watcher removes it; it has nothing to pull
                return None

        return [s for s in await asyncio.gather(*(one(e) for e in entries)) if s]

    async def _end(self, entry: NodeEntry) -> None:
        """A drained node leaves: forgotten here first (its death is no surprise), then ended."""
        if self.nodes.get(entry.id) is entry:
            del self.nodes[entry.id]
        if entry.watch is not None:
            entry.watch.cancel()
        self._leaving.add(entry.id)
        try:
            await asyncio.wait_for(entry.handle.leave.remote(), CALL_TIMEOUT)
        except Exception as e:  # it exits by raising (ray.actor.exit_actor), or was already gone
            log.info("drained node %s ended (%s)", entry.id, type(e).__name__)
        finally:
            self._leaving.discard(entry.id)

    def set_origin_policy(self, policy: OriginPolicy) -> None:
        """Every `cachefs up` hands over its allowlist: the last `up` decides."""
        self.policy = policy

    # -- datasets ----------------------------------------------------------------------
    def list_datasets(self) -> list[dict[str, Any]]:
        return [i.to_json() for i in self.registry.list()]

    def node_dataset(self, name: str) -> tuple[dict[str, Any], bytes, str, dict[str, Any]]:
        """What a node needs to serve a dataset; storage options stay inside the cluster."""
        rec = self.registry.get(name)
        return rec.info.to_json(), rec.manifest_ipc, rec.info.origin, rec.storage_options

    def node_snapshot(self, name: str, snapshot: str) -> tuple[dict[str, Any], bytes, str, dict[str, Any]]:
        """`node_dataset` for a given snapshot: the current one or one a lease keeps (else
        SnapshotGone, or NotFound for one the dataset never had)."""
        current = self.registry.get(name)
        rec = self.leases.find(name, snapshot, current)
        info = {**rec.info.to_json(), "lease": current.info.lease}
        return info, rec.manifest_ipc, rec.info.origin, current.storage_options

    def lease_snapshot(self, name: str, snapshot: str) -> float:
        """A reader loaded `snapshot`: keep it readable for the dataset's lease; when that ends."""
        current = self.registry.get(name)
        self.leases.find(name, snapshot, current)
        return self.leases.take(name, snapshot, current.info.lease)

    async def add_dataset(self, body: dict[str, Any]) -> dict[str, Any]:
        self.policy_loop.start()
        spec = DatasetSpec.parse(body, self.block_size)
        await self.policy.check(spec.origin, spec.storage_options)
        existing = self.registry.check_add(spec)

        async def run(op: Operation) -> None:
            if existing is not None:  # the same add again: nothing to list
                op.info.result = existing.info.to_json()
                return
            record = await self._snapshot(op, spec)
            self.registry.check_add(spec)  # someone may have added it meanwhile
            self.registry.put(record)
            op.info.result = record.info.to_json()

        return self.ops.start("add", spec.name, run).to_json()

    async def refresh_dataset(self, name: str, body: dict[str, Any] | None = None,
                              trigger: str = "manual") -> dict[str, Any]:
        """A new snapshot of the origin. `{"warm": true}`: warmed first, made current only
        once every node holds its share; until then (or if that fails) readers get the old one."""
        body = body or {}
        if not isinstance(body, dict) or set(body) - {"warm"} or not isinstance(body.get("warm", False), bool):
            raise BadRequest('a refresh takes {"warm": true|false} or no body')
        warm = body.get("warm", False)
        old = self.registry.get(name)
        await self.policy.check(old.info.origin, old.storage_options)  # the allowlist may have changed since
        spec = DatasetSpec(name, old.info.origin, old.storage_options, old.info.replicas, old.info.allowed_namespaces,
                           old.info.block_size, old.info.pack_threshold, old.info.lease, old.info.refresh)

        async def run(op: Operation) -> None:
            record = await self._snapshot(op, spec, old)
            if record.info.snapshot == old.info.snapshot:
                op.info.result = {**old.info.to_json(), "changed": False}
                return
            if warm:
                await self._warm_before_swap(op, record)
            replaced = self.registry.get(name)
            self.registry.put(record)
            self.leases.replaced(replaced)  # kept readable while a reader's lease on it lasts
            await self._broadcast("dataset_updated", name)  # nodes load the new snapshot; blocks stay
            op.info.result = {**record.info.to_json(), "changed": True}

        info = self.ops.start("refresh", name, run)
        task = self.ops.get(info.id).task
        assert task is not None
        task.add_done_callback(lambda _: self._record_refresh(name, {
            "trigger": trigger, "operation": info.id, "state": info.state, "time": info.finished,
            "changed": bool(info.result.get("changed")), "snapshot": info.result.get("snapshot", ""),
            "message": info.message}))
        return info.to_json()

    # -- refresh policies (server/refresh_policy.py) -----------------------------------------
    def _policies(self) -> dict[str, RefreshPolicy]:
        return {i.name: RefreshPolicy.parse(i.refresh) for i in self.registry.list() if i.refresh}

    async def _origin_changed(self, name: str) -> bool:
        """Do the origin's files (path, size, version token) differ from the snapshot's?"""
        record = self.registry.get(name)
        return await asyncio.to_thread(origin_differs, record)

    async def _policy_refresh(self, name: str, warm: bool, trigger: str) -> None:
        if self.ops.running(name, "refresh") is None:
            await self.refresh_dataset(name, {"warm": warm} if warm else {}, trigger)

    def _record_refresh(self, name: str, result: dict[str, Any]) -> None:
        if name in self.registry.names():
            self.last_refresh[name] = result

    async def _warm_before_swap(self, op: Operation, record: Any) -> None:
        """Warm `record`'s snapshot on every node while the current one keeps serving; raise
        (the refresh fails, nothing changes for readers) unless all of it got cached."""
        snapshot, current = record.info.snapshot, self.registry.get(record.info.name).info.snapshot
        self.leases.pend(record)
        try:
            op.info.message = f"warming snapshot {snapshot}; {current} serves until it is warm"
            reports = await self._broadcast_warm(op, snapshot)
        finally:
            self.leases.unpend(record)
        if op.cancelled.is_set():
            raise Cancelled("cancelled by request")
        failed = sorted({p for r in reports for p in r.failures} | set(op.info.failures))
        if failed or len(reports) < len(self.nodes):
            raise Unavailable(f"snapshot {snapshot} was not made current: {len(failed)} file(s) failed to warm "
                              f"(first: {failed[:3]}), or a node left; snapshot {current} still serves. "
                              "Refresh again once the origin is readable")
        op.info.message = ""

    async def _snapshot(self, op: Operation, spec: DatasetSpec, previous: Any = None):  # -> DatasetRecord
        def progress(files: int, nbytes: int) -> None:
            op.info.done_files, op.info.done_bytes = files, nbytes

        record = await asyncio.to_thread(take_snapshot, spec, progress, op.cancelled, previous)
        op.info.total_files, op.info.total_bytes = record.info.files, record.info.bytes
        return record

    async def update_dataset(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """New settings in place (replicas, allowed namespaces, storage options): the same
        snapshot, every cached block kept; nodes reload the dataset's settings."""
        if not isinstance(body, dict):
            raise BadRequest(f"an update is a JSON object of settings ({', '.join(SETTINGS)})")
        settings = parse_settings(body)
        old = self.registry.get(name)
        if "storage_options" in settings:
            await self.policy.check(old.info.origin, settings["storage_options"])
        record = self.registry.update(name, settings)
        await self._broadcast("dataset_updated", name)
        return record.info.to_json()

    async def remove_dataset(self, name: str) -> dict[str, Any]:
        self.registry.remove(name)
        self.leases.forget(name)
        self.last_refresh.pop(name, None)
        await self._broadcast("dataset_changed", name)
        return {"removed": name}

    # -- warm-up -------------------------------------------------------------------------
    async def warm_dataset(self, name: str) -> dict[str, Any]:
        info = self.registry.get(name).info
        running = self.ops.running(name, "warm")
        if running is not None:
            return running.to_json()  # one warm-up per dataset at a time; join it
        if not self.nodes:
            raise BadRequest("no cache nodes are up: run `cachefs up` first")

        async def run(op: Operation) -> None:
            op.info.total_files, op.info.total_bytes = info.files, info.bytes * info.replicas
            reports = await self._broadcast_warm(op)
            self._fold(op.info, reports)
            if op.cancelled.is_set():
                op.info.state = "cancelled"
            elif op.info.failures or len(reports) < len(self.nodes):
                op.info.state = "failed"
                op.info.message = f"{len(op.info.failures)} file(s) failed to warm"

        return self.ops.start("warm", name, run).to_json()

    async def _broadcast_warm(self, op: Operation, snapshot: str | None = None) -> list[OperationInfo]:
        entries = list(self.nodes.values())

        async def one(e: NodeEntry) -> OperationInfo | None:
            try:
                return OperationInfo.from_json(await e.handle.warm.remote(op.info.id, op.info.dataset, snapshot))
            except Exception as exc:  # the node died mid-warm: say so in the report
                op.info.failures[f"<node {e.id}>"] = f"node failed during warm-up: {type(exc).__name__}"
                return None

        return [r for r in await asyncio.gather(*(one(e) for e in entries)) if r is not None]

    @staticmethod
    def _fold(info: OperationInfo, reports: list[OperationInfo]) -> None:
        """Sum the nodes' progress into one operation (bytes count each replica)."""
        info.done_bytes = sum(r.done_bytes for r in reports)
        failed = {p for r in reports for p in r.failures}
        # A file's blocks spread over nodes: until the end, the sum over nodes is an estimate.
        info.done_files = (min(info.total_files, sum(r.done_files for r in reports)) if info.running
                           else info.total_files - len(failed))
        info.total_bytes = max(info.total_bytes, sum(r.total_bytes for r in reports))
        for r in reports:
            info.failures.update(r.failures)
            if r.message:
                info.message = r.message

    async def operation(self, op_id: str) -> dict[str, Any]:
        op = self.ops.get(op_id)
        if op.info.kind == "warm" and op.info.running:
            reports = [OperationInfo.from_json(r) for r in await self._broadcast("warm_progress", op_id) if r]
            self._fold(op.info, reports)
        return op.info.to_json()

    async def cancel(self, op_id: str) -> dict[str, Any]:
        op = self.ops.cancel(op_id)
        if op.info.kind in ("warm", "refresh"):  # a refresh --warm warms too
            await self._broadcast("cancel_warm", op_id)
        return op.info.to_json()

    # -- status --------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        stats = [s for s in await self._broadcast("stats") if s]
        urls = {n.id: n.url for n in self.nodes.values()}
        for s in stats:
            s["url"] = urls.get(s["id"], "")
        datasets = []
        for info in self.registry.list():
            cached = sum(s["datasets"].get(info.name, 0) for s in stats)
            datasets.append({**info.to_json(), "cached_bytes": cached, "last_refresh": self.last_refresh.get(info.name),
                             "kept_snapshots": self.leases.kept(info.name)})
        draining = {n.id for n in self.nodes.values() if n.draining}
        for s in stats:
            s["state"] = "draining" if s["id"] in draining else "serving"
        return {"epoch": self.ring.epoch, "nodes": sorted(stats, key=lambda s: s["id"]),
                "datasets": datasets, "deaths": self.deaths, "time": time.time(),
                **({"problem": self.state_problem} if self.state_problem else {})}


def cachefs_error_or_raise(e: BaseException) -> CachefsError:
    """Ray wraps an actor's exception; give back ours (its cause) when it is one."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, CachefsError):
        return cause
    if isinstance(e, CachefsError):
        return e
    raise e


__all__ = ["Coordinator", "NotFound", "DatasetInfo", "cachefs_error_or_raise"]
