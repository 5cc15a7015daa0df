"""The origin allowlist: what may be registered as a dataset's origin, and the clear 403
that names the setting to change when something is refused.

Refusals are proved over real HTTP against the session cluster, whose allowlist is the
default one plus pytest's temporary directory (file://) and 127.0.0.1 (the S3 servers).
The matching rules themselves are a table over `OriginPolicy`."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cachefs.common import wire
from server.config import ClusterConfig, DEFAULT_ALLOWED_ORIGINS
from cachefs.common.settings import load
from cachefs.common.errors import BadRequest, ConfigError, Forbidden
from conftest import NAMESPACE, write_tree
from server.origin_policy import OriginPolicy


async def add(cluster, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(headers=wire.bearer(cluster.admin_token)) as s:
        async with s.post(f"{cluster.endpoints[0]}{wire.DATASETS}", json=body) as r:
            return r.status, json.loads(await r.read())


def metadata_s3(endpoint: str) -> dict[str, Any]:
    return {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint}}


# (what it proves, origin, storage options, status, the setting the message must name)
REFUSED = [
    ("a host path outside every root", "file:///etc", {}, 403, "allowed_origins"),
    ("the root of the host", "file:///", {}, 403, "allowed_origins"),
    ("'..' climbing out of an allowed root", "file://{root}/../../../etc", {}, 403, "allowed_origins"),
    ("a symlink out of an allowed root", "file://{root}/{link}", {}, 403, "allowed_origins"),
    ("a relative local path", "file://etc/passwd", {}, 400, ""),
    ("a protocol nobody listed", "memory://anything", {}, 403, "allowed_origins"),
    ("fsspec's other name for local files", "local:///etc", {}, 403, "allowed_origins"),
    ("a chained URL", "simplecache::https://example.com/data", {}, 400, ""),
    ("a loopback address other than the allowed one", "http://127.0.0.2:8080/data", {}, 403, "allowed_origin_hosts"),
    ("IPv6 loopback", "http://[::1]/data", {}, 403, "allowed_origin_hosts"),
    ("the metadata address", "http://169.254.169.254/latest/meta-data/", {}, 403, "allowed_origin_hosts"),
    ("the metadata address as a decimal number", "http://2852039166/latest/", {}, 403, "allowed_origin_hosts"),
    ("the metadata address mapped into IPv6", "http://[::ffff:169.254.169.254]/x", {}, 403, "allowed_origin_hosts"),
    ("the metadata address behind a user name", "https://example.com@169.254.169.254/x", {}, 403,
     "allowed_origin_hosts"),
    ("a metadata host name", "http://metadata.google.internal/computeMetadata/v1/", {}, 403, "allowed_origin_hosts"),
    ("AWS metadata over IPv6", "http://[fd00:ec2::254]/latest/", {}, 403, "allowed_origin_hosts"),
    ("Alibaba's metadata address", "http://100.100.100.200/latest/", {}, 403, "allowed_origin_hosts"),
    ("another link-local address", "http://169.254.10.1/data", {}, 403, "allowed_origin_hosts"),
    ("IPv6 link-local", "http://[fe80::1]/data", {}, 403, "allowed_origin_hosts"),
    ("the unspecified address", "http://0.0.0.0:8080/data", {}, 403, "allowed_origin_hosts"),
    ("an S3 endpoint at the metadata address", "s3://latest/meta-data", metadata_s3("http://169.254.169.254"), 403,
     "allowed_origin_hosts"),
    ("an S3 endpoint nested deep in the options", "s3://b/p",
     {"config_kwargs": {"proxies": {"http": "http://169.254.169.254:80"}}}, 403, "allowed_origin_hosts"),
]


@pytest.fixture(scope="module")
def escape_link(tmp_path_factory) -> Path:
    """A symlink inside pytest's (allowed) temporary tree that points at /etc."""
    link = tmp_path_factory.mktemp("links") / "etc-link"
    link.symlink_to("/etc")
    return link


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
async def test_a_refused_origin_gets_a_clear_error_naming_the_setting(cachefs_cluster, sample_origin, escape_link,
                                                                      case) -> None:
    _, origin, options, status, setting = case
    origin = origin.format(root=sample_origin, link=os.path.relpath(escape_link, sample_origin))
    name = cachefs_cluster.unique("refused")
    got, doc = await add(cachefs_cluster, {"name": name, "origin": origin, "storage_options": options})
    assert got == status, doc
    if setting:
        assert doc["error"] == wire.FORBIDDEN and doc["setting"] == setting
        assert setting in doc["message"] and "cachefs up" in doc["message"]
    assert "Traceback" not in doc["message"]
    async with aiohttp.ClientSession(headers=wire.bearer(cachefs_cluster.token)) as s:
        async with s.get(f"{cachefs_cluster.endpoints[0]}/v1/datasets/{name}") as r:
            assert r.status == 404  # nothing was registered


def test_an_allowed_local_root_and_an_allowed_loopback_s3_register(cachefs_cluster, sample_origin,
                                                                   s3_origin) -> None:
    assert cachefs_cluster.add_dataset(cachefs_cluster.unique("allowed-file"), f"file://{sample_origin}").files > 0
    url, options, files = s3_origin
    info = cachefs_cluster.add_dataset(cachefs_cluster.unique("allowed-s3"), url, storage_options=options)
    assert info.files == len(files)


def test_refresh_checks_the_allowlist_of_the_moment(cachefs_cluster, tmp_path) -> None:
    """An origin registered while allowed is refused on refresh once the list no longer has it."""
    import ray

    origin = write_tree(tmp_path / "o", {"a.bin": b"a" * 100})
    name = cachefs_cluster.unique("narrowed")
    cachefs_cluster.add_dataset(name, f"file://{origin}")
    coordinator = ray.get_actor("cachefs-coordinator", namespace=NAMESPACE)
    before = OriginPolicy(cachefs_cluster.config.allowed_origins, cachefs_cluster.config.allowed_origin_hosts)
    ray.get(coordinator.set_origin_policy.remote(OriginPolicy(DEFAULT_ALLOWED_ORIGINS)), timeout=30)
    try:
        async def refresh() -> None:
            async with cachefs_cluster.admin() as a:
                await a.refresh_dataset(name)

        with pytest.raises(Forbidden, match="allowed_origins"):
            asyncio.run(refresh())
    finally:
        ray.get(coordinator.set_origin_policy.remote(before), timeout=30)


# ---- the matching rules -----------------------------------------------------------------

# (what it proves, allowed_origins, allowed hosts, origin, storage options, allowed?)
RULES = [
    ("a bare protocol allows all of it", ("s3://",), (), "s3://any/bucket", {}, True),
    ("a prefix allows what lies under it", ("s3://team/sets/",), (), "s3://team/sets/imagenet", {}, True),
    ("a prefix allows itself", ("s3://team/sets/",), (), "s3://team/sets", {}, True),
    ("a prefix is whole segments", ("s3://team/sets",), (), "s3://team/setsx/a", {}, False),
    ("another bucket is not under the prefix", ("s3://team/",), (), "s3://team2/a", {}, False),
    ("a protocol is not another", ("s3://",), (), "gs://bucket/a", {}, False),
    ("a local root allows its tree", ("file:///data/",), (), "file:///data/coco", {}, True),
    ("a local root is whole segments", ("file:///data",), (), "file:///data2/coco", {}, False),
    ("file:// with no path allows every local path", ("file://",), (), "file:///etc", {}, True),
    ("no local root by default", DEFAULT_ALLOWED_ORIGINS, (), "file:///data/coco", {}, False),
    ("http to a public address", ("https://",), (), "https://93.184.216.34/data", {}, True),
    ("a host listed by name is reachable", ("http://",), ("minio.local",), "http://minio.local:9000/x", {}, True),
    ("a host listed by address", ("s3://",), ("127.0.0.1",), "s3://b",
     {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}, True),
    ("a CIDR covers its addresses", ("http://",), ("169.254.0.0/16",), "http://169.254.169.254/x", {}, True),
    ("an address outside the CIDR", ("http://",), ("127.0.0.0/30",), "http://127.0.0.9/x", {}, False),
]


@pytest.mark.parametrize("case", RULES, ids=[c[0] for c in RULES])
def test_the_allowlist_rules(case) -> None:
    _, allowed, hosts, origin, options, ok = case
    check = OriginPolicy(allowed, hosts).check(origin, options)
    if ok:
        asyncio.run(check)
    else:
        with pytest.raises(Forbidden):
            asyncio.run(check)


def test_dot_segments_outside_local_paths_are_refused() -> None:
    with pytest.raises(BadRequest, match=r"'\.\.'"):
        asyncio.run(OriginPolicy(("s3://team/",)).check("s3://team/../other/x", {}))


# ---- the settings -------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("allowed_origins", ("/data",), "protocol or URL prefix"),
    ("allowed_origins", ("simplecache::s3://",), "protocol or URL prefix"),
    ("allowed_origin_hosts", ("Not A Host",), "host name, an IP"),
])
def test_bad_allowlist_settings_are_refused_at_start(field, value, message) -> None:
    with pytest.raises(ConfigError, match=message):
        ClusterConfig(**{field: value})


def test_the_allowlist_comes_from_the_environment_and_up_flags_add_to_it(tmp_path, monkeypatch) -> None:
    from server.cli import cluster_config
    from cachefs.cli.main import build_parser

    env = {"CACHEFS_HOME": str(tmp_path), "CACHEFS_ALLOWED_ORIGINS": "s3://team/, file:///data/",
           "CACHEFS_ALLOWED_ORIGIN_HOSTS": "10.0.0.0/8"}
    assert load(ClusterConfig, env=env).allowed_origins == ("s3://team/", "file:///data/")
    assert load(ClusterConfig, env={"CACHEFS_HOME": str(tmp_path)}).allowed_origins == DEFAULT_ALLOWED_ORIGINS
    for key in list(os.environ):
        if key.startswith("CACHEFS_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(["up", "--allow-origin", "file:///scratch/", "--allow-origin-host", "minio"])
    config = cluster_config(args)
    assert config.allowed_origins == ("s3://team/", "file:///data/", "file:///scratch/")
    assert config.allowed_origin_hosts == ("10.0.0.0/8", "minio")
