"""Unit tests of the engine's scheduling order (pure logic: plain strings stand in for jobs)."""

from __future__ import annotations

from inferencecenter.actors.engine.scheduling import (
    AGING_S,
    WaitQueue,
    effective_rank,
    prefill_order,
)


def test_higher_priority_is_served_first() -> None:
    queue: WaitQueue[str] = WaitQueue(limit=10)
    queue.push("low", "low", now=0.0)
    queue.push("normal", "normal", now=0.1)
    queue.push("high", "high", now=0.2)
    assert [queue.pop(now=0.3) for _ in range(3)] == ["high", "normal", "low"]
    assert queue.pop(now=0.3) is None


def test_same_priority_is_first_come_first_served() -> None:
    queue: WaitQueue[str] = WaitQueue(limit=10)
    for index in range(5):
        queue.push(f"job{index}", "normal", now=float(index))
    assert [queue.pop(now=10.0) for _ in range(5)] == [f"job{i}" for i in range(5)]


def test_aging_lets_low_overtake_a_fresh_high() -> None:
    queue: WaitQueue[str] = WaitQueue(limit=10)
    queue.push("old-low", "low", now=0.0)
    later = 2 * AGING_S + 0.1
    queue.push("new-high", "high", now=later)
    assert queue.pop(now=later) == "old-low"


def test_low_does_not_overtake_high_before_it_has_aged() -> None:
    queue: WaitQueue[str] = WaitQueue(limit=10)
    queue.push("low", "low", now=0.0)
    queue.push("high", "high", now=AGING_S)
    assert queue.peek(now=AGING_S) == "high"


def test_low_never_starves_under_a_stream_of_high() -> None:
    queue: WaitQueue[str] = WaitQueue(limit=100)
    queue.push("low", "low", now=0.0)
    served = []
    now = 0.0
    for index in range(100):  # a new high request arrives every second; one is served a second
        queue.push(f"high{index}", "high", now=now)
        served.append(queue.pop(now=now))
        now += 1.0
        if "low" in served:
            break
    assert "low" in served
    assert served.index("low") <= 2 * AGING_S + 1


def test_queue_is_bounded() -> None:
    queue: WaitQueue[str] = WaitQueue(limit=2)
    assert queue.push("a", "normal", 0.0) and queue.push("b", "normal", 0.0)
    assert queue.full() and not queue.push("c", "high", 0.0)
    assert len(queue) == 2
    assert queue.remove("a") and not queue.remove("a")
    assert queue.push("c", "high", 0.0)


def test_zero_limit_refuses_everything() -> None:
    queue: WaitQueue[str] = WaitQueue(limit=0)
    assert not queue.push("a", "high", 0.0)


def test_unknown_priority_counts_as_normal() -> None:
    assert effective_rank("weird", 0.0) == effective_rank("normal", 0.0)


def test_prefill_order_uses_priority_then_arrival() -> None:
    jobs = [("n1", "normal", 0.0), ("l1", "low", 0.0), ("h1", "high", 1.0), ("n2", "normal", 0.5)]
    assert prefill_order(jobs, now=1.0) == ["h1", "n1", "n2", "l1"]


def test_ordered_lists_best_first_without_removing() -> None:
    queue: WaitQueue[str] = WaitQueue(limit=10)
    queue.push("low", "low", now=0.0)
    queue.push("high", "high", now=1.0)
    queue.push("normal", "normal", now=2.0)
    assert queue.ordered(now=2.0) == ["high", "normal", "low"]
    assert len(queue) == 3
