"""Refresh policies: when the coordinator refreshes a dataset by itself.

Per dataset, in its `refresh` setting ({"interval": s, "on_change": bool, "warm": bool}):
- manual (the default, `{}`): only `cachefs dataset refresh`;
- every `interval` seconds: a refresh (a new snapshot only if anything changed);
- `on_change`: every `interval` seconds (default 60) the origin is listed and compared
  with the snapshot's version tokens, no manifest built; a refresh only when they differ;
- `warm`: refreshes warm the new snapshot before making it current (`refresh --warm`).
The last outcome is kept per dataset and shown in `cachefs status` and the resource's status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from cachefs.common.errors import BadRequest, CachefsError

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between looks at the policies
DEFAULT_CHECK = 60.0  # seconds between origin checks of an on-change policy without an interval
MIN_INTERVAL = 1.0


@dataclass(frozen=True)
class RefreshPolicy:
    interval: float = 0.0
    on_change: bool = False
    warm: bool = False

    @property
    def manual(self) -> bool:
        return not self.interval and not self.on_change

    @property
    def period(self) -> float:
        return self.interval or DEFAULT_CHECK

    def to_json(self) -> dict[str, Any]:
        return {} if self.manual and not self.warm else {"interval": self.interval, "on_change": self.on_change,
                                                         "warm": self.warm}

    @classmethod
    def parse(cls, doc: Any) -> "RefreshPolicy":
        """From the API's `refresh` setting (onChange accepted for on_change); BadRequest saying what is wrong."""
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise BadRequest('refresh must be an object like {"interval": 3600, "on_change": false, "warm": true}')
        doc = {("on_change" if k == "onChange" else k): v for k, v in doc.items()}
        unknown = set(doc) - {"interval", "on_change", "warm"}
        if unknown:
            raise BadRequest(f"unknown refresh field(s) {sorted(unknown)}: a policy has interval, on_change, warm")
        interval = doc.get("interval", 0) or 0
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or \
                not (interval == 0 or MIN_INTERVAL <= interval <= 365 * 86400):
            raise BadRequest(f"refresh.interval must be 0 (none) or seconds from {MIN_INTERVAL:g} to a year, "
                             f"not {interval!r}")
        for flag in ("on_change", "warm"):
            if not isinstance(doc.get(flag, False), bool):
                raise BadRequest(f"refresh.{flag} must be true or false, not {doc[flag]!r}")
        return cls(float(interval), doc.get("on_change", False), doc.get("warm", False))


class PolicyLoop:
    """Looks at every dataset's policy each TICK and starts the refreshes that are due."""

    def __init__(self, policies: Callable[[], dict[str, RefreshPolicy]],
                 changed: Callable[[str], Awaitable[bool]],
                 refresh: Callable[[str, bool, str], Awaitable[None]],
                 record: Callable[[str, dict[str, Any]], None], clock: Callable[[], float] = time.time) -> None:
        self.policies, self.changed, self.refresh, self.record, self.clock = policies, changed, refresh, record, clock
        self._due: dict[str, float] = {}
        self._running: dict[str, asyncio.Task[None]] = {}  # a dataset's check or refresh in flight
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.tick(wait=False)
            except Exception as e:  # a policy must never stop the loop for the others
                log.exception("refresh policies: %s", e)

    async def tick(self, wait: bool = True) -> None:
        """Start the checks and refreshes that are due, each a task of its own: a slow origin
        or a long refresh of one dataset never holds up another's (a dataset whose last one
        is still running is skipped). `wait`: until the ones started now are done."""
        now = self.clock()
        policies = self.policies()
        for name in [n for n in self._due if n not in policies or policies[n].manual]:
            del self._due[name]
        started = []
        for name, policy in policies.items():
            if policy.manual or (name in self._running and not self._running[name].done()):
                continue
            due = self._due.setdefault(name, now + policy.period)
            if now < due:
                continue
            self._due[name] = now + policy.period
            self._running[name] = task = asyncio.ensure_future(self._follow(name, policy, now))
            started.append(task)
        for name in [n for n, t in self._running.items() if t.done()]:
            del self._running[name]
        if wait and started:
            await asyncio.gather(*started)

    async def _follow(self, name: str, policy: RefreshPolicy, now: float) -> None:
        """One dataset's due policy: check the origin if asked to, then refresh."""
        trigger = "onChange" if policy.on_change else "interval"
        try:
            if policy.on_change:
                try:
                    if not await self.changed(name):
                        self.record(name, {"trigger": trigger, "state": "unchanged", "time": now})
                        return
                except CachefsError as e:
                    self.record(name, {"trigger": trigger, "state": "failed", "time": now,
                                       "message": f"checking the origin failed: {e}"})
                    return
            await self.refresh(name, policy.warm, trigger)
        except Exception as e:  # one dataset's failure is its own; the loop goes on
            log.exception("refresh policy of %s: %s", name, e)
