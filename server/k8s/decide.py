"""What the operator does for a CachedDataset, decided as pure functions.

controller-runtime's lesson: the decision is a function of (desired, observed) → action,
tested as a table; the side effects are a thin loop around it (server/k8s/reconciler.py).
Here the inputs are three values:

- `Desired`: the resource's spec and annotations (and its Secret's version);
- `Observed`: what cachefs answers (the dataset's info, or None when it has none);
- `Known`: what the operator knows: the status it last meant to write (its intent, which
  a failed write does not lose) and whether it is following a warm operation.

Each function returns what to do; none does it. A new input (say, a refresh that falls
due on a schedule) is one more field and one more line, and one more row of the tests.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping

from cachefs.common.wire import DatasetInfo, OperationInfo


@dataclass(frozen=True)
class Desired:
    origin: str
    fingerprint: str  # what a registration of this spec is (DatasetSpec.fingerprint)
    replicas: int
    namespaces: tuple[str, ...]
    generation: int
    refresh_request: str = ""  # the refresh annotation's value
    warm_request: str = ""  # the warm annotation's value
    warm_on_create: bool = False


@dataclass(frozen=True)
class Observed:
    info: DatasetInfo | None  # cachefs's dataset of that name, if any


@dataclass(frozen=True)
class Known:
    registration: str = ""  # the fingerprint this operator registered (status.registration)
    observed_generation: int | None = None
    last_refresh_request: str = ""
    last_warm_request: str = ""
    warmed_snapshot: str = ""
    warm_operation: str = ""  # the warm operation status names
    warm_running: bool = False  # this operator is following a warm operation now
    warm_followed: bool = False  # it has followed one since it started (it knows how that went)

    @classmethod
    def of(cls, status: Mapping[str, Any], warm_running: bool = False, warm_followed: bool = False) -> "Known":
        gen = status.get("observedGeneration")
        return cls(registration=str(status.get("registration") or ""),
                   observed_generation=gen if isinstance(gen, int) else None,
                   last_refresh_request=str(status.get("lastRefreshRequest") or ""),
                   last_warm_request=str(status.get("lastWarmRequest") or ""),
                   warmed_snapshot=str(status.get("warmedSnapshot") or ""),
                   warm_operation=str(status.get("warmOperation") or ""),
                   warm_running=warm_running, warm_followed=warm_followed)


class Register(enum.Enum):
    """What to do about the registration."""

    KEEP = "keep"  # registered as the spec says: nothing
    ADD = "add"  # not registered: add it
    UPDATE = "update"  # same origin, other settings: update in place (PATCH), the cache is kept
    REPLACE = "replace"  # another origin: remove it, then add it
    CONFLICT = "conflict"  # a dataset of that name that this resource did not register


def _same_origin(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def registration(desired: Desired, observed: Observed, known: Known) -> Register:
    """The one action on cachefs's registration, from the spec, cachefs's answer and what
    the operator registered before (a fingerprint, so fields cachefs may normalise, such
    as replicas on a small cluster, do not look like a change on every pass)."""
    info = observed.info
    if info is None:
        return Register.ADD
    same_origin = _same_origin(info.origin, desired.origin)
    if not known.registration:  # not ours (yet): adopt it if it is what the spec says
        if not same_origin:
            return Register.CONFLICT
        stale = info.replicas != desired.replicas or tuple(sorted(info.allowed_namespaces)) != desired.namespaces
    else:
        stale = known.registration != desired.fingerprint or not same_origin
    if stale:
        return Register.UPDATE if same_origin else Register.REPLACE
    return Register.KEEP


@dataclass(frozen=True)
class Plan:
    register: Register
    refresh: bool  # take a new snapshot after (a registration kept or updated in place)


def plan(desired: Desired, observed: Observed, known: Known) -> Plan:
    """The registration's action, and whether a new snapshot is due: when the spec changed
    in a way that was not an update in place (its origin's files may have), or when the
    refresh annotation has a new value. An add is a new snapshot already."""
    register = registration(desired, observed, known)
    if register not in (Register.KEEP, Register.UPDATE):
        return Plan(register, refresh=False)
    spec_changed = register is Register.KEEP and known.observed_generation not in (None, desired.generation)
    requested = desired.refresh_request != known.last_refresh_request
    return Plan(register, refresh=spec_changed or requested)


class Warm(enum.Enum):
    START = "start"  # start a warm operation and follow it
    FOLLOW_AGAIN = "follow"  # status names an operation from before a restart: follow it again
    NONE = "none"


def warming(desired: Desired, snapshot: str, known: Known) -> Warm:
    """Level-triggered: each snapshot is warmed once when warmOnCreate, and once per new
    value of the warm annotation; never two at once."""
    if known.warm_running:
        return Warm.NONE
    requested = desired.warm_request != known.last_warm_request
    unwarmed = desired.warm_on_create and known.warmed_snapshot != snapshot
    if requested or unwarmed:
        return Warm.START
    if known.warm_operation and not known.warm_followed:
        return Warm.FOLLOW_AGAIN
    return Warm.NONE


@dataclass(frozen=True)
class Condition:
    value: bool | None
    reason: str
    message: str


def warm_condition(running: bool, progress: OperationInfo | None, cached: float | None, total: str,
                   done: str) -> Condition:
    """The Warm condition, from the warm operation followed (if any) and the fraction of the
    snapshot cachefs says it holds. `total`/`done` are sizes already formatted."""
    if running:
        return Condition(False, "Warming", f"warming: {done} of {total} fetched")
    if cached is not None and cached >= 0.999:
        return Condition(True, "Cached", "every block of the snapshot is cached")
    if progress is not None and not progress.finished_ok:
        detail = progress.message or "; ".join(f"{p}: {m}" for p, m in list(progress.failures.items())[:3])
        return Condition(False, "WarmFailed", f"warm {progress.state}: {detail}")
    if progress is not None and cached is None:
        return Condition(True, "Warmed", "the last warm operation fetched every block")
    if cached is not None:
        return Condition(False, "Partial", f"{cached:.0%} of the snapshot is cached")
    return Condition(None, "Unknown", "the cache did not report what it holds")


def status_patch(current: Mapping[str, Any], last_meant: Mapping[str, Any],
                 new: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch from the resource's `current` status to `new` (None: nothing to
    write, so a write never triggers another pass). A field that went away is nulled
    whether `current` holds it or only `last_meant` does: a watch event older than our own
    last write must not bring a removed field back."""
    gone = {k for k in (*current, *last_meant) if k not in new}
    if dict(new) == dict(current) and not gone:
        return None
    patch: dict[str, Any] = {k: v for k, v in new.items() if current.get(k) != v}
    patch.update({k: None for k in gone})
    return patch


def cleaned(status: Mapping[str, Any]) -> dict[str, Any]:
    """A status as written: fields without a value left out."""
    return {k: v for k, v in status.items() if v not in (None, "")}
