"""TLS round trip: a cache cluster whose node serves https:// with a certificate made in
the test, registered and read through the real clients (aiohttp for metadata and admin
calls, the BufferedProtocol block client for blocks), and refused by clients that do not
trust it. The certificate names only a DNS name, never the node's address, as on
Kubernetes where nodes are reached by pod IP and clients check `tls_server_name`."""

from __future__ import annotations

import asyncio
import datetime
import os
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from cachefs.admin import AdminClient
from cachefs.config import ClientConfig
from server.config import ClusterConfig, DEFAULT_ALLOWED_ORIGINS
from cachefs.common.errors import ConfigError, NodeUnavailable
from conftest import BLOCK, MiB, sample_files, write_tree

SERVER_NAME = "cachefs.tls.test"
NAMESPACE = "cachefs-tls-test"


def make_ca_and_cert(where: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signs for SERVER_NAME: (ca.crt, tls.crt, tls.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("cachefs test CA")).issuer_name(name("cachefs test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name(SERVER_NAME)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = where / "ca.crt", where / "tls.crt", where / "tls.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    fd = os.open(paths[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def tls_cluster(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One https:// cache node with a coordinator of its own, on the session's Ray."""
    from server import hosting

    home = tmp_path_factory.mktemp("tls-home")
    ca, cert, key = make_ca_and_cert(home)
    origin = write_tree(home / "origin", sample_files(seed=7))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    env["CACHEFS_HOME"] = str(home)
    config = ClusterConfig(nodes=1, memory_bytes=16 * MiB, disk_bytes=0, state_dir=str(home / "state"),
                           address=ray_cluster.address, block_size=BLOCK, namespace=NAMESPACE,
                           allowed_origins=(*DEFAULT_ALLOWED_ORIGINS, f"file://{origin}/"),
                           tls_cert=str(cert), tls_key=str(key))
    handle = hosting.up(config, env)
    try:
        yield {"handle": handle, "ca": str(ca), "origin": origin}
    finally:
        hosting.down(env, namespace=NAMESPACE)


def client(tls: dict[str, Any], **kw: Any) -> ClientConfig:
    h = tls["handle"]
    return ClientConfig(**{"endpoint": h.endpoint, "token": h.token, "admin_token": h.admin_token,
                           "ca_bundle": tls["ca"], "tls_server_name": SERVER_NAME, "retries": 0,
                           "connect_timeout": 5.0, "origin_fallback": False, **kw})


def test_a_tls_node_round_trips_a_dataset(tls_cluster) -> None:
    from cachefs.filesystem import CachefsFileSystem

    assert tls_cluster["handle"].endpoint.startswith("https://")
    config = client(tls_cluster)

    async def register() -> Any:
        async with AdminClient(config) as a:
            return await a.wait(await a.add_dataset("over-tls", f"file://{tls_cluster['origin']}"), timeout=60)

    assert asyncio.run(register()).finished_ok
    fs = CachefsFileSystem(skip_instance_cache=True, **{k: getattr(config, k) for k in (
        "endpoint", "token", "ca_bundle", "tls_server_name", "origin_fallback")})
    files = sample_files(seed=7)
    for rel in ("README.txt", "val/big.bin", "train/dogs/001.jpg"):  # several blocks, and small files
        assert fs.cat_file(f"over-tls/{rel}") == files[rel]
    assert fs.cat_file("over-tls/val/big.bin", start=BLOCK - 10, end=BLOCK + 10) == files["val/big.bin"][BLOCK - 10:
                                                                                                          BLOCK + 10]


@pytest.mark.parametrize("case,overrides", [
    ("a client that does not trust the CA", {"ca_bundle": ""}),
    ("a client that checks the node's address instead of its name", {"tls_server_name": ""}),
])
def test_an_untrusted_node_is_refused(tls_cluster, case, overrides) -> None:
    async def ask() -> Any:
        async with AdminClient(client(tls_cluster, **overrides)) as a:
            return await a.list_datasets()

    with pytest.raises(NodeUnavailable, match="(?i)certificate"):
        asyncio.run(ask())


def test_blocks_are_refused_by_an_untrusting_block_client(tls_cluster) -> None:
    from cachefs.blockproto import FrameClient

    async def fetch() -> Any:
        blocks = FrameClient(tls_cluster["handle"].token, 5.0, 5.0)
        try:
            body = b'{"snapshot": "s", "items": [["p", 0, 0, 1]]}'
            return await blocks.read(tls_cluster["handle"].endpoint.split(",")[0], "d", body, 0,
                                     [memoryview(bytearray(1))])
        finally:
            blocks.close()

    with pytest.raises(NodeUnavailable, match="(?i)certificate"):
        asyncio.run(fetch())


def test_plain_http_to_a_tls_node_gets_no_answer(tls_cluster) -> None:
    async def ask() -> int:
        url = tls_cluster["handle"].endpoint.replace("https://", "http://") + "/v1/health"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.get(url) as r:
                return r.status

    with pytest.raises(aiohttp.ClientError):
        asyncio.run(ask())


def test_tls_settings_are_checked_when_built(tmp_path) -> None:
    from cachefs.common.tls import client_context
    from server.tls import server_context

    with pytest.raises(ConfigError, match="go together"):
        ClusterConfig(tls_cert="/etc/cert.pem")
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        server_context(str(tmp_path / "missing.crt"), str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match="CA bundle"):
        client_context(str(tmp_path / "missing-ca.pem"))
