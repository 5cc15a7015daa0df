"""Files written whole or not at all: to a temporary name beside them, then renamed.

A crash mid-write leaves the old file (or none), never half of one; the mode is set when
the file is created, so a secret is never readable by others, not even for a moment.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | os.PathLike[str], data: bytes, mode: int = 0o600, durable: bool = False) -> None:
    """Replace `path` with `data`; `durable` also waits for the disk (fsync) before renaming."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, final)
