"""A small Kubernetes API server for the operator's tests (aiohttp, in process).

It speaks only what the operator uses, with the semantics that matter to it:
- CachedDataset list, watch (from a resourceVersion; 410 when that is too old),
  get, create, merge-patch of the object and of its status subresource, delete;
- a spec change bumps metadata.generation, a status or metadata change does not;
- delete of an object with finalizers sets deletionTimestamp; the object goes when
  its last finalizer is removed;
- a patch carrying metadata.resourceVersion is refused with 409 when stale;
- Secrets: get.
Tests change objects through the same methods the HTTP handlers use (`create`,
`update_spec`, `delete`, ...), and inject failures with `fail(...)`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import jsonschema
from aiohttp import web

PREFIX = "/apis/cachefs.io/v1alpha1"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def status_body(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message, "code": code}
    return web.json_response(body, status=code)


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    times: int


class FakeKubeApi:
    """State and HTTP face of the fake API server. Start with `await start()`."""

    def __init__(self, schema: dict[str, Any] | None = None, history: int = 1000) -> None:
        self.schema = schema  # the CRD's openAPIV3Schema: validate like the real server
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []  # (rv, type, object)
        self.history = history
        self.oldest_rv = 0  # events at or before this were compacted away
        self.rv = 0
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) seen
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._watch_responses: set[web.StreamResponse] = set()
        self.url = ""

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware])
        ns = PREFIX + "/namespaces/{ns}/cacheddatasets"
        app.router.add_get(PREFIX + "/cacheddatasets", self._list)
        app.router.add_get(ns, self._list)
        app.router.add_post(ns, self._create)
        app.router.add_get(ns + "/{name}", self._get)
        app.router.add_patch(ns + "/{name}", self._patch)
        app.router.add_patch(ns + "/{name}/status", self._patch_status)
        app.router.add_delete(ns + "/{name}", self._delete)
        app.router.add_get("/api/v1/namespaces/{ns}/secrets/{name}", self._get_secret)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        await self.drop_watches()
        if self._runner:
            await self._runner.cleanup()

    async def drop_watches(self) -> None:
        """Cut every open watch, as an API server restart or a load balancer would."""
        for resp in list(self._watch_responses):
            if resp.task is not None:
                resp.task.cancel()
        self._watch_responses.clear()

    # ---- fault injection -------------------------------------------------------------

    def fail(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """The next `times` requests matching answer `status` instead of being served."""
        self.faults.append(Fault(method.upper(), re.compile(path_regex), status, times))

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        for fault in self.faults:
            if fault.times > 0 and fault.method == request.method and fault.path.search(request.path_qs):
                fault.times -= 1
                self.requests.append((request.method, request.path_qs, fault.status))
                return status_body(fault.status, "InternalError", "injected failure")
        response = await handler(request)
        self.requests.append((request.method, request.path_qs, response.status))
        return response

    # ---- state changes (used by tests and by the HTTP handlers) ----------------------

    def _bump(self) -> str:
        self.rv += 1
        return str(self.rv)

    async def _record(self, kind: str, obj: dict[str, Any]) -> None:
        self.events.append((int(obj["metadata"]["resourceVersion"]), kind, copy.deepcopy(obj)))
        if len(self.events) > self.history:
            dropped = self.events[: len(self.events) - self.history]
            self.events = self.events[len(dropped):]
            self.oldest_rv = dropped[-1][0]
        async with self._changed:
            self._changed.notify_all()

    def compact(self) -> None:
        """Forget all watch history, so a watch from an old resourceVersion gets 410."""
        if self.events:
            self.oldest_rv = self.events[-1][0]
        self.events.clear()

    def _validate(self, obj: dict[str, Any]) -> str | None:
        if self.schema is None:
            return None
        try:
            jsonschema.validate(obj, self.schema)
        except jsonschema.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path)
            return f"CachedDataset.cachefs.io is invalid: {path}: {e.message}"
        return None

    async def create(self, namespace: str, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
        obj = {
            "apiVersion": "cachefs.io/v1alpha1",
            "kind": "CachedDataset",
            "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations or {})},
            "spec": spec,
        }
        return await self._create_object(obj)

    async def _create_object(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        if key in self.objects:
            raise KeyError(f"{key} exists")
        error = self._validate(obj)
        if error:
            raise ValueError(error)
        meta.update(
            uid=f"uid-{self.rv + 1}",
            generation=1,
            creationTimestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            resourceVersion=self._bump(),
        )
        self.objects[key] = obj
        await self._record("ADDED", obj)
        return copy.deepcopy(obj)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((namespace, name))
        return copy.deepcopy(obj) if obj else None

    async def update_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return await self.patch(namespace, name, {"spec": spec})

    async def annotate(self, namespace: str, name: str, annotations: dict[str, str]) -> dict[str, Any]:
        return await self.patch(namespace, name, {"metadata": {"annotations": annotations}})

    async def patch(self, namespace: str, name: str, patch: dict[str, Any], status: bool = False) -> dict[str, Any]:
        """Merge-patch the object (or its status); raises LookupError / ValueError like 404 / 422."""
        old = self.objects.get((namespace, name))
        if old is None:
            raise LookupError(f"{namespace}/{name} not found")
        wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted_rv is not None and wanted_rv != old["metadata"]["resourceVersion"]:
            raise ConflictError(f"the object has been modified; resourceVersion {wanted_rv} is stale")
        new = merge_patch(old, patch)
        # The status subresource changes status only; the main resource never changes it.
        if status:
            new = dict(old, status=new.get("status"))
        else:
            new["status"] = old.get("status")
            for fixed in ("name", "namespace", "uid", "creationTimestamp", "generation", "deletionTimestamp"):
                if fixed in old["metadata"]:
                    new["metadata"][fixed] = old["metadata"][fixed]
        if new.get("status") is None:
            new.pop("status", None)
        error = self._validate(new)
        if error:
            raise ValueError(error)
        if new == old:
            return copy.deepcopy(old)  # a no-op patch does not bump resourceVersion
        if new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = old["metadata"]["generation"] + 1
        new["metadata"]["resourceVersion"] = self._bump()
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            del self.objects[(namespace, name)]
            await self._record("DELETED", new)
            return copy.deepcopy(new)
        self.objects[(namespace, name)] = new
        await self._record("MODIFIED", new)
        return copy.deepcopy(new)

    async def delete(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self.objects.get((namespace, name))
        if obj is None:
            raise LookupError(f"{namespace}/{name} not found")
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj = copy.deepcopy(obj)
                obj["metadata"]["deletionTimestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                obj["metadata"]["resourceVersion"] = self._bump()
                self.objects[(namespace, name)] = obj
                await self._record("MODIFIED", obj)
            return copy.deepcopy(obj)
        del self.objects[(namespace, name)]
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = self._bump()
        await self._record("DELETED", obj)
        return obj

    def put_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.secrets[(namespace, name)] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": self._bump()},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }

    # ---- HTTP handlers ---------------------------------------------------------------

    def _selected(self, namespace: str | None) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (ns, _), o in sorted(self.objects.items()) if namespace in (None, ns)]

    async def _list(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info.get("ns")
        if request.query.get("watch") in ("true", "True", "1"):
            return await self._watch(request, namespace)
        body = {
            "apiVersion": "cachefs.io/v1alpha1",
            "kind": "CachedDatasetList",
            "metadata": {"resourceVersion": str(self.rv)},
            "items": self._selected(namespace),
        }
        return web.json_response(body)

    async def _watch(self, request: web.Request, namespace: str | None) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self.rv)
        if since < self.oldest_rv:
            # Like the real server: 200, then one ERROR event with the 410 Status.
            resp = web.StreamResponse()
            await resp.prepare(request)
            gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": f"too old resource version: {since}"}
            await resp.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            return resp
        timeout = float(request.query.get("timeoutSeconds") or 300)
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        self._watch_responses.add(resp)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sent = since
        try:
            while True:
                for rv, kind, obj in list(self.events):
                    if rv > sent and namespace in (None, obj["metadata"]["namespace"]):
                        await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                    sent = max(sent, rv)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return resp
                async with self._changed:
                    try:
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    except asyncio.TimeoutError:
                        pass
        finally:
            self._watch_responses.discard(resp)

    async def _create(self, request: web.Request) -> web.Response:
        obj = await request.json()
        obj.setdefault("metadata", {})["namespace"] = request.match_info["ns"]
        try:
            return web.json_response(await self._create_object(obj), status=201)
        except KeyError as e:
            return status_body(409, "AlreadyExists", str(e))
        except ValueError as e:
            return status_body(422, "Invalid", str(e))

    async def _get(self, request: web.Request) -> web.Response:
        obj = self.get(request.match_info["ns"], request.match_info["name"])
        if obj is None:
            return status_body(404, "NotFound", "cacheddatasets.cachefs.io not found")
        return web.json_response(obj)

    async def _patch_any(self, request: web.Request, status: bool) -> web.Response:
        if request.content_type != "application/merge-patch+json":
            return status_body(415, "UnsupportedMediaType", f"this fake takes merge patches, not {request.content_type}")
        try:
            obj = await self.patch(request.match_info["ns"], request.match_info["name"], await request.json(), status)
        except LookupError as e:
            return status_body(404, "NotFound", str(e))
        except ConflictError as e:
            return status_body(409, "Conflict", str(e))
        except ValueError as e:
            return status_body(422, "Invalid", str(e))
        return web.json_response(obj)

    async def _patch(self, request: web.Request) -> web.Response:
        return await self._patch_any(request, status=False)

    async def _patch_status(self, request: web.Request) -> web.Response:
        return await self._patch_any(request, status=True)

    async def _delete(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(await self.delete(request.match_info["ns"], request.match_info["name"]))
        except LookupError as e:
            return status_body(404, "NotFound", str(e))

    async def _get_secret(self, request: web.Request) -> web.Response:
        secret = self.secrets.get((request.match_info["ns"], request.match_info["name"]))
        if secret is None:
            return status_body(404, "NotFound", f'secrets "{request.match_info["name"]}" not found')
        return web.json_response(secret)


class ConflictError(Exception):
    """A stale resourceVersion (409)."""
