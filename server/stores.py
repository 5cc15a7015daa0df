"""The two tiers of a cache node: Arrow buffers in memory, block files on local disk.

Both keep their byte budget through a policy (server/policy.py) and tag every block with
its dataset and snapshot, so that `rm` and `refresh` can drop a snapshot's blocks at once.
Disk layout: ROOT/<dataset>/<snapshot>/<key>.<digest>; written to ROOT/.tmp then renamed,
so a crash never leaves a half block under a real name. On start the disk tier re-indexes
what is there from names and sizes alone, and checks a block's bytes against the digest
in its name when it is first read (`DiskStore.get_verified`): re-reading a large NVMe tier
on start took longer than `up` waits for a node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import xxhash

from server.policy import Policy, make_policy
from server.singleflight import Group

log = logging.getLogger(__name__)

DIGEST_RE = re.compile(r"[0-9a-f]{16}")  # xxh3-64, as digest_of writes it
CHECK_CHUNK = 1024 * 1024  # a block is hashed in pieces of this size, never held whole


def digest_of(data: bytes | memoryview | pa.Buffer) -> str:
    return xxhash.xxh3_64_hexdigest(data)


@dataclass(frozen=True)
class StoredBlock:
    key: str
    dataset: str
    snapshot: str
    size: int
    digest: str
    buffer: pa.Buffer | None = None  # memory tier
    path: str = ""  # disk tier
    holes: tuple = ()  # server.units.Hole: pack members that failed (memory tier only)
    verified: bool = True  # False: re-indexed from its file name on start, bytes not read yet


class _Tier:
    """What both tiers share: a policy for the budget, and the blocks it admitted."""

    def __init__(self, budget: int, policy: str = "lru") -> None:
        self.policy: Policy = make_policy(policy, budget)
        self._blocks: dict[str, StoredBlock] = {}
        self.evictions = 0

    @property
    def used(self) -> int:
        return self.policy.used

    @property
    def budget(self) -> int:
        return self.policy.budget

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: str) -> bool:
        return key in self._blocks

    def get(self, key: str) -> StoredBlock | None:
        block = self._blocks.get(key)
        if block is not None:
            self.policy.touch(key)
        return block

    def blocks(self) -> list[StoredBlock]:
        return list(self._blocks.values())

    def would_keep(self, size: int) -> bool:
        return self.policy.would_admit(size)


class MemoryStore(_Tier):
    """Blocks as Arrow buffers within a byte budget. Owned by one event loop."""

    def put(self, block: StoredBlock) -> list[StoredBlock]:
        """Store (if the policy admits it); returns the blocks evicted to make room."""
        admitted, victims = self.policy.admit(block.key, block.size)
        evicted = [self._blocks.pop(v) for v in victims if v in self._blocks]
        self.evictions += len(evicted)
        if admitted:
            self._blocks[block.key] = block
        return evicted

    def purge(self, dataset: str, keep_snapshot: str | None = None) -> int:
        """Drop a dataset's blocks (all, or all but one snapshot's); returns how many."""
        gone = [k for k, b in self._blocks.items() if b.dataset == dataset and b.snapshot != keep_snapshot]
        for k in gone:
            self.policy.remove(k)
            del self._blocks[k]
        return len(gone)



class DiskStore(_Tier):
    """Block files within a byte budget; file I/O runs in threads, never on the loop."""

    def __init__(self, root: str | os.PathLike[str], budget: int, policy: str = "lru") -> None:
        super().__init__(budget, policy)
        self.root = Path(root)
        self.dropped_on_reindex = 0  # files whose name is not <key>.<digest>
        self.dropped_on_verify = 0  # re-indexed blocks whose bytes did not match their digest
        self._checks: Group[StoredBlock | None] = Group()  # readers of an unchecked block share one check

    async def open(self) -> None:
        """Create the layout and re-index blocks left by an earlier run, without reading them."""
        found = await asyncio.to_thread(self._scan)
        for i, block in enumerate(found):  # oldest first, so LRU order survives a restart
            if i % 4096 == 4095:
                await asyncio.sleep(0)  # a million blocks take seconds: let the loop breathe meanwhile
            admitted, victims = self.policy.admit(block.key, block.size)
            for v in victims:
                await self._delete(self._blocks.pop(v))
            if admitted:
                self._blocks[block.key] = block
            else:
                await asyncio.to_thread(_unlink, block.path)

    def _scan(self) -> list[StoredBlock]:
        """Every block file, oldest first, from its name and a stat: no byte is read."""
        shutil.rmtree(self.root / ".tmp", ignore_errors=True)
        (self.root / ".tmp").mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, StoredBlock]] = []
        for dataset in _subdirs(str(self.root)):
            if dataset.name.startswith("."):
                continue
            for snapshot in _subdirs(dataset.path):
                with os.scandir(snapshot.path) as files:
                    for f in files:
                        if not f.is_file(follow_symlinks=False):
                            continue
                        key, _, digest = f.name.partition(".")
                        if not key or not DIGEST_RE.fullmatch(digest):
                            log.warning("dropping %s: not a block file (<key>.<digest>)", f.path)
                            _unlink(f.path)
                            self.dropped_on_reindex += 1
                            continue
                        st = f.stat(follow_symlinks=False)
                        found.append((st.st_mtime, StoredBlock(key, dataset.name, snapshot.name, st.st_size, digest,
                                                               path=f.path, verified=False)))
        found.sort(key=lambda t: t[0])
        return [b for _, b in found]

    async def get_verified(self, key: str) -> StoredBlock | None:
        """The block, once its bytes are known to match its digest; None if absent or corrupt.

        A block re-indexed on start is read (in a thread) and checked on its first read,
        and dropped if it does not match, so the caller fetches it again; after that it is
        trusted and never re-read. Blocks this process wrote are trusted from the start.
        """
        block = self.get(key)
        if block is None or block.verified:
            return block
        return await self._checks.do(key, lambda: self._verify(block))

    async def _verify(self, block: StoredBlock) -> StoredBlock | None:
        try:
            good = await asyncio.to_thread(_file_digest, block.path) == block.digest
        except OSError as e:
            log.warning("could not read block file %s: %s", block.path, e)
            good = False
        if self._blocks.get(block.key) is not block:
            return None  # evicted or purged while it was read: the caller fetches it
        if not good:
            log.warning("dropping %s: its bytes do not match the digest in its name", block.path)
            self.policy.remove(block.key)
            del self._blocks[block.key]
            await self._delete(block)
            self.dropped_on_verify += 1
            return None
        checked = dataclasses.replace(block, verified=True)
        self._blocks[block.key] = checked
        return checked

    async def put(self, block: StoredBlock, data: bytes | memoryview | pa.Buffer) -> list[StoredBlock]:
        """Write the block if the policy admits it; returns the blocks evicted for room."""
        admitted, victims = self.policy.admit(block.key, block.size)
        evicted = [self._blocks.pop(v) for v in victims if v in self._blocks]
        for v in evicted:
            await self._delete(v)
        self.evictions += len(evicted)
        if not admitted or block.key in self._blocks:
            return evicted
        final = self.root / block.dataset / block.snapshot / f"{block.key}.{block.digest}"
        try:
            await asyncio.to_thread(self._write, final, data)
        except OSError as e:
            self.policy.remove(block.key)
            log.warning("could not write block %s to disk: %s", block.key, e)
            return evicted
        if block.key in self.policy:  # a purge during the write has not removed it
            self._blocks[block.key] = StoredBlock(**{**block.__dict__, "buffer": None, "path": str(final)})
        else:
            await asyncio.to_thread(_unlink, str(final))
        return evicted

    def _write(self, final: Path, data: bytes | memoryview | pa.Buffer) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / ".tmp" / final.name
        with open(tmp, "wb") as f:
            f.write(memoryview(data))
        os.replace(tmp, final)

    async def _delete(self, block: StoredBlock) -> None:
        await asyncio.to_thread(_unlink, block.path)

    async def purge(self, dataset: str, keep_snapshot: str | None = None) -> int:
        gone = [b for b in self._blocks.values() if b.dataset == dataset and b.snapshot != keep_snapshot]
        for b in gone:
            self.policy.remove(b.key)
            del self._blocks[b.key]
        await asyncio.to_thread(self._remove_dirs, dataset, keep_snapshot)
        return len(gone)

    def _remove_dirs(self, dataset: str, keep_snapshot: str | None) -> None:
        base = self.root / dataset
        if not base.is_dir():
            return
        for snap in base.iterdir():
            if snap.name != keep_snapshot:
                shutil.rmtree(snap, ignore_errors=True)



def read_ranges(ranges: list[tuple[str, int, int]]) -> list[bytes]:
    """Bytes [start, end) of block files, for a batch served from the disk tier (run it in a
    thread: even page-cache reads may wait on the disk)."""
    out = []
    for path, start, end in ranges:
        fd = os.open(path, os.O_RDONLY)
        try:
            out.append(os.pread(fd, end - start, start))
        finally:
            os.close(fd)
    return out


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _subdirs(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as entries:
        return [e for e in entries if e.is_dir(follow_symlinks=False)]


def _file_digest(path: str) -> str:
    """digest_of(the file's bytes), read in pieces into one buffer."""
    hasher = xxhash.xxh3_64()
    buf = bytearray(CHECK_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
    return hasher.hexdigest()
