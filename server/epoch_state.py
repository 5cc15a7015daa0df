"""The coordinator's ring state on disk: the last epoch it published and its weight unit.

Written whole or not at all (a temporary file, fsync, rename): a torn write used to leave
a file that read as epoch 0, and a restarted coordinator then published epochs every node
ignored. A file that cannot be read is reported, never taken as 0: the coordinator then
starts above any epoch it can have published (`floor_after_loss`) and above what its
nodes report when they register (Coordinator.register_node).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cachefs.common.files import write_atomically

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RingState:
    epoch: int = 0
    weight_unit: int = 0  # 0: not chosen yet (server/placement.py chooses it with the first ring)
    problem: str = ""  # why the saved state could not be read, for `status`; empty when it could


def floor_after_loss() -> int:
    """An epoch above any a coordinator can have published: epochs grow by one per
    membership change, far slower than one a second, so the clock in seconds is ahead."""
    return int(time.time())


def parse(text: str) -> tuple[int, int]:
    """(epoch, weight unit) from the file's text: JSON, or the bare integer older versions wrote."""
    text = text.strip()
    if text.isdigit():
        return int(text), 0
    doc = json.loads(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("epoch"), int) or doc["epoch"] < 0:
        raise ValueError("expected {\"epoch\": N, \"weight_unit\": N}")
    unit = doc.get("weight_unit", 0)
    if not isinstance(unit, int) or unit < 0:
        raise ValueError(f"weight_unit must be a non-negative integer, not {unit!r}")
    return doc["epoch"], unit


def load(path: Path | None) -> RingState:
    if path is None:
        return RingState()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return RingState()
    except OSError as e:
        return _lost(path, f"cannot read it: {e}")
    try:
        epoch, unit = parse(text)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        return _lost(path, f"it is not a ring state ({e}): {text[:40]!r}")
    return RingState(epoch, unit)


def _lost(path: Path, why: str) -> RingState:
    floor = floor_after_loss()
    problem = (f"the saved ring epoch in {path} was unreadable ({why}); starting at epoch {floor}, above any "
               "epoch published before, so that nodes and clients keep following this coordinator")
    log.error(problem)
    return RingState(floor, 0, problem)


def save(path: Path | None, epoch: int, weight_unit: int) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps({"epoch": epoch, "weight_unit": weight_unit}).encode(), mode=0o644,
                         durable=True)
