"""The operator's loop: list and watch CachedDatasets, feed a work queue, reconcile.

Level-triggered, like client-go controllers: an event only says "look at this key
again"; the worker reconciles the latest object from the local store. So nothing is
lost when the operator restarts (it lists everything first), when the watch breaks
(it lists again), or when a reconcile fails (the key comes back with backoff). A
periodic resync re-reconciles every key, which refreshes cachedFraction and re-adds
datasets a restarted cache cluster lost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from server.k8s.crd import Key, key_of
from server.k8s.kube import KubeApi, KubeError
from server.k8s.reconciler import Reconciler, Retry
from server.k8s.workqueue import ShutDown, WorkQueue

log = logging.getLogger("cachefs.operator")


class Controller:
    def __init__(
        self,
        kube: KubeApi,
        reconciler: Reconciler,
        queue: WorkQueue[Key],
        namespaces: Sequence[str] | None,
        workers: int = 4,
        resync: float = 60.0,
        relist_delay: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.kube = kube
        self.reconciler = reconciler
        self.queue = queue
        self.namespaces: list[str | None] = list(namespaces) if namespaces else [None]  # None: all
        self.workers = workers
        self.resync = resync
        self.relist_delay = relist_delay  # (first, longest) pause after a failed list or watch
        self.store: dict[Key, dict[str, Any]] = {}  # latest object per key, from list and watch
        self.synced = asyncio.Event()  # set once every namespace has been listed
        self._listed: set[str | None] = set()

    async def run(self) -> None:
        """Run until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                for ns in self.namespaces:
                    tg.create_task(self._list_and_watch(ns), name=f"watch {ns or '*'}")
                for i in range(self.workers):
                    tg.create_task(self._work(), name=f"worker {i}")
                tg.create_task(self._resync(), name="resync")
        finally:
            self.queue.shutdown()
            await self.reconciler.close()

    # ---- list and watch --------------------------------------------------------------

    def _in(self, ns: str | None, key: Key) -> bool:
        return ns is None or key.namespace == ns

    async def _list_and_watch(self, ns: str | None) -> None:
        first, longest = self.relist_delay
        delay = first
        while True:
            try:
                items, version = await self.kube.list(ns)
                listed = {key_of(obj): obj for obj in items}
                for key in [k for k in self.store if self._in(ns, k) and k not in listed]:
                    del self.store[key]  # deleted while we were not watching
                    self.reconciler.forget(key)
                for key, obj in listed.items():
                    self.store[key] = obj
                    self.queue.add(key)
                self._listed.add(ns)
                if len(self._listed) == len(self.namespaces):
                    self.synced.set()
                delay = first
                while True:  # the server ends each watch after a while: watch again from where we were
                    async for event in self.kube.watch(ns, version):
                        version = event.resource_version or version
                        if event.type == "BOOKMARK":
                            continue
                        key = key_of(event.object)
                        if event.type == "DELETED":
                            self.store.pop(key, None)
                            self.reconciler.forget(key)
                        else:
                            self.store[key] = event.object
                            self.queue.add(key)
            except KubeError as e:
                if e.status == 410:
                    log.info("watch of %s expired: listing again", ns or "all namespaces")
                    continue
                log.warning("list/watch of %s failed: %s; again in %.1fs", ns or "all namespaces", e, delay)
                await asyncio.sleep(delay)
                delay = min(longest, delay * 2)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync)
            for key in list(self.store):
                self.queue.add(key)

    # ---- workers ---------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            try:
                key = await self.queue.get()
            except ShutDown:
                return
            try:
                await self._reconcile(key)
            finally:
                self.queue.done(key)

    async def _reconcile(self, key: Key) -> None:
        obj = self.store.get(key)
        if obj is None:
            self.queue.forget(key)
            return
        try:
            newest = await self.reconciler.reconcile(obj)
        except Retry as e:
            delay = self.queue.retry(key)
            log.warning("%s: %s; retrying in %.1fs", key, e, delay)
            return
        except Exception:  # a bug met by one resource must not stop the others
            delay = self.queue.retry(key)
            log.exception("%s: unexpected error; retrying in %.1fs", key, delay)
            return
        self.queue.forget(key)
        # Keep what our own patches returned, unless the watch brought something newer.
        if self.store.get(key) is obj and newest is not obj:
            self.store[key] = newest
