"""What the FUSE and CSI tests share: the origin's bytes, and leaving no mount behind."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from csi.mounter import mount_pids
from csi.mounts import read_mounts


def origin_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cleanup_mounts(root: Path) -> None:
    """Leave nothing behind: lazily unmount every FUSE mount under root, kill its process."""
    for point, entry in read_mounts().items():
        if point.startswith(str(root)) and entry.fstype.startswith("fuse"):
            pids = mount_pids(point)
            subprocess.run(["fusermount3", "-uz", point], capture_output=True, timeout=10)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
