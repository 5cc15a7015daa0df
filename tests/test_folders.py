"""A snapshot keeps the origin's tree, empty folders included (#21).

Tools that look at folders, not just files (MLPerf Storage's DLIO wants its empty `valid/`,
an `ImageFolder` counts its class folders, `os.walk`, `diff -r`), see through cachefs
exactly the tree the origin has: on a local origin, on S3 with folder markers, through
`cachefs://` and through a mount.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import fsspec
import pytest

from fuse_helpers import cleanup_mounts

from cachefs.common.manifest import FileEntry, Manifest, build_table, for_readers, from_ipc, snapshot_id, to_ipc

pytestmark = pytest.mark.timeout(180)

FILES = {"train/a.bin": b"a" * 1000, "train/deep/b.bin": b"b" * 3000, "m/f.txt": b"1", "top.txt": b"t"}
FOLDERS = ["valid", "only/inner", "nested/empty/deeper", "train/empty", "a-b"]  # the empty ones


def tree_with_empty_folders(root: Path) -> Path:
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for rel in FOLDERS:
        (root / rel).mkdir(parents=True, exist_ok=True)
    return root


def relative_find(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, str]:
    """`find(root, withdirs=True)` as {relative path: type}."""
    found = fs.find(root, withdirs=True, detail=True)
    root = root.rstrip("/")
    return {name[len(root):].strip("/"): info["type"] for name, info in found.items()
            if name.rstrip("/") != root}


# ---- the manifest alone ---------------------------------------------------------------------

def test_the_manifest_records_only_the_folders_no_file_implies() -> None:
    table = build_table([FileEntry(p, len(d), "v") for p, d in FILES.items()],
                        folders=["train", "train/deep", "m", *FOLDERS, "only", "nested", "nested/empty"])
    manifest = Manifest(from_ipc(to_ipc(for_readers(table))), "s")
    assert manifest.folders == sorted(FOLDERS)
    assert manifest.list_dir("") == sorted([("a-b", "directory", 0), ("m", "directory", 0),
                                            ("nested", "directory", 0), ("only", "directory", 0),
                                            ("top.txt", "file", 1), ("train", "directory", 0),
                                            ("valid", "directory", 0)])
    assert manifest.list_dir("only") == [("only/inner", "directory", 0)]
    assert manifest.list_dir("valid") == [] and manifest.is_dir("nested/empty")
    assert ("train/empty", "directory", 0) in manifest.list_dir("train")
    assert list(manifest.walk_files("valid")) == []
    assert not manifest.is_dir("a") and not manifest.is_dir("valid/x")  # 'a-b' is no prefix of 'a'


def test_an_empty_folder_makes_a_new_snapshot_and_none_keeps_the_old_id() -> None:
    files = [FileEntry("x/y", 1, "v")]
    plain = build_table(files)
    assert snapshot_id(build_table(files, folders=["x"])) == snapshot_id(plain)  # implied by x/y
    assert snapshot_id(build_table(files, folders=["z"])) != snapshot_id(plain)
    assert snapshot_id(build_table(files, 64, 20, folders=["z"]), "p") != snapshot_id(build_table(files, 64, 20), "p")


def test_a_manifest_without_a_folder_list_shows_the_folders_its_files_imply() -> None:
    old = build_table([FileEntry("a/b/c", 1, "v")])
    assert old.schema.metadata is None or b"cachefs.folders" not in old.schema.metadata
    manifest = Manifest(from_ipc(to_ipc(old)), "s")
    assert manifest.folders == [] and manifest.list_dir("a") == [("a/b", "directory", 0)]


def test_a_malformed_folder_list_is_refused_with_a_clear_error() -> None:
    table = build_table([FileEntry("a", 1, "v")]).replace_schema_metadata({b"cachefs.folders": b"[1, 2]"})
    with pytest.raises(OSError, match="folder list"):
        Manifest(table, "s")
    escaping = build_table([FileEntry("a", 1, "v")]).replace_schema_metadata({b"cachefs.folders": b'["../x"]'})
    with pytest.raises(OSError, match="'..'"):
        Manifest(escaping, "s")


# ---- through the cluster --------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_dataset(cachefs_cluster, tmp_path_factory) -> tuple[str, Path]:
    origin = tree_with_empty_folders(tmp_path_factory.mktemp("folders-origin"))
    name = cachefs_cluster.unique("folders")
    cachefs_cluster.add_dataset(name, f"file://{origin}")
    return name, origin


def test_cachefs_shows_exactly_the_origin_tree(cachefs_cluster, local_dataset) -> None:
    name, origin = local_dataset
    fs = cachefs_cluster.fs()
    assert relative_find(fs, name) == relative_find(fsspec.filesystem("file"), str(origin))
    assert fs.isdir(f"{name}/valid") and fs.isdir(f"{name}/only/inner") and fs.ls(f"{name}/valid") == []
    assert fs.info(f"{name}/nested/empty/deeper")["type"] == "directory"
    walked = {d[len(name):].strip("/"): (sorted(ds), sorted(fs_)) for d, ds, fs_ in fs.walk(name)}
    local = {d[len(str(origin)):].strip("/"): (sorted(ds), sorted(fs_)) for d, ds, fs_ in os.walk(origin)}
    assert walked == local
    with pytest.raises(FileNotFoundError):
        fs.info(f"{name}/valid/nothing")
    with pytest.raises(IsADirectoryError):
        fs.cat_file(f"{name}/valid")


def test_s3_folder_markers_are_folders_not_files(cachefs_cluster, s3_server) -> None:
    import boto3
    import s3fs

    s3 = boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing", **s3_server["client_kwargs"])
    s3.create_bucket(Bucket="markers")
    for rel, data in FILES.items():
        s3.put_object(Bucket="markers", Key=f"ds/{rel}", Body=data)
    for rel in [*FOLDERS, "m"]:  # "m/" beside m/f.txt: a marker of a folder that has files too
        s3.put_object(Bucket="markers", Key=f"ds/{rel}/", Body=b"")
    name = cachefs_cluster.unique("s3-folders")
    info = cachefs_cluster.add_dataset(name, "s3://markers/ds", storage_options=s3_server)
    assert info.files == len(FILES)  # no marker became a file

    fs = cachefs_cluster.fs()
    expected = {rel: "file" for rel in FILES}
    for rel in [*FOLDERS, *{str(Path(p).parent) for p in [*FILES, *FOLDERS]} - {"."}]:
        expected[rel] = "directory"
        for parent in Path(rel).parents:
            if str(parent) != ".":
                expected[str(parent)] = "directory"
    assert relative_find(fs, name) == expected
    origin = relative_find(s3fs.S3FileSystem(skip_instance_cache=True, **s3_server), "markers/ds")
    assert {rel for rel, kind in origin.items() if kind == "file" and rel in FILES} == set(FILES)
    assert fs.ls(f"{name}/valid") == [] and fs.cat_file(f"{name}/train/deep/b.bin") == FILES["train/deep/b.bin"]


@pytest.fixture(scope="module")
def mounted(cachefs_cluster, local_dataset, tmp_path_factory) -> Iterator[Path]:
    name, _origin = local_dataset
    root = tmp_path_factory.mktemp("folders-mounts")
    point = root / "mnt"
    home = tmp_path_factory.mktemp("folders-home")
    env = {**os.environ, "CACHEFS_ENDPOINT": cachefs_cluster.endpoint, "CACHEFS_TOKEN": cachefs_cluster.token,
           "CACHEFS_HOME": str(home), "CACHEFS_CONFIG": str(home / "no-config.toml")}
    done = subprocess.run([sys.executable, "-m", "cachefs.cli.main", "mount", name, str(point)], env=env,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    try:
        yield point
    finally:
        subprocess.run([sys.executable, "-m", "cachefs.cli.main", "unmount", str(point)], env=env,
                       capture_output=True, text=True, timeout=90)
        cleanup_mounts(root)


def test_a_mount_shows_the_origin_tree_to_diff_and_find(local_dataset, mounted) -> None:
    _name, origin = local_dataset
    diff = subprocess.run(["diff", "-r", str(origin), str(mounted)], capture_output=True, text=True, timeout=60)
    assert diff.returncode == 0, diff.stdout + diff.stderr

    def find(root: Path) -> list[str]:
        out = subprocess.run(["find", ".", "-printf", "%y %s %p\n"], cwd=root, capture_output=True, text=True,
                             timeout=60, check=True).stdout.splitlines()
        # a folder's size is the filesystem's own business; files' sizes must match
        return sorted(line if line.startswith("f") else line.split(" ", 2)[0] + " " + line.split(" ", 2)[2]
                      for line in out)

    assert find(mounted) == find(origin)
    assert os.listdir(mounted / "valid") == [] and os.path.isdir(mounted / "only" / "inner")
