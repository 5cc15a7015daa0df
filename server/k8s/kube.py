"""The few Kubernetes API calls the operator makes, over the `kubernetes` asyncio client.

list, watch, patch status, patch finalizers, read a Secret: nothing else. Every failure
leaves this module as a `KubeError` carrying the HTTP status (0 when the API server
could not be reached), so the reconciler decides retry or not by status, never by text.
Objects stay plain dicts: the CRD has no generated model, and dicts are what the merge
patches are made of.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

import aiohttp
from kubernetes.aio import client as kclient
from kubernetes.aio.client.exceptions import ApiException

from server.k8s.crd import GROUP, PLURAL, VERSION, Key

T = TypeVar("T")


class KubeError(Exception):
    """A Kubernetes API call failed; `status` is the HTTP status, 0 when unreachable."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API: {message} (HTTP {status})" if status else f"Kubernetes API: {message}")
        self.status = status
        self.message = message

    @property
    def transient(self) -> bool:
        """Worth retrying as is: the server was unreachable, overloaded or failed."""
        return self.status in (0, 408, 429) or self.status >= 500


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK
    object: dict[str, Any]

    @property
    def resource_version(self) -> str:
        return str((self.object.get("metadata") or {}).get("resourceVersion") or "")


def _message(body: Any, fallback: str) -> str:
    """The `message` of a Kubernetes Status body, if the body is one."""
    try:
        doc = json.loads(body) if isinstance(body, (str, bytes)) else body
        return str(doc.get("message") or fallback)
    except (ValueError, AttributeError):
        return fallback


class KubeApi:
    """CachedDataset calls for one API server; `close()` when done."""

    def __init__(
        self,
        api_client: kclient.ApiClient,
        request_timeout: float = 30.0,
        watch_timeout: int = 300,
    ) -> None:
        self.api_client = api_client
        self.request_timeout = float(request_timeout)
        # The server ends a watch after watch_timeout s; the client gives it a margin
        # more, so a silent connection is noticed without cutting a healthy watch.
        self.watch_timeout = int(watch_timeout)
        self._objects = kclient.CustomObjectsApi(api_client)
        self._core = kclient.CoreV1Api(api_client)

    @classmethod
    async def connect(cls, kubeconfig: str = "", context: str = "", **kwargs: Any) -> "KubeApi":
        """In-cluster service account, or a kubeconfig file when one is named."""
        from kubernetes.aio import config as kconfig

        configuration = kclient.Configuration()
        try:
            if kubeconfig or context:
                await kconfig.load_kube_config(
                    config_file=kubeconfig or None, context=context or None, client_configuration=configuration
                )
            else:
                kconfig.load_incluster_config(client_configuration=configuration)
        except kconfig.ConfigException as e:
            raise KubeError(0, f"no Kubernetes configuration: {e}; run in a pod, or pass --kubeconfig") from e
        return cls(kclient.ApiClient(configuration), **kwargs)

    async def close(self) -> None:
        await self.api_client.close()

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except ApiException as e:
            raise KubeError(int(e.status or 0), _message(e.body, str(e.reason))) from e
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise KubeError(0, f"cannot reach the API server: {e!r}") from e

    async def list(self, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        """Every CachedDataset in `namespace` (None: all), and the list's resourceVersion."""
        if namespace is None:
            call = self._objects.list_cluster_custom_object(
                GROUP, VERSION, PLURAL, _request_timeout=self.request_timeout
            )
        else:
            call = self._objects.list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, _request_timeout=self.request_timeout
            )
        doc = await self._call(call)
        return list(doc.get("items") or []), str((doc.get("metadata") or {}).get("resourceVersion") or "")

    async def watch(self, namespace: str | None, resource_version: str) -> AsyncIterator[WatchEvent]:
        """Changes after `resource_version` until the server ends the watch.

        Raises KubeError(410) when that version is too old: list again.
        """
        kwargs: dict[str, Any] = dict(
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout,
            _request_timeout=float(self.watch_timeout + 30),
        )
        if namespace is None:
            call = self._objects.list_cluster_custom_object_without_preload_content(GROUP, VERSION, PLURAL, **kwargs)
        else:
            call = self._objects.list_namespaced_custom_object_without_preload_content(
                GROUP, VERSION, namespace, PLURAL, **kwargs
            )
        response: aiohttp.ClientResponse = await self._call(call)
        try:
            if response.status != 200:
                body = await self._call(response.text())
                raise KubeError(response.status, _message(body, response.reason or "watch refused"))
            while True:
                line = await self._call(response.content.readline())
                if not line:
                    return  # the server ended the watch (timeout_seconds): watch again
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError as e:
                    raise KubeError(0, f"malformed watch event {line[:200]!r}") from e
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise KubeError(int(obj.get("code") or 0), _message(obj, "watch error"))
                yield WatchEvent(str(kind), obj)
        finally:
            response.release()

    async def patch_status(self, key: Key, status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch `.status` through the status subresource."""
        return await self._call(
            self._objects.patch_namespaced_custom_object_status(
                GROUP, VERSION, key.namespace, PLURAL, key.name, {"status": status},
                _content_type="application/merge-patch+json", _request_timeout=self.request_timeout,
            )
        )

    async def patch_finalizers(self, key: Key, finalizers: list[str], resource_version: str) -> dict[str, Any]:
        """Replace `.metadata.finalizers`; refused (409) if the object moved past
        `resource_version`, so a finalizer another controller added is never dropped."""
        body = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        return await self._call(
            self._objects.patch_namespaced_custom_object(
                GROUP, VERSION, key.namespace, PLURAL, key.name, body,
                _content_type="application/merge-patch+json", _request_timeout=self.request_timeout,
            )
        )

    async def read_secret(self, namespace: str, name: str) -> tuple[dict[str, str], str]:
        """A Secret's data, decoded, and its resourceVersion."""
        response = await self._call(
            self._core.read_namespaced_secret_without_preload_content(
                name, namespace, _request_timeout=self.request_timeout
            )
        )
        try:
            text = await self._call(response.text())
            if response.status != 200:
                raise KubeError(response.status, _message(text, f"cannot read Secret {namespace}/{name}"))
        finally:
            response.release()
        doc = json.loads(text)
        data = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
        data.update(doc.get("stringData") or {})
        return data, str((doc.get("metadata") or {}).get("resourceVersion") or "")
