"""What the operator does for one CachedDataset: bring cachefs and the resource into step.

`Reconciler.reconcile(obj)` is idempotent and safe to call any number of times with
the latest object; the controller calls it on every change and every resync. The
decisions are pure functions of (spec, what cachefs answers, what the operator knows) in
server/k8s/decide.py, tested as tables; this module gathers their inputs and carries them
out. In order:

1. Being deleted → remove the dataset from cachefs (already gone is fine), then drop
   our finalizer. Until then the resource stays, so a delete is never lost.
2. No finalizer yet → add it (with the object's resourceVersion: a finalizer another
   controller added meanwhile is never dropped).
3. Spec invalid → say so in status; nothing else until the spec changes.
4. `decide.plan`: not registered → add it; registered with other settings (replicas,
   namespaces, storage options, the Secret's version) → update it in place (PATCH, the
   cache is kept); another origin → remove and add; a name this resource did not
   register → report the conflict. Spec changed or a refresh requested → refresh.
   `decide.warming`: warm when `warmOnCreate` (after every new snapshot) or when a warm
   is requested.
5. Write status (`decide.status_patch`: only when it differs, so a status write never
   triggers a loop).

Failures that may pass (API server or cachefs unreachable, 5xx, origin unavailable,
timeouts) raise `Retry`: the controller retries the key with backoff. Failures only
the resource's owner can fix are written into status and not raised.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Mapping, Protocol, Sequence

from cachefs.common import errors
from cachefs.common.settings import format_size
from cachefs.common.wire import DatasetInfo, OperationInfo
from server.k8s.crd import (
    FINALIZER,
    READY,
    REFRESH_ANNOTATION,
    WARM,
    WARM_ANNOTATION,
    DatasetSpec,
    InvalidSpec,
    Key,
    Resource,
    condition,
    dataset_name,
    now_rfc3339,
)
from server.k8s import decide
from server.k8s.decide import Desired, Known, Observed, Register, Warm
from server.k8s.kube import KubeApi, KubeError
from server.k8s.warming import CachedFraction, WarmFollower

log = logging.getLogger("cachefs.operator")


class Admin(Protocol):
    """The part of cachefs.admin.AdminClient the operator uses."""

    async def get_dataset(self, name: str) -> DatasetInfo: ...
    async def add_dataset(
        self, name: str, origin: str, storage_options: Mapping[str, Any] | None = None,
        replicas: int = 1, allowed_namespaces: tuple[str, ...] | list[str] = (), *,
        refresh: dict[str, Any] | None = None,
    ) -> OperationInfo: ...
    async def update_dataset(self, name: str, *, replicas: int | None = None,
                             allowed_namespaces: Sequence[str] | None = None,
                             storage_options: dict[str, Any] | None = None,
                             refresh: dict[str, Any] | None = None) -> DatasetInfo: ...
    async def refresh_dataset(self, name: str) -> OperationInfo: ...
    async def remove_dataset(self, name: str) -> Any: ...
    async def warm_dataset(self, name: str) -> OperationInfo: ...
    async def operation(self, op_id: str) -> OperationInfo: ...
    async def wait(self, op: OperationInfo, progress: Any = None, timeout: float | None = None) -> OperationInfo: ...
    async def status(self) -> dict[str, Any]: ...


class Retry(Exception):
    """Try this resource again later, with backoff; the message says why."""


class _Blocked(Exception):
    """The resource cannot progress until something outside it changes (a Secret, the
    origin); reported in status as Ready=False with `reason`, then retried."""

    def __init__(self, reason: str, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry = retry


# cachefs errors only the resource's owner can fix: reported, retried at resync pace.
_OWNER_ERRORS: tuple[type[errors.CachefsError], ...] = (errors.BadRequest, errors.Conflict)


class Reconciler:
    def __init__(
        self,
        kube: KubeApi,
        admin: Admin,
        on_change: Callable[[Key], None] = lambda key: None,
        op_timeout: float = 600.0,
        status_ttl: float = 2.0,
        warm_poll: float = 2.0,
        warm_report: float = 15.0,
    ) -> None:
        self.kube = kube
        self.admin = admin
        self.on_change = on_change  # asks the controller to reconcile a key again
        self.op_timeout = op_timeout  # longest wait for an add or a refresh (lists the origin)
        self.warms = WarmFollower(admin, on_change, poll=warm_poll, report=warm_report)
        self.cached = CachedFraction(admin, ttl=status_ttl)
        # The status last meant for each resource, written or not. Decisions read it
        # rather than the object's status, so a failed status write followed by a retry
        # does not register, refresh or warm a second time.
        self._intent: dict[Key, dict[str, Any]] = {}

    # ---- entry points ------------------------------------------------------------

    async def reconcile(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Act on the latest `obj`; returns the newest version of it this call saw."""
        res = Resource.from_object(obj)
        try:
            if res.deleting:
                return await self._finalize(res, obj)
            if not res.has_finalizer:
                obj = await self.kube.patch_finalizers(res.key, [*res.finalizers, FINALIZER], res.resource_version)
                res = Resource.from_object(obj)
            return await self._converge(res, obj)
        except KubeError as e:
            if e.status == 404:
                return obj  # gone meanwhile; the watch will tell
            raise Retry(str(e)) from e

    def forget(self, key: Key) -> None:
        """The resource is gone: stop following its warm operation, drop what we meant."""
        self._intent.pop(key, None)
        self.warms.forget(key)

    async def close(self) -> None:
        self.warms.close()

    # ---- delete ------------------------------------------------------------------

    async def _finalize(self, res: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        if not res.has_finalizer:
            return obj
        self.forget(res.key)
        try:
            name = dataset_name(res.key)
        except InvalidSpec:
            name = ""  # never registered: nothing to remove
        if name:
            try:
                await self.admin.remove_dataset(name)
                log.info("%s: removed dataset %s", res.key, name)
            except errors.NotFound:
                pass
            except errors.CachefsError as e:
                raise Retry(f"cannot remove dataset {name}: {e}") from e
        rest = [f for f in res.finalizers if f != FINALIZER]
        return await self.kube.patch_finalizers(res.key, rest, res.resource_version)

    # ---- create / update ---------------------------------------------------------

    async def _converge(self, res: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        known = self._known(res)
        status = dict(known)
        try:
            spec = DatasetSpec.parse(res.spec)
            name = dataset_name(res.key)
        except InvalidSpec as e:
            status.update(observedGeneration=res.generation, lastError=str(e))
            self._set(status, res, READY, False, "InvalidSpec", str(e))
            return await self._write(res, obj, status)
        status["dataset"] = name
        try:
            info = await self._ensure_registered(res, spec, name, known, status)
        except _Blocked as e:
            status["lastError"] = e.message
            self._set(status, res, READY, False, e.reason, e.message)
            obj = await self._write(res, obj, status)
            if e.retry:
                raise Retry(f"{res.key}: {e.message}") from e
            return obj
        except errors.CachefsError as e:
            # cachefs unreachable or failing: keep what status says, record why, retry.
            status["lastError"] = f"cachefs: {e}"
            if not self._condition(status, READY):
                self._set(status, res, READY, False, "Pending", "waiting for the cache cluster")
            obj = await self._write(res, obj, status)
            raise Retry(f"{res.key}: cachefs: {e}") from e
        status.update(
            snapshot=info.snapshot, files=info.files, bytes=info.bytes,
            observedGeneration=res.generation, lastError="",
        )
        self._set(
            status, res, READY, True, "Registered",
            f"snapshot {info.snapshot}: {info.files} files, {format_size(info.bytes)}",
        )
        await self._update_warmth(res, spec, name, info, known, status)
        await self._refresh_status(name, status)
        return await self._write(res, obj, status)

    async def _refresh_status(self, name: str, status: dict[str, Any]) -> None:
        """`status.lastRefresh`: the last refresh (or check) the dataset's policy made, or any refresh."""
        last = await self.cached.last_refresh(name)
        if last:  # every field, each time: the status is merge-patched, so one left out would keep its old value
            status["lastRefresh"] = {"trigger": last.get("trigger", ""), "state": last.get("state", ""),
                                     "time": last.get("time") or 0.0, "changed": bool(last.get("changed")),
                                     "snapshot": last.get("snapshot", ""), "message": last.get("message", "")}

    async def _ensure_registered(
        self, res: Resource, spec: DatasetSpec, name: str, known: Mapping[str, Any], status: dict[str, Any]
    ) -> DatasetInfo:
        """Registered as the spec says, with a snapshot no older than the spec: the info."""
        options, secret_version = await self._storage_options(res, spec)
        desired = Desired(origin=spec.origin, fingerprint=spec.fingerprint(res.key.namespace, secret_version),
                          replicas=spec.replicas, namespaces=spec.namespaces(res.key.namespace),
                          generation=res.generation, refresh_request=res.annotations.get(REFRESH_ANNOTATION, ""))
        info = await self._get(name)
        step = decide.plan(desired, Observed(info), Known.of(known))
        if step.register is Register.CONFLICT:
            assert info is not None
            raise _Blocked(
                "NameConflict",
                f"cachefs already has a dataset {name} with origin {info.origin} that this resource "
                "did not register; remove it (`cachefs dataset rm`) or rename this resource",
                retry=False,
            )
        if step.register is Register.UPDATE:
            log.info("%s: settings of %s changed: updating them in place", res.key, name)
            info = await self.admin.update_dataset(name, replicas=spec.replicas, allowed_namespaces=desired.namespaces,
                                                   storage_options=options, refresh=dict(spec.refresh))
        elif step.register is Register.REPLACE:
            log.info("%s: origin of %s changed: removing it to add it again", res.key, name)
            try:
                await self.admin.remove_dataset(name)
            except errors.NotFound:
                pass
        if step.register in (Register.ADD, Register.REPLACE):
            info = await self._run(
                res, "add", self.admin.add_dataset(name, spec.origin, options, spec.replicas, desired.namespaces,
                                                   refresh=dict(spec.refresh)), name
            )
            log.info("%s: registered %s from %s (snapshot %s)", res.key, name, spec.origin, info.snapshot)
        assert info is not None
        if step.refresh:
            old = info.snapshot
            info = await self._run(res, "refresh", self.admin.refresh_dataset(name), name)
            log.info("%s: refreshed %s (snapshot %s → %s)", res.key, name, old, info.snapshot)
        status["registration"] = desired.fingerprint
        status["lastRefreshRequest"] = desired.refresh_request
        return info

    async def _storage_options(self, res: Resource, spec: DatasetSpec) -> tuple[dict[str, Any], str]:
        """spec.storageOptions overlaid with the Secret's keys, and the Secret's version."""
        options = dict(spec.storage_options)
        if not spec.secret_name:
            return options, ""
        try:
            data, version = await self.kube.read_secret(res.key.namespace, spec.secret_name)
        except KubeError as e:
            if e.status == 404:
                raise _Blocked("SecretNotFound", f"Secret {spec.secret_name} (spec.secretRef) does not exist in namespace {res.key.namespace}") from e
            if e.status == 403:
                raise _Blocked("SecretForbidden", f"the operator may not read Secret {spec.secret_name}: grant it `get` on secrets (Helm value operator.readSecrets)") from e
            raise
        except UnicodeDecodeError as e:
            raise _Blocked("InvalidSecret", f"Secret {spec.secret_name} holds binary data; storage options must be text", retry=False) from e
        options.update(data)
        return options, version

    async def _get(self, name: str) -> DatasetInfo | None:
        try:
            return await self.admin.get_dataset(name)
        except errors.NotFound:
            return None

    async def _run(self, res: Resource, what: str, start: Any, name: str) -> DatasetInfo:
        """Start an add or refresh, wait for it, and return the dataset it made."""
        try:
            op = await self.admin.wait(await start, timeout=self.op_timeout)
        except errors.OriginUnavailable as e:
            raise _Blocked("OriginUnavailable", f"cannot read the origin: {e}") from e
        except _OWNER_ERRORS as e:
            raise _Blocked("Rejected", f"cachefs refused to {what} {name}: {e}", retry=False) from e
        except (TimeoutError, asyncio.TimeoutError) as e:
            raise Retry(f"{res.key}: {what} of {name} took longer than {self.op_timeout:.0f}s") from e
        if not op.finished_ok:
            reason = "RegistrationFailed" if what == "add" else "RefreshFailed"
            raise _Blocked(reason, f"{what} of {name} {op.state}: {op.message}")
        if op.result.get("snapshot"):
            return DatasetInfo.from_json(op.result)
        info = await self._get(name)
        if info is None:
            raise Retry(f"{res.key}: {name} vanished right after its {what}")
        return info

    # ---- warm ----------------------------------------------------------------------

    async def _update_warmth(
        self, res: Resource, spec: DatasetSpec, name: str, info: DatasetInfo,
        known: Mapping[str, Any], status: dict[str, Any],
    ) -> None:
        """Level-triggered: each snapshot is warmed once when warmOnCreate, and once per
        new value of the warm-request annotation; a failed start is retried."""
        warm_request = res.annotations.get(WARM_ANNOTATION, "")
        desired = Desired(origin=spec.origin, fingerprint="", replicas=spec.replicas, namespaces=(),
                          generation=res.generation, warm_request=warm_request, warm_on_create=spec.warm_on_create)
        # what the operator knows: the status so far (a new snapshot's warmth included)
        knows = Known.of(status, warm_running=self.warms.running(res.key),
                         warm_followed=self.warms.last(res.key) is not None)
        action = decide.warming(desired, info.snapshot, knows)
        if action is Warm.START:
            try:
                op = await self.admin.warm_dataset(name)
            except errors.CachefsError as e:
                self._set(status, res, WARM, False, "WarmFailed", f"cannot start warming: {e}")
                status["lastError"] = f"cachefs: cannot start warming: {e}"
                await self._write(res, {}, status)
                raise Retry(f"{res.key}: cannot start warming {name}: {e}") from e
            log.info("%s: warming %s (operation %s)", res.key, name, op.id)
            status["warmOperation"] = op.id
            status["warmedSnapshot"] = info.snapshot
            self.warms.follow(res.key, op)
        elif action is Warm.FOLLOW_AGAIN:
            # An operation from before a restart of the operator: follow it again.
            self.warms.follow(res.key, OperationInfo(id=knows.warm_operation, kind="warm", dataset=name))
        status["lastWarmRequest"] = warm_request
        fraction = await self.cached.of(info)
        if fraction is not None:
            status["cachedFraction"] = fraction
        cached = status.get("cachedFraction")
        progress = self.warms.last(res.key)
        running = self.warms.running(res.key)
        if not running:
            status.pop("warmOperation", None)
        total = format_size((progress.total_bytes if progress else 0) or info.bytes)
        c = decide.warm_condition(running, progress, cached if isinstance(cached, (int, float)) else None, total,
                                  format_size(progress.done_bytes) if progress else "0 B")
        self._set(status, res, WARM, c.value, c.reason, c.message)

    # ---- status --------------------------------------------------------------------

    @staticmethod
    def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
        for c in status.get("conditions") or ():
            if c.get("type") == kind:
                return c
        return {}

    def _set(self, status: dict[str, Any], res: Resource, kind: str, value: bool | None, reason: str, message: str) -> None:
        previous = self._condition(status, kind)
        new = condition(previous, kind, value, reason, message, res.generation, now_rfc3339())
        others = [c for c in status.get("conditions") or () if c.get("type") != kind]
        status["conditions"] = sorted([*others, new], key=lambda c: (c["type"] != READY, c["type"]))

    def _known(self, res: Resource) -> Mapping[str, Any]:
        """What this resource's status is, or is about to be once our last write lands."""
        return self._intent.get(res.key) or res.status

    async def _write(self, res: Resource, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """Patch status if it changed; a merge patch, with null for fields that went away."""
        status = decide.cleaned(status)
        # What we wrote last may not be in `res` yet (a watch event older than our own
        # patch): fields that went away are nulled whichever of the two holds them.
        previous = self._intent.get(res.key, {})
        self._intent[res.key] = status
        patch = decide.status_patch(res.status, previous, status)
        if patch is None:
            return obj
        return await self.kube.patch_status(res.key, patch)
