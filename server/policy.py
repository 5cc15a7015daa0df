"""Eviction policies: which blocks a byte budget keeps.

A policy only does bookkeeping (keys and sizes); the stores own the bytes. Two policies:
- `LRU` evicts the least recently used blocks to make room.
- `Sticky` admits blocks until full, then keeps that resident set and declines new ones.
  Under shuffled epochs over a dataset larger than the cache, LRU evicts much of what the
  next epoch needs (bench/epoch.py, a dataset twice the cache: 15-16% hits per epoch);
  Sticky keeps a stable set, so each epoch hits capacity/dataset of its reads (50% there).
  Its price: once full it admits nothing new until blocks are purged (`dataset rm` or
  `refresh`), so it suits a cluster dedicated to one large dataset; LRU stays the default.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class Policy(Protocol):
    budget: int
    used: int

    def __contains__(self, key: str) -> bool: ...
    def __len__(self) -> int: ...
    def touch(self, key: str) -> None: ...
    def admit(self, key: str, size: int) -> tuple[bool, list[str]]: ...
    def would_admit(self, size: int) -> bool: ...
    def remove(self, key: str) -> int: ...


class LRU:
    """Least-recently-used within a byte budget. Not thread-safe: one event loop owns it."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._sizes: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def touch(self, key: str) -> None:
        if key in self._sizes:
            self._sizes.move_to_end(key)

    def admit(self, key: str, size: int) -> tuple[bool, list[str]]:
        """Make room for `key`; returns (admitted, keys evicted to make room)."""
        if key in self._sizes:
            self.touch(key)
            return True, []
        if size > self.budget:
            return False, []
        victims = []
        while self.used + size > self.budget:
            victim, vsize = self._sizes.popitem(last=False)
            self.used -= vsize
            victims.append(victim)
        self._sizes[key] = size
        self.used += size
        return True, victims

    def would_admit(self, size: int) -> bool:
        """Would a new block of `size` bytes be kept (evicting others if need be)?"""
        return size <= self.budget

    def remove(self, key: str) -> int:
        size = self._sizes.pop(key, 0)
        self.used -= size
        return size


class Sticky(LRU):
    """Admit while there is room; once full, keep what is resident (no eviction)."""

    def admit(self, key: str, size: int) -> tuple[bool, list[str]]:
        if key in self._sizes:
            return True, []
        if self.used + size > self.budget:
            return False, []
        self._sizes[key] = size
        self.used += size
        return True, []

    def would_admit(self, size: int) -> bool:
        return self.used + size <= self.budget


def make_policy(name: str, budget: int) -> Policy:
    if name == "lru":
        return LRU(budget)
    if name == "sticky":
        return Sticky(budget)
    raise ValueError(f"unknown eviction policy {name!r}: use 'lru' or 'sticky'")
