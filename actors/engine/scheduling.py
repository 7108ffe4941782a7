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


class StepCostModel:
    """How long a decode step takes, learnt from the steps done, so prompts are prefilled in
    chunks that keep a step within a time budget (the gap every generating stream sees).

    Steps are of two kinds (the engine does not mix them). A step of generating streams costs
    what such steps with that many rows cost lately; for counts not seen yet, a line fitted by
    recursive least squares (forgetting old steps). A step of prompt chunks costs `per_token ×
    tokens`, per_token a moving average over the recent prompt steps (it grows as a long prompt
    goes deeper, and the average follows).
    """

    FORGET = 0.95
    TOKEN_SMOOTHING = 0.3  # weight of the newest step in the moving averages
    MIN_TOKENS_TO_LEARN = 8

    def __init__(self) -> None:
        self.base_ms = 0.0
        self.row_ms = 0.0
        self._p = [[1e4, 0.0], [0.0, 1e4]]  # the fit's uncertainty (RLS covariance)
        self.token_ms: float | None = None
        # Decode steps by their number of rows (padding included): the line is an average, but
        # CPU kernels are much faster for some counts than for their neighbours.
        self.decode_ms: dict[int, float] = {}

    def rows_cost(self, rows: int) -> float:
        """A step of `rows` rows (generating streams and any padding)."""
        known = self.decode_ms.get(rows)
        if known is not None:
            return known
        return max(0.0, self.base_ms + self.row_ms * rows)

    def observe(self, rows: int, prompt_tokens: int, ms: float) -> None:
        """One step done: `rows` sampled positions (generating streams, or the last tokens of
        prompts) and `prompt_tokens` other prompt positions, in `ms`."""
        if prompt_tokens == 0:
            if rows > 0:
                self._fit_rows(float(rows), ms)
                known = self.decode_ms.get(rows, ms)
                self.decode_ms[rows] = known + self.TOKEN_SMOOTHING * (ms - known)
            return
        tokens = rows + prompt_tokens
        if tokens >= self.MIN_TOKENS_TO_LEARN:
            per_token = ms / tokens
            if self.token_ms is None:
                self.token_ms = per_token
            else:
                self.token_ms += self.TOKEN_SMOOTHING * (per_token - self.token_ms)

    def _fit_rows(self, rows: float, ms: float) -> None:
        (a, b), (c, d) = self._p
        px = (a + b * rows, c + d * rows)
        gain_den = self.FORGET + px[0] + rows * px[1]
        k = (px[0] / gain_den, px[1] / gain_den)
        error = ms - (self.base_ms + self.row_ms * rows)
        self.base_ms += k[0] * error
        self.row_ms += k[1] * error
        # P = (P - k xᵀP) / λ, with xᵀP = pxᵀ (P is symmetric); bounded so that steps that all
        # have the same number of rows (nothing tells base from per_row) cannot wind it up.
        self._p = [
            [min(1e4, (a - k[0] * px[0]) / self.FORGET), (b - k[0] * px[1]) / self.FORGET],
            [(c - k[1] * px[0]) / self.FORGET, min(1e4, (d - k[1] * px[1]) / self.FORGET)],
        ]

    def prompt_tokens_within(self, budget_ms: float, wanted: int) -> int:
        """How many of `wanted` prompt tokens fit in `budget_ms`; all when nothing is known."""
        if self.token_ms is None or wanted <= 0:
            return max(0, wanted)
        return min(wanted, int(max(0.0, budget_ms) / self.token_ms))

    def prompt_cost(self, tokens: int) -> float:
        return 0.0 if self.token_ms is None else tokens * self.token_ms


# Rows of a decode step are padded to a multiple of this (see padded_rows).
PAD_GROUP = 4
# A padded step must take at most this share of the unpadded one's measured time to be chosen:
# step times measured at start vary by several per cent on a busy machine.
PAD_MARGIN = 0.9


def padded_rows(rows: int, spare: int) -> int:
    """`--batch-padding on`: the rows to decode `rows` generating streams with, given `spare`
    idle slots to pad with. llama.cpp's repacked CPU kernels work on groups of 4 rows; measured
    on 2 cores with AVX-512 (gemma 270M), a step of 5, 6 or 7 streams took 51, 55 and 61 ms, one
    of 8 took 43; 9 to 15 took 57 to 77 ms, 12 and 16 took 53. Below 4 rows, 4 is slower than
    1, 2 or 3 there. A fixed rule, not a choice per step: temp-0 output then depends only on
    which sessions run."""
    if rows <= PAD_GROUP or rows % PAD_GROUP == 0:
        return rows
    rounded = -(-rows // PAD_GROUP) * PAD_GROUP
    return rounded if rounded - rows <= spare else rows


class RowPadding:
    """`--batch-padding auto`: the rows to decode `rows` streams with, from the decode-only step
    times measured at start for each row count. Which counts llama.cpp's CPU kernels favour
    depends on the machine: with AVX-512 multiples of 4 win and 4 rows are dear below 4; with
    AVX2 (2 cores, gemma 270M) 3 rows took 81 ms and 4 took 62, 5 took 91 and 6 took 79, 7 took
    119 and 8 took 100. The choice is fixed for the life of the process, like padded_rows'."""

    def __init__(self, step_ms: dict[int, float]) -> None:
        self.step_ms = dict(step_ms)

    def rows_for(self, rows: int, spare: int) -> int:
        own = self.step_ms.get(rows)
        if own is None:
            return rows
        candidates = [more for more in range(rows + 1, rows + spare + 1) if more in self.step_ms]
        if not candidates:
            return rows
        fastest = min(candidates, key=lambda more: (self.step_ms[more], more))
        return fastest if self.step_ms[fastest] <= PAD_MARGIN * own else rows

    def padded_counts(self) -> dict[int, int]:
        """Each measured count that is padded with slots to spare, and what to."""
        most = max(self.step_ms, default=0)
        chosen = {rows: self.rows_for(rows, most - rows) for rows in self.step_ms}
        return {rows: more for rows, more in chosen.items() if more != rows}
