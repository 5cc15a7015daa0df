"""Two tokens over real HTTP: the reader token (pods, clients) reads, the admin token (CLI,
operator) also changes datasets. Every admin route refuses the reader token with a 403
that names the token needed, and does nothing; every reader route takes either token."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import pytest

from cachefs.common import wire
from cachefs.admin import AdminClient
from cachefs.config import ClientConfig
from cachefs.common.errors import ConfigError, Forbidden
from conftest import http_call, run_cli


@pytest.fixture(scope="module")
def ds(cachefs_cluster, sample_origin) -> dict[str, Any]:
    name = cachefs_cluster.unique("auth")

    async def add() -> wire.OperationInfo:
        async with cachefs_cluster.admin() as a:
            return await a.wait(await a.add_dataset(name, f"file://{sample_origin}"), timeout=60)

    op = cachefs_cluster.run(add())
    assert op.finished_ok, op
    return {"name": name, "snapshot": op.result["snapshot"], "op": op.id, "base": cachefs_cluster.endpoints[0],
            "reader": cachefs_cluster.token, "admin": cachefs_cluster.admin_token}


async def call(method: str, url: str, token: str | None, **kw: Any) -> tuple[int, Any]:
    return await http_call(method, url, wire.bearer(token) if token else {}, **kw)


def url(ds: dict[str, Any], route: str, **query: str) -> str:
    path = route.format(name=ds["name"], op_id=ds["op"], node_id="no-such-node")
    return f"{ds['base']}{path}" + (f"?{urlencode(query)}" if query else "")


# (what it would do, method, route, body): every route that changes the cluster
ADMIN_ROUTES = [
    ("register a dataset", "POST", wire.DATASETS, {"name": "by-a-reader", "origin": "s3://bucket/p"}),
    ("update a dataset", "PATCH", wire.DATASET, {"replicas": 2}),
    ("remove a dataset", "DELETE", wire.DATASET, None),
    ("refresh a dataset", "POST", wire.DATASET_REFRESH, None),
    ("warm a dataset", "POST", wire.DATASET_WARM, None),
    ("cancel an operation", "DELETE", wire.OPERATION, None),
    ("drain a cache node", "POST", wire.NODE_DRAIN, None),
]


def test_the_table_above_names_every_admin_call() -> None:
    admin_calls = {(c.method, c.route) for c in wire.ADMIN_CALLS if c.role == wire.ADMIN}
    assert admin_calls == {(method, route) for _, method, route, _ in ADMIN_ROUTES}


@pytest.mark.parametrize("case", ADMIN_ROUTES, ids=[c[0] for c in ADMIN_ROUTES])
async def test_each_admin_route_refuses_the_reader_token_and_says_which_token_it_needs(ds, case) -> None:
    _, method, route, body = case
    status, doc = await call(method, url(ds, route), ds["reader"], json=body)
    assert status == 403, doc
    assert doc["error"] == wire.FORBIDDEN and doc["needs"] == wire.ADMIN
    assert "admin token" in doc["message"] and "CACHEFS_ADMIN_TOKEN" in doc["message"]
    # and nothing happened
    status, info = await call("GET", url(ds, wire.DATASET), ds["reader"])
    assert status == 200 and info["snapshot"] == ds["snapshot"]
    status, _ = await call("GET", url(ds, wire.DATASET.replace("{name}", "by-a-reader")), ds["reader"])
    assert status == 404


READER_ROUTES = [
    ("the ring", wire.RING, {}),
    ("the status", wire.STATUS, {}),
    ("metrics", wire.METRICS, {}),
    ("the dataset list", wire.DATASETS, {}),
    ("a dataset", wire.DATASET, {}),
    ("a manifest", wire.DATASET_MANIFEST, {}),
    ("an operation", wire.OPERATION, {}),
    ("a block", wire.BLOCK, {"path": "README.txt", "index": "0"}),
]


@pytest.mark.parametrize("who", ["reader", "admin"])
@pytest.mark.parametrize("case", READER_ROUTES, ids=[c[0] for c in READER_ROUTES])
async def test_reader_routes_take_the_reader_token_and_the_admin_token(ds, case, who) -> None:
    _, route, query = case
    if route == wire.BLOCK:
        query = {**query, "snapshot": ds["snapshot"]}
    status, body = await call("GET", url(ds, route, **query), ds[who])
    assert status == 200, body


@pytest.mark.parametrize("token", [None, "not-a-token"], ids=["no token", "a wrong token"])
async def test_without_a_valid_token_every_route_but_health_is_401(ds, token) -> None:
    for _, method, route, body in ADMIN_ROUTES:
        assert (await call(method, url(ds, route), token, json=body))[0] == 401
    for _, route, _query in READER_ROUTES:
        assert (await call("GET", url(ds, route), token))[0] == 401
    assert (await call("GET", url(ds, "/v1/no-such-route"), token))[0] == 401
    assert (await call("GET", url(ds, wire.HEALTH), token))[0] == 200


async def test_the_admin_client_with_only_a_reader_token_reads_and_explains_a_refusal(ds, cachefs_cluster) -> None:
    reader_only = ClientConfig(endpoint=cachefs_cluster.endpoint, token=ds["reader"])
    async with AdminClient(reader_only) as a:
        assert ds["name"] in [d.name for d in await a.list_datasets()]
        with pytest.raises(Forbidden) as err:
            await a.remove_dataset(ds["name"])
    assert isinstance(err.value, PermissionError)
    assert "admin token" in str(err.value) and "only a reader token" in str(err.value)
    assert (await call("GET", url(ds, wire.DATASET), ds["reader"]))[0] == 200


def test_the_cli_with_only_the_reader_token_lists_but_cannot_remove(ds, cachefs_cluster, tmp_path) -> None:
    env = {**cachefs_cluster.env, "CACHEFS_HOME": str(tmp_path), "CACHEFS_ENDPOINT": cachefs_cluster.endpoint,
           "CACHEFS_TOKEN": ds["reader"]}
    env.pop("CACHEFS_ADMIN_TOKEN", None)
    listed = run_cli("dataset", "ls", "--json", env=env)
    assert listed.returncode == 0 and ds["name"] in listed.stdout
    removed = run_cli("dataset", "rm", ds["name"], env=env)
    assert removed.returncode == 2 and "admin token" in removed.stderr and "Traceback" not in removed.stderr
    assert run_cli("dataset", "ls", "--json", env=env).stdout.count(f'"{ds["name"]}"') == 1


def test_one_token_for_both_roles_is_refused(tmp_path) -> None:
    from server.hosting import resolve_tokens

    env = {"CACHEFS_HOME": str(tmp_path), "CACHEFS_TOKEN": "same-token-twice", "CACHEFS_ADMIN_TOKEN": "same-token-twice"}
    with pytest.raises(ConfigError, match="must differ"):
        resolve_tokens(env)


def test_tokens_come_from_the_environment_then_the_cluster_file_then_are_made_up(tmp_path) -> None:
    from server.hosting import resolve_tokens

    made = resolve_tokens({"CACHEFS_HOME": str(tmp_path)})
    assert made.reader != made.admin and len(made.admin) >= 32
    (tmp_path / "cluster.json").write_text('{"token": "recorded-reader"}')  # a file from before admin tokens
    recorded = resolve_tokens({"CACHEFS_HOME": str(tmp_path)})
    assert recorded.reader == "recorded-reader" and recorded.admin not in ("", "recorded-reader")
    given = resolve_tokens({"CACHEFS_HOME": str(tmp_path), "CACHEFS_ADMIN_TOKEN": "from-env"})
    assert (given.reader, given.admin) == ("recorded-reader", "from-env")
