"""Unit tests of the engine core against a fake backend (no model, no sockets, no threads).

Each test drives the core as the actor shell does (`admit`, `plan_step`, the step run by
`execute_step` as the decode thread would, `step_done`) and checks what a client would see:
its events, and what was decoded into which sequence.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

from inferencecenter.actors.config import Config
from inferencecenter.actors.engine.core import EngineCore
from inferencecenter.actors.engine.jobs import EndOut, HistoryAppend, Job, TokenOut
from inferencecenter.actors.engine.scheduling import RowPadding
from inferencecenter.actors.engine.worker import (
    Step,
    StepResult,
    execute_step,
    run_step,
)
from inferencecenter.protocol.errors import BadRequest, Busy, NotFound, Overloaded, TooLarge
from inferencecenter.protocol.messages import MAX_GRAMMAR_BYTES, SamplingParams

from .fake_backend import EOG, FakeBackend


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# Decode step times measured on a 2-core AVX2 machine: 3 rows cost more than 4.
AVX2_STEP_MS = {1: 25.9, 2: 48.1, 3: 81.3, 4: 61.7, 5: 90.8, 6: 78.5, 7: 118.8, 8: 100.4}


def make_core(
    parallel: int = 4, *, pad: bool = False, **settings: Any
) -> tuple[EngineCore, FakeBackend, FakeClock]:
    backend = FakeBackend(n_seq_max=parallel, n_ctx_seq=settings.pop("ctx", 256))
    clock = FakeClock()
    config = Config(model="fake.gguf", **settings)
    pad_rows = RowPadding(AVX2_STEP_MS).rows_for if pad else None
    core = EngineCore(config, backend, pad_rows, clock=clock)
    return core, backend, clock


def params(**fields: Any) -> SamplingParams:
    return SamplingParams.from_wire({"temp": 0.0, "max_tokens": 4, **fields})


def open_session(core: EngineCore, name: str, system_prompt: str | None = None) -> str:
    core.open(name, system_prompt, "alice")
    return name


JOB_IDS = iter(range(1, 10**6))


def infer(core: EngineCore, session: str, prompt: str = "hello there", **fields: Any) -> Job:
    priority = fields.pop("priority", "normal")
    return core.infer(next(JOB_IDS), session, params(**fields), prompt=prompt, priority=priority)


def decode(backend: FakeBackend, step: Step, *, continued: bool = False) -> StepResult:
    """The step as the decode thread runs it."""
    result = run_step(functools.partial(execute_step, backend), step)
    result.continued = continued
    return result


def step_and_apply(core: EngineCore, backend: FakeBackend, step: Step, ms: float = 10.0) -> None:
    core.step_done(decode(backend, step), ms)


def step_once(core: EngineCore, backend: FakeBackend) -> Step | None:
    core.admit()
    step = core.plan_step()
    if step is not None:
        step_and_apply(core, backend, step)
    return step


def run_to_idle(core: EngineCore, backend: FakeBackend, most: int = 500) -> list[Step]:
    steps = []
    for _ in range(most):
        core.admit()
        if not core.active:
            return steps
        step = core.plan_step()
        if step is not None:
            step_and_apply(core, backend, step)
            steps.append(step)
    raise AssertionError("the core did not become idle")


def ends(events: list[Any]) -> dict[int, EndOut]:
    return {e.job_id: e for e in events if isinstance(e, EndOut)}


def text_of(events: list[Any], job: Job) -> str:
    return "".join(e.content for e in events if isinstance(e, TokenOut) and e.job_id == job.job_id)


# ---- batch composition and padding ---------------------------------------------------------


def burst_compositions(prompt_ms: float) -> list[list[tuple[int, bool]]]:
    """The first three steps of a burst of 4 prompts, with prompts costing `prompt_ms` a token."""
    core, backend, _ = make_core(parallel=4, step_budget_ms=5.0)
    core.planner.step_cost.observe(1, 99, 99 * prompt_ms)
    jobs = [infer(core, open_session(core, f"s{i}")) for i in range(4)]
    steps = []
    for _ in range(3):
        step = step_once(core, backend)
        assert step is not None
        steps.append(sorted((e.seq_id, e.logits) for e in step.entries if e.logits))
    assert all(job.state == "generating" for job in jobs)
    return steps


def test_burst_prefills_together_then_decodes_one_row_per_stream() -> None:
    first, second, third = burst_compositions(prompt_ms=1.0)
    # 4 prompts, nothing generating: more than half in the first step (three), whole.
    assert first == [(0, True), (1, True), (2, True)]
    # The burst's last prompt joins the first three streams' step whole.
    assert second == [(0, True), (1, True), (2, True), (3, True)]
    assert third == second


def test_a_burst_is_batched_the_same_whatever_steps_have_cost() -> None:
    # temp-0 output depends on the batches' shapes: the same burst sent on a busy machine (or
    # after other work taught the cost model other figures) must be batched the same.
    assert burst_compositions(prompt_ms=0.01) == burst_compositions(prompt_ms=50.0)


def test_three_streams_are_padded_to_four_rows_in_an_idle_slot() -> None:
    core, backend, _ = make_core(parallel=4, pad=True)
    for i in range(3):
        infer(core, open_session(core, f"s{i}"), max_tokens=8)
    for _ in range(3):
        step_once(core, backend)
    step = step_once(core, backend)
    assert step is not None and len(step.entries) == 3
    assert step.pads == [(3, 0)]
    assert backend.batches[-1][-1].seq_id == 3  # the padding row was decoded...
    assert backend.kv[3] == []  # ...and removed after the step
    assert core.padded_steps >= 1


def generating_with_gaps(core: EngineCore, backend: FakeBackend, lengths: list[int]) -> Step:
    """A session per slot, in order, generating `lengths` tokens each: the first step once the
    2-token ones have ended, with the long ones going on and gaps where the short ones were."""
    jobs = [infer(core, open_session(core, f"s{i}"), max_tokens=n) for i, n in enumerate(lengths)]
    short = [job for job in jobs if job.params.max_tokens == 2]
    core.admit()
    while any(job in core.active for job in short):
        step_once(core, backend)
    step = step_once(core, backend)
    assert step is not None
    return step


def test_a_gap_between_generating_slots_is_padded_so_the_step_is_one_ubatch() -> None:
    # llama.cpp decodes each run of consecutive sequence ids as a ubatch of its own.
    core, backend, _ = make_core(parallel=4, pad=True)
    step = generating_with_gaps(core, backend, [12, 2, 12])
    assert sorted(entry.seq_id for entry in step.entries) == [0, 2]
    idle = core.slots.holder(1)
    assert idle is not None and idle.job is None
    # Slot 1 fills the gap, after its idle session's KV; then the 3 rows are padded to the 4
    # this table favours, next to them.
    assert step.pads == [(1, idle.n_past), (3, 0)]
    assert sorted(entry.seq_id for entry in backend.batches[-1]) == [0, 1, 2, 3]
    assert len(backend.kv[1]) == idle.n_past  # the padding row was removed after the step


def test_a_gap_wider_than_gap_rows_is_left() -> None:
    core, backend, _ = make_core(parallel=5, pad=True)
    core.planner.pad_rows = lambda rows, spare: rows  # no padding by row count here
    step = generating_with_gaps(core, backend, [12, 2, 2, 2, 12])
    assert sorted(entry.seq_id for entry in step.entries) == [0, 4]
    assert step.pads == []


def test_one_stream_is_never_padded() -> None:
    core, backend, _ = make_core(parallel=4, pad=True)
    infer(core, open_session(core, "s"), max_tokens=6)
    steps = run_to_idle(core, backend)
    assert all(step.pads == [] for step in steps)


# ---- prompt chunking under the step budget ------------------------------------------------


def test_a_long_prompt_is_chunked_and_alternates_with_the_streams() -> None:
    core, backend, _ = make_core(parallel=2, prefill_chunk=32, step_budget_ms=20.0)
    stream = infer(core, open_session(core, "stream"), max_tokens=100, ignore_eos=True)
    for _ in range(4):  # the stream generates; the cost model learns its step
        step_once(core, backend)
    long_prompt = " ".join(f"w{i}" for i in range(150))
    # A prompt step of 40 tokens took 40 ms: 1 ms a token, so 20 ms fit ~20 tokens at most.
    core.planner.step_cost.observe(1, 39, 40.0)
    late = infer(core, open_session(core, "long"), prompt=long_prompt, max_tokens=2)
    kinds = []
    for _ in range(30):
        step = step_once(core, backend)
        assert step is not None
        prompt_tokens = sum(1 for e in step.entries if e.seq_id == late.session.slot)
        stream_rows = sum(1 for e in step.entries if e.seq_id == stream.session.slot)
        kinds.append("prompt" if prompt_tokens else "stream")
        assert prompt_tokens <= 32
        if prompt_tokens and stream_rows:  # only a last chunk that fits the budget joins them
            assert prompt_tokens <= 20 and late.state == "generating"
        if late.state == "generating":
            break
    assert late.state == "generating"
    assert "prompt,prompt" not in ",".join(kinds), kinds  # the stream waits one step at most
    session = late.session
    assert backend.kv[session.slot or 0] == list(session.tokens)[: session.n_past]


def test_no_decode_exceeds_n_batch() -> None:
    core, backend, _ = make_core(parallel=2)
    long_prompt = " ".join(f"w{i}" for i in range(200))
    infer(core, open_session(core, "a"), prompt=long_prompt, max_tokens=2)
    steps = run_to_idle(core, backend)
    assert max(len(step.entries) for step in steps) <= backend.n_batch
    assert len(steps) >= 4


# ---- slots: eviction, restore, prefix reuse ------------------------------------------------


def test_an_idle_session_is_evicted_to_host_memory_and_restored_with_its_context() -> None:
    core, backend, clock = make_core(parallel=1)
    a, b = open_session(core, "a"), open_session(core, "b")
    first = infer(core, a, prompt="the first turn")
    run_to_idle(core, backend)
    clock.now += 1
    infer(core, b, prompt="another session")
    run_to_idle(core, backend)
    assert core.sessions["a"].saved is not None  # evicted, kept in host memory
    held = len(core.sessions["a"].tokens)
    clock.now += 1
    again = infer(core, a, prompt="and more")
    run_to_idle(core, backend)
    assert backend.restores == 1
    # The last generated token is in the history, not yet in the KV: it is evaluated again.
    assert again.cached_tokens == held - 1
    assert again.prompt_tokens == 3
    assert backend.kv[0][:held] == list(core.sessions["a"].tokens)[:held]
    assert first.session is again.session


def test_states_beyond_the_cache_limit_are_rebuilt_from_history() -> None:
    core, backend, clock = make_core(parallel=1, session_cache_mb=0)
    a, b = open_session(core, "a"), open_session(core, "b")
    infer(core, a)
    run_to_idle(core, backend)
    clock.now += 1
    infer(core, b)
    run_to_idle(core, backend)
    assert core.sessions["a"].saved is None and core.sessions["a"].n_past == 0
    again = infer(core, a, prompt="more")
    run_to_idle(core, backend)
    assert again.cached_tokens == 0
    assert backend.kv[0] == list(core.sessions["a"].tokens)[:-1]


def test_a_known_system_prompt_is_restored_not_evaluated_again() -> None:
    core, backend, _ = make_core(parallel=2)
    system = "you are a terse assistant"
    first = infer(core, open_session(core, "a", system))
    run_to_idle(core, backend)
    assert first.cached_tokens == 0
    second = infer(core, open_session(core, "b", system))
    evaluated_before = sum(len(b) for b in backend.batches)
    run_to_idle(core, backend)
    prefix = len(system.split()) + 1  # BOS and the words
    assert second.cached_tokens == prefix
    assert sum(len(b) for b in backend.batches) - evaluated_before == second.prompt_tokens + 3


# ---- decode-ahead: steps the decode thread takes by itself ---------------------------------


def going_on(core: EngineCore, backend: FakeBackend, step: Step) -> tuple[StepResult, StepResult]:
    """Run a step and the one the decode thread would go on to, as it does: results of both."""
    assert step.rows_left is not None, "a decode-only step may go on"
    first = decode(backend, step, continued=True)
    second = decode(backend, step.following(first.tokens))
    return first, second


def test_a_stop_string_met_while_the_thread_went_on_trims_the_extra_token() -> None:
    core, backend, _ = make_core(parallel=2)
    stopper = backend.word("STOP")
    backend.continuation = lambda history: stopper if len(history) >= 4 else 20
    job = infer(core, open_session(core, "s"), prompt="a b", max_tokens=10, stop=["STOP"])
    step_once(core, backend)  # prefill: first token
    step = core.plan_step()
    assert step is not None
    first, second = going_on(core, backend, step)
    core.step_done(first, 10.0)  # samples STOP: the job ends here
    assert job.session.job is None
    core.going_on_done(second)  # the thread had decoded STOP and sampled one more
    events = core.take_events()
    assert ends(events)[job.job_id].finish_reason == "stop"
    assert "STOP" not in text_of(events, job)
    assert len(backend.kv[0]) == job.session.n_past  # the extra token's KV is gone
    assert list(job.session.tokens)[: job.session.n_past] == backend.kv[0]


def test_an_abort_while_the_thread_went_on_ends_aborted_without_its_token() -> None:
    core, backend, _ = make_core(parallel=2)
    job = infer(core, open_session(core, "s"), max_tokens=10)
    step_once(core, backend)
    step = core.plan_step()
    assert step is not None
    first, second = going_on(core, backend, step)
    core.step_done(first, 10.0)
    core.abort("s")
    core.going_on_done(second)
    events = core.take_events()
    assert ends(events)[job.job_id].finish_reason == "aborted"
    assert job.generated == 2  # the prefill's token and the first step's; not the third
    assert len(backend.kv[0]) == job.session.n_past


# ---- queue order, admission, errors --------------------------------------------------------


def test_waiting_infers_get_the_slot_by_priority() -> None:
    core, backend, clock = make_core(parallel=1)
    infer(core, open_session(core, "running"), max_tokens=3)
    step_once(core, backend)
    waiting = {
        p: infer(core, open_session(core, p), priority=p, max_tokens=1)
        for p in ("low", "normal", "high")
    }
    order = []
    for _ in range(40):
        clock.now += 0.01
        core.admit()
        for name, job in waiting.items():
            if job.state != "queued" and name not in order:
                order.append(name)
        step = core.plan_step()
        if step is None:
            break
        step_and_apply(core, backend, step)
    assert order == ["high", "normal", "low"]


def test_a_full_queue_is_overloaded_and_changes_nothing() -> None:
    core, backend, _ = make_core(parallel=1, max_queue=1)
    infer(core, open_session(core, "a"))
    step_once(core, backend)
    infer(core, open_session(core, "b"))
    c = open_session(core, "c")
    with pytest.raises(Overloaded):
        infer(core, c)
    assert core.sessions[c].tokens.tolist() == [] and core.sessions[c].job is None


def test_unknown_and_busy_sessions_are_refused() -> None:
    core, _, _ = make_core()
    with pytest.raises(NotFound):
        infer(core, "nobody")
    with pytest.raises(NotFound):
        core.abort("nobody")
    infer(core, open_session(core, "s"))
    with pytest.raises(Busy):
        infer(core, "s")


def test_a_prompt_over_what_is_left_ends_with_context_and_leaves_the_session_unchanged() -> None:
    core, backend, _ = make_core(ctx=16)
    s = open_session(core, "s")
    infer(core, s, prompt=" ".join(["x"] * 8), max_tokens=1)
    run_to_idle(core, backend)
    held = len(core.sessions[s].tokens)
    core.take_events()
    job = infer(core, s, prompt=" ".join(["x"] * 8))
    assert ends(core.take_events())[job.job_id].finish_reason == "context"
    assert len(core.sessions[s].tokens) == held and core.sessions[s].job is None


def test_a_prompt_over_what_a_session_holds_is_too_large_and_changes_nothing() -> None:
    core, _, _ = make_core(ctx=16)
    s = open_session(core, "s")
    with pytest.raises(TooLarge, match="a session holds 16"):
        infer(core, s, prompt=" ".join(["x"] * 16))
    assert len(core.sessions[s].tokens) == 0 and not core.arriving
    assert not ends(core.take_events())
    infer(core, s, prompt=" ".join(["x"] * 14))  # the session goes on


def test_a_prompt_over_the_clients_budget_is_too_large() -> None:
    core, _, _ = make_core(ctx=64)
    s = open_session(core, "s")
    job_params = params()
    with pytest.raises(TooLarge, match="max_prompt_tokens \\(5\\)"):
        core.infer(1, s, job_params, prompt="a b c d e f", max_prompt_tokens=5)
    core.infer(2, s, job_params, prompt="a b c d", max_prompt_tokens=5)  # and <bos>


def test_an_input_too_long_by_its_length_alone_is_refused_before_tokenizing() -> None:
    core, backend, _ = make_core(ctx=16)
    backend.longest_word = 4  # no token stands for more than 4 characters
    core.max_token_bytes = backend.max_token_bytes()
    s = open_session(core, "s")
    tokenized: list[str] = []
    original = backend.tokenize
    backend.tokenize = lambda text, *, add_bos: (
        tokenized.append(text)
        or original(  # type: ignore[method-assign]
            text, add_bos=add_bos
        )
    )
    with pytest.raises(TooLarge, match="at least 16 tokens"):
        core.accept(1, s, params(), prompt="x" * 64)
    assert tokenized == [] and not core.arriving
    arrival = core.accept(2, s, params(), prompt="x" * 60)  # 15 tokens at least: tokenize it
    assert core.arrived(arrival, *core.tokenize(arrival)).state == "queued"


def test_max_tokens_over_the_context_is_bad_request() -> None:
    core, _, _ = make_core(ctx=16)
    s = open_session(core, "s")
    with pytest.raises(BadRequest, match="at most the session's ctx_size \\(16\\)"):
        infer(core, s, max_tokens=17)
    infer(core, s, max_tokens=16)


def test_an_abort_or_close_while_tokenizing_ends_it_aborted() -> None:
    core, _, _ = make_core()
    s = open_session(core, "s")
    arrival = core.accept(1, s, params(), prompt="hello there")
    with pytest.raises(Busy):
        core.accept(2, s, params(), prompt="again")
    assert core.info([s])[s]["state"] == "queued"
    core.abort(s)
    job = core.arrived(arrival, *core.tokenize(arrival))
    assert ends(core.take_events())[job.job_id].finish_reason == "aborted"
    assert core.sessions[s].job is None and len(core.sessions[s].tokens) == 0
    arrival = core.accept(3, s, params(), prompt="hello there")
    assert not core.close(s, if_idle=True)
    core.close(s)
    job = core.arrived(arrival, *core.tokenize(arrival))
    assert ends(core.take_events())[job.job_id].finish_reason == "aborted"


def test_end_of_generation_ends_with_stop_and_max_tokens_with_length() -> None:
    core, backend, _ = make_core()
    backend.continuation = lambda history: EOG if len(history) > 5 else 20
    stopped = infer(core, open_session(core, "a"), prompt="one two three", max_tokens=50)
    limited = infer(core, open_session(core, "b"), prompt="one", max_tokens=2, ignore_eos=True)
    run_to_idle(core, backend)
    finished = ends(core.take_events())
    assert finished[stopped.job_id].finish_reason == "stop"
    assert finished[limited.job_id].finish_reason == "length"
    assert finished[limited.job_id].stats["tokens"] == 2


def test_a_failed_decode_ends_its_jobs_with_error_and_the_session_goes_on() -> None:
    core, backend, _ = make_core()
    job = infer(core, open_session(core, "s"))
    backend.fail_next_decode = 1
    step_once(core, backend)
    end = ends(core.take_events())[job.job_id]
    assert end.finish_reason == "error" and "decode failed" in end.message
    again = infer(core, "s", prompt="retry")
    run_to_idle(core, backend)
    assert ends(core.take_events())[again.job_id].finish_reason == "length"


# ---- grammars and log-probabilities --------------------------------------------------------


def test_a_grammar_llama_cpp_refuses_is_bad_request_and_changes_nothing() -> None:
    core, _, _ = make_core()
    s = open_session(core, "s")
    core.take_events()
    with pytest.raises(BadRequest, match="grammar"):
        infer(core, s, grammar='start ::= "x"')
    with pytest.raises(BadRequest, match="longer than"):
        infer(core, s, grammar="root ::= " + "x" * MAX_GRAMMAR_BYTES)
    assert core.sessions[s].tokens.tolist() == [] and core.sessions[s].job is None
    assert core.take_events() == [] and len(core.queue) == 0


def test_with_a_grammar_end_of_generation_ends_it_even_with_ignore_eos() -> None:
    """A complete grammar allows only end-of-generation tokens: they end the generation (with
    `stop`), and the decode thread stops there too."""
    core, backend, _ = make_core()
    backend.continuation = lambda history: EOG if len(history) > 4 else 20
    job = infer(core, open_session(core, "s"), max_tokens=50, ignore_eos=True, grammar="root ::= x")
    step_once(core, backend)
    step = core.plan_step()
    assert step is not None and step.eog_stops == [True]
    step_and_apply(core, backend, step)
    run_to_idle(core, backend)
    end = ends(core.take_events())[job.job_id]
    assert end.finish_reason == "stop" and end.stats["tokens"] < 50


def test_logprobs_travel_with_the_text_of_their_tokens() -> None:
    """Each token's log-probabilities come with the piece of text that completes it (a piece held
    back for a stop string brings them later); the end-of-generation token has none; a job that
    did not ask gets none."""
    core, backend, _ = make_core()
    backend.continuation = lambda history: EOG if len(history) > 8 else 20
    asked = infer(
        core, open_session(core, "a"), prompt="one", max_tokens=20, stop=[" w20 x"], logprobs=2
    )
    plain = infer(core, open_session(core, "b"), prompt="one", max_tokens=20)
    run_to_idle(core, backend)
    events = core.take_events()
    pieces = [e for e in events if isinstance(e, TokenOut) and e.job_id == asked.job_id]
    rows = [row for piece in pieces for row in piece.logprobs or []]
    assert len(rows) == asked.generated - 1  # all but the end-of-generation token
    assert b"".join(row[0] for row in rows).decode() == text_of(events, asked)
    assert all(len(row[2]) == 2 and row[2][0] == [row[0], 0.0] for row in rows)
    assert pieces[0].logprobs is not None and len(pieces[0].logprobs) == 2  # one was held back
    assert all(
        e.logprobs is None for e in events if isinstance(e, TokenOut) and e.job_id == plain.job_id
    )
    assert ends(events)[asked.job_id].finish_reason == "stop"


# ---- the durable record gets only what is new -----------------------------------------------


def test_each_infer_appends_only_its_new_tokens_and_turns() -> None:
    core, backend, _ = make_core()
    s = open_session(core, "s")
    infer(core, s, prompt="first words")
    run_to_idle(core, backend)
    first = [e for e in core.take_events() if isinstance(e, HistoryAppend)]
    assert len(first) == 1 and not first[0].reset
    held = len(first[0].tokens) // 4
    infer(core, s, prompt="more")
    run_to_idle(core, backend)
    second = [e for e in core.take_events() if isinstance(e, HistoryAppend)]
    assert len(second[0].tokens) // 4 == len(core.sessions[s].tokens) - held
    core.infer(next(JOB_IDS), s, params(), prompt="again", reset=True)
    run_to_idle(core, backend)
    third = [e for e in core.take_events() if isinstance(e, HistoryAppend)]
    assert third[0].reset and len(third[0].tokens) // 4 == len(core.sessions[s].tokens)


def test_close_if_idle_keeps_a_generating_session() -> None:
    core, backend, _ = make_core()
    s = open_session(core, "s")
    job = infer(core, s, max_tokens=20)
    step_once(core, backend)
    assert core.close(s, if_idle=True) is False and s in core.sessions
    assert core.close(s) is True and s not in core.sessions
    assert ends(core.take_events())[job.job_id].finish_reason == "aborted"
