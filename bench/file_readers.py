"""Read many whole files with N reader *processes* at once, as DataLoader workers do.

Threads would share one GIL and measure Python; processes measure the filesystem. Each
reader gets its share of the paths (round robin), waits for a common start signal, reads
every file with `open(path, "rb").read()` and reports its start, end, files and bytes.

    from file_readers import read_files
    files, nbytes, seconds = read_files(paths, processes=4)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

_READER = """
import json, sys, time
paths = open(sys.argv[1]).read().split("\\0")
sys.stdin.readline()  # the start signal: every reader is up and has its list
start, n = time.time(), 0
for p in paths:
    with open(p, "rb") as f:
        n += len(f.read())
print(json.dumps({"start": start, "end": time.time(), "files": len(paths), "bytes": n}))
"""


def read_files(paths: list[str], processes: int = 4, timeout: float = 600) -> tuple[int, int, float]:
    """(files, bytes, seconds from the first reader's start to the last one's end)."""
    shares = [paths[i::processes] for i in range(processes)]
    with tempfile.TemporaryDirectory(prefix="cachefs-readers-") as tmp:
        procs = []
        for i, share in enumerate(s for s in shares if s):
            listing = os.path.join(tmp, f"{i}.lst")
            with open(listing, "w") as f:
                f.write("\0".join(share))
            procs.append(subprocess.Popen([sys.executable, "-c", _READER, listing], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True))
        for proc in procs:  # every reader was started before any reads
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = []
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"a reader process failed with exit code {proc.returncode}")
            reports.append(json.loads(out))
    seconds = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return sum(r["files"] for r in reports), sum(r["bytes"] for r in reports), seconds
