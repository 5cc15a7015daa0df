"""Refresh policies (server/refresh_policy.py): parsed with clear errors, due when they
should be, and followed by the real coordinator (an on-change policy refreshes once the
origin changes, and says so in `status`)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from cachefs.common.errors import BadRequest
from server.refresh_policy import PolicyLoop, RefreshPolicy

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("doc,expected", [
    (None, RefreshPolicy()), ({}, RefreshPolicy()),
    ({"interval": 3600}, RefreshPolicy(3600.0)),
    ({"interval": 60, "onChange": True, "warm": True}, RefreshPolicy(60.0, True, True)),
    ({"on_change": True}, RefreshPolicy(0.0, True)),
])
def test_policies_parse(doc: Any, expected: RefreshPolicy) -> None:
    assert RefreshPolicy.parse(doc) == expected
    assert RefreshPolicy.parse(expected.to_json()) == expected


@pytest.mark.parametrize("doc,says", [
    ("hourly", "must be an object"), ({"every": 5}, "unknown refresh field"), ({"interval": -1}, "interval"),
    ({"interval": 0.1}, "interval"), ({"interval": True}, "interval"), ({"warm": "yes"}, "warm"),
    ({"onChange": 1}, "on_change"),
])
def test_bad_policies_say_what_is_wrong(doc: Any, says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        RefreshPolicy.parse(doc)


def test_the_loop_refreshes_when_due_and_checks_before_an_on_change_refresh() -> None:
    now = [1000.0]
    policies = {"a": RefreshPolicy(10.0), "b": RefreshPolicy(5.0, on_change=True, warm=True), "m": RefreshPolicy()}
    changed = {"b": False}
    refreshed: list[tuple[str, bool, str]] = []
    records: dict[str, dict[str, Any]] = {}

    async def is_changed(name: str) -> bool:
        return changed[name]

    async def refresh(name: str, warm: bool, trigger: str) -> None:
        refreshed.append((name, warm, trigger))

    loop = PolicyLoop(lambda: policies, is_changed, refresh, records.__setitem__, clock=lambda: now[0])

    async def at(t: float) -> None:
        now[0] = t
        await loop.tick()

    async def scenario() -> None:
        await at(1000)  # first look: each is due one period from now
        assert refreshed == []
        await at(1005)
        assert refreshed == [] and records["b"]["state"] == "unchanged"
        changed["b"] = True
        await at(1010)
        assert refreshed == [("a", False, "interval"), ("b", True, "onChange")]
        await at(1012)
        assert len(refreshed) == 2  # not due again yet

    asyncio.run(scenario())


def test_an_on_change_policy_refreshes_once_the_origin_changes(cachefs_cluster, tmp_path) -> None:
    from conftest import wait_until, write_tree

    origin = write_tree(tmp_path / "o", {"a.bin": b"a" * 3000, "b.bin": b"b" * 3000})
    name = cachefs_cluster.unique("policy")
    first = cachefs_cluster.add_dataset(name, f"file://{origin}")

    async def set_policy():
        async with cachefs_cluster.admin() as a:
            return await a.update_dataset(name, refresh={"interval": 1, "onChange": True})

    assert cachefs_cluster.run(set_policy()).refresh == {"interval": 1.0, "on_change": True, "warm": False}

    def dataset() -> dict[str, Any]:
        return next(d for d in cachefs_cluster.status()["datasets"] if d["name"] == name)

    wait_until(lambda: (dataset()["last_refresh"] or {}).get("state") == "unchanged", timeout=30,
               what="a first check that finds nothing changed")
    assert dataset()["snapshot"] == first.snapshot
    (origin / "b.bin").write_bytes(b"B" * 4000)
    os.utime(origin / "b.bin", ns=(0, 2_000_000_000_000_000_000))
    last = wait_until(lambda: (r := dataset()["last_refresh"] or {}).get("state") not in (None, "unchanged") and r,
                      timeout=60, what="the policy to refresh")
    assert dataset()["snapshot"] != first.snapshot
    assert last["state"] == "succeeded" and last["changed"] and last["trigger"] == "onChange", last
    assert cachefs_cluster.fs().cat_file(f"{name}/b.bin") == b"B" * 4000

    async def manual():
        async with cachefs_cluster.admin() as a:
            return await a.update_dataset(name, refresh={})

    assert cachefs_cluster.run(manual()).refresh == {}
    cachefs_cluster.remove_dataset(name)


@pytest.mark.parametrize("lease", [-1, "1d", True, 10**9, None])
def test_a_bad_lease_says_what_is_wrong(lease: Any) -> None:
    from server.registry import parse_settings

    with pytest.raises(BadRequest, match="lease must be"):
        parse_settings({"lease": lease})


def test_a_manifest_from_before_units_still_loads_and_names_its_blocks_by_its_snapshot() -> None:
    from cachefs.common.manifest import FileEntry, Manifest, build_table, for_readers, from_ipc, to_ipc
    from cachefs.common.wire import DatasetInfo
    from cachefs.plan import plan
    from shard import block_key, pack_key

    table = build_table([FileEntry("a.bin", 100, "v1"), FileEntry("b.bin", 5_000_000, "v1")], 4 << 20, 1 << 20)
    old = table.drop_columns(["unit"])  # what a cluster before units wrote
    for ipc in (to_ipc(old), to_ipc(for_readers(old))):
        m = Manifest(from_ipc(ipc), "snap1")
        assert not m.has_units and m.get("a.bin").unit == 0 and m.packs == 1
        info = DatasetInfo("d", "file:///x", "snap1", 2, 5_000_100, block_size=4 << 20)
        buf = memoryview(bytearray(5_000_100))
        assert plan(info, m.get("a.bin"), 0, 100, buf[:100])[0].key == pack_key("d", "snap1", 0)
        assert plan(info, m.get("b.bin"), 0, 10, buf[:10])[0].key == block_key("d", "snap1", "b.bin", 0)
    fresh = Manifest(table, "snap2")
    assert fresh.get("a.bin").unit and fresh.get("b.bin").unit  # with units: keys name the bytes


def test_leases_keep_a_replaced_snapshot_until_they_end_and_survive_a_coordinator_restart(tmp_path) -> None:
    from cachefs.common.errors import NotFound, SnapshotGone
    from cachefs.common.wire import DatasetInfo
    from server.leases import Leases
    from server.registry import DatasetRecord

    now = [1000.0]

    def record(snapshot: str) -> DatasetRecord:
        return DatasetRecord(DatasetInfo("d", "file:///x", snapshot, 1, 1, lease=100), {}, f"ipc-{snapshot}".encode())

    leases = Leases(tmp_path, clock=lambda: now[0])
    leases.take("d", "s1", 100)  # a reader loaded s1
    leases.replaced(record("s1"))  # a refresh made s2 current
    current = record("s2")
    assert leases.find("d", "s1", current).manifest_ipc == b"ipc-s1"
    restarted = Leases(tmp_path, clock=lambda: now[0])  # the coordinator restarts
    assert restarted.find("d", "s1", current).manifest_ipc == b"ipc-s1" and restarted.kept("d") == ["s1"]
    with pytest.raises(NotFound, match="no snapshot"):
        restarted.find("d", "s0", current)
    now[0] = 1101.0
    with pytest.raises(SnapshotGone, match="lease"):
        restarted.find("d", "s1", current)
    assert not list((tmp_path / "leases").glob("*.arrow"))  # its manifest went with it
    (tmp_path / "leases" / "leases.json").write_text("{not json")
    assert Leases(tmp_path, clock=lambda: now[0]).kept("d") == []  # a damaged file ends the leases, loudly
