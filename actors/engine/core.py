"""The engine's core, without I/O: sessions, admission, step planning, applying results, events.

Ops come in as method calls; what the world must hear (tokens, ends, session events, history
for the durable record) goes out as events in `events`, which the actor shell sends. The loop
that drives it (in the shell) does: `admit`, `plan_step` → run the step in the decode thread →
`step_done`, and `going_on_done` for steps the decode thread took by itself. The unit tests
drive it with a fake backend, the shell with the real one.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...protocol.errors import BadRequest, Busy, NotFound, Overloaded
from ...protocol.messages import MAX_GRAMMAR_BYTES, SamplingParams
from ..budgets import check_length, input_chars, prompt_limit, too_large
from ..config import Config
from ..logs import EventLog
from .backend import DecodeError, Logprobs
from .chat import ChatRenderer
from .jobs import (
    Backend,
    EndOut,
    Event,
    HistoryAppend,
    Job,
    QueueFull,
    RequestDone,
    Sampler,
    Session,
    SessionEvent,
    TokenOut,
    token_array,
)
from .planner import BatchPlanner, PadRows, Plan
from .scheduling import WaitQueue
from .slots import SlotTable
from .text import TextStream
from .worker import Step, StepResult

log = EventLog("engine")

CHAT_PREFIXES = 64  # system prompts whose chat-format prefix is remembered


@dataclass
class Arrival:
    """An infer past the cheap checks whose input is being tokenized (off the loop when long);
    its session counts as busy meanwhile. An abort or a close marks it `aborted`."""

    job: Job
    fresh: bool
    reset: bool
    prompt: str | None
    limit: int  # the most new tokens it may bring
    chars: int  # its input's length in characters
    aborted: bool = False


Tokenized = tuple[list[int], tuple[int, ...] | None]  # new tokens, the shareable prefix


class EngineCore:
    """One model's sessions and generations. Not thread-safe: the loop's thread only; the
    decode thread touches nothing here but the `Step` it is handed."""

    def __init__(
        self,
        config: Config,
        backend: Backend,
        pad_rows: PadRows | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.backend = backend
        self.n_ctx = backend.n_ctx_seq
        self.clock = clock
        self.on_change = on_change  # something the loop must look at happened
        self.sessions: dict[str, Session] = {}
        self.arriving: dict[str, Arrival] = {}  # by session_id: input being tokenized
        self.max_token_bytes = backend.max_token_bytes()
        self.slots = SlotTable(backend, config.session_cache_mb * 2**20, self.session_event)
        self.queue: WaitQueue[Job] = WaitQueue(config.max_queue)
        self.planner = BatchPlanner(
            backend.n_batch, self.n_ctx, config.prefill_chunk, config.step_budget_ms, pad_rows
        )
        self.chat = ChatRenderer(backend.chat_template, backend.bos_text, backend.eos_text)
        self.chat_prefixes: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self.chat_prefixes_lock = threading.Lock()  # the loop and the tokenizer thread use it
        self.active: list[Job] = []  # jobs holding a slot: prefill or generating
        self.events: list[Event] = []
        self.in_flight: Plan | None = None  # the plan of the step in the decode thread
        self.going_on = False  # the decode thread goes on by itself with `in_flight`'s rows
        self.stale_rows: list[tuple[int, int]] = []  # (slot, position) to trim when it stops
        self.retired: list[Sampler] = []  # freed once no decode may use them
        self.steps = 0  # decode steps done: the supervisor's sign of life
        self.padded_steps = 0
        self.arrivals = 0
        self.total_tokens = 0
        self.recent_tokens: deque[float] = deque()
        self.last_tps = 0.0
        self.last_ttft_ms = 0.0

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def session_event(self, kind: str, session: Session) -> None:
        self.events.append(SessionEvent(kind, session.session_id, session.client_id))

    # ---- ops ---------------------------------------------------------------------------

    def open(self, session_id: str, system_prompt: str | None, client_id: str) -> int:
        """A new session (idempotent: opening a known one changes nothing); its context size."""
        if session_id not in self.sessions:
            session = Session(session_id, system_prompt, client_id=client_id)
            self.sessions[session_id] = session
            self.session_event("created", session)
        return self.n_ctx

    def close(self, session_id: str, if_idle: bool = False) -> bool:
        """Forget a session, aborting its generation (unless `if_idle`: then a generating
        session stays and the answer is False)."""
        session = self.sessions.get(session_id)
        if session is None:
            return True
        if if_idle and (session.job is not None or session_id in self.arriving):
            return False
        self.sessions.pop(session_id)
        self.session_event("closed", session)
        if session_id in self.arriving:
            self.arriving[session_id].aborted = True
        if session.job is not None:
            self.finish(session.job, "aborted")
        self.slots.release(session)
        return True

    def abort(self, session_id: str) -> None:
        job = self.known(session_id).job
        if session_id in self.arriving:
            self.arriving[session_id].aborted = True  # it ends once tokenized
            return
        if job is None:
            return
        if job.state == "queued":
            self.finish(job, "aborted")
        else:
            job.aborted = True  # ends at the step boundary (the decode in flight completes)
            self.on_change()

    def known(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"no session {session_id[:80]!r}")
        return session

    def info(self, session_ids: list[str]) -> dict[str, dict[str, Any]]:
        result = {}
        for session_id in session_ids:
            session = self.sessions.get(session_id)
            if session is not None:
                state = "idle" if session.job is None else session.job.state
                state = "queued" if session_id in self.arriving else state
                state = "generating" if state == "prefill" else state
                result[session_id] = {"state": state, "tokens": len(session.tokens)}
        return result

    def infer(self, job_id: int, session_id: str, params: SamplingParams, **request: Any) -> Job:
        """Queue an infer (`request`: `accept`'s keywords), its input tokenized here (the shell
        tokenizes long ones off the loop: `accept`, `tokenize`, `arrived`). A prompt that does
        not fit in what is left of the context ends at once (`context`, the session unchanged);
        errors raise and change nothing."""
        arrival = self.accept(job_id, session_id, params, **request)
        try:
            tokens, prefix = self.tokenize(arrival)
        except BaseException:
            self.drop(arrival)
            raise
        return self.arrived(arrival, tokens, prefix)

    def accept(
        self,
        job_id: int,
        session_id: str,
        params: SamplingParams,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        reset: bool = False,
        priority: str = "normal",
        client_id: str = "",
        max_prompt_tokens: int = 0,
    ) -> Arrival:
        """The checks that cost nothing, an input too long by its length alone included; the
        session is then busy until `arrived` (or `drop`)."""
        session = self.known(session_id)
        if session.job is not None or session_id in self.arriving:
            raise Busy("this session is still generating; abort it or wait for its end")
        if params.max_tokens > self.n_ctx:
            raise BadRequest(
                f"params.max_tokens must be at most the session's ctx_size ({self.n_ctx})"
            )
        if params.grammar is not None:
            self.check_grammar(params.grammar)
        fresh = reset or not session.tokens
        limit = prompt_limit(self.n_ctx, max_prompt_tokens)
        chars = input_chars(prompt, messages, session.system_prompt if fresh else None)
        check_length(chars, limit, self.n_ctx, self.max_token_bytes)
        job = Job(job_id, session, params, client_id, messages, priority, t_arrival=self.clock())
        arrival = Arrival(job, fresh, reset, prompt, limit, chars)
        self.arriving[session_id] = arrival
        return arrival

    def tokenize(self, arrival: Arrival) -> Tokenized:
        """The arrival's new tokens: called on the loop for a short input, in the tokenizer
        thread for a long one (it reads the session's history, which is fixed while busy)."""
        job = arrival.job
        return self.input_tokens(job.session, arrival.fresh, arrival.prompt, job.new_turns)

    def drop(self, arrival: Arrival) -> None:
        """Tokenizing failed: the session is as before."""
        if self.arriving.get(arrival.job.session.session_id) is arrival:
            del self.arriving[arrival.job.session.session_id]

    def arrived(
        self, arrival: Arrival, new_tokens: list[int], prefix: tuple[int, ...] | None
    ) -> Job:
        """Queue a tokenized infer (or end it: aborted or closed meanwhile, or no room)."""
        self.drop(arrival)
        job, reset = arrival.job, arrival.reset
        session = job.session
        if arrival.aborted:
            self.send_end(job, "aborted")
            return job
        if len(new_tokens) > arrival.limit:
            raise too_large(str(len(new_tokens)), arrival.limit, self.n_ctx)
        held = 0 if reset else len(session.tokens)
        if held + len(new_tokens) >= self.n_ctx:
            job.cached_tokens = 0 if reset else session.n_past
            self.send_end(job, "context")
            return job
        if self.slots.free_slot_for(session) is None and self.queue.full():
            self.events.append(QueueFull())
            raise Overloaded("the daemon's queue is full; retry later")
        if reset:
            self.slots.forget_kv(session)
            session.tokens = token_array()
            session.chat = []
            session.journaled = 0
            session.reset_pending = True
        session.tokens.extend(new_tokens)
        if session.n_past >= len(session.tokens):
            # Nothing new to evaluate, but sampling needs the last position's logits again.
            self.slots.forget_kv(session)
        job.prefix = prefix if session.n_past == 0 else None
        job.cached_tokens = session.n_past
        job.prompt_tokens = len(session.tokens) - session.n_past
        job.text = TextStream(job.params.stop)
        session.job = job
        session.last_used = job.t_arrival
        self.queue.push(job, job.priority, job.t_arrival)
        self.arrivals += 1
        self.on_change()
        return job

    def check_grammar(self, grammar: str) -> None:
        if len(grammar.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES:
            raise BadRequest(f"the grammar is longer than {MAX_GRAMMAR_BYTES} bytes")
        try:
            self.backend.check_grammar(grammar)
        except ValueError as exc:
            raise BadRequest(f"grammar: {exc}") from None

    def load_histories(self, histories: list[dict[str, Any]]) -> None:
        """Sessions of an earlier engine life: their KV is rebuilt on their next infer."""
        for history in histories:
            tokens = token_array()
            tokens.frombytes(bytes(history.get("tokens", b"")))
            session = Session(history["session_id"], history.get("system_prompt"), tokens)
            session.chat = list(history.get("chat", []))
            session.journaled = len(tokens)
            self.sessions[session.session_id] = session

    def abort_all(self) -> None:
        for arrival in self.arriving.values():
            arrival.aborted = True
        for job in list(self.active) + self.queue.items():
            self.finish(job, "aborted")

    # ---- turning input into tokens ------------------------------------------------------

    def input_tokens(
        self,
        session: Session,
        fresh: bool,
        prompt: str | None,
        turns: list[dict[str, str]] | None,
    ) -> tuple[list[int], tuple[int, ...] | None]:
        """Tokens to append, and the system prompt's tokens they start with (shareable KV)."""
        tokenize = self.backend.tokenize
        system = session.system_prompt if fresh else None
        if turns is not None:
            new = list(turns)
            if system:
                new.insert(0, {"role": "system", "content": system})
            tokens = tokenize(self.render(session.chat if not fresh else [], new), add_bos=fresh)
            prefix = self.chat_prefix(system) if system else None
        elif system:
            prefix = tuple(tokenize(system, add_bos=True))
            tokens = [*prefix, *tokenize(prompt or "", add_bos=False)]
        else:
            return tokenize(prompt or "", add_bos=fresh), None
        if prefix and tuple(tokens[: len(prefix)]) != prefix:
            prefix = None
        return tokens, prefix

    def render(self, history: list[dict[str, str]], new: list[dict[str, str]]) -> str:
        try:
            text = self.chat.render(history, new)
        except ValueError as exc:
            raise BadRequest(f"messages could not be rendered: {exc}") from None
        bos = self.backend.bos_text
        return text[len(bos) :] if bos and text.startswith(bos) else text

    def chat_prefix(self, system: str) -> tuple[int, ...]:
        """The tokens a chat with this system prompt always starts with: the common start of two
        renders that differ only in the user's words."""
        with self.chat_prefixes_lock:
            cached = self.chat_prefixes.get(system)
        if cached is None:
            a, b = (
                self.backend.tokenize(
                    self.render(
                        [],
                        [{"role": "system", "content": system}, {"role": "user", "content": word}],
                    ),
                    add_bos=True,
                )
                for word in ("A", "Z")
            )
            common = next(
                (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)),
            )
            cached = tuple(a[:common])
            with self.chat_prefixes_lock:
                self.chat_prefixes[system] = cached
                if len(self.chat_prefixes) > CHAT_PREFIXES:
                    self.chat_prefixes.popitem(last=False)
        return cached

    # ---- the loop's side ----------------------------------------------------------------

    def admit(self) -> None:
        """Move waiting jobs into slots, best effective priority first."""
        # A job that finds no slot does not hold up one whose session still owns its slot (all
        # slots held by sessions with queued jobs would otherwise never run).
        now = self.clock()
        for job in self.queue.ordered(now):
            slot = self.slots.free_slot_for(job.session)
            if slot is None:
                continue
            self.queue.remove(job)
            self.slots.bind(job.session, slot)
            self.slots.use_prefix(job)
            job.sampler = self.backend.new_sampler(job.params, job.session.tokens)
            job.state = "prefill"
            job.t_started = now
            self.active.append(job)

    def plan_step(self) -> Step | None:
        """The next step for the decode thread, or None when there is nothing to decode."""
        self.finish_aborted()
        entries, plan = self.planner.build(self.active, self.clock())
        if not entries:
            return None
        sample_at = [(job.sampler, index) for job, _, index in plan if index >= 0 and job.sampler]
        decode_only = all(job.state == "generating" for job, _, _ in plan)
        pads = self.planner.padding(entries, self.slots) if decode_only else []
        for slot, pos in pads:
            holder = self.slots.holder(slot)
            if holder is not None and pos == 0:
                holder.clear_slot = False  # emptied by the step
        step = Step(entries, sample_at, pads)
        prompts_wait = any(job.state == "prefill" for job in self.active)
        if decode_only and not prompts_wait and len(sample_at) == len(entries):
            step.rows_left = [self.steps_left(job) for job, _, _ in plan]
            step.eog_stops = [job.params.stops_at_eog for job, _, _ in plan]
        self.in_flight = plan
        return step

    def steps_left(self, job: Job) -> int:
        """How many steps after this one the job may take without the loop looking (each
        samples one more token): within max_tokens and the context."""
        tokens = len(job.session.tokens)
        return min(job.params.max_tokens - job.generated, self.n_ctx - tokens) - 1

    def result_arrived(self, result: StepResult) -> Plan:
        """Bookkeeping for every result of the decode thread, before it is applied."""
        plan = self.in_flight
        assert plan is not None
        self.steps += 1
        self.going_on = result.continued
        if not result.continued:
            self.in_flight = None
            for sampler in self.retired:
                sampler.free()
            self.retired.clear()
            self.trim_stale_rows()
        return plan

    def step_done(self, result: StepResult, step_ms: float) -> None:
        """Apply a step the loop planned: positions, tokens, the step cost model."""
        plan = self.result_arrived(result)
        if self.decode_failed(result, plan):
            return
        self.count_padding(result)
        now = self.clock()
        token_at = {
            index: token
            for (_, index), token in zip(result.step.sample_at, result.tokens, strict=True)
        }
        logprobs_at = {
            index: logprobs
            for (_, index), logprobs in zip(result.step.sample_at, result.logprobs, strict=True)
        }
        outputs = 0
        for job, added, logits_index in plan:
            job.session.n_past += added
            if job.prefix_end and job.session.n_past == job.prefix_end:
                self.slots.snapshot_prefix(job)
            if job.state == "generating":
                job.next_token = None
            if logits_index < 0:
                continue
            outputs += 1
            if not job.aborted and job.session.job is job and logits_index in token_at:
                job.state = "generating"
                self.accept_token(job, token_at[logits_index], now, logprobs_at[logits_index])
        self.finish_aborted()
        entries = len(result.step.entries)
        self.planner.observe(
            outputs + result.pads_used, entries - outputs, step_ms, outputs == entries
        )

    def going_on_done(self, result: StepResult) -> None:
        """A step the decode thread took by itself (the same rows, one position on). Each row
        is checked against its session: only one whose history holds the token it decoded (at
        the position it decoded it) keeps it; the others are trimmed once the thread stops."""
        plan = self.result_arrived(result)
        if self.decode_failed(result, plan):
            return
        self.count_padding(result)
        now = self.clock()
        for index, (job, _, _) in enumerate(plan):
            entry = result.step.entries[index]
            session = job.session
            if not (
                session.slot == entry.seq_id
                and session.n_past == entry.pos
                and entry.pos < len(session.tokens)
                and session.tokens[entry.pos] == entry.token
            ):
                self.stale_rows.append((entry.seq_id, entry.pos))
                self.on_change()
                continue
            session.n_past += 1
            job.next_token = None
            if job.state == "generating" and not job.aborted and session.job is job:
                self.accept_token(job, result.tokens[index], now, result.logprobs[index])
        self.finish_aborted()
        self.planner.step_cost.observe(len(plan) + result.pads_used, 0, result.ms)
        if not self.going_on:
            self.trim_stale_rows()

    def trim_stale_rows(self) -> None:
        """Tokens the decode thread put in the KV of rows whose job had ended or been aborted
        (the thread is idle now: the context is the loop's)."""
        for slot, pos in sorted(self.stale_rows, key=lambda row: -row[1]):
            if not self.backend.seq_trim(slot, pos):
                holder = self.slots.holder(slot)
                if holder is not None:
                    self.slots.forget_kv(holder)
        self.stale_rows.clear()

    def decode_failed(self, result: StepResult, plan: Plan) -> bool:
        """A failed decode ends the step's jobs with `error` and drops their KV."""
        error = result.error
        if error is None:
            return False
        if not isinstance(error, DecodeError):
            raise error
        log.error("decode failed", code=error.code, tokens=len(plan))
        for job, _, _ in plan:
            self.slots.forget_kv(job.session)
            if job.session.job is job:
                self.finish(job, "error", message=f"decode failed (code {error.code})")
        for slot, _ in result.step.pads:
            holder = self.slots.holder(slot)
            if holder is not None and holder.job is None:
                self.slots.forget_kv(holder)  # its padding may still be in the KV
        return True

    def count_padding(self, result: StepResult) -> None:
        """A slot whose padding could not be removed has its KV rebuilt on next use."""
        for slot in result.spoilt:
            holder = self.slots.holder(slot)
            if holder is not None:
                self.slots.forget_kv(holder)
        self.padded_steps += 1 if result.pads_used else 0

    def finish_aborted(self) -> None:
        for job in [j for j in self.active if j.aborted]:
            self.finish(job, "aborted")

    # ---- tokens out, ends ---------------------------------------------------------------

    def accept_token(
        self, job: Job, token: int, now: float, logprobs: Logprobs | None = None
    ) -> None:
        session = job.session
        session.tokens.append(token)
        job.generated += 1
        self.total_tokens += 1
        self.recent_tokens.append(now)
        if job.t_first is None:
            job.t_first = now
        if self.backend.is_eog(token) and job.params.stops_at_eog:
            self.finish(job, "stop")
            return
        piece = self.backend.token_bytes(token)
        if logprobs is not None:
            job.logprobs.append(self.logprobs_row(piece, logprobs))
        text, stopped = job.text.push(piece)
        if text:
            self.send_token(job, text)
        if stopped:
            self.finish(job, "stop", flush=False)
        elif job.generated >= job.params.max_tokens:
            self.finish(job, "length")
        elif len(session.tokens) >= self.n_ctx:
            self.finish(job, "context")
        else:
            job.next_token = token

    def logprobs_row(self, piece: bytes, logprobs: Logprobs) -> list[Any]:
        """A token's log-probabilities as they travel: [bytes, logprob, [[bytes, logprob], ...]]."""
        chosen, best = logprobs
        token_bytes = self.backend.token_bytes
        return [piece, chosen, [[token_bytes(token), value] for token, value in best]]

    def send_token(self, job: Job, text: str) -> None:
        """A piece of text, with the log-probabilities of the tokens it completes (if asked)."""
        logprobs = None
        if job.logprobs:
            logprobs, job.logprobs = job.logprobs, []
        self.events.append(TokenOut(job.job_id, job.seq, text, logprobs))
        job.reply_text.append(text)
        job.seq += 1

    def finish(self, job: Job, reason: str, *, flush: bool = True, message: str = "") -> None:
        """End a job: send what text is held (unless a stop string ended it), then `end`."""
        session = job.session
        if flush and job.state != "queued":
            rest = job.text.flush()
            if rest:
                self.send_token(job, rest)
        if job in self.active:
            self.active.remove(job)
        self.queue.remove(job)
        if job.sampler is not None:
            if self.in_flight is not None:  # the decode thread may be sampling with it
                self.retired.append(job.sampler)
            else:
                job.sampler.free()
            job.sampler = None
        new_chat: list[dict[str, str]] = []
        if session.job is job:
            session.job = None
            session.last_used = self.clock()
        if job.new_turns is not None and reason != "error":
            reply = {"role": "assistant", "content": "".join(job.reply_text)}
            new_chat = [*job.new_turns, reply]
            session.chat = session.chat + new_chat
        self.send_end(job, reason, message)
        if session.session_id in self.sessions:
            self.journal(session, new_chat)
        self.on_change()

    def journal(self, session: Session, new_chat: list[dict[str, str]]) -> None:
        """The tokens and turns the durable record does not have yet."""
        if session.journaled == len(session.tokens) and not new_chat and not session.reset_pending:
            return
        self.events.append(
            HistoryAppend(
                session.session_id,
                session.tokens[session.journaled :].tobytes(),
                new_chat,
                session.reset_pending,
            )
        )
        session.journaled = len(session.tokens)
        session.reset_pending = False

    def send_end(self, job: Job, reason: str, message: str = "") -> None:
        now = self.clock()
        ttft_ms = (job.t_first - job.t_arrival) * 1000 if job.t_first else 0.0
        decoding = now - job.t_first if job.t_first else 0.0
        tps = (job.generated - 1) / decoding if job.generated > 1 and decoding > 0 else 0.0
        stats = {
            "prompt_tokens": job.prompt_tokens,
            "cached_tokens": job.cached_tokens,
            "tokens": job.generated,
            "ttft_ms": round(ttft_ms, 2),
            "total_ms": round((now - job.t_arrival) * 1000, 2),
            "tps": round(tps, 2),
        }
        if reason == "error":
            message = message or "generation failed"
        # Logged before the client hears of it: whoever reads the log after `end` finds it.
        log.info(
            "request end",
            client_id=job.client_id,
            session_id=job.session.session_id,
            prompt_tokens=job.prompt_tokens,
            cached_tokens=job.cached_tokens,
            tokens=job.generated,
            ttft_ms=stats["ttft_ms"],
            finish_reason=reason,
        )
        self.events.append(EndOut(job.job_id, reason, stats, message))
        started = job.t_started or now
        self.events.append(
            RequestDone(
                finish_reason=reason,
                tokens=job.generated,
                prompt_tokens=job.prompt_tokens,
                cached_tokens=job.cached_tokens,
                ttft_s=ttft_ms / 1000,
                tpot_s=(1 / tps) if tps > 0 else 0.0,
                queue_s=started - job.t_arrival,
                duration_s=now - job.t_arrival,
            )
        )
        if job.generated:
            self.last_tps = stats["tps"]
            self.last_ttft_ms = stats["ttft_ms"]

    def inference_snapshot(self) -> dict[str, Any]:
        now = self.clock()
        while self.recent_tokens and self.recent_tokens[0] < now - 1.0:
            self.recent_tokens.popleft()
        return {
            "active_generations": len(self.active),
            "queued": len(self.queue),
            "total_sessions": len(self.sessions),
            "last_tps": self.last_tps,
            "last_ttft_ms": self.last_ttft_ms,
            "total_tokens_generated": self.total_tokens,
            "total_requests": self.arrivals,
            "tokens_per_second": float(len(self.recent_tokens)),
            "kv_cells_used": self.slots.cells_used(),
            "kv_cells_total": self.n_ctx * len(self.slots),
            "decode_steps": self.steps,
            "padded_steps": self.padded_steps,
        }

    def pending(self) -> int:
        return len(self.active) + len(self.queue)
