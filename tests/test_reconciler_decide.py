"""The operator's decisions as tables: (spec, what cachefs answers, what the operator
knows) → the action (server/k8s/decide.py). No cluster, no API server: the loop around
them is tested end to end in test_reconciler.py."""

from __future__ import annotations

import dataclasses

import pytest

from cachefs.common.wire import DatasetInfo, OperationInfo
from server.k8s.decide import (Condition, Desired, Known, Observed, Plan, Register, Warm, plan, status_patch,
                               warm_condition, warming)

ORIGIN = "s3://bucket/images/"
SPEC = Desired(origin=ORIGIN, fingerprint="fp-1", replicas=2, namespaces=("ml",), generation=3)
INFO = DatasetInfo(name="ml.images", origin=ORIGIN, snapshot="snap-a", files=10, bytes=1000, replicas=2,
                   allowed_namespaces=("ml",))
OURS = Known(registration="fp-1", observed_generation=3)


def spec(**kw) -> Desired:
    return dataclasses.replace(SPEC, **kw)


def info(**kw) -> DatasetInfo:
    return dataclasses.replace(INFO, **kw)


def ours(**kw) -> Known:
    return dataclasses.replace(OURS, **kw)


PLANS = {
    "nothing in cachefs: add": (SPEC, None, OURS, Plan(Register.ADD, False)),
    "a new resource, nothing in cachefs: add": (SPEC, None, Known(), Plan(Register.ADD, False)),
    "as registered: nothing": (SPEC, INFO, OURS, Plan(Register.KEEP, False)),
    "a trailing slash is the same origin": (spec(origin=ORIGIN.rstrip("/")), INFO, OURS, Plan(Register.KEEP, False)),
    "replicas cachefs capped on a small cluster: no churn": (SPEC, info(replicas=1), OURS, Plan(Register.KEEP, False)),
    "settings changed (new fingerprint): update in place": (spec(fingerprint="fp-2", generation=4), INFO, OURS,
                                                            Plan(Register.UPDATE, False)),
    "settings changed and a refresh asked: update, then refresh": (
        spec(fingerprint="fp-2", generation=4, refresh_request="r1"), INFO, OURS, Plan(Register.UPDATE, True)),
    "another origin: remove and add": (spec(origin="s3://bucket/other/", fingerprint="fp-2"), INFO, OURS,
                                       Plan(Register.REPLACE, False)),
    "ours, but cachefs holds another origin: remove and add": (SPEC, info(origin="s3://elsewhere/"), OURS,
                                                               Plan(Register.REPLACE, False)),
    "spec changed, same registration (e.g. warmOnCreate): refresh": (spec(generation=4), INFO, OURS,
                                                                      Plan(Register.KEEP, True)),
    "refresh annotation with a new value: refresh": (spec(refresh_request="r1"), INFO, OURS,
                                                     Plan(Register.KEEP, True)),
    "refresh annotation already acted on: nothing": (spec(refresh_request="r1"), INFO,
                                                     ours(last_refresh_request="r1"), Plan(Register.KEEP, False)),
    "registered by hand with another origin: conflict": (SPEC, info(origin="s3://someone/else/"), Known(),
                                                          Plan(Register.CONFLICT, False)),
    "registered by hand as the spec says: adopted": (SPEC, INFO, Known(), Plan(Register.KEEP, False)),
    "registered by hand, other replicas: update in place": (SPEC, info(replicas=1), Known(),
                                                            Plan(Register.UPDATE, False)),
    "registered by hand, other namespaces: update in place": (SPEC, info(allowed_namespaces=("ml", "x")), Known(),
                                                              Plan(Register.UPDATE, False)),
}


@pytest.mark.parametrize("desired, observed, known, expected", PLANS.values(), ids=PLANS.keys())
def test_the_registration_plan(desired: Desired, observed: DatasetInfo | None, known: Known, expected: Plan) -> None:
    assert plan(desired, Observed(observed), known) == expected


WARM_ON = spec(warm_on_create=True)
WARMS = {
    "warmOnCreate, snapshot not warmed: start": (WARM_ON, Known(), Warm.START),
    "warmOnCreate, this snapshot warmed: nothing": (WARM_ON, Known(warmed_snapshot="snap-a"), Warm.NONE),
    "warmOnCreate, a new snapshot: start": (WARM_ON, Known(warmed_snapshot="snap-old"), Warm.START),
    "a warm asked (new annotation value): start": (spec(warm_request="w1"), Known(), Warm.START),
    "a warm asked before, already done: nothing": (spec(warm_request="w1"), Known(last_warm_request="w1"),
                                                   Warm.NONE),
    "a warm asked while one runs: nothing (never two)": (spec(warm_request="w2"),
                                                          Known(last_warm_request="w1", warm_running=True),
                                                          Warm.NONE),
    "an operation from before a restart: follow it again": (SPEC, Known(warm_operation="op-7"), Warm.FOLLOW_AGAIN),
    "an operation already followed since start: nothing": (SPEC, Known(warm_operation="op-7", warm_followed=True),
                                                           Warm.NONE),
    "nothing asked, no warmOnCreate: nothing": (SPEC, Known(), Warm.NONE),
}


@pytest.mark.parametrize("desired, known, expected", WARMS.values(), ids=WARMS.keys())
def test_the_warm_decision(desired: Desired, known: Known, expected: Warm) -> None:
    assert warming(desired, "snap-a", known) == expected


def op(state: str, message: str = "", failures: dict[str, str] | None = None) -> OperationInfo:
    return OperationInfo(id="op", kind="warm", dataset="d", state=state, message=message, failures=failures or {})


CONDITIONS = {
    "running": (True, op("running"), None, Condition(False, "Warming", "warming: 1 KB of 9 KB fetched")),
    "everything cached": (False, None, 1.0, Condition(True, "Cached", "every block of the snapshot is cached")),
    "cached beats an old failure": (False, op("failed", "x"), 1.0,
                                    Condition(True, "Cached", "every block of the snapshot is cached")),
    "failed, with its message": (False, op("failed", "origin gone"), 0.5,
                                 Condition(False, "WarmFailed", "warm failed: origin gone")),
    "failed, with its first failures": (False, op("failed", failures={"a": "e1", "b": "e2"}), None,
                                        Condition(False, "WarmFailed", "warm failed: a: e1; b: e2")),
    "succeeded, nothing reported": (False, op("succeeded"), None,
                                    Condition(True, "Warmed", "the last warm operation fetched every block")),
    "partly cached": (False, None, 0.25, Condition(False, "Partial", "25% of the snapshot is cached")),
    "nothing known": (False, None, None, Condition(None, "Unknown", "the cache did not report what it holds")),
}


@pytest.mark.parametrize("running, progress, cached, expected", CONDITIONS.values(), ids=CONDITIONS.keys())
def test_the_warm_condition(running: bool, progress: OperationInfo | None, cached: float | None,
                            expected: Condition) -> None:
    assert warm_condition(running, progress, cached, "9 KB", "1 KB") == expected


PATCHES = {
    "unchanged: no write": ({"a": 1}, {"a": 1}, {"a": 1}, None),
    "a field changed: only it": ({"a": 1, "b": 2}, {}, {"a": 1, "b": 3}, {"b": 3}),
    "a field added": ({"a": 1}, {}, {"a": 1, "c": 4}, {"c": 4}),
    "a field gone: nulled": ({"a": 1, "b": 2}, {}, {"a": 1}, {"b": None}),
    "gone from what we meant, not yet in the object: still nulled": ({"a": 1}, {"a": 1, "w": "op"}, {"a": 1},
                                                                      {"w": None}),
    "the object lags our last write: the difference only": ({"a": 1}, {"a": 2}, {"a": 2}, {"a": 2}),
}


@pytest.mark.parametrize("current, meant, new, expected", PATCHES.values(), ids=PATCHES.keys())
def test_the_status_patch(current: dict, meant: dict, new: dict, expected: dict | None) -> None:
    assert status_patch(current, meant, new) == expected


def test_known_reads_a_status_as_written() -> None:
    status = {"registration": "fp", "observedGeneration": 2, "lastRefreshRequest": "r", "lastWarmRequest": "w",
              "warmedSnapshot": "s", "warmOperation": "op"}
    assert Known.of(status, warm_running=True) == Known("fp", 2, "r", "w", "s", "op", True, False)
    assert Known.of({"observedGeneration": "2"}) == Known()  # a malformed field is not taken for a generation
