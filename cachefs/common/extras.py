"""Commands whose parts are extras: without them, a clear message naming the extra; the
demo, which is the first thing a new user runs, installs what it needs instead.

`pip install cachefs` is the client; `cachefs up` needs `cachefs[server]` (Ray), `cachefs
csi|mount` need `cachefs[csi]` (gRPC), `cachefs operator` needs
`cachefs[operator]` (kubernetes). The requirements are read from the package's own
metadata, so they are written once, in pyproject.toml.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from typing import Callable

from cachefs.common.errors import CachefsError

MODULES = {  # an extra → modules whose absence says it is not installed
    "server": ("ray", "prometheus_client"),
    "csi": ("grpc",),
    "operator": ("kubernetes",),
    "torch": ("torch",),
    "demo": ("moto",),  # the demo's object store (moto's S3 server), beside the server extra
}


def missing(extra: str) -> list[str]:
    return [m for m in MODULES[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, command: str) -> None:
    """Raise a clear error when `command` cannot run without `extra`."""
    if missing(extra):
        raise CachefsError(f"`cachefs {command}` needs the {extra} extra, which is not installed "
                           f"(no {', '.join(missing(extra))}): pip install 'cachefs[{extra}]'")


def requirements(extra: str) -> list[str]:
    """The requirements of `extra`, from this installation's metadata."""
    out = []
    for req in importlib.metadata.requires("cachefs") or []:
        spec, _, marker = req.partition(";")
        if f'extra == "{extra}"' in marker.replace("'", '"'):
            out.append(spec.strip())
    return out


def install(extra: str, say: Callable[[str], None]) -> None:
    """pip-install `extra`'s requirements into this Python (for the demo)."""
    reqs = requirements(extra)
    if not reqs:
        raise CachefsError(f"cannot tell what the {extra} extra needs: pip install 'cachefs[{extra}]' yourself")
    say(f"installing the {extra} extra: {' '.join(reqs)}")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *reqs], timeout=3600)
    if done.returncode != 0:
        raise CachefsError(f"installing the {extra} extra failed (pip exited {done.returncode}); "
                           f"run: pip install 'cachefs[{extra}]'")
