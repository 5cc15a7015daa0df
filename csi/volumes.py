"""Publishing datasets as volumes: the node plugin's logic, free of gRPC.

Every operation runs in the same order: look up (NOT_FOUND) → check state
(FAILED_PRECONDITION, ALREADY_EXISTS) → already done? return → act → record. Arguments
were checked by the caller (csi.node) before. Operations on one target path are
serialised; different targets proceed in parallel.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

from cachefs.common.wire import ALL_NAMESPACES, DatasetInfo
from csi import errors, keeping
from csi.catalog import Catalog
from csi.config import CsiConfig, MountConfig
from csi.mounter import Health, Mounter, MountError, MountTimeout, mount_pids
from csi.mounts import find_mount
from csi.state import StateStore, VolumeRecord

log = logging.getLogger("cachefs.csi.volumes")


@dataclass(frozen=True)
class PublishRequest:
    """A checked NodePublishVolume: what to mount where, and for whom."""

    volume_id: str
    target: str
    dataset: str
    namespace: str = ""  # the pod's namespace when the CO sends pod info
    ephemeral: bool = False


@dataclass(frozen=True)
class VolumeStats:
    files: int
    bytes: int
    abnormal: bool
    message: str


class KeyedLocks:
    """One lock per key, created on demand."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()  # guards _locks

    @contextmanager
    def hold(self, key: str, timeout: float) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        if not lock.acquire(timeout=timeout):
            raise errors.Aborted(f"another operation on {key} is still running; retry later")
        try:
            yield
        finally:
            lock.release()


class VolumeManager:
    def __init__(self, store: StateStore, mounter: Mounter, catalog: Catalog, config: CsiConfig,
                 mount_config: MountConfig, base_env: Mapping[str, str] | None = None) -> None:
        self.store = store
        self.mounter = mounter
        self.catalog = catalog
        self.config = config
        self.mount_config = mount_config
        self.base_env = dict(os.environ if base_env is None else base_env)
        self._locks = KeyedLocks()
        # A target's lock is held for at most one mount start plus one stop.
        self._lock_timeout = config.mount_timeout + 2 * config.stop_timeout

    # ---- publish -------------------------------------------------------------------

    def publish(self, req: PublishRequest) -> None:
        with self._locks.hold(req.target, self._lock_timeout):
            info = self._lookup(req.dataset)
            self._authorize(info, req.namespace)
            record = self.store.get(req.target)
            if record is not None:
                if record.dataset != req.dataset or record.volume_id != req.volume_id:
                    raise errors.AlreadyExists(
                        f"{req.target} already holds volume {record.volume_id!r} (dataset {record.dataset!r}); "
                        f"it cannot also hold {req.volume_id!r} (dataset {req.dataset!r})")
                health, record = self._health(record)
                if health is Health.OK:
                    return  # idempotent: the same volume is already published there
                log.warning("volume %s on %s is %s; mounting it again", req.volume_id, req.target, health.value)
                self._teardown(req.target, record.pid)
            else:
                self._check_target(req.target)
            self._mount(req, info)

    def _lookup(self, dataset: str) -> DatasetInfo:
        endpoint = self.catalog.endpoint
        try:
            return self.catalog.lookup(dataset)
        except FileNotFoundError:
            raise errors.NotFound(
                f"dataset {dataset!r} is not registered in the cache cluster at {endpoint}; "
                f"register it with `cachefs dataset add {dataset} ORIGIN_URL`") from None
        except PermissionError as e:
            raise errors.Internal(f"the cache cluster at {endpoint} refused the plugin's token ({e}); "
                                  "check the token Secret mounted into the CSI plugin") from None
        except ValueError as e:
            raise errors.InvalidArgument(f"dataset {dataset!r}: {e}") from None
        except OSError as e:  # NodeUnavailable, timeouts, connection errors: all retryable
            raise errors.Unavailable(
                f"cannot ask the cache cluster at {endpoint} about dataset {dataset!r}: {e}") from None

    def _authorize(self, info: DatasetInfo, namespace: str) -> None:
        """Closed by default: a dataset mounts only in the namespaces it names ('*': all)."""
        allowed = info.allowed_namespaces
        if ALL_NAMESPACES in allowed:
            return
        if not allowed:
            raise errors.PermissionDenied(
                f"dataset {info.name!r} names no namespace that may mount it, so it mounts nowhere: register it "
                "with `cachefs dataset add ... --allow-namespace NS` (or '*' for every namespace), or through a "
                "CachedDataset in the namespace that mounts it")
        if not namespace:
            raise errors.PermissionDenied(
                f"dataset {info.name!r} may only be mounted from namespaces {list(allowed)}, and the request "
                "carries no pod namespace: set podInfoOnMount: true on the CSIDriver")
        if namespace not in allowed:
            raise errors.PermissionDenied(
                f"namespace {namespace!r} may not mount dataset {info.name!r}; allowed: {list(allowed)}")

    def _check_target(self, target: str) -> None:
        if os.path.lexists(target) and not os.path.isdir(target):
            raise errors.FailedPrecondition(f"{target} exists and is not a directory; cannot mount a volume there")
        if find_mount(target) is not None:
            # Ours, but with no record: the state was lost. Nobody can own it; replace it.
            log.warning("%s holds an unrecorded cachefs mount; unmounting it", target)
            self._teardown(target, pid=0)
        elif os.path.ismount(target):
            raise errors.FailedPrecondition(f"{target} is already a mount point of another filesystem")

    def _mount(self, req: PublishRequest, info: DatasetInfo) -> None:
        source = self.catalog.source(req.dataset)
        env = {**self.base_env, **self.catalog.mount_env()}
        log_path = self.store.log_path(req.target)
        try:
            pid = self.mounter.spawn(source, req.target, log_path=log_path, env=env, config=self.mount_config,
                                     fsname=source, mtime=info.created, keeper=self.config.keeper_socket)
        except OSError as e:
            raise errors.Internal(f"cannot start a mount process on {req.target}: {e}") from None
        record = VolumeRecord(volume_id=req.volume_id, target=req.target, dataset=req.dataset, source=source,
                              endpoint=self.catalog.endpoint, pid=pid, namespace=req.namespace,
                              ephemeral=req.ephemeral, files=info.files, bytes=info.bytes,
                              snapshot=info.snapshot, created=info.created)
        self.store.put(record)  # before waiting: a crash from here on leaves a record to clean up
        try:
            self.mounter.wait_ready(req.target, pid, timeout=self.config.mount_timeout, log_path=log_path)
        except MountError as e:
            self._teardown(req.target, pid)
            self._remove_dir(req.target)
            self.store.delete(req.target)
            kind = errors.DeadlineExceeded if isinstance(e, MountTimeout) else errors.Internal
            raise kind(f"mounting dataset {req.dataset!r} on {req.target} failed: {e}") from None
        log.info("published %s (dataset %s) on %s, mount process %d", req.volume_id, req.dataset, req.target, pid)

    def _health(self, record: VolumeRecord, revive: bool = True) -> tuple[Health, VolumeRecord]:
        """The mount's health, following its session: when the recorded process is gone, the
        keeper may have started another on the kept session (or is asked to, `revive`); the
        record then names that one."""
        health = self.mounter.health(record.target, record.pid)
        if health is not Health.BROKEN:
            return health, record
        pids = mount_pids(record.target)
        if not pids and revive and self.config.keeper_socket:
            try:
                if record.target in keeping.sessions(self.config.keeper_socket):
                    pid = keeping.revive(self.config.keeper_socket, record.target)
                    self.mounter.wait_ready(record.target, pid, timeout=self.config.mount_timeout)
                    pids = [pid]
            except (keeping.KeeperError, MountError) as e:
                log.warning("the keeper could not serve %s again: %s", record.target, e)
        if not pids or self.mounter.health(record.target, pids[0]) is not Health.OK:
            return Health.BROKEN, record
        record = VolumeRecord(**{**record.to_json(), "pid": pids[0]})
        self.store.put(record)
        log.info("%s is served by mount process %d on the kept session", record.target, pids[0])
        return Health.OK, record

    # ---- unpublish -----------------------------------------------------------------

    def unpublish(self, volume_id: str, target: str) -> None:
        with self._locks.hold(target, self._lock_timeout):
            record = self.store.get(target)
            if record is not None and record.volume_id != volume_id:
                raise errors.NotFound(f"{target} holds volume {record.volume_id!r}, not {volume_id!r}")
            if record is None and find_mount(target) is None and not os.path.lexists(target):
                return  # never published, or already unpublished
            if record is not None:  # the keeper may serve it with another process than recorded
                record = self._health(record, revive=False)[1]
            self._teardown(target, record.pid if record else 0)
            self._remove_dir(target)
            self.store.delete(target)
            log.info("unpublished %s from %s", volume_id, target)

    def _teardown(self, target: str, pid: int) -> None:
        try:
            self.mounter.stop(target, pid, timeout=self.config.stop_timeout)
        except MountError as e:
            raise errors.Internal(f"cannot unmount {target}: {e}") from None

    def _remove_dir(self, target: str) -> None:
        try:
            os.rmdir(target)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                log.warning("leaving %s in place: it is not empty, so it is not ours to delete", target)
            elif e.errno == errno.ENOTDIR:
                raise errors.FailedPrecondition(f"{target} is not a directory; not removing it") from None
            else:
                raise errors.Internal(f"cannot remove {target}: {e}") from None

    # ---- stats ---------------------------------------------------------------------

    def stats(self, volume_id: str, path: str) -> VolumeStats:
        record = self.store.get(path) if os.path.isabs(path) and "\x00" not in path else None
        if record is None or record.volume_id != volume_id:
            raise errors.NotFound(f"volume {volume_id!r} is not published at {path}")
        health, record = self._health(record, revive=False)
        if health is Health.OK:
            return VolumeStats(record.files, record.bytes, abnormal=False, message="mounted")
        message = {Health.BROKEN: "the mount process is gone (transport endpoint is not connected); "
                                  "the plugin remounts it on restart or on the next publish",
                   Health.ABSENT: "nothing is mounted at the target"}[health]
        return VolumeStats(record.files, record.bytes, abnormal=True, message=message)

    # ---- restart -------------------------------------------------------------------

    def recover(self) -> tuple[int, int, int]:
        """Re-adopt recorded mounts after a plugin restart; repair broken ones.

        Returns (adopted, repaired, dropped). A record whose pod directory is gone is
        dropped; one that cannot be repaired is kept, so NodeUnpublishVolume cleans up.
        """
        adopted = repaired = dropped = 0
        for record in list(self.store.all()):
            target = record.target
            try:
                with self._locks.hold(target, self._lock_timeout):
                    health, record = self._health(record)
                    if health is Health.OK:
                        adopted += 1
                        log.info("adopted %s on %s (mount process %d)", record.volume_id, target, record.pid)
                        continue
                    self._teardown(target, record.pid)
                    if not os.path.isdir(os.path.dirname(target)):
                        self.store.delete(target)
                        dropped += 1
                        log.info("dropped %s: %s no longer exists", record.volume_id, os.path.dirname(target))
                        continue
                    log.warning("repairing %s on %s (%s)", record.volume_id, target, health.value)
                    self._remount(record)
                    repaired += 1
            except (errors.VolumeError, MountError, OSError) as e:
                log.error("could not recover %s on %s: %s", record.volume_id, target, e)
        return adopted, repaired, dropped

    def _remount(self, record: VolumeRecord) -> None:
        env = {**self.base_env, **self.catalog.mount_env()}
        log_path = self.store.log_path(record.target)
        started = time.monotonic()
        pid = self.mounter.spawn(record.source, record.target, log_path=log_path, env=env,
                                 config=self.mount_config, fsname=record.source, mtime=record.created,
                                 keeper=self.config.keeper_socket)
        self.store.put(VolumeRecord(**{**record.to_json(), "pid": pid, "endpoint": self.catalog.endpoint}))
        self.mounter.wait_ready(record.target, pid, timeout=self.config.mount_timeout, log_path=log_path)
        log.info("remounted %s on %s in %.1f s (mount process %d)", record.volume_id, record.target,
                 time.monotonic() - started, pid)
