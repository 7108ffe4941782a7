"""Who gets a free slot and prefill budget first: priority with aging, and a bounded queue."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}
# Each this many seconds of waiting lifts a request one priority level, so `low` never starves:
# after 2 × AGING_S it is ahead of any `high` request that has just arrived.
AGING_S = 4.0


def effective_rank(priority: str, waited_s: float, aging_s: float = AGING_S) -> float:
    """Lower goes first: the client's priority rank minus one level per `aging_s` waited."""
    return PRIORITY_RANK.get(priority, 1) - max(0.0, waited_s) / aging_s


@dataclass(order=True)
class _Entry(Generic[T]):
    arrived: float
    order: int
    priority: str = field(compare=False)
    item: T = field(compare=False)


class WaitQueue(Generic[T]):
    """Infers waiting for a slot. `pop` gives the one with the best effective rank (ties: the
    earliest); beyond `limit` waiting, `push` refuses (the caller answers `overloaded`)."""

    def __init__(self, limit: int, aging_s: float = AGING_S) -> None:
        self.limit = limit
        self.aging_s = aging_s
        self._entries: list[_Entry[T]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item: object) -> bool:
        return any(entry.item is item for entry in self._entries)

    def full(self) -> bool:
        return len(self._entries) >= self.limit

    def push(self, item: T, priority: str, now: float) -> bool:
        if self.full():
            return False
        self._entries.append(_Entry(now, next(self._counter), priority, item))
        return True

    def _best(self, now: float) -> _Entry[T] | None:
        if not self._entries:
            return None
        return min(
            self._entries,
            key=lambda e: (effective_rank(e.priority, now - e.arrived, self.aging_s), e.arrived),
        )

    def ordered(self, now: float) -> list[T]:
        """Everything waiting, best effective rank first."""
        ranked = sorted(
            self._entries,
            key=lambda e: (effective_rank(e.priority, now - e.arrived, self.aging_s), e.arrived),
        )
        return [entry.item for entry in ranked]

    def peek(self, now: float) -> T | None:
        best = self._best(now)
        return best.item if best else None

    def pop(self, now: float) -> T | None:
        best = self._best(now)
        if best is None:
            return None
        self._entries.remove(best)
        return best.item

    def remove(self, item: T) -> bool:
        for entry in self._entries:
            if entry.item is item:
                self._entries.remove(entry)
                return True
        return False

    def items(self) -> list[T]:
        return [entry.item for entry in self._entries]


def prefill_order(
    jobs: list[tuple[T, str, float]], now: float, aging_s: float = AGING_S
) -> list[T]:
    """Order prompts for this step's prefill budget: (item, priority, arrived) by effective rank,
    then arrival."""
    ranked = sorted(jobs, key=lambda j: (effective_rank(j[1], now - j[2], aging_s), j[2]))
    return [item for item, _, _ in ranked]
