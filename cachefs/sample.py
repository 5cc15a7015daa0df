"""A sample dataset shaped like training data: many small files in class folders, a few
large shards. Used by `cachefs demo`, the tests and the benchmarks (deterministic bytes)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SampleSpec:
    classes: int = 10
    small_files: int = 600  # spread over the classes
    small_min: int = 16 * 1024
    small_max: int = 160 * 1024
    large_files: int = 3
    large_size: int = 40 * 1024 * 1024
    seed: int = 7


def make_sample(root: str | os.PathLike[str], spec: SampleSpec = SampleSpec()) -> Path:
    """Write the sample under `root` (idempotent: existing files of the right size are kept)."""
    root = Path(root)
    rng = random.Random(spec.seed)
    files: list[tuple[Path, int]] = []
    for i in range(spec.small_files):
        cls = i % spec.classes
        files.append((root / "train" / f"class_{cls:02d}" / f"img_{i:05d}.jpg", rng.randint(spec.small_min, spec.small_max)))
    for i in range(spec.large_files):
        files.append((root / "shards" / f"shard-{i:04d}.tar", spec.large_size + rng.randint(0, 4096)))
    for path, size in files:
        if path.exists() and path.stat().st_size == size:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(random.Random(f"{spec.seed}:{path.name}").randbytes(size))
    return root
