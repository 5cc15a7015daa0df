"""End to end: every byte read through cachefs:// equals the origin's, on a 3-node Ray
cluster, for a local origin and an S3 origin (moto on 127.0.0.1)."""

from __future__ import annotations

import random

import pytest

from conftest import sample_files


def origin_bytes(files: dict[str, bytes]) -> dict[str, bytes]:
    return {rel: data for rel, data in files.items()}


@pytest.fixture(scope="module")
def local_dataset(cachefs_cluster, sample_origin) -> tuple[str, dict[str, bytes]]:
    name = cachefs_cluster.unique("local")
    cachefs_cluster.add_dataset(name, f"file://{sample_origin}")
    return name, sample_files()


@pytest.fixture(scope="module")
def s3_dataset(cachefs_cluster, s3_origin) -> tuple[str, dict[str, bytes]]:
    url, options, files = s3_origin
    name = cachefs_cluster.unique("s3")
    cachefs_cluster.add_dataset(name, url, storage_options=options)
    return name, files


@pytest.fixture(params=["local", "s3"])
def dataset(request) -> tuple[str, dict[str, bytes]]:
    return request.getfixturevalue(f"{request.param}_dataset")


def test_whole_files_equal_the_origin(cachefs_cluster, dataset) -> None:
    name, files = dataset
    fs = cachefs_cluster.fs()
    for rel, data in files.items():
        assert fs.cat_file(f"{name}/{rel}") == data, rel
    # a second pass is served by the cache and is still exact
    got = fs.cat([f"cachefs://{name}/{rel}" for rel in files])
    assert {k.split("/", 1)[1]: v for k, v in got.items()} == files


def test_random_ranges_equal_the_origin(cachefs_cluster, dataset) -> None:
    name, files = dataset
    fs = cachefs_cluster.fs()
    rnd = random.Random(5)
    for rel, data in files.items():
        for _ in range(5):
            a = rnd.randint(0, max(0, len(data) - 1))
            b = rnd.randint(a, len(data) + 10)
            assert fs.cat_file(f"{name}/{rel}", start=a, end=b) == data[a:b], (rel, a, b)


def test_open_seek_and_read_across_blocks(cachefs_cluster, local_dataset) -> None:
    name, files = local_dataset
    data = files["val/big.bin"]
    fs = cachefs_cluster.fs()
    with fs.open(f"cachefs://{name}/val/big.bin", "rb") as f:
        assert f.size == len(data)
        f.seek(1024 * 1024 - 7)
        assert f.read(100) == data[1024 * 1024 - 7:1024 * 1024 + 93]
        f.seek(-10, 2)
        assert f.read() == data[-10:]
        f.seek(0)
        assert f.read() == data


def test_listings_equal_the_origin(cachefs_cluster, dataset) -> None:
    name, files = dataset
    fs = cachefs_cluster.fs()
    assert sorted(p.split("/", 1)[1] for p in fs.find(name)) == sorted(files)
    top = {e["name"].split("/", 1)[1]: e["type"] for e in fs.ls(name, detail=True)}
    assert top == {"README.txt": "file", "empty.bin": "file", "train": "directory", "val": "directory"}
    assert fs.info(f"{name}/val/big.bin")["size"] == len(files["val/big.bin"])
    assert fs.isdir(f"{name}/train/cats") and not fs.isdir(f"{name}/README.txt")
    assert fs.exists(f"{name}/empty.bin") and not fs.exists(f"{name}/nope")
    assert sorted(fs.glob(f"{name}/train/*/001.jpg")) == [f"{name}/train/cats/001.jpg", f"{name}/train/dogs/001.jpg"]
    assert name in [d["name"] for d in fs.ls("", detail=True)]


def test_get_copies_a_directory(cachefs_cluster, local_dataset, tmp_path) -> None:
    name, files = local_dataset
    fs = cachefs_cluster.fs()
    fs.get(f"{name}/train/dogs/", str(tmp_path / "dogs"), recursive=True)
    assert (tmp_path / "dogs" / "001.jpg").read_bytes() == files["train/dogs/001.jpg"]
    assert (tmp_path / "dogs" / "deep" / "er" / "x.bin").read_bytes() == files["train/dogs/deep/er/x.bin"]


def test_writes_are_refused_with_a_read_only_error(cachefs_cluster, local_dataset) -> None:
    name, _ = local_dataset
    fs = cachefs_cluster.fs()
    with pytest.raises(PermissionError, match="read-only"):
        fs.pipe_file(f"{name}/new.txt", b"x")
    with pytest.raises(PermissionError, match="read-only"):
        fs.open(f"{name}/new.txt", "wb")
    with pytest.raises(PermissionError, match="read-only"):
        fs.rm(f"{name}/README.txt")


def test_missing_things_raise_file_not_found(cachefs_cluster, local_dataset) -> None:
    name, _ = local_dataset
    fs = cachefs_cluster.fs()
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{name}/no/such/file")
    with pytest.raises(FileNotFoundError):
        fs.cat_file("no-such-dataset/file")
    with pytest.raises(IsADirectoryError):
        fs.cat_file(f"{name}/train")


def test_fsspec_url_with_endpoint_from_environment(cachefs_cluster, local_dataset, monkeypatch) -> None:
    import fsspec

    name, files = local_dataset
    monkeypatch.setenv("CACHEFS_ENDPOINT", cachefs_cluster.endpoint)
    monkeypatch.setenv("CACHEFS_TOKEN", cachefs_cluster.token)
    with fsspec.open(f"cachefs://{name}/train/cats/001.jpg", "rb", skip_instance_cache=True) as f:
        assert f.read() == files["train/cats/001.jpg"]


def test_readinto_fills_a_reused_buffer_across_blocks(cachefs_cluster, local_dataset) -> None:
    name, files = local_dataset
    data = files["val/big.bin"]
    buf = bytearray(700_000)  # not a divisor of the block size: reads straddle blocks
    got = bytearray()
    with cachefs_cluster.fs().open(f"{name}/val/big.bin") as f:
        while n := f.readinto(buf):
            got += buf[:n]
    assert got == data


def test_a_script_that_reads_and_exits_prints_no_warnings(cachefs_cluster, local_dataset) -> None:
    import subprocess
    import sys

    name, files = local_dataset
    script = f"""
import fsspec
from cachefs.filesystem import CachefsFileSystem
with fsspec.open("cachefs://{name}/README.txt", "rb") as f:
    assert f.read() == {files["README.txt"]!r}
def scoped():  # an instance that goes away before the end
    return CachefsFileSystem(skip_instance_cache=True).cat(["{name}/train/cats/001.jpg", "{name}/val/big.bin"])
assert len(scoped()) == 2
kept = CachefsFileSystem(skip_instance_cache=True)  # one alive at exit
assert kept.cat_file("{name}/train/dogs/001.jpg") == {files["train/dogs/001.jpg"][:0]!r} + kept.cat_file("{name}/train/dogs/001.jpg")
print("read")
"""
    env = {**cachefs_cluster.env, "CACHEFS_ENDPOINT": cachefs_cluster.endpoint, "CACHEFS_TOKEN": cachefs_cluster.token}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "read", r.stderr
    assert "Unclosed" not in r.stderr and "Traceback" not in r.stderr, r.stderr
