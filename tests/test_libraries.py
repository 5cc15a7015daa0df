"""Libraries that call more of fsspec (DuckDB, polars, Hugging Face `datasets`) reading
cachefs:// on the real cluster, and the calls they make: times, change keys, existence,
glob with `**`, open with `block_size` and `cache_type`."""

from __future__ import annotations

import datetime
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


ROWS = 3_000


@pytest.fixture(scope="module")
def tables(cachefs_cluster, tmp_path_factory) -> str:
    """Three parquet files (one a folder deeper) and two small binaries, registered."""
    files = {}
    for part in range(3):
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": list(range(part * ROWS, (part + 1) * ROWS)),
                                 "label": [i % 7 for i in range(part * ROWS, (part + 1) * ROWS)]}),
                       buf, row_group_size=1_000)
        files[f"table/{'deep/' if part == 2 else ''}part-{part}.parquet"] = buf.getvalue()
    files["images/a.bin"] = b"a" * 3000
    files["images/b.bin"] = b"b" * 5000
    return cachefs_cluster.dataset_of(files, tmp_path_factory.mktemp("libs"), "libs")


def test_duckdb_reads_a_glob_of_parquet_files(cachefs_cluster, tables) -> None:
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    con.register_filesystem(cachefs_cluster.fs())
    one = con.execute(f"SELECT count(*), sum(id) FROM read_parquet('cachefs://{tables}/table/*.parquet')").fetchone()
    assert one == (2 * ROWS, sum(range(2 * ROWS)))
    deep = con.execute(f"SELECT count(*) FROM read_parquet('cachefs://{tables}/table/**/*.parquet')").fetchone()
    assert deep == (3 * ROWS,)
    by_label = con.execute(f"SELECT label, count(*) FROM read_parquet('cachefs://{tables}/table/**/*.parquet') "
                           "GROUP BY label ORDER BY label").fetchall()
    assert by_label == [(k, sum(1 for i in range(3 * ROWS) if i % 7 == k)) for k in range(7)]


def test_polars_reads_files_opened_through_cachefs(cachefs_cluster, tables) -> None:
    pl = pytest.importorskip("polars")
    fs = cachefs_cluster.fs()
    frames = [pl.read_parquet(fs.open(p)) for p in fs.glob(f"{tables}/table/**/*.parquet")]
    got = pl.concat(frames).sort("id")
    assert got["id"].to_list() == list(range(3 * ROWS))
    with fs.open(f"{tables}/table/part-1.parquet", cache_type="none", block_size=0) as f:
        assert pl.read_parquet(f)["id"].to_list() == list(range(ROWS, 2 * ROWS))


def test_hugging_face_datasets_loads_a_glob(cachefs_cluster, tables, tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(
        "parquet", data_files={"train": f"cachefs://{tables}/table/**/*.parquet"}, split="train",
        cache_dir=str(tmp_path), storage_options={"endpoint": cachefs_cluster.endpoint,
                                                  "token": cachefs_cluster.token})
    assert ds.num_rows == 3 * ROWS
    assert sorted(ds["id"]) == list(range(3 * ROWS))


def test_times_and_change_keys_come_from_the_snapshot(cachefs_cluster, tables) -> None:
    fs = cachefs_cluster.fs()
    path = f"{tables}/table/part-0.parquet"
    info = fs.info(path)
    snapshot_time = fs.dataset_info(tables).created
    assert info["mtime"] == snapshot_time > 0
    assert fs.modified(path) == fs.created(path) == datetime.datetime.fromtimestamp(
        snapshot_time, tz=datetime.timezone.utc)
    assert fs.info(f"{tables}/table")["mtime"] == snapshot_time
    assert fs.ukey(path) == fs.ukey(f"cachefs://{path}") != fs.ukey(f"{tables}/table/part-1.parquet")
    assert fs.checksum(path) == int(fs.ukey(path)[:16], 16)
    with pytest.raises(FileNotFoundError):
        fs.modified(f"{tables}/table/nope.parquet")
    with pytest.raises(FileNotFoundError):
        fs.ukey(f"{tables}/nope")


def test_a_refresh_that_changes_a_file_changes_its_key_and_time(cachefs_cluster, tmp_path) -> None:
    name = cachefs_cluster.dataset_of({"a.bin": b"one"}, tmp_path, "ukey")
    fs = cachefs_cluster.fs()
    key, when = fs.ukey(f"{name}/a.bin"), fs.modified(f"{name}/a.bin")
    (tmp_path / "a.bin").write_bytes(b"two!")

    async def refresh():
        async with cachefs_cluster.admin() as a:
            return await a.wait(await a.refresh_dataset(name), timeout=60)

    assert cachefs_cluster.run(refresh()).state == "succeeded"
    fs.invalidate_cache()
    assert fs.cat(f"{name}/a.bin") == b"two!"
    assert fs.ukey(f"{name}/a.bin") != key and fs.modified(f"{name}/a.bin") > when


def test_exists_and_isdir_answer_for_files_folders_and_strangers(cachefs_cluster, tables) -> None:
    fs = cachefs_cluster.fs()
    assert fs.exists(f"{tables}/images/a.bin") and fs.isfile(f"{tables}/images/a.bin")
    assert fs.exists(f"cachefs://{tables}/table/deep") and fs.isdir(f"{tables}/table/deep")
    assert fs.exists(tables) and fs.isdir(tables)
    assert not fs.isdir(f"{tables}/images/a.bin") and not fs.isfile(f"{tables}/images")
    for missing in (f"{tables}/images/c.bin", f"{tables}/nope/a.bin", "no-such-dataset/x", "UPPER/x"):
        assert not fs.exists(missing) and not fs.isdir(missing) and not fs.isfile(missing)
    with pytest.raises(ValueError, match="'..'"):
        fs.exists(f"{tables}/../etc/passwd")


@pytest.mark.parametrize("pattern, expected", [
    ("table/*.parquet", ["table/part-0.parquet", "table/part-1.parquet"]),
    ("table/**/*.parquet", ["table/deep/part-2.parquet", "table/part-0.parquet", "table/part-1.parquet"]),
    ("**/*.bin", ["images/a.bin", "images/b.bin"]),
    ("images/[a]?bin", ["images/a.bin"]),
    ("*", ["images", "table"]),
    ("table/*", ["table/deep", "table/part-0.parquet", "table/part-1.parquet"]),
    ("table/**", ["table", "table/deep", "table/deep/part-2.parquet", "table/part-0.parquet",
                  "table/part-1.parquet"]),
    ("t*/d*", ["table/deep"]),
    ("nope/**", []),
    ("images/a.bin", ["images/a.bin"]),
])
def test_glob_matches_what_fsspec_matches(cachefs_cluster, tables, pattern, expected) -> None:
    """The manifest's answer equals fsspec's own glob (walking `ls`) on the same tree."""
    from fsspec.asyn import AsyncFileSystem, sync

    fs = cachefs_cluster.fs()
    got = fs.glob(f"cachefs://{tables}/{pattern}")
    assert got == [f"{tables}/{p}" for p in expected]
    walked = sync(fs.loop, AsyncFileSystem._glob, fs, f"{tables}/{pattern}")  # fsspec's generic glob
    assert got == walked
    detail = fs.glob(f"{tables}/{pattern}", detail=True)
    assert list(detail) == got and all(d["mtime"] > 0 for d in detail.values())


def test_find_lists_from_the_manifest(cachefs_cluster, tables) -> None:
    fs = cachefs_cluster.fs()
    assert fs.find(f"{tables}/table") == [f"{tables}/table/deep/part-2.parquet", f"{tables}/table/part-0.parquet",
                                          f"{tables}/table/part-1.parquet"]
    found = fs.find(tables, detail=True)
    assert found[f"{tables}/images/b.bin"]["size"] == 5000 and len(found) == 5
    assert fs.find(f"{tables}/images/a.bin") == [f"{tables}/images/a.bin"]
    assert fs.find(f"{tables}/nope") == []


@pytest.mark.parametrize("cache_type, block_size", [("none", 0), ("readahead", 1 << 16), ("bytes", None),
                                                    ("blockcache", 3 << 20), ("first", None)])
def test_open_takes_fsspec_cache_types_and_block_sizes(cachefs_cluster, tables, cache_type, block_size) -> None:
    fs = cachefs_cluster.fs()
    with fs.open(f"{tables}/images/b.bin", cache_type=cache_type, block_size=block_size) as f:
        f.seek(4990)
        assert f.read() == b"b" * 10
        f.seek(0)
        assert f.read(3) == b"bbb"
    assert fs.open(f"{tables}/images/a.bin", cache_type="none").cache.readahead == 0


def test_open_refuses_an_unknown_cache_type_clearly(cachefs_cluster, tables) -> None:
    fs = cachefs_cluster.fs()
    with pytest.raises(ValueError, match="not an fsspec cache; use one of .*readahead"):
        fs.open(f"{tables}/images/a.bin", cache_type="turbo")
    with pytest.raises(ValueError, match="block_size must be"):
        fs.open(f"{tables}/images/a.bin", block_size=-5)


def test_fsspec_chaining_keeps_a_local_copy_checked_against_ukey(cachefs_cluster, tables, tmp_path) -> None:
    """`filecache::cachefs://` keeps files on local disk and, with check_files, asks `ukey`
    whether its copy is still the file's."""
    import fsspec

    options = {"filecache": {"cache_storage": str(tmp_path), "check_files": True},
               "cachefs": {"endpoint": cachefs_cluster.endpoint, "token": cachefs_cluster.token}}
    for _ in range(2):  # the second open is served from the local copy, after its ukey check
        with fsspec.open(f"filecache::cachefs://{tables}/images/b.bin", "rb", **options) as f:
            assert f.read() == b"b" * 5000
    assert sum(1 for p in tmp_path.iterdir() if p.is_file() and p.stat().st_size == 5000) == 1
