"""The operator's Kubernetes calls (server.k8s.kube) against the fake API server: what
each call sends, and how each failure reaches the reconciler (status, transient?)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.aio import client as kclient

from kubeapi_fake import FakeKubeApi
from server.k8s.crd import Key
from server.k8s.kube import KubeApi, KubeError


@pytest.fixture
async def fake() -> Any:
    f = FakeKubeApi()
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
async def api(fake: FakeKubeApi) -> Any:
    a = KubeApi(kclient.ApiClient(kclient.Configuration(host=fake.url)), request_timeout=5, watch_timeout=1)
    yield a
    await a.close()


async def test_list_gives_objects_and_a_version_to_watch_from(fake: FakeKubeApi, api: KubeApi) -> None:
    await fake.create("a", "x", {"origin": "s3://b/x"})
    await fake.create("b", "y", {"origin": "s3://b/y"})
    items, version = await api.list("a")
    assert [i["metadata"]["name"] for i in items] == ["x"] and version == str(fake.rv)
    items, _ = await api.list(None)
    assert sorted(i["metadata"]["name"] for i in items) == ["x", "y"]


async def test_watch_gives_the_changes_after_a_version_then_ends(fake: FakeKubeApi, api: KubeApi) -> None:
    await fake.create("a", "x", {"origin": "s3://b/x"})
    _, version = await api.list("a")
    await fake.update_spec("a", "x", {"origin": "s3://b/z"})
    await fake.create("other", "y", {"origin": "s3://b/y"})
    await fake.delete("a", "x")
    events = [(e.type, e.object["metadata"]["name"]) async for e in api.watch("a", version)]
    assert events == [("MODIFIED", "x"), ("DELETED", "x")]  # ends at the server's timeout


async def test_patch_status_touches_status_only(fake: FakeKubeApi, api: KubeApi) -> None:
    await fake.create("a", "x", {"origin": "s3://b/x"})
    obj = await api.patch_status(Key("a", "x"), {"snapshot": "s1", "files": 2})
    assert obj["status"] == {"snapshot": "s1", "files": 2} and obj["metadata"]["generation"] == 1
    obj = await api.patch_status(Key("a", "x"), {"files": None})  # null removes a field
    assert obj["status"] == {"snapshot": "s1"}


async def test_a_finalizer_patch_on_a_stale_version_is_refused(fake: FakeKubeApi, api: KubeApi) -> None:
    obj = await fake.create("a", "x", {"origin": "s3://b/x"})
    stale = obj["metadata"]["resourceVersion"]
    await fake.patch("a", "x", {"metadata": {"finalizers": ["someone.else/keep"]}})
    with pytest.raises(KubeError) as caught:
        await api.patch_finalizers(Key("a", "x"), ["cachefs.io/dataset"], stale)
    assert caught.value.status == 409 and not caught.value.transient
    assert fake.get("a", "x")["metadata"]["finalizers"] == ["someone.else/keep"]


async def test_secrets_are_read_decoded(fake: FakeKubeApi, api: KubeApi) -> None:
    fake.put_secret("a", "creds", {"key": "AKIA", "secret": "s3cr3t"})
    data, version = await api.read_secret("a", "creds")
    assert data == {"key": "AKIA", "secret": "s3cr3t"} and version


# (what goes wrong, HTTP status the reconciler sees, retry as is?)
FAILURES = {
    "server error": (500, 500, True),
    "overloaded": (429, 429, True),
    "unavailable": (503, 503, True),
    "forbidden (RBAC)": (403, 403, False),
    "not found": (404, 404, False),
}


@pytest.mark.parametrize("what", sorted(FAILURES))
async def test_failures_reach_the_reconciler_as_a_status_and_a_retry_verdict(fake: FakeKubeApi, api: KubeApi, what: str) -> None:
    injected, status, transient = FAILURES[what]
    await fake.create("a", "x", {"origin": "s3://b/x"})
    fake.fail("PATCH", "/status$", injected)
    with pytest.raises(KubeError) as caught:
        await api.patch_status(Key("a", "x"), {"files": 1})
    assert (caught.value.status, caught.value.transient) == (status, transient)


async def test_an_expired_watch_says_410(fake: FakeKubeApi, api: KubeApi) -> None:
    await fake.create("a", "x", {"origin": "s3://b/x"})
    await fake.create("a", "y", {"origin": "s3://b/y"})
    fake.compact()  # history before the second create is gone
    with pytest.raises(KubeError) as caught:
        async for _ in api.watch("a", "1"):
            pass
    assert caught.value.status == 410


async def test_an_unreachable_api_server_is_transient() -> None:
    api = KubeApi(kclient.ApiClient(kclient.Configuration(host="http://127.0.0.1:9")), request_timeout=2)
    try:
        with pytest.raises(KubeError) as caught:
            await api.list("a")
        assert caught.value.status == 0 and caught.value.transient
    finally:
        await api.close()
