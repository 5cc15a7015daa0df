"""cachefs:// as a filesystem for pyarrow, pandas and Ray Data, each on the real cluster."""

from __future__ import annotations

import io

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from pyarrow.fs import FSSpecHandler, PyFileSystem

from conftest import write_tree


@pytest.fixture(scope="module")
def parquet_dataset(cachefs_cluster, tmp_path_factory) -> tuple[str, pd.DataFrame]:
    frame = pd.DataFrame({"id": range(30_000), "label": [i % 10 for i in range(30_000)],
                          "text": [f"sample {i}" for i in range(30_000)]})
    files = {}
    for part in range(3):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(frame.iloc[part * 10_000:(part + 1) * 10_000], preserve_index=False),
                       buf, row_group_size=2_000)
        files[f"table/part-{part}.parquet"] = buf.getvalue()
    files["images/a.bin"] = b"\x89PNG" + bytes(5000)
    files["images/b.bin"] = b"\xff\xd8" + bytes(7000)
    origin = write_tree(tmp_path_factory.mktemp("pq"), files)
    name = cachefs_cluster.unique("pq")
    cachefs_cluster.add_dataset(name, f"file://{origin}")
    return name, frame


def test_pyarrow_parquet_reads_a_file_and_a_directory(cachefs_cluster, parquet_dataset) -> None:
    name, frame = parquet_dataset
    fs = cachefs_cluster.fs()
    table = pq.read_table(f"{name}/table", filesystem=fs)
    assert table.num_rows == len(frame)
    assert sorted(table.column("id").to_pylist()) == list(frame["id"])
    one = pq.ParquetFile(fs.open(f"{name}/table/part-1.parquet"))
    assert one.metadata.num_row_groups == 5
    assert one.read_row_group(2).column("id").to_pylist() == list(range(14_000, 16_000))


def test_pyarrow_dataset_filters_through_the_cache(cachefs_cluster, parquet_dataset) -> None:
    name, frame = parquet_dataset
    fs = PyFileSystem(FSSpecHandler(cachefs_cluster.fs()))
    ds = pads.dataset(f"{name}/table", filesystem=fs, format="parquet")
    got = ds.to_table(filter=pads.field("label") == 3).column("id").to_pylist()
    assert sorted(got) == [i for i in range(30_000) if i % 10 == 3]


def test_pandas_reads_with_storage_options(cachefs_cluster, parquet_dataset) -> None:
    name, frame = parquet_dataset
    got = pd.read_parquet(f"cachefs://{name}/table/part-0.parquet",
                          storage_options={"endpoint": cachefs_cluster.endpoint, "token": cachefs_cluster.token})
    pd.testing.assert_frame_equal(got, frame.iloc[:10_000].reset_index(drop=True))


def test_ray_data_reads_parquet_and_binary_files(cachefs_cluster, parquet_dataset) -> None:
    import ray

    name, frame = parquet_dataset
    fs = PyFileSystem(FSSpecHandler(cachefs_cluster.fs()))
    ds = ray.data.read_parquet(f"{name}/table", filesystem=fs)
    assert ds.count() == len(frame)
    assert sorted(ds.to_pandas()["id"]) == list(frame["id"])
    blobs = ray.data.read_binary_files(f"{name}/images", filesystem=fs, include_paths=True).take_all()
    assert sorted((r["path"].rsplit("/", 1)[1], r["bytes"][:2]) for r in blobs) == [("a.bin", b"\x89P"),
                                                                                   ("b.bin", b"\xff\xd8")]
