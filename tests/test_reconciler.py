"""The CachedDataset operator end to end: a fake Kubernetes API server (tests/kubeapi_fake.py)
on one side, the session's real cachefs cluster on the other, the operator in between
exactly as `cachefs operator` wires it (only the delays are shortened).

Each test works in a namespace of its own, so its datasets (NAMESPACE.NAME) never meet
another test's on the shared cluster.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from kubernetes.aio import client as kclient

from cachefs.common import errors
from cachefs.admin import AdminClient
from cachefs.common.wire import DatasetInfo
from conftest import sample_files, write_tree
from helm_render import CHART_DIR
from kubeapi_fake import FakeKubeApi
from server.k8s.controller import Controller
from server.k8s.crd import FINALIZER, REFRESH_ANNOTATION, WARM_ANNOTATION
from server.k8s.kube import KubeApi
from server.k8s.reconciler import Reconciler
from server.k8s.workqueue import WorkQueue

pytestmark = pytest.mark.slow

CRD_SCHEMA = yaml.safe_load((CHART_DIR / "crds" / "cacheddatasets.cachefs.io.yaml").read_text())["spec"]["versions"][0][
    "schema"
]["openAPIV3Schema"]


class Recorder:
    """The real admin client, noting which calls the operator makes (name, dataset)."""

    def __init__(self, admin: AdminClient) -> None:
        self._admin = admin
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self._admin, attr)
        if attr not in ("add_dataset", "update_dataset", "refresh_dataset", "remove_dataset", "warm_dataset"):
            return target

        async def call(name: str, *args: Any, **kwargs: Any) -> Any:
            self.calls.append((attr.removesuffix("_dataset"), name))
            return await target(name, *args, **kwargs)

        return call

    def of(self, dataset: str) -> list[str]:
        return [what for what, name in self.calls if name == dataset]


class Counted:
    """The real reconciler, counting the passes over each resource: what a test waits
    on to know that resyncs happened (instead of sleeping through them)."""

    def __init__(self, inner: Reconciler) -> None:
        self.inner = inner
        self.passes: dict[str, int] = {}

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    async def reconcile(self, obj: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.inner.reconcile(obj)
        finally:
            name = obj["metadata"]["name"]
            self.passes[name] = self.passes.get(name, 0) + 1


class Operator:
    """One running operator (Controller + Reconciler), as `cachefs operator` builds it."""

    def __init__(self, url: str, admin: AdminClient, namespaces: list[str]) -> None:
        self.kube = KubeApi(kclient.ApiClient(kclient.Configuration(host=url)), request_timeout=10, watch_timeout=5)
        self.queue: WorkQueue[Any] = WorkQueue(base_delay=0.05, max_delay=1.0)
        self.reconciler = Reconciler(
            self.kube, admin, on_change=self.queue.add, op_timeout=60, status_ttl=0.2, warm_poll=0.2, warm_report=0.5
        )
        self.counted = Counted(self.reconciler)
        self.controller = Controller(
            self.kube, self.counted, self.queue, namespaces, workers=2, resync=1.0,  # type: ignore[arg-type]
            relist_delay=(0.05, 0.5),
        )
        self.task = asyncio.create_task(self.controller.run())

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        await self.kube.close()


class Harness:
    """The fake API server, the cluster's admin API, and operators to start and stop."""

    def __init__(self, fake: FakeKubeApi, admin: AdminClient, namespace: str) -> None:
        self.fake = fake
        self.admin = admin
        self.recorder = Recorder(admin)
        self.ns = namespace
        self.operators: list[Operator] = []

    def start(self, namespaces: list[str] | None = None) -> Operator:
        op = Operator(self.fake.url, self.recorder, namespaces or [self.ns])  # type: ignore[arg-type]
        self.operators.append(op)
        return op

    def dataset(self, name: str) -> str:
        return f"{self.ns}.{name}"

    async def info(self, name: str) -> DatasetInfo | None:
        try:
            return await self.admin.get_dataset(self.dataset(name))
        except errors.NotFound:
            return None

    def obj(self, name: str) -> dict[str, Any] | None:
        return self.fake.get(self.ns, name)

    def status(self, name: str) -> dict[str, Any]:
        return (self.obj(name) or {}).get("status") or {}

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == kind), {})

    async def until(self, check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; objects: {self.fake.objects}")

    async def passes(self, name: str, more: int, timeout: float = 30.0) -> None:
        """Wait for `more` reconciles of `name` (resyncs, when nothing changes) from now."""
        count = lambda: sum(op.counted.passes.get(name, 0) for op in self.operators)  # noqa: E731
        target = count() + more
        await self.until(lambda: count() >= target, f"{more} more reconciles of {name}", timeout)

    async def ready(self, name: str, generation: int = 1, timeout: float = 60.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            obj = self.obj(name)
            ok = (
                obj is not None
                and self.condition(name, "Ready").get("status") == "True"
                and self.status(name).get("observedGeneration") == generation
            )
            return obj if ok else None

        return await self.until(check, f"{name} Ready at generation {generation}", timeout)

    async def reason(self, name: str, reason: str, timeout: float = 60.0) -> dict[str, Any]:
        return await self.until(
            lambda: self.condition(name, "Ready") if self.condition(name, "Ready").get("reason") == reason else None,
            f"{name} Ready reason {reason}", timeout,
        )


@pytest.fixture
async def harness(cachefs_cluster: Any) -> Any:
    fake = FakeKubeApi(schema=CRD_SCHEMA)
    await fake.start()
    admin = AdminClient(cachefs_cluster.client_config)
    h = Harness(fake, admin, f"t-{uuid.uuid4().hex[:8]}")
    try:
        yield h
    finally:
        for op in h.operators:
            await op.stop()
        for info in await admin.list_datasets():
            if info.name.startswith(h.ns + "."):
                await admin.remove_dataset(info.name)
        await admin.close()
        await fake.stop()


def url(path: Path) -> str:
    return f"file://{path}"


def count_files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


# ---- create, change, delete --------------------------------------------------------------


async def test_a_new_resource_is_registered_and_its_status_written(harness: Harness, fresh_origin: Path) -> None:
    harness.start()
    await harness.fake.create(harness.ns, "images", {"origin": url(fresh_origin)})
    obj = await harness.ready("images")
    info = await harness.info("images")
    assert info is not None and info.origin == url(fresh_origin) and info.files == count_files(fresh_origin)
    assert info.allowed_namespaces == (harness.ns,)
    status = obj["status"]
    assert status["dataset"] == harness.dataset("images")
    assert (status["snapshot"], status["files"], status["bytes"]) == (info.snapshot, info.files, info.bytes)
    assert status["observedGeneration"] == 1 and "lastError" not in status
    assert obj["metadata"]["finalizers"] == [FINALIZER]
    assert harness.condition("images", "Ready")["reason"] == "Registered"
    assert 0.0 <= status["cachedFraction"] <= 1.0


async def test_a_spec_change_refreshes_the_dataset(harness: Harness, fresh_origin: Path) -> None:
    harness.start()
    await harness.fake.create(harness.ns, "images", {"origin": url(fresh_origin)})
    before = (await harness.ready("images"))["status"]
    (fresh_origin / "added.bin").write_bytes(b"x" * 5000)
    await harness.fake.update_spec(harness.ns, "images", {"origin": url(fresh_origin), "warmOnCreate": False})
    after = (await harness.ready("images", generation=2))["status"]
    info = await harness.info("images")
    assert after["snapshot"] != before["snapshot"] and after["files"] == before["files"] + 1
    assert info.snapshot == after["snapshot"]
    assert harness.recorder.of(harness.dataset("images")) == ["add", "refresh"]  # in place, not removed and added


# (change to the spec, what cachefs must show afterwards, the calls the operator makes):
# replicas and namespaces change in place, keeping the cache; another origin is another
# dataset, so it is removed and added again.
REREGISTER = {
    "another origin": (lambda other: {"origin": url(other)}, lambda info, other: info.origin == url(other),
                       ["add", "remove", "add"]),
    "more replicas": (lambda other: {"replicas": 2}, lambda info, other: info.replicas == 2, ["add", "update"]),
    "more namespaces": (lambda other: {"allowedNamespaces": ["team-b"]},
                        lambda info, other: "team-b" in info.allowed_namespaces, ["add", "update"]),
}


@pytest.mark.parametrize("change", sorted(REREGISTER))
async def test_a_registration_change_updates_in_place_or_registers_again(
    harness: Harness, fresh_origin: Path, tmp_path: Path, change: str
) -> None:
    other = write_tree(tmp_path / "other", dict(list(sample_files(seed=7).items())[:5]))
    edit, check, calls = REREGISTER[change]
    harness.start()
    await harness.fake.create(harness.ns, "images", {"origin": url(fresh_origin)})
    await harness.ready("images")
    await harness.fake.update_spec(harness.ns, "images", {"origin": url(fresh_origin), **edit(other)})
    status = (await harness.ready("images", generation=2))["status"]
    info = await harness.info("images")
    assert check(info, other) and status["snapshot"] == info.snapshot and status["files"] == info.files
    assert harness.recorder.of(harness.dataset("images")) == calls


async def test_a_refresh_request_refreshes_without_a_spec_change(harness: Harness, fresh_origin: Path) -> None:
    harness.start()
    await harness.fake.create(harness.ns, "images", {"origin": url(fresh_origin)})
    before = (await harness.ready("images"))["status"]
    (fresh_origin / "added.bin").write_bytes(b"y" * 100)
    await harness.fake.annotate(harness.ns, "images", {REFRESH_ANNOTATION: "2025-06-01T10:00:00Z"})
    await harness.until(lambda: harness.status("images").get("lastRefreshRequest") == "2025-06-01T10:00:00Z", "refresh")
    after = harness.status("images")
    assert after["files"] == before["files"] + 1 and after["observedGeneration"] == 1


async def test_a_deleted_resource_removes_its_dataset_then_goes(harness: Harness, fresh_origin: Path) -> None:
    harness.start()
    await harness.fake.create(harness.ns, "images", {"origin": url(fresh_origin)})
    await harness.ready("images")
    await harness.fake.delete(harness.ns, "images")
    await harness.until(lambda: harness.obj("images") is None, "the resource to go")
    assert await harness.info("images") is None


async def test_warm_on_create_caches_every_block(harness: Harness, fresh_origin: Path) -> None:
    harness.start()
    await harness.fake.create(harness.ns, "images", {"origin": url(fresh_origin), "warmOnCreate": True})
    await harness.ready("images")
    warm = await harness.until(
        lambda: harness.condition("images", "Warm") if harness.condition("images", "Warm").get("status") == "True" else None,
        "Warm=True",
    )
    assert warm["reason"] == "Cached" and harness.status("images")["cachedFraction"] == 1.0
    assert harness.status("images")["warmedSnapshot"] == harness.status("images")["snapshot"]
    assert "warmOperation" not in harness.status("images")


async def test_a_warm_request_warms_a_cold_dataset(harness: Harness, fresh_origin: Path) -> None:
    harness.start()
    await harness.fake.create(harness.ns, "images", {"origin": url(fresh_origin)})
    await harness.ready("images")
    assert harness.condition("images", "Warm")["status"] != "True"
    await harness.fake.annotate(harness.ns, "images", {WARM_ANNOTATION: "now"})
    await harness.until(lambda: harness.condition("images", "Warm").get("status") == "True", "Warm=True")
    assert harness.status("images")["lastWarmRequest"] == "now"


# ---- failures ----------------------------------------------------------------------------


async def test_kubernetes_api_errors_are_retried_not_lost(harness: Harness, fresh_origin: Path) -> None:
    fake = harness.fake
    fake.fail("GET", r"/cacheddatasets\?", 500, times=2)  # the first lists
    fake.fail("GET", r"watch=true", 503, times=2)  # the first watches
    fake.fail("PATCH", r"/cacheddatasets/[^/]+$", 500, times=2)  # adding the finalizer
    fake.fail("PATCH", r"/status$", 500, times=3)  # writing status
    await fake.create(harness.ns, "images", {"origin": url(fresh_origin)})
    harness.start()
    await harness.ready("images")
    assert all(f.times == 0 for f in fake.faults)
    assert (await harness.info("images")).snapshot == harness.status("images")["snapshot"]
    # A status write that failed did not make the operator register the dataset again.
    assert harness.recorder.of(harness.dataset("images")) == ["add"]


async def test_a_broken_or_expired_watch_loses_no_change(harness: Harness, fresh_origin: Path) -> None:
    harness.start()
    await harness.fake.create(harness.ns, "first", {"origin": url(fresh_origin)})
    await harness.ready("first")
    await harness.fake.drop_watches()
    await harness.fake.create(harness.ns, "second", {"origin": url(fresh_origin)})
    harness.fake.compact()  # the operator's resourceVersion is now too old: 410, list again
    await harness.fake.drop_watches()
    await harness.fake.create(harness.ns, "third", {"origin": url(fresh_origin)})
    for name in ("second", "third"):
        await harness.ready(name)


async def test_a_restarted_operator_loses_nothing(harness: Harness, fresh_origin: Path) -> None:
    first = harness.start()
    for name in ("kept", "changed", "deleted"):
        await harness.fake.create(harness.ns, name, {"origin": url(fresh_origin)})
    for name in ("kept", "changed", "deleted"):
        await harness.ready(name)
    await first.stop()
    # While no operator runs:
    (fresh_origin / "added.bin").write_bytes(b"z" * 10)
    await harness.fake.create(harness.ns, "created", {"origin": url(fresh_origin)})
    await harness.fake.update_spec(harness.ns, "changed", {"origin": url(fresh_origin), "warmOnCreate": False})
    await harness.fake.delete(harness.ns, "deleted")
    assert harness.obj("deleted") is not None  # held by the finalizer
    harness.start()
    await harness.ready("created")
    assert (await harness.ready("changed", generation=2))["status"]["files"] == count_files(fresh_origin)
    await harness.until(lambda: harness.obj("deleted") is None, "the deleted resource to go")
    assert await harness.info("deleted") is None
    assert await harness.info("kept") is not None


async def test_datasets_without_a_resource_are_left_alone(harness: Harness, fresh_origin: Path) -> None:
    admin = harness.admin
    await admin.wait(await admin.add_dataset(harness.dataset("by-hand"), url(fresh_origin)), timeout=60)
    await harness.fake.create("elsewhere", "images", {"origin": url(fresh_origin)})  # not watched
    harness.start()
    await harness.fake.create(harness.ns, "images", {"origin": url(fresh_origin)})
    await harness.ready("images")
    await harness.passes("images", 2)  # two resyncs
    assert await harness.info("by-hand") is not None
    with pytest.raises(errors.NotFound):
        await admin.get_dataset("elsewhere.images")
    assert "status" not in harness.fake.get("elsewhere", "images")


async def test_a_name_too_long_for_cachefs_is_reported_once(harness: Harness, fresh_origin: Path) -> None:
    name = "n" * (63 - len(harness.ns))  # NS.NAME is 64 characters
    harness.start()
    await harness.fake.create(harness.ns, name, {"origin": url(fresh_origin)})
    ready = await harness.reason(name, "InvalidSpec")
    assert "at most 63 characters" in ready["message"] and ready["status"] == "False"
    writes = sum(1 for m, path, _ in harness.fake.requests if m == "PATCH" and path.endswith(f"{name}/status"))
    await harness.passes(name, 2)  # resyncs do not write the same status again
    assert sum(1 for m, path, _ in harness.fake.requests if m == "PATCH" and path.endswith(f"{name}/status")) == writes


async def test_a_dataset_registered_by_hand_under_the_name_is_not_taken_over(
    harness: Harness, fresh_origin: Path, tmp_path: Path
) -> None:
    other = write_tree(tmp_path / "other", {"a.txt": b"a"})
    admin = harness.admin
    await admin.wait(await admin.add_dataset(harness.dataset("taken"), url(other)), timeout=60)
    harness.start()
    await harness.fake.create(harness.ns, "taken", {"origin": url(fresh_origin)})
    ready = await harness.reason("taken", "NameConflict")
    assert harness.dataset("taken") in ready["message"]
    assert (await harness.info("taken")).origin == url(other)


async def test_a_missing_origin_is_reported_and_retried_until_it_appears(harness: Harness, tmp_path: Path) -> None:
    origin = tmp_path / "later"
    harness.start()
    await harness.fake.create(harness.ns, "later", {"origin": url(origin)})
    ready = await harness.reason("later", "RegistrationFailed")
    assert str(origin) in ready["message"] and harness.status("later")["lastError"]
    write_tree(origin, {"a.bin": b"a" * 10, "b/c.bin": b"c"})
    obj = await harness.ready("later")
    assert obj["status"]["files"] == 2 and "lastError" not in obj["status"]


async def test_origin_credentials_come_from_the_secret_named_by_the_resource(
    harness: Harness, s3_origin: tuple[str, dict[str, Any], dict[str, bytes]]
) -> None:
    origin, options, files = s3_origin
    spec = {
        "origin": origin,
        "secretRef": {"name": "s3-credentials"},
        "storageOptions": {"client_kwargs": options["client_kwargs"]},
    }
    harness.start()
    await harness.fake.create(harness.ns, "s3", spec)
    ready = await harness.reason("s3", "SecretNotFound")
    assert "s3-credentials" in ready["message"]
    harness.fake.put_secret(harness.ns, "s3-credentials", {"key": options["key"], "secret": options["secret"]})
    obj = await harness.ready("s3")
    assert obj["status"]["files"] == len(files)


async def test_an_unreachable_cache_cluster_is_reported_and_retried(harness: Harness, fresh_origin: Path) -> None:
    from cachefs.config import ClientConfig

    dead = AdminClient(ClientConfig(endpoint="http://127.0.0.1:9", token="x", connect_timeout=0.5, retries=0))
    op = Operator(harness.fake.url, dead, [harness.ns])
    try:
        await harness.fake.create(harness.ns, "images", {"origin": url(fresh_origin)})
        ready = await harness.reason("images", "Pending")
        assert ready["status"] == "False" and harness.status("images")["lastError"].startswith("cachefs:")
        await harness.until(lambda: op.queue.failures(next(iter(op.controller.store))) >= 3, "retries")
    finally:
        await op.stop()
        await dead.close()


async def test_the_refresh_policy_of_the_spec_is_followed_and_its_last_result_shown(harness: Harness,
                                                                                    fresh_origin: Path) -> None:
    harness.start()
    spec = {"origin": url(fresh_origin), "refresh": {"interval": 1, "onChange": True}}
    await harness.fake.create(harness.ns, "images", spec)
    before = (await harness.ready("images"))["status"]
    info = await harness.info("images")
    assert info.refresh == {"interval": 1, "on_change": True, "warm": False}
    await harness.until(lambda: harness.status("images").get("lastRefresh", {}).get("state") == "unchanged",
                        "a first check of the origin")
    (fresh_origin / "added.bin").write_bytes(b"x" * 5000)
    last = await harness.until(lambda: (r := harness.status("images").get("lastRefresh", {})).get("changed") and r,
                               "the policy's refresh")
    assert last["state"] == "succeeded" and last["trigger"] == "onChange"
    await harness.until(lambda: harness.status("images").get("snapshot") not in (None, before["snapshot"]),
                        "the new snapshot in the status")
    assert harness.recorder.of(harness.dataset("images")) == ["add"]  # the cluster refreshed it, not the operator
    await harness.fake.update_spec(harness.ns, "images", {"origin": url(fresh_origin), "refresh": None})  # manual
    info = await harness.until(lambda: _manual(harness), "the policy to be removed")
    assert info.refresh == {}


async def _manual(harness: Harness) -> Any:
    info = await harness.info("images")
    return info if info is not None and not info.refresh else None


@pytest.mark.parametrize("refresh", [{"interval": -5}, {"interval": "1h"}, {"onChange": "yes"}, {"every": 5}, "daily"])
def test_a_bad_refresh_policy_is_an_invalid_spec_naming_the_field(refresh: Any) -> None:
    from server.k8s.crd import DatasetSpec, InvalidSpec

    with pytest.raises(InvalidSpec, match="spec.refresh"):
        DatasetSpec.parse({"origin": "s3://b/p", "refresh": refresh})
