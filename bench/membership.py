"""Membership changes under a running reader: what a join, a drain and a rolling restart
cost the origin, and whether any read failed or came back wrong.

A 3-node cluster holds a warmed dataset (shards and small packed files, on moto's S3
behind a byte meter). A reader reads shuffled epochs of it, checking every file against
the xxh3 digest taken when it was written, while the cluster:
  (a) join          gets a 4th node
  (b) drain         drains that node again (`cachefs node drain`)
  (c) rolling       restarts every node, one at a time: drain, then start again on the same disk
  (d) crash-roll    every node killed and started again, one at a time (no drain: a crash)
Side by side, the same on a cluster whose nodes have the hand-over off (`handover = false`:
a moved unit is read from the origin, which is what every change cost before).
For each event: origin bytes as a fraction of the dataset (the meter on the origin: the
nodes' reads and any reader's fallback), failed reads, wrong files, and how long it took.

    python bench/membership.py          # 96 MiB; 1 MiB blocks
    python bench/membership.py --quick  # 24 MiB: for CI, a minute or two

Figures on a loaded shared machine: the durations move, the origin fractions do not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import xxhash  # noqa: E402

from bench.cluster import local_ray  # noqa: E402
from bench.harness import BUCKET, MiB, MeteredS3, machine, table, workdir  # noqa: E402

NAMESPACE = "cachefs-membership"
SETTLE_TIMEOUT = 180.0


def make_files(total: int, seed: int = 7) -> dict[str, bytes]:
    """Half the bytes in 2 MiB shards, half in ~40 KiB files (packed)."""
    rnd = random.Random(seed)
    files = {f"shards/shard-{i:04d}.tar": rnd.randbytes(2 * MiB) for i in range(max(1, total // 2 // (2 * MiB)))}
    files.update({f"images/img-{i:05d}.jpg": rnd.randbytes(rnd.randint(20_000, 60_000))
                  for i in range(max(1, total // 2 // 40_000))})
    return files


def upload(s3: MeteredS3, prefix: str, files: dict[str, bytes]) -> None:
    import boto3
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.options)
    if not fs.exists(BUCKET):
        boto3.client("s3", aws_access_key_id="bench", aws_secret_access_key="bench",
                     **s3.options["client_kwargs"]).create_bucket(Bucket=BUCKET)
    fs.pipe({f"{BUCKET}/{prefix}/{p}": d for p, d in files.items()})


class Members:
    """The cluster, grown, drained and restarted node by node (node-0, node-1, ...)."""

    def __init__(self, work: Path, nodes: int, budget: int) -> None:
        from server import hosting
        from server.config import ClusterConfig

        self.env = {**os.environ}
        self.config = ClusterConfig(nodes=nodes, memory_bytes=budget // 4, disk_bytes=budget,
                                    disk_root=str(work / "disk"), state_dir=str(work / "state"), block_size=MiB,
                                    namespace=NAMESPACE, allowed_origin_hosts=("127.0.0.1",))
        self.handle = hosting.up(self.config, self.env)

    def admin(self) -> Any:
        from cachefs.admin import AdminClient
        from cachefs.config import ClientConfig

        return AdminClient(ClientConfig(endpoint=",".join(self.handle.endpoints), token=self.handle.token,
                                        admin_token=self.handle.admin_token))

    def call(self, name: str, *args: Any) -> Any:
        async def go() -> Any:
            async with self.admin() as a:
                return await a.call(name, *args)

        return asyncio.run(go())

    def wait_op(self, op: Any, timeout: float = 300) -> Any:
        async def go() -> Any:
            async with self.admin() as a:
                return await a.wait(op, timeout=timeout)

        done = asyncio.run(go())
        if done.state != "succeeded":
            raise RuntimeError(f"{done.kind} {done.dataset} {done.state}: {done.message}")
        return done

    def run(self, count: int) -> None:
        from server import hosting

        self.config = replace(self.config, nodes=count)
        urls = hosting.ensure_nodes(self.config, hosting.Tokens(self.handle.token, self.handle.admin_token), self.env)
        self.handle = replace(self.handle, endpoints=tuple(urls))

    def drain(self, node_id: str) -> Any:
        return self.wait_op(self.call("drain_node", node_id, {"deadline": 120}))

    def kill(self, node_id: str) -> None:
        import ray

        ray.kill(ray.get_actor(f"cachefs-{node_id}", namespace=NAMESPACE), no_restart=True)

    def settled(self, ids: set[str]) -> None:
        end = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < end:
            s = self.call("status")
            serving = {n["id"] for n in s["nodes"] if n.get("state") == "serving"}
            busy = [n for n in s["nodes"] if n["rebalance"]["state"] == "running" or n["epoch"] < s["epoch"]]
            if serving == ids and not busy:
                return
            time.sleep(0.3)
        raise TimeoutError(f"nodes {sorted(ids)} did not settle within {SETTLE_TIMEOUT:.0f} s")

    def stop(self) -> None:
        from server import hosting

        hosting.down(self.env, namespace=NAMESPACE)


@dataclass
class Reader:
    """Shuffled epochs on a thread, every file checked against its digest."""

    members: Members
    name: str
    digests: dict[str, str]
    epochs: int = 0
    failed: int = 0
    wrong: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Reader":
        from cachefs.filesystem import CachefsFileSystem

        self.fs = CachefsFileSystem(endpoint=",".join(self.members.handle.endpoints), token=self.members.handle.token,
                                    skip_instance_cache=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        paths = sorted(self.digests)
        while not self._stop.is_set():
            random.Random(self.epochs).shuffle(paths)
            for i in range(0, len(paths), 16):
                batch = [f"{self.name}/{p}" for p in paths[i:i + 16]]
                try:
                    got = self.fs.cat(batch, on_error="return")
                except Exception as e:  # noqa: BLE001 - counted and reported
                    self.failed += len(batch)
                    self.errors.append(f"{type(e).__name__}: {e}")
                    continue
                for path, data in got.items():
                    if isinstance(data, BaseException):
                        self.failed += 1
                        self.errors.append(f"{path}: {data}")
                    elif xxhash.xxh3_64_hexdigest(data) != self.digests[path.split("/", 1)[1]]:
                        self.wrong += 1
            self.epochs += 1

    def until_epochs(self, n: int) -> None:
        target = self.epochs + n
        end = time.monotonic() + SETTLE_TIMEOUT
        while self.epochs < target and time.monotonic() < end:
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def event(label: str, s3: MeteredS3, reader: Reader, dataset_bytes: int, change: Callable[[], None]) -> dict[str, Any]:
    """Run `change` under the reader, then one more whole epoch; what it cost."""
    before_bytes, _ = s3.meter()
    failed, wrong, fallback = reader.failed, reader.wrong, reader.fs.blocks.origin_reads
    t0 = time.perf_counter()
    change()
    seconds = time.perf_counter() - t0
    reader.until_epochs(1)
    origin = s3.meter()[0] - before_bytes
    row = {"event": label, "origin_bytes": origin, "origin_fraction": origin / dataset_bytes,
           "failed_reads": reader.failed - failed, "wrong_files": reader.wrong - wrong, "seconds": seconds,
           "reader_fallback_slices": reader.fs.blocks.origin_reads - fallback}
    print(f"  {label:<12} origin {origin / dataset_bytes:7.2%}  failed {row['failed_reads']}  "
          f"wrong {row['wrong_files']}  {seconds:.1f} s  (reader's own origin reads: "
          f"{row['reader_fallback_slices']} slices)", file=sys.stderr)
    return row


def run_peer(total: int, handover: bool) -> dict[str, Any]:
    """The events on a fresh cluster (a Ray of its own) with the hand-over on or off."""
    files = make_files(total)
    dataset_bytes = sum(len(d) for d in files.values())
    digests = {p: xxhash.xxh3_64_hexdigest(d) for p, d in files.items()}
    os.environ["CACHEFS_HANDOVER"] = "true" if handover else "false"  # the nodes' Ray inherits it
    try:
        with workdir("cachefs-membership-") as work, MeteredS3() as s3, local_ray():
            upload(s3, "moving", files)
            members = Members(work, 3, 2 * dataset_bytes)
            try:
                return events_on(members, s3, files, dataset_bytes, digests)
            finally:
                members.stop()
    finally:
        os.environ.pop("CACHEFS_HANDOVER", None)


def events_on(members: Members, s3: MeteredS3, files: dict[str, bytes], dataset_bytes: int,
              digests: dict[str, str]) -> dict[str, Any]:
    members.wait_op(members.call("add_dataset", {"name": "moving", "origin": f"s3://{BUCKET}/moving",
                                                 "storage_options": s3.options}))
    members.wait_op(members.call("warm_dataset", "moving"))
    reader = Reader(members, "moving", digests).start()
    reader.until_epochs(1)
    three = {"node-0", "node-1", "node-2"}

    def join() -> None:
        members.run(4)
        members.settled(three | {"node-3"})

    def drain() -> None:
        members.drain("node-3")
        members.settled(three)

    def rolling() -> None:
        for node in sorted(three):
            members.drain(node)
            members.settled(three - {node})
            members.run(3)
            members.settled(three)

    def crash_roll() -> None:
        for node in sorted(three):
            members.kill(node)
            members.settled(three - {node})
            members.run(3)
            members.settled(three)

    rows = [event(label, s3, reader, dataset_bytes, change)
            for label, change in (("join", join), ("drain", drain), ("rolling", rolling), ("crash-roll", crash_roll))]
    reader.stop()
    return {"dataset_bytes": dataset_bytes, "files": len(files), "epochs_read": reader.epochs, "events": rows,
            "errors": reader.errors[:5]}


def run(total: int) -> dict[str, Any]:
    peers = {}
    for label, handover in (("hand-over", True), ("no hand-over", False)):
        print(f"{label}:", file=sys.stderr)
        peers[label] = run_peer(total, handover)
    return {"machine": machine(), "peers": peers}


def report(doc: dict[str, Any]) -> str:
    first = next(iter(doc["peers"].values()))
    rows = []
    for label, peer in doc["peers"].items():
        rows += [[r["event"], label, f"{r['origin_fraction']:.2%}", r["failed_reads"], r["wrong_files"],
                  f"{r['seconds']:.1f}"] for r in peer["events"]]
    rows.sort(key=lambda r: [e["event"] for e in first["events"]].index(r[0]))
    return (f"dataset {first['dataset_bytes'] / MiB:.0f} MiB in {first['files']} files, 3 nodes, a reader reading "
            "epochs throughout (origin: metered at the origin; crash-roll = each node killed and started again)\n"
            + table(["event", "peer", "origin / dataset", "failed reads", "wrong files", "seconds"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="24 MiB instead of 96 MiB")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    doc = run(24 * MiB if args.quick else 96 * MiB)
    print(json.dumps(doc, indent=2) if args.json else report(doc))


if __name__ == "__main__":
    main()
