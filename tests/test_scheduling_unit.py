"""Unit tests of the engine's scheduling order (pure logic: plain strings stand in for jobs)."""

from __future__ import annotations

from inferencecenter.actors.engine.scheduling import (
    AGING_S,
    RowPadding,
    StepCostModel,
    WaitQueue,
    effective_rank,
    padded_rows,
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


# ---- the step cost model (synthetic step times) ----


def _decode_ms(rows: int) -> float:
    """Like the CPU measured here: some row counts are much faster than their neighbours."""
    return {1: 11.0, 2: 24.0, 3: 31.0, 4: 35.0, 5: 50.0, 6: 55.0, 7: 61.0, 8: 43.0}[rows]


def _trained() -> StepCostModel:
    model = StepCostModel()
    for rows in (1, 2, 4, 8, 7, 3, 8, 8, 1, 7, 7):
        model.observe(rows, 0, _decode_ms(rows))
    for tokens in (64, 32, 100):
        model.observe(1, tokens - 1, 1.2 * tokens)
    return model


def test_cost_model_learns_steps_by_rows_and_prompt_tokens() -> None:
    model = _trained()
    assert abs(model.rows_cost(7) - 61.0) < 1.0
    assert abs(model.rows_cost(8) - 43.0) < 1.0
    assert model.token_ms is not None and abs(model.token_ms - 1.2) < 0.05


def test_cost_model_fits_a_chunk_into_the_budget() -> None:
    model = _trained()
    take = model.prompt_tokens_within(60.0, 2000)
    assert take == 50
    assert model.prompt_cost(take) <= 60.0
    assert model.prompt_tokens_within(60.0, 20) == 20


def test_cost_model_follows_a_prompt_that_gets_dearer() -> None:
    model = _trained()
    for _ in range(12):  # deep in a long prompt, attention makes each token dearer
        model.observe(0, 60, 2.0 * 60)
    assert model.token_ms is not None and abs(model.token_ms - 2.0) < 0.05


def test_cold_cost_model_leaves_the_token_cap_alone() -> None:
    model = StepCostModel()
    assert model.prompt_tokens_within(50.0, 128) == 128
    model.observe(0, 4, 500.0)  # too few tokens to learn from
    assert model.token_ms is None


def test_padding_rounds_up_to_groups_of_four_when_slots_allow() -> None:
    assert [padded_rows(rows, spare=8) for rows in range(1, 17)] == [
        1, 2, 3, 4, 8, 8, 8, 8, 12, 12, 12, 12, 16, 16, 16, 16
    ]  # fmt: skip
    assert padded_rows(7, spare=1) == 8
    assert padded_rows(6, spare=1) == 6  # two spare slots needed, one idle
    assert padded_rows(7, spare=0) == 7


# Decode-only step times (ms) by row count, measured with `inferencecenter bench --rows` on two
# machines of 2 cores (gemma 270M): AVX2 only, and AVX-512. Pure data for the padding choice.
AVX2_STEP_MS = dict(enumerate(
    [25.9, 48.1, 81.3, 61.7, 90.8, 78.5, 118.8, 100.4,
     155.5, 121.7, 154.5, 111.8, 158.2, 151.0, 160.8, 156.9], start=1
))  # fmt: skip
AVX512_STEP_MS = dict(enumerate(
    [10.2, 22.3, 28.7, 32.3, 45.6, 50.2, 56.1, 39.2,
     53.4, 58.5, 64.9, 50.8, 64.5, 70.1, 76.6, 51.8], start=1
))  # fmt: skip


def test_measured_padding_takes_the_fastest_count_within_the_spare_slots() -> None:
    padding = RowPadding(AVX2_STEP_MS)
    assert [padding.rows_for(rows, spare=16 - rows) for rows in range(1, 17)] == [
        1, 2, 4, 4, 6, 6, 8, 8, 12, 10, 12, 12, 13, 14, 15, 16
    ]  # fmt: skip
    assert padding.rows_for(9, spare=1) == 10  # 12 is out of reach, 10 still beats 9
    assert padding.rows_for(3, spare=0) == 3
    assert padding.rows_for(17, spare=8) == 17  # not measured: left alone
    assert padding.padded_counts() == {3: 4, 5: 6, 7: 8, 9: 12, 11: 12}


def test_measured_padding_needs_a_clear_gain() -> None:
    padding = RowPadding(AVX512_STEP_MS)
    chosen = [padding.rows_for(rows, spare=16 - rows) for rows in range(1, 17)]
    # Groups of 4 where they clearly pay; 9 rows (53.4 ms) against 12 (50.8) is within noise.
    assert chosen == [1, 2, 3, 4, 8, 8, 8, 8, 9, 12, 12, 12, 16, 16, 16, 16]


def test_cost_model_stays_sane_when_every_step_has_the_same_rows() -> None:
    model = StepCostModel()
    for _ in range(500):  # base and per-row cannot be told apart; the prediction must hold
        model.observe(8, 0, 42.0)
    assert abs(model.rows_cost(8) - 42.0) < 0.5
    assert abs(model.base_ms + 8 * model.row_ms - 42.0) < 0.5
    assert all(abs(v) < 1e6 for row in model._p for v in row)
