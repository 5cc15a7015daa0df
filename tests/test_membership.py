"""Nodes join, drain, restart and die under a running reader: the cache keeps what it holds.

A cluster of its own (module-scoped, in a namespace of its own on the session's Ray
cluster): membership changes would disturb the shared cache cluster's other tests. Every
read is compared with the origin's bytes; origin reads are counted on the nodes.
"""

from __future__ import annotations

import json
import os
import shlex
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import BLOCK, MiB, wait_until, write_tree

NAMESPACE = "cachefs-members"


class Members:
    """The module's cache cluster: `nodes` named node-0..N-1, grown and shrunk by tests."""

    def __init__(self, config: Any, env: dict[str, str], handle: Any) -> None:
        self.config, self.env, self.handle = config, env, handle

    def admin(self):  # -> AdminClient
        from cachefs.admin import AdminClient
        from cachefs.config import ClientConfig

        return AdminClient(ClientConfig(endpoint=",".join(self.handle.endpoints), token=self.handle.token,
                                        admin_token=self.handle.admin_token))

    def call(self, name: str, *args: Any) -> Any:
        import asyncio

        async def go() -> Any:
            async with self.admin() as a:
                return await a.call(name, *args)

        return asyncio.run(go())

    def drain(self, node_id: str, deadline: float = 60.0):  # -> OperationInfo
        import asyncio

        async def go():
            async with self.admin() as a:
                return await a.wait(await a.call("drain_node", node_id, {"deadline": deadline}), timeout=120)

        return asyncio.run(go())

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def nodes(self, count: int) -> list[str]:
        """Run node-0..count-1 (creating the missing ones); their URLs."""
        from dataclasses import replace

        from server import hosting

        self.config = replace(self.config, nodes=count)
        urls = hosting.ensure_nodes(self.config, hosting.Tokens(self.handle.token, self.handle.admin_token), self.env)
        self.handle = replace(self.handle, endpoints=tuple(urls))
        return urls

    def kill(self, node_id: str) -> None:
        import ray

        ray.kill(ray.get_actor(f"cachefs-{node_id}", namespace=NAMESPACE), no_restart=True)

    def origin_bytes(self) -> dict[str, int]:
        return {n["id"]: n["origin_bytes"] for n in self.status()["nodes"]}

    def settled(self, ids: set[str]) -> dict[str, Any]:
        """Wait until exactly `ids` serve and none is rebalancing; the status then."""
        def done() -> dict[str, Any] | None:
            s = self.status()
            serving = {n["id"] for n in s["nodes"] if n.get("state") == "serving"}
            busy = [n["id"] for n in s["nodes"] if n["rebalance"]["state"] == "running" or n["epoch"] < s["epoch"]]
            return s if serving == ids and not busy else None

        return wait_until(done, timeout=90, what=f"nodes {sorted(ids)} to serve, rebalanced")


@pytest.fixture(scope="module")
def members(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Members]:
    from server import hosting
    from server.config import ClusterConfig, DEFAULT_ALLOWED_ORIGINS

    home = tmp_path_factory.mktemp("members-home")
    allowed = (*DEFAULT_ALLOWED_ORIGINS, f"file://{tmp_path_factory.getbasetemp().resolve()}/")
    env = {**os.environ, "CACHEFS_HOME": str(home), "CACHEFS_ALLOWED_ORIGINS": ",".join(allowed)}
    env.pop("CACHEFS_TOKEN", None)
    env.pop("CACHEFS_ADMIN_TOKEN", None)
    config = ClusterConfig(nodes=3, memory_bytes=8 * MiB, disk_bytes=32 * MiB, disk_root=str(home / "disk"),
                           state_dir=str(home / "state"), address=ray_cluster.address, block_size=BLOCK,
                           namespace=NAMESPACE, allowed_origins=allowed)
    handle = hosting.up(config, env)
    try:
        yield Members(config, env, handle)
    finally:
        hosting.down(env, namespace=NAMESPACE)


def warm_dataset(members: Members, root: Path, name: str, seed: int) -> dict[str, bytes]:
    """~12 MiB in 1 MiB blocks and small packed files, registered and warmed."""
    import asyncio

    rnd = __import__("random").Random(seed)
    files = {f"big/{i:02d}.bin": rnd.randbytes(BLOCK + rnd.randint(0, 2 * BLOCK)) for i in range(6)}
    files.update({f"small/{i:03d}.txt": rnd.randbytes(rnd.randint(100, 30_000)) for i in range(40)})
    origin = write_tree(root, files)

    async def go() -> None:
        async with members.admin() as a:
            op = await a.wait(await a.add_dataset(name, f"file://{origin}"), timeout=60)
            assert op.state == "succeeded", op
            op = await a.wait(await a.warm_dataset(name), timeout=120)
            assert op.state == "succeeded", op

    asyncio.run(go())
    return files


@pytest.fixture(scope="module")
def dataset(members: Members, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, bytes]]:
    """A dataset warmed on the first three nodes: everything is cached."""
    return "moving", warm_dataset(members, tmp_path_factory.mktemp("members-origin"), "moving", 17)


class Reader:
    """Reads every file over and over on a thread, comparing with the origin's bytes."""

    def __init__(self, members: Members, name: str, files: dict[str, bytes]) -> None:
        from cachefs.filesystem import CachefsFileSystem

        self.fs = CachefsFileSystem(endpoint=",".join(members.handle.endpoints), token=members.handle.token,
                                    skip_instance_cache=True)
        self.name, self.files = name, files
        self.errors: list[BaseException] = []
        self.wrong: list[str] = []
        self.rounds = 0
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            for rel, data in self.files.items():
                t0 = time.monotonic()
                try:
                    if self.fs.cat_file(f"{self.name}/{rel}") != data:
                        self.wrong.append(rel)
                except Exception as e:  # noqa: BLE001 - reported to the test
                    self.errors.append(e)
                self.slowest = max(self.slowest, time.monotonic() - t0)
            self.rounds += 1

    def __enter__(self) -> "Reader":
        self._thread.start()
        wait_until(lambda: self.rounds >= 1, timeout=60, what="a first round of reads")
        return self

    def more_rounds(self, n: int = 2) -> None:
        target = self.rounds + n
        wait_until(lambda: self.rounds >= target, timeout=240,
                   what=f"{n} more rounds of reads (slowest file read so far: {self.slowest:.1f} s)")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the reader did not stop within 60 s"

    def check(self) -> None:
        assert not self.errors, self.errors[:3]
        assert not self.wrong, self.wrong[:5]
        # A node slow to answer on a loaded machine can send a slice to the origin (the
        # client's last resort, bytes still checked): rare, never more than a few.
        assert self.fs.blocks.origin_reads <= len(self.files) // 20


def origin_read(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(v - before.get(k, 0) for k, v in after.items())


def total(files: dict[str, bytes]) -> int:
    return sum(len(d) for d in files.values())


# -- join, drain, restart under a reader ------------------------------------------------------
def test_a_joining_node_takes_its_share_from_the_previous_owners_not_the_origin(members, dataset) -> None:
    name, files = dataset
    members.settled({"node-0", "node-1", "node-2"})
    before = members.origin_bytes()
    with Reader(members, name, files) as reader:
        members.nodes(4)
        status = members.settled({"node-0", "node-1", "node-2", "node-3"})
        reader.more_rounds()
    reader.check()
    new = next(n for n in status["nodes"] if n["id"] == "node-3")
    assert new["peer_bytes"] > 0 and new["datasets"].get(name, 0) > 0  # its share came from the others
    assert origin_read(before, members.origin_bytes()) <= 0.02 * total(files)


def test_a_drained_node_hands_its_blocks_over_and_leaves(members, tmp_path) -> None:
    # warmed on four nodes, r = 1: the drained node is the last (only) holder of its share
    members.nodes(4)
    members.settled({"node-0", "node-1", "node-2", "node-3"})
    name = "drained"
    files = warm_dataset(members, tmp_path, name, 18)
    held = next(n for n in members.status()["nodes"] if n["id"] == "node-3")["datasets"].get(name, 0)
    assert held > 0
    before = members.origin_bytes()
    peer_before = sum(n["peer_bytes"] for n in members.status()["nodes"] if n["id"] != "node-3")
    with Reader(members, name, files) as reader:
        op = members.drain("node-3")
        reader.more_rounds()
    reader.check()
    assert op.state == "succeeded", op
    assert op.result["units_left"] == 0 and op.total_bytes == op.done_bytes  # units, all handed over
    status = members.settled({"node-0", "node-1", "node-2"})
    # what it held came from it (pulled by the rebalance, or by a reader's miss first)
    assert sum(n["peer_bytes"] for n in status["nodes"]) - peer_before >= held
    assert "node-3" not in {n["id"] for n in members.call("list_nodes")}
    assert origin_read(before, members.origin_bytes()) <= 0.02 * total(files)
    assert sum(n["datasets"].get(name, 0) for n in status["nodes"]) >= total(files)  # all still cached


def test_a_drain_whose_deadline_passes_leaves_the_rest_to_the_origin_and_nothing_fails(members, dataset) -> None:
    name, files = dataset
    members.nodes(4)
    members.settled({"node-0", "node-1", "node-2", "node-3"})

    def held_by_node_3() -> int:
        return next(n for n in members.status()["nodes"] if n["id"] == "node-3")["datasets"].get(name, 0)

    with Reader(members, name, files) as reader:
        wait_until(lambda: held_by_node_3() > 0, 60, what="node-3 to hold some of the dataset (a drain with nothing "
                   "to hand over never meets its deadline)")
        op = members.drain("node-3", deadline=0.001)  # over before anything can move
        assert op.state == "succeeded", op
        members.settled({"node-0", "node-1", "node-2"})
        reader.more_rounds()
    reader.check()
    assert "deadline" in op.message


def test_a_node_restarted_with_its_disk_comes_back_as_itself_with_its_blocks(members, dataset) -> None:
    name, files = dataset
    members.nodes(3)
    members.settled({"node-0", "node-1", "node-2"})
    url = next(n["url"] for n in members.call("list_nodes") if n["id"] == "node-1")
    with Reader(members, name, files) as reader:
        members.drain("node-1")  # what the chart's preStop does before a restart
        members.settled({"node-0", "node-2"})
        before = members.origin_bytes()
        members.nodes(3)
        status = members.settled({"node-0", "node-1", "node-2"})
        reader.more_rounds()
    reader.check()
    back = next(n for n in status["nodes"] if n["id"] == "node-1")
    assert back["url"] == url and back["disk_blocks"] > 0  # the same URL, its disk re-indexed
    assert origin_read(before, members.origin_bytes()) <= 0.02 * total(files)


def test_two_changes_at_once_a_join_and_a_drain(members, dataset) -> None:
    name, files = dataset
    members.nodes(3)
    members.settled({"node-0", "node-1", "node-2"})
    before = members.origin_bytes()
    with Reader(members, name, files) as reader:
        drained: list[Any] = []
        drainer = threading.Thread(target=lambda: drained.append(members.drain("node-0")))
        drainer.start()
        members.nodes(4)  # node-3 joins while node-0 drains
        drainer.join(timeout=120)
        assert drained and drained[0].state == "succeeded", drained
        members.settled({"node-1", "node-2", "node-3"})
        reader.more_rounds()
    reader.check()
    assert origin_read(before, members.origin_bytes()) <= 0.02 * total(files)


def test_a_previous_owner_that_died_costs_an_origin_read_not_a_failed_one(members, dataset) -> None:
    name, files = dataset
    members.nodes(4)  # node-0 back (node-3 is there)
    members.settled({"node-0", "node-1", "node-2", "node-3"})
    with Reader(members, name, files) as reader:
        members.kill("node-1")  # its blocks' new owners find it dead when they ask
        members.settled({"node-0", "node-2", "node-3"})
        reader.more_rounds()
    reader.check()
    members.nodes(4)
    members.settled({"node-0", "node-1", "node-2", "node-3"})


def test_node_ls_and_drain_from_the_command_line(members, dataset) -> None:
    from conftest import run_cli
    from server import hosting

    env = {**members.env, "CACHEFS_ENDPOINT": ",".join(members.handle.endpoints)}
    members.nodes(4)
    members.settled({"node-0", "node-1", "node-2", "node-3"})
    r = run_cli("node", "ls", "--json", env=env)
    assert r.returncode == 0, r.stderr
    listed = {n["id"]: n for n in json.loads(r.stdout)}
    assert set(listed) == {"node-0", "node-1", "node-2", "node-3"}
    assert all(n["state"] == "serving" and n["weight"] > 0 for n in listed.values())
    assert "node-3" in run_cli("node", "ls", env=env).stdout
    for bad, says in ((["node", "drain"], "name the node to drain"),
                      (["node", "drain", "node-9"], "no cache node 'node-9'"),
                      (["node", "drain", "node-1", "--deadline", "-5"], "--deadline")):
        r = run_cli(*bad, env=env)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli("node", "drain", "node-3", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "succeeded"
    members.settled({"node-0", "node-1", "node-2"})
    # --here (the preStop) drains only the nodes of this machine: none at an address that is not ours
    assert hosting.drain_here(members.handle.ray_address or "auto", NAMESPACE, 5, {"192.0.2.99"}, members.env) == []


# -- the coordinator's epoch -----------------------------------------------------------------
def test_a_torn_epoch_file_is_reported_and_the_epoch_never_goes_back(tmp_path: Path) -> None:
    from server.coordinator import Coordinator
    from server.origin_policy import OriginPolicy

    state = tmp_path / "state"
    state.mkdir()
    (state / "epoch").write_text('{"epoch": 41, "weig')  # the write stopped halfway
    coord = Coordinator(str(state), BLOCK, OriginPolicy(()))
    assert coord.ring.epoch >= time.time() - 60  # above anything it can have published
    assert "unreadable" in coord.state_problem and str(state / "epoch") in coord.state_problem


def test_the_epoch_is_written_whole_and_read_back_after_a_restart(tmp_path: Path) -> None:
    from server import epoch_state
    from server.coordinator import Coordinator
    from server.origin_policy import OriginPolicy

    path = tmp_path / "epoch"
    epoch_state.save(path, 12, 4096)
    assert json.loads(path.read_text()) == {"epoch": 12, "weight_unit": 4096}
    assert not path.with_name("epoch.tmp").exists()
    coord = Coordinator(str(tmp_path), BLOCK, OriginPolicy(()))
    assert (coord.ring.epoch, coord.weight_unit, coord.state_problem) == (12, 4096, "")
    path.write_text("7\n")  # what older versions wrote
    assert epoch_state.load(path).epoch == 7


@pytest.mark.parametrize("text", ["", "x", "-3", "{}", "[]", '{"epoch": -1}', '{"epoch": "5"}',
                                  '{"epoch": 3, "weight_unit": -2}', '{"epoch": 1.5}', "\x00\xff", "null"])
def test_a_malformed_epoch_file_never_reads_as_a_low_epoch(tmp_path: Path, text: str) -> None:
    from server import epoch_state

    path = tmp_path / "epoch"
    path.write_text(text, errors="surrogateescape")
    loaded = epoch_state.load(path)
    assert loaded.problem and loaded.epoch >= time.time() - 60


def test_a_coordinator_that_lost_its_epoch_goes_on_above_its_nodes_epochs(tmp_path: Path) -> None:
    import asyncio

    from server.coordinator import Coordinator
    from server.origin_policy import OriginPolicy

    class Node:  # only what register_node touches: a watch that never ends, a ring to take
        class _Call:
            def __init__(self, fn: Any) -> None:
                self.remote = fn

        def __init__(self) -> None:
            self.wait_forever = self._Call(lambda: asyncio.get_running_loop().create_future())
            self.set_ring = self._Call(self._set)

        async def _set(self, *_: Any) -> None:
            return None

    async def go() -> int:
        coord = Coordinator(None, BLOCK, OriginPolicy(()))
        await coord.register_node("node-0", "http://a", MiB, Node(), 900)
        epoch = coord.ring.epoch
        for entry in coord.nodes.values():
            entry.watch.cancel()
        return epoch

    assert asyncio.run(go()) == 901


# -- fair moves and the drain's decisions (pure) ----------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 8])
def test_a_node_joining_moves_only_its_own_share_whatever_its_size(size: int) -> None:
    import numpy as np

    from server.placement import build_ring
    from shard.keys import key_hash

    nodes = [(f"n{i}", f"http://n{i}", 100 * MiB) for i in range(10)]
    before = build_ring(nodes, 1, 256)
    after = build_ring([*nodes, ("big", "http://big", size * 100 * MiB)], 2, 256, unit=100 * MiB)
    positions = np.array([key_hash(f"k{i}") for i in range(40_000)], dtype=np.uint64)
    was = np.array(before.node_ids)[before.primaries(positions)]
    now = np.array(after.node_ids)[after.primaries(positions)]
    moved = was != now
    assert set(now[moved]) == {"big"}  # every key that moved went to the new node
    share = size / (10 + size)
    assert moved.mean() <= share * 1.2, (moved.mean(), share)


def test_units_left_counts_the_running_rebalances_of_the_drain_epoch() -> None:
    from server.drain import units_left

    def node(epoch: int, r_epoch: int, state: str, units: int = 0, moved: int = 0) -> dict[str, Any]:
        return {"epoch": epoch, "rebalance": {"epoch": r_epoch, "state": state, "units": units, "moved": moved,
                                              "missing": 0}}

    assert units_left([node(4, 4, "done", 5, 5), node(4, 3, "done")], 4) == 0  # nothing moved to the second
    assert units_left([node(4, 4, "running", 5, 2)], 4) == 3
    assert units_left([node(4, 4, "running", 5, 5)], 4) == 1  # still running: never 0 before it ends
    assert units_left([node(3, 3, "done")], 4) is None  # has not seen the ring yet


def test_a_drain_is_refused_clearly_for_an_unknown_node_the_last_node_or_a_bad_deadline() -> None:
    from types import SimpleNamespace

    from cachefs.common.errors import BadRequest, NotFound
    from server.drain import drain_plan

    nodes = {i: SimpleNamespace(id=i, draining=False) for i in ("a", "b")}
    assert drain_plan(nodes, "a", 10).id == "a"
    with pytest.raises(NotFound, match="no cache node 'c'.*a, b"):
        drain_plan(nodes, "c", 10)
    with pytest.raises(BadRequest, match="seconds"):
        drain_plan(nodes, "a", -1)
    with pytest.raises(BadRequest, match="seconds"):
        drain_plan(nodes, "a", "soon")
    nodes["b"].draining = True
    with pytest.raises(BadRequest, match="last one serving"):
        drain_plan(nodes, "a", 10)


def test_a_cache_node_on_a_hostpath_disk_is_named_by_its_host_so_a_restart_keeps_it() -> None:
    from server.hosting import node_id_of

    ray_id = "a1b2c3d4e5f60718"
    assert node_id_of({"NodeID": ray_id, "Resources": {"cachefs_node": 1.0}}) == "node-a1b2c3d4e5"
    named = {"NodeID": ray_id, "Resources": {"cachefs_node": 1.0, "cachefs_host_ip-10-0-1-7.EC2.internal": 1.0}}
    assert node_id_of(named) == "node-ip-10-0-1-7-ec2-internal"
    assert node_id_of({"NodeID": ray_id, "Resources": {"cachefs_host_..": 1.0}}) == "node-a1b2c3d4e5"


# -- the chart: a drain before every stop, a host-named node on a hostPath disk ---------------
def test_the_chart_drains_a_worker_before_it_stops_and_gives_it_the_time(chart: Any) -> None:
    from helm_render import container, env_of, render

    rendered = render(chart, {"ray": {"workers": {"drainDeadlineSeconds": 90}}})
    worker = container(rendered.worker_pod, "ray-worker")
    stop = " ".join(worker["lifecycle"]["preStop"]["exec"]["command"])
    assert 'cachefs node drain --here --address "${RAY_ADDRESS:-${FQ_RAY_IP}:6379}" --deadline 90' in stop
    assert stop.index("drain") < stop.index("ray stop")
    assert rendered.worker_pod["spec"]["terminationGracePeriodSeconds"] == 120
    assert env_of(worker)["POD_IP"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert "CACHEFS_ADMIN_TOKEN" not in env_of(worker)  # the drain goes through Ray, not the admin API


def test_the_chart_names_a_hostpath_worker_by_its_kubernetes_node(chart: Any) -> None:
    from helm_render import container, env_of, render

    rendered = render(chart, {"cache": {"diskTier": {"type": "hostPath"}}})
    (unquoted,) = shlex.split(rendered.worker_group["rayStartParams"]["resources"])  # as KubeRay's shell does
    resources = json.loads(unquoted)
    assert resources == {"cachefs_node": 1, "cachefs_host_$(CACHEFS_HOST_ID)": 1}
    worker = container(rendered.worker_pod, "ray-worker")
    assert env_of(worker)["CACHEFS_HOST_ID"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_a_moved_unit_is_asked_of_its_previous_owners_and_an_unmoved_one_of_nobody() -> None:
    from server.handover import previous_owner_urls
    from server.placement import build_ring

    nodes = [(f"n{i}", f"http://n{i}", MiB) for i in range(4)]
    before = build_ring(nodes, 1, 64)
    after = build_ring([*nodes, ("new", "http://new", MiB)], 2, 64)
    keys = [f"k{i}" for i in range(400)]
    moved = [k for k in keys if after.owners(k)[0] == "new"]
    stayed = [k for k in keys if after.owners(k)[0] != "new"]
    assert moved and stayed
    for k in moved:  # the new owner asks who had it
        assert previous_owner_urls("new", [before], k, 1) == [before.member(before.owners(k)[0]).url]
    for k in stayed:  # an owner that always had it: a plain miss
        owner = after.owners(k)[0]
        assert previous_owner_urls(owner, [before], k, 1) == []
    assert previous_owner_urls("new", [], moved[0], 1) == []  # no earlier ring known: the origin


def test_a_rebalance_is_paced_reports_progress_and_stops_when_cancelled() -> None:
    import asyncio
    from types import SimpleNamespace

    from server.rebalance import Rebalancer
    from server.units import Unit

    units = [Unit(f"k{i}", 1000) for i in range(50)]

    class Node:  # the rebalance's view of a node (the plan of what moved is given)
        node_id = "me"
        config = SimpleNamespace(rebalance_bytes_per_s=10_000, rebalance_concurrency=2)  # 10 units a second
        ring = SimpleNamespace(epoch=7, owners=lambda key, r: ["me"])
        previous_rings = (SimpleNamespace(epoch=6, owners=lambda key, r: ["other"]),)
        pulled: list[str] = []

        async def dataset_names(self) -> list[str]:
            return ["d"]

        async def dataset(self, name: str) -> Any:
            return SimpleNamespace(info=SimpleNamespace(replicas=1), manifest=None)

        def holds(self, key: str) -> bool:
            return False

        async def pull(self, state: Any, unit: Unit) -> Any:
            self.pulled.append(unit.key)
            return (None, "peer") if unit.key != "k3" else None  # k3: no previous owner holds it

    async def go() -> None:
        node = Node()
        r = Rebalancer(node, plan=lambda state, ring, previous, node_id: units)
        r.start()
        await asyncio.sleep(0.3)
        assert r.progress.state == "running" and r.progress.epoch == 7 and r.progress.units == 50
        assert 0 < r.progress.moved < 20  # paced: ~10 units a second, not all 50 at once
        r.cancel()
        done = await r.wait()
        assert done.state == "cancelled" and done.moved < 50
        node.config = SimpleNamespace(rebalance_bytes_per_s=10**9, rebalance_concurrency=4)
        r.start()  # a newer ring: all over again, to the end
        done = await asyncio.wait_for(r.wait(), 30)
        assert done.state == "done" and (done.moved, done.missing) == (49, 1)

    asyncio.run(go())
