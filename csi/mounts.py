"""The mount table: which cachefs FUSE mounts exist, read from /proc/self/mountinfo.

Read, never probed: touching a mount point would block on a hung FUSE server. Both the
mounter (csi/mounter.py) and the mount process itself (csi/mount_process.py) read it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

FSTYPE = "fuse.cachefs"  # "fuse." + the subtype csi.fusefs mounts with


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor", names the mount's bdi in sysfs


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def read_mounts(mountinfo: str = "/proc/self/mountinfo") -> dict[str, MountEntry]:
    """Mount point → entry; the last mount on a point wins, as it does for lookups."""
    mounts: dict[str, MountEntry] = {}
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) < 5 or len(rest) < 2:
                continue
            point = _unescape(fields[4])
            mounts[point] = MountEntry(point, rest[0], _unescape(rest[1]), fields[2])
    return mounts


def find_mount(target: str) -> MountEntry | None:
    entry = read_mounts().get(os.path.realpath(target)) or read_mounts().get(target)
    return entry if entry is not None and entry.fstype == FSTYPE else None
