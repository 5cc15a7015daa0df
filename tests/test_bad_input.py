"""Every bad input over real HTTP gets a clear JSON error with the right status, and the
node keeps serving afterwards. No 500s, no tracebacks, nothing outside the dataset."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from conftest import http_call as call
from cachefs.common import wire


@pytest.fixture(scope="module")
def ds(cachefs_cluster, sample_origin) -> dict[str, Any]:
    name = cachefs_cluster.unique("bad")
    info = cachefs_cluster.add_dataset(name, f"file://{sample_origin}")
    return {"name": name, "snapshot": info.snapshot, "base": cachefs_cluster.endpoints[0],
            "auth": wire.bearer(cachefs_cluster.token), "admin": wire.bearer(cachefs_cluster.admin_token)}




def block_url(ds: dict[str, Any], path: str, index: Any = 0, snapshot: str | None = None, name: str | None = None) -> str:
    from urllib.parse import urlencode

    q = urlencode({"snapshot": snapshot or ds["snapshot"], "path": path, "index": index})
    return f"{ds['base']}/v1/blocks/{name or ds['name']}?{q}"


CASES = [
    # (what it proves, method, url builder, headers: "auth" | "none" | "wrong", extra, status, code)
    ("no token is refused", "GET", lambda d: f"{d['base']}/v1/datasets", "none", {}, 401, "unauthorized"),
    ("a wrong token is refused", "GET", lambda d: f"{d['base']}/v1/datasets", "wrong", {}, 401, "unauthorized"),
    ("metrics need the token", "GET", lambda d: f"{d['base']}/v1/metrics", "none", {}, 401, "unauthorized"),
    ("blocks need the token", "GET", lambda d: block_url(d, "README.txt"), "none", {}, 401, "unauthorized"),
    ("unknown dataset", "GET", lambda d: f"{d['base']}/v1/datasets/nope-nope", "auth", {}, 404, "not_found"),
    ("unknown dataset's block", "GET", lambda d: block_url(d, "README.txt", name="nope-nope"), "auth", {}, 404, "not_found"),
    ("unknown file", "GET", lambda d: block_url(d, "no/such/file"), "auth", {}, 404, "not_found"),
    ("unknown route", "GET", lambda d: f"{d['base']}/v1/nothing-here", "auth", {}, 404, "not_found"),
    ("dataset name with capitals", "GET", lambda d: f"{d['base']}/v1/datasets/BAD", "auth", {}, 400, "bad_request"),
    ("dot-dot path", "GET", lambda d: block_url(d, "../../etc/passwd"), "auth", {}, 400, "bad_request"),
    ("dot-dot inside a path", "GET", lambda d: block_url(d, "train/../../x"), "auth", {}, 400, "bad_request"),
    ("absolute path", "GET", lambda d: block_url(d, "/etc/passwd"), "auth", {}, 400, "bad_request"),
    ("NUL in a path", "GET", lambda d: block_url(d, "README.txt\x00.jpg"), "auth", {}, 400, "bad_request"),
    ("index that is not a number", "GET", lambda d: block_url(d, "README.txt", index="x"), "auth", {}, 400, "bad_request"),
    ("missing query parameters", "GET", lambda d: f"{d['base']}/v1/blocks/{d['name']}", "auth", {}, 400, "bad_request"),
    ("block past the end of the file", "GET", lambda d: block_url(d, "README.txt", index=1), "auth", {}, 416,
     "range_not_satisfiable"),
    ("negative block index", "GET", lambda d: block_url(d, "README.txt", index=-1), "auth", {}, 416,
     "range_not_satisfiable"),
    ("byte range past the block", "GET", lambda d: block_url(d, "README.txt"), "auth",
     {"headers": {"Range": "bytes=5000-6000"}}, 416, "range_not_satisfiable"),
    ("malformed range", "GET", lambda d: block_url(d, "README.txt"), "auth", {"headers": {"Range": "bytes=zz"}}, 400,
     "bad_request"),
    ("a snapshot the dataset never had", "GET", lambda d: block_url(d, "README.txt", snapshot="0" * 20), "auth", {},
     404, "not_found"),
    ("stale ring epoch", "GET", lambda d: block_url(d, "README.txt"), "auth", {"headers": {wire.EPOCH_HEADER: "-1"}},
     409, "stale_epoch"),
    ("add with a body that is not JSON", "POST", lambda d: f"{d['base']}/v1/datasets", "auth", {"data": b"{nope"}, 400,
     "bad_request"),
    ("add without an origin", "POST", lambda d: f"{d['base']}/v1/datasets", "auth", {"json": {"name": "x1"}}, 400,
     "bad_request"),
    ("add with a bad name", "POST", lambda d: f"{d['base']}/v1/datasets", "auth",
     {"json": {"name": "../x", "origin": "file:///tmp"}}, 400, "bad_request"),
    ("add with an origin that is not a URL", "POST", lambda d: f"{d['base']}/v1/datasets", "auth",
     {"json": {"name": "x2", "origin": "/tmp/data"}}, 400, "bad_request"),
    ("add with an unknown protocol", "POST", lambda d: f"{d['base']}/v1/datasets", "auth",
     {"json": {"name": "x3", "origin": "nosuchproto://b/p"}}, 400, "bad_request"),
    ("add with replicas 0", "POST", lambda d: f"{d['base']}/v1/datasets", "auth",
     {"json": {"name": "x4", "origin": "file:///tmp", "replicas": 0}}, 400, "bad_request"),
    ("add with an unknown field", "POST", lambda d: f"{d['base']}/v1/datasets", "auth",
     {"json": {"name": "x5", "origin": "file:///tmp", "colour": "red"}}, 400, "bad_request"),
    ("add the same name with another origin", "POST", lambda d: f"{d['base']}/v1/datasets", "auth",
     {"json": {"name": "__same__", "origin": "s3://somewhere/else"}}, 409, "conflict"),
    ("add with a namespace that is not a namespace name", "POST", lambda d: f"{d['base']}/v1/datasets", "auth",
     {"json": {"name": "x6", "origin": "s3://b/p", "allowed_namespaces": ["Team_A"]}}, 400, "bad_request"),
    ("unknown operation", "GET", lambda d: f"{d['base']}/v1/operations/nope", "auth", {}, 404, "not_found"),
    ("remove an unknown dataset", "DELETE", lambda d: f"{d['base']}/v1/datasets/nope-nope", "auth", {}, 404, "not_found"),
    ("wrong method", "PUT", lambda d: f"{d['base']}/v1/datasets", "auth", {}, 405, "bad_request"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_bad_input_gets_a_clear_error(ds, case) -> None:
    _, method, url, auth, extra, status, code = case
    # reads with the reader token; what would change the cluster with the admin token (tests/test_auth.py)
    token = ds["auth"] if method == "GET" else ds["admin"]
    headers = {"none": {}, "wrong": wire.bearer("not-the-token"), "auth": dict(token)}[auth]
    headers.update(extra.pop("headers", {}) if "headers" in extra else {})
    if "json" in extra and extra["json"].get("name") == "__same__":
        extra = {"json": {**extra["json"], "name": ds["name"]}}
    got_status, body = await call(method, url(ds), headers=headers, **extra)
    assert got_status == status, body
    assert body["error"] == code
    assert len(body["message"]) > 10 and "Traceback" not in body["message"]
    # and the node still serves
    ok_status, ok_body = await call("GET", block_url(ds, "README.txt"), headers=ds["auth"])
    assert ok_status == 200 and ok_body == b"a small dataset for tests\n"


async def test_health_needs_no_token(ds) -> None:
    status, body = await call("GET", f"{ds['base']}/v1/health")
    assert status == 200 and body["status"] == "ok"


async def test_range_requests_return_partial_content(ds) -> None:
    async with aiohttp.ClientSession(headers=ds["auth"]) as s:
        async with s.get(block_url(ds, "README.txt"), headers={"Range": "bytes=2-6"}) as r:
            assert r.status == 206
            assert await r.read() == b"small"
            assert r.headers["Content-Range"] == "bytes 2-6/26"


def test_origin_that_cannot_be_read_is_503_with_the_origins_error(cachefs_cluster) -> None:
    """An S3 origin whose server went away: 503, and the message carries the origin's error."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://{host}:{port}",
                                                          "region_name": "us-east-1"}}
    try:
        s3 = boto3.client("s3", aws_access_key_id="k", aws_secret_access_key="s", **opts["client_kwargs"])
        s3.create_bucket(Bucket="gone")
        s3.put_object(Bucket="gone", Key="d/file.bin", Body=b"x" * 1000)
        name = cachefs_cluster.unique("gone")
        info = cachefs_cluster.add_dataset(name, "s3://gone/d", storage_options=opts)
    finally:
        server.stop()
    d = {"name": name, "snapshot": info.snapshot, "base": cachefs_cluster.endpoints[0]}
    # ask the block's owner directly so the answer is the node's own, not a client fallback
    from shard import Ring, block_key

    ring_status, ring_doc = asyncio.run(call("GET", f"{d['base']}/v1/ring", headers=wire.bearer(cachefs_cluster.token)))
    ring = Ring.from_json(ring_doc)
    owner = ring.member(ring.owners(block_key(name, info.snapshot, "file.bin", 0))[0]).url
    status, body = asyncio.run(call("GET", block_url({**d, "base": owner}, "file.bin"),
                                    headers=wire.bearer(cachefs_cluster.token)))
    assert status == 503, body
    assert body["error"] == "origin_unavailable"
    assert "s3://gone/d" in body["message"] and "file.bin" in body["message"]
