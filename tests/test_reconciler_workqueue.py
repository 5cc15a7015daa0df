"""The operator's work queue: each key once in the queue, never in two workers, failing
keys back after a growing delay."""

from __future__ import annotations

import asyncio

import pytest

from server.k8s.workqueue import ShutDown, WorkQueue


async def drain(q: WorkQueue[str]) -> list[str]:
    out = []
    while len(q):
        key = await q.get()
        out.append(key)
        q.done(key)
    return out


async def test_a_key_added_twice_is_handed_out_once() -> None:
    q: WorkQueue[str] = WorkQueue()
    for key in ("a", "b", "a", "a"):
        q.add(key)
    assert await drain(q) == ["a", "b"]


async def test_a_key_added_while_a_worker_holds_it_comes_back_after_done() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    key = await q.get()
    q.add("a")  # changed again while being reconciled
    assert len(q) == 0  # not handed to a second worker meanwhile
    q.done(key)
    assert await drain(q) == ["a"]


async def test_failures_back_off_exponentially_up_to_the_limit_and_success_resets() -> None:
    q: WorkQueue[str] = WorkQueue(base_delay=0.01, max_delay=0.04)
    delays = [q.retry("a") for _ in range(5)]
    assert delays == [0.01, 0.02, 0.04, 0.04, 0.04]
    q.forget("a")
    assert q.retry("a") == 0.01 and q.failures("a") == 1


async def test_a_retried_key_comes_back_after_its_delay() -> None:
    q: WorkQueue[str] = WorkQueue(base_delay=0.05)
    q.retry("a")
    assert len(q) == 0
    assert await asyncio.wait_for(q.get(), 1.0) == "a"


async def test_the_earliest_of_two_delayed_adds_wins() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add_after("a", 5.0)
    q.add_after("a", 0.02)
    q.add_after("a", 1.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await asyncio.wait_for(q.get(), 2.0) == "a"
    assert loop.time() - start < 0.5


async def test_shutdown_releases_waiting_workers() -> None:
    q: WorkQueue[str] = WorkQueue()
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.shutdown()
    with pytest.raises(ShutDown):
        await asyncio.wait_for(waiter, 1.0)
    q.add("late")  # ignored once shut down
    assert len(q) == 0
