"""What goes into the next decode step: the streams' next tokens, prompt chunks, padding rows."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from .backend import BatchEntry
from .jobs import Job
from .scheduling import PAD_GROUP, StepCostModel, prefill_order
from .slots import SlotTable

# A chunked prompt advances at least this much per step, however many streams generate.
MIN_PREFILL_TOKENS = 16
# While a long prompt is prefilled, the streams' gap between tokens (their step and a prompt
# step) is held to --step-budget-ms or this many times their step alone, whichever is longer.
STEP_STRETCH = 2.2

# Generating slots this far apart get throw-away rows in between, so that the step is one
# ubatch: two rows cost less than a ubatch (one row alone 27 ms, one more in a step of 8 5-10).
GAP_ROWS = 2

# Per job in a step: (job, tokens it adds, batch index of its logits or -1).
Plan = list[tuple[Job, int, int]]
# (rows, idle slots) -> rows to decode them with: padded_rows, RowPadding.rows_for, or none.
PadRows = Callable[[int, int], int]


class BatchPlanner:
    """Builds each step within n_batch tokens and a time budget, learning step costs as it goes."""

    def __init__(
        self,
        n_batch: int,
        n_ctx: int,
        prefill_chunk: int,
        step_budget_ms: float,
        pad_rows: PadRows | None = None,
    ) -> None:
        self.n_batch = n_batch
        self.n_ctx = n_ctx
        self.prefill_chunk = prefill_chunk
        self.step_budget_ms = step_budget_ms
        self.pad_rows = pad_rows
        self.step_cost = StepCostModel()
        self.last_decode_ms = 0.0  # the last step of generating streams alone
        self.prompt_turn = False  # the last step was prompts only, while streams waited
        self.burst_rest: set[int] = set()  # ids of a burst's jobs left for the next step

    def build(self, active: list[Job], now: float) -> tuple[list[BatchEntry], Plan]:
        """The next step: the next token of every generating job and/or chunks of pending
        prompts (within n_batch tokens). Returns the entries and the plan.

        Streams generating keep their gap between tokens within a time budget (STEP_STRETCH ×
        their own step, at least --step-budget-ms), by the step cost model. Prompts that fit in
        it join their step; a longer one gets steps of its own, alternating with theirs, each a
        chunk that fits (a batch mixing a long chunk with the streams costs more than the two
        apart here: with a KV stream per sequence llama.cpp splits it into a ubatch of one token
        per sequence, which cannot be padded, and one of the rest). A burst of prompts with
        nothing generating: the first step takes more than half of them, so the median first
        token comes a step earlier; the rest join the next step whole, so that the streams of a
        burst run in step. The split is by count alone, never by measured costs: temp-0 output
        depends on the batches' shapes, and the same burst sent again must be batched the same."""
        generating = [j for j in active if j.state == "generating" and j.next_token is not None]
        waiting = prefill_order(
            [(j, j.priority, j.t_arrival) for j in active if j.state == "prefill"], now
        )
        rows = []
        for job in generating:
            assert job.session.slot is not None and job.next_token is not None
            rows.append(BatchEntry(job.next_token, job.session.n_past, job.session.slot, True))
        rows_plan = [(job, 1, index) for index, job in enumerate(generating)]
        if not waiting or not generating:
            self.prompt_turn = False
        if not waiting:
            return rows, rows_plan
        if not generating:
            return self._burst(waiting)
        burst_rest = all(id(job) in self.burst_rest for job in waiting)
        self.burst_rest = set()
        if self.prompt_turn:  # the streams waited for a prompt step: theirs comes now
            self.prompt_turn = False
            return rows, rows_plan
        cost = self.step_cost
        alone_ms = cost.rows_cost(self.decode_rows(len(rows), PAD_GROUP))
        cycle_ms = max(self.step_budget_ms, STEP_STRETCH * alone_ms)
        left_ms = cycle_ms - cost.rows_cost(len(rows))
        remaining = sum(len(job.session.tokens) - job.session.n_past for job in waiting)
        if remaining <= self.n_batch - len(rows) and (
            burst_rest or (cost.token_ms is not None and cost.prompt_cost(remaining) <= left_ms)
        ):
            entries, plan = self.prompt_chunks(waiting, remaining, None, offset=len(rows))
            return rows + entries, rows_plan + plan
        self.prompt_turn = True
        # The streams' step just done (unpadded when every slot is busy) plus this one.
        return self.prompt_chunks(
            waiting, self.prefill_chunk, cycle_ms - max(alone_ms, self.last_decode_ms)
        )

    def _burst(self, waiting: list[Job]) -> tuple[list[BatchEntry], Plan]:
        """Prompts with nothing generating: more than half of them now, the rest next step."""
        if len(waiting) == 1:
            return self.prompt_chunks(waiting, self.n_batch, None)
        half = len(waiting) // 2 + 1
        entries, plan = self.prompt_chunks(waiting[:half], self.prefill_chunk, None)
        done = {id(job) for job, _, index in plan if index >= 0}
        self.burst_rest = {id(job) for job in waiting if id(job) not in done}
        return entries, plan

    def prompt_chunks(
        self,
        jobs: list[Job],
        room: int,
        time_left: float | None,
        offset: int = 0,
        at_least: int = MIN_PREFILL_TOKENS,
    ) -> tuple[list[BatchEntry], Plan]:
        """Chunks of these prompts, in this order, within `room` tokens and (when given) the
        time the step cost model says fits, but `at_least` tokens so that prompts progress.
        `offset`: where these entries will start in the batch."""
        entries: list[BatchEntry] = []
        plan: Plan = []
        for job in jobs:
            if room <= 0:
                break
            session = job.session
            assert session.slot is not None
            start = session.n_past
            end = job.prefix_end if job.prefix_end > start else len(session.tokens)
            take = min(room, end - start)
            if time_left is not None:
                fitting = self.step_cost.prompt_tokens_within(time_left, take)
                take = fitting if fitting > 0 or plan else min(take, at_least)
                if take <= 0:
                    break
                time_left -= self.step_cost.prompt_cost(take)
            room -= take
            last = start + take == len(session.tokens)
            slot = session.slot
            for pos in range(start, start + take):
                entries.append(BatchEntry(session.tokens[pos], pos, slot, False))
            if last:
                entries[-1] = BatchEntry(session.tokens[-1], start + take - 1, slot, True)
            plan.append((job, take, offset + len(entries) - 1 if last else -1))
        return entries, plan

    def decode_rows(self, rows: int, spare: int) -> int:
        return self.pad_rows(rows, spare) if self.pad_rows is not None else rows

    def padding(self, entries: list[BatchEntry], slots: SlotTable) -> list[tuple[int, int]]:
        """Throw-away rows that make a decode-only step faster: (slot, position) in slots whose
        session is not generating, appended after its KV and removed after the step. First in
        the gaps of up to GAP_ROWS slots between generating slots: llama.cpp decodes each run
        of consecutive sequence ids as a ubatch of its own (4 rows in slots 0, 2, 4 and 6 took
        108 ms here, in slots 0-3 42 ms and in 0-6 78 ms). Then up to a row count the kernels
        like (see `pad_rows`), next to the generating slots, so the run stays one."""
        if self.pad_rows is None:
            return []
        generating = sorted(entry.seq_id for entry in entries)
        gaps = [
            range(a + 1, b) for a, b in itertools.pairwise(generating) if 1 < b - a <= GAP_ROWS + 1
        ]
        rows = len(entries)
        # A row count that is not padded even with every other slot idle is never padded: the
        # usual case (one stream, or a count the kernels like, in one run) skips the look at
        # the slots.
        if not gaps and self.decode_rows(rows, len(slots) - rows) == rows:
            return []
        spare = dict(slots.spare(self.n_ctx))
        pads = []
        for gap in gaps:
            if all(slot in spare for slot in gap):
                pads += [(slot, spare.pop(slot)) for slot in gap]
        # The spare slots next to the run, after it first: a count is padded only to one
        # they reach.
        low, high = generating[0], generating[-1]
        after = list(itertools.takewhile(spare.__contains__, itertools.count(high + 1)))
        before = list(itertools.takewhile(spare.__contains__, itertools.count(low - 1, -1)))
        reach = after + before
        wanted = self.decode_rows(rows + len(pads), len(reach)) - rows - len(pads)
        return pads + [(slot, spare[slot]) for slot in reach[: max(wanted, 0)]]

    def observe(self, outputs: int, prompt_tokens: int, ms: float, decode_only: bool) -> None:
        """A step's measured time, for the cost model (`outputs` rows with logits, padding
        included)."""
        if decode_only:
            self.last_decode_ms = ms
        self.step_cost.observe(outputs, prompt_tokens, ms)
