"""Settings: one frozen object per component, read from flags, variables and a file.

Precedence, highest first: explicit values (flags, storage options) → `CACHEFS_<FIELD>`
environment variables → the config file (`$CACHEFS_HOME/config.toml`, one table per
component: `[client]`, `[node]`, `[cluster]`, `[csi]`, `[mount]`) → the cluster file that
`cachefs up` writes (endpoint and tokens, for clients) → defaults. Every object is
validated when built, so a bad value fails at start with its name. The objects themselves
live with their components (cachefs/config.py, server/config.py, csi/config.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping, TypeVar, get_type_hints

from cachefs.common.errors import ConfigError

T = TypeVar("T")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.I)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(value: str | int) -> int:
    """'256MiB', '1G', '4096' → bytes. Decimal units (MB) are 1000-based, binary (MiB) 1024."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"cannot read {value!r} as a size: use a number with an optional unit, like 256MiB or 2GiB")
    number, unit, suffix = m.groups()
    base = 1000 if suffix.lower() == "b" else 1024  # MB is decimal; M, Mi and MiB are binary
    return int(float(number) * base ** _UNITS[unit.lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cachefs_home(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("CACHEFS_HOME") or Path.home() / ".cachefs")


def cluster_file(env: Mapping[str, str] = os.environ) -> Path:
    """Where `cachefs up` records the endpoint and token (mode 0600)."""
    return cachefs_home(env) / "cluster.json"


def read_cluster_file(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    path = cluster_file(env)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}; run `cachefs up` again or delete the file") from e


def _coerce(name: str, kind: Any, value: Any) -> Any:
    if value is None:
        return None
    try:
        if kind is bool or kind == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{value!r} is not a boolean (use true or false)")
        if kind is int or kind == "int":
            return parse_size(value) if name.endswith(("_bytes", "block_size")) else int(value)
        if kind is float or kind == "float":
            return float(value)
        if kind is str or kind == "str":
            return str(value)
        if kind == tuple[str, ...]:
            if isinstance(value, str):
                return tuple(x for x in (p.strip() for p in value.split(",")) if x)
            return tuple(str(x) for x in value)
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"bad value for {name}: {e}") from e
    return value


def load(
    cls: type[T],
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] = os.environ,
    config_path: Path | None = None,
) -> T:
    """Build `cls` (a frozen dataclass with a SECTION name) from all configuration sources."""
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if getattr(cls, "USES_CLUSTER_FILE", False):
        values.update({k: v for k, v in read_cluster_file(env).items() if k in fields})
    path = config_path or Path(env.get("CACHEFS_CONFIG") or cachefs_home(env) / "config.toml")
    if path.exists():
        try:
            section = tomllib.loads(path.read_text()).get(cls.SECTION, {})  # type: ignore[attr-defined]
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        unknown = set(section) - fields
        if unknown:
            raise ConfigError(f"unknown keys in [{cls.SECTION}] of {path}: {sorted(unknown)}; known: {sorted(fields)}")  # type: ignore[attr-defined]
        values.update(section)
    for name in fields:
        key = f"CACHEFS_{name.upper()}"
        if key in env:
            values[name] = env[key]
    for name, value in (overrides or {}).items():
        if name not in fields:
            raise ConfigError(f"unknown option {name!r}; known: {sorted(fields)}")
        if value is not None:
            values[name] = value
    coerced = {k: _coerce(k, hints[k], v) for k, v in values.items()}
    config = cls(**coerced)
    object.__setattr__(config, "_given", frozenset(values))  # which fields some source set (see `given`)
    return config


def given(config: Any) -> frozenset[str] | None:
    """The fields of a loaded config that a flag, variable or file set (not defaults); None
    for a config built in code, where every field counts as given."""
    return getattr(config, "_given", None)
