"""The engine's sessions, its scheduler loop (one llama_decode per step over all slots) and ops.

Each step puts into one batch the next token of every generating sequence plus chunks of pending
prompts (never more than n_batch tokens), decodes once in a worker thread, samples per sequence
in C, and streams the text. Sessions outnumbering the slots are swapped: an idle session's KV
goes to host memory when another needs its slot and comes back when it is used again.
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..config import Config
from ..logs import EventLog
from ...protocol import internal
from ...protocol.errors import BadRequest, Busy, Overloaded
from ...protocol.messages import SamplingParams
from ..actor import (
    ActorLink,
    ActorServer,
    Body,
    Caller,
    SupervisorLink,
    report_to_supervisor,
)
from .backend import BatchEntry, DecodeError, LlamaBackend, Sampler
from .chat import ChatRenderer
from .scheduling import (
    PAD_GROUP,
    RowPadding,
    StepCostModel,
    WaitQueue,
    padded_rows,
    prefill_order,
)
from .text import TextStream
from .worker import DecodeThread, Step, StepResult

log = EventLog("engine")

STATS_PERIOD_S = 1.0
# Requests that arrive together start together: after an idle spell, the first step waits while
# more keep arriving (each within COALESCE_GAP_S of the last, COALESCE_MAX_S in all), so one
# prefill step takes them all instead of the first alone and the rest one step later.
COALESCE_GAP_S = 0.005
COALESCE_MAX_S = 0.03
PREFIX_CACHE_ENTRIES = 8  # evaluated system prompts kept as sequence state
# A chunked prompt advances at least this much per step, however many streams generate.
MIN_PREFILL_TOKENS = 16
# While a long prompt is prefilled, the streams' gap between tokens (their step and a prompt
# step) is held to --step-budget-ms or this many times their step alone, whichever is longer.
STEP_STRETCH = 2.2


def _tokens() -> array[int]:
    return array("i")


@dataclass
class Session:
    """One conversation: its whole token history lives here; its KV lives in a slot or in
    `saved` (host memory) while another session uses the slot."""

    session_id: str
    system_prompt: str | None
    tokens: array[int] = field(default_factory=_tokens)  # 4 bytes a token: hundreds of sessions
    n_past: int = 0  # tokens of `tokens` whose KV exists (in the slot or in `saved`)
    slot: int | None = None
    saved: bytes | None = None
    clear_slot: bool = False  # its slot's KV is stale: cleared by the loop before next use
    client_id: str = ""
    chat: list[dict[str, str]] = field(default_factory=list)
    job: Job | None = None
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Job:
    """One infer from arrival to `end`."""

    caller: Caller
    session: Session
    params: SamplingParams
    client_id: str
    new_turns: list[dict[str, str]] | None
    priority: str = "normal"
    prefix: tuple[int, ...] | None = None  # a system prompt's tokens, whose KV can be shared
    prefix_end: int = 0  # when > 0: snapshot the slot once n_past reaches it
    state: str = "queued"  # queued -> prefill -> generating
    sampler: Sampler | None = None
    text: TextStream = field(default_factory=TextStream)
    next_token: int | None = None  # sampled, still to be decoded
    generated: int = 0
    seq: int = 0
    aborted: bool = False
    reply_text: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    t_arrival: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    t_started: float | None = None  # when it got a slot


class Engine:
    def __init__(
        self,
        config: Config,
        backend: LlamaBackend,
        sessions_link: ActorLink | None = None,
        monitor: ActorLink | None = None,
        pad_rows: Callable[[int, int], int] | None = None,
    ) -> None:
        self.config = config
        # (rows, idle slots) -> rows to decode them with: padded_rows, RowPadding or none.
        self.pad_rows = pad_rows
        self.sessions_link = sessions_link
        self.monitor = monitor
        self.backend = backend
        self.n_ctx = backend.n_ctx_seq
        self.sessions: dict[str, Session] = {}
        self.slots: list[Session | None] = [None] * backend.n_seq_max
        self.queue: WaitQueue[Job] = WaitQueue(config.max_queue)
        self.prefill_chunk = config.prefill_chunk
        self.step_budget_ms = config.step_budget_ms
        self.step_cost = StepCostModel()
        self.decoder = DecodeThread(self.run_step, backend.is_eog)
        self.going_on: list[tuple[Job, int, int]] | None = None  # the plan the thread repeats
        self.stale_rows: list[tuple[int, int]] = []  # (slot, position) to trim when it stops
        self.padded_steps = 0
        self.last_decode_ms = 0.0  # the last step of generating streams alone
        self.prompt_turn = False  # the last step was prompts only, while streams waited
        self.burst_rest: set[int] = set()  # ids of a burst's jobs left for the next step
        self.cache_limit = config.session_cache_mb * 2**20
        self.saved_bytes = 0  # sequence states of evicted sessions, in host memory
        self.prefix_cache: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self.chat_prefixes: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self.active: list[Job] = []  # jobs holding a slot: prefill or generating
        self.wakeup = trio.Event()
        self.decoding = False  # a step is in the worker thread: samplers must not be freed
        self.steps = 0  # decode steps done: the supervisor's sign of life
        self.arrivals = 0
        self.retired: list[Sampler] = []
        self.chat = ChatRenderer(backend.chat_template, backend.bos_text, backend.eos_text)
        self.total_tokens = 0
        self.recent_tokens: deque[tuple[float, int]] = deque()
        self.last_tps = 0.0
        self.last_ttft_ms = 0.0
        self.handlers = {
            "open": self.open,
            "close": self.close,
            "infer": self.infer,
            "abort": self.abort,
            "info": self.info,
            "stats": self.stats,
        }

    # ---- ops ---------------------------------------------------------------------------

    def open(self, body: Body, caller: Caller) -> None:
        session_id = body["session_id"]
        session = Session(session_id, body.get("system_prompt"))
        session.client_id = str(body.get("client_id", ""))
        self.sessions[session_id] = session
        self.session_event("created", session)
        caller.reply(ctx_size=self.n_ctx)

    def session_event(self, kind: str, session: Session) -> None:
        """`event.session` on the PUB socket, through the monitor."""
        if self.monitor is not None:
            self.monitor.push(
                "event",
                topic="session",
                kind=kind,
                session_id=session.session_id,
                client_id=session.client_id,
                model=self.config.model_name,
            )

    def close(self, body: Body, caller: Caller) -> None:
        session = self.sessions.get(body["session_id"])
        if session is not None:
            self.forget_session(session)
        caller.reply()

    def forget_session(self, session: Session) -> None:
        """Close a session: abort its generation, give back its slot and saved state."""
        self.sessions.pop(session.session_id, None)
        self.session_event("closed", session)
        if session.job is not None:
            self.finish(session.job, "aborted")
        if session.slot is not None:
            self.slots[session.slot] = None  # cleared by the loop when next bound
            session.slot = None
        self.drop_saved(session)

    def abort(self, body: Body, caller: Caller) -> None:
        session = self.sessions.get(body["session_id"])
        job = session.job if session else None
        if job is not None:
            if job.state == "queued":
                self.finish(job, "aborted")
            else:
                job.aborted = True  # ends at the step boundary (the decode in flight completes)
                self.kick()
        caller.reply()

    def info(self, body: Body, caller: Caller) -> None:
        result: dict[str, Any] = {}
        for session_id in body.get("session_ids", []):
            session = self.sessions.get(session_id)
            if session is not None:
                state = "idle" if session.job is None else session.job.state
                state = "generating" if state == "prefill" else state
                result[session_id] = {"state": state, "tokens": len(session.tokens)}
        caller.reply(sessions=result)

    def stats(self, body: Body, caller: Caller) -> None:
        caller.reply(inference=self.inference_snapshot())

    def infer(self, body: Body, caller: Caller) -> None:
        session_id = body["session_id"]
        session = self.sessions.get(session_id)
        if session is None:  # the engine restarted: the session starts an empty context
            session = self.sessions[session_id] = Session(session_id, None)
        if session.job is not None:
            raise Busy("this session is still generating; abort it or wait for its end")
        params = SamplingParams.from_wire(body["params"])
        job = Job(caller, session, params, str(body.get("client_id", "")), body.get("messages"))
        job.priority = str(body.get("priority", "normal"))
        reset = bool(body.get("reset"))
        fresh = reset or not session.tokens
        new_tokens, prefix = self.input_tokens(session, fresh, body.get("prompt"), job.new_turns)
        held = 0 if reset else len(session.tokens)
        if held + len(new_tokens) >= self.n_ctx:
            # The prompt does not fit: nothing is evaluated, the session is unchanged.
            job.cached_tokens = 0 if reset else session.n_past
            self.send_end(job, "context")
            return
        if self.free_slot_for(session) is None and self.queue.full():
            if self.monitor is not None:
                self.monitor.push("event", topic="engine", kind="overloaded")
            raise Overloaded("the daemon's queue is full; retry later")
        if reset:
            self.reset(session)
        session.tokens.extend(new_tokens)
        if session.n_past >= len(session.tokens):
            # Nothing new to evaluate, but sampling needs the last position's logits again.
            self.forget_kv(session)
        job.prefix = prefix if session.n_past == 0 else None
        job.cached_tokens = session.n_past
        job.prompt_tokens = len(session.tokens) - session.n_past
        job.text = TextStream(params.stop)
        session.job = job
        session.last_used = time.monotonic()
        self.queue.push(job, job.priority, job.t_arrival)
        self.arrivals += 1
        self.kick()

    # ---- sessions and slots -------------------------------------------------------------

    def input_tokens(
        self,
        session: Session,
        fresh: bool,
        prompt: str | None,
        turns: list[dict[str, str]] | None,
    ) -> tuple[list[int], tuple[int, ...] | None]:
        """Tokens to append, and the system prompt's tokens they start with (shareable KV)."""
        system = session.system_prompt if fresh else None
        if turns is not None:
            new = list(turns)
            if system:
                new.insert(0, {"role": "system", "content": system})
            tokens = self.backend.tokenize(
                self.render(session.chat if not fresh else [], new), add_bos=fresh
            )
            prefix = self.chat_prefix(system) if system else None
        elif system:
            prefix = tuple(self.backend.tokenize(system, add_bos=True))
            tokens = [*prefix, *self.backend.tokenize(prompt or "", add_bos=False)]
        else:
            return self.backend.tokenize(prompt or "", add_bos=fresh), None
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
            self.chat_prefixes[system] = cached
            if len(self.chat_prefixes) > 64:
                self.chat_prefixes.popitem(last=False)
        return cached

    def reset(self, session: Session) -> None:
        self.forget_kv(session)
        session.tokens = _tokens()
        session.chat = []

    def forget_kv(self, session: Session) -> None:
        """Drop the session's KV; only bookkeeping here, since a decode may be running: the loop
        clears the slot itself before the session next uses it."""
        session.clear_slot = session.slot is not None
        self.drop_saved(session)
        session.n_past = 0

    def drop_saved(self, session: Session) -> None:
        if session.saved is not None:
            self.saved_bytes -= len(session.saved)
            session.saved = None

    def store_saved(self, session: Session, state: bytes) -> None:
        """Keep an evicted session's state within --session-cache-mb: beyond it, the least
        recently used states are dropped and those sessions are rebuilt from their token
        history when next used."""
        session.saved = state
        self.saved_bytes += len(state)
        while self.saved_bytes > self.cache_limit:
            held = [s for s in self.sessions.values() if s.saved is not None]
            if not held:
                break
            oldest = min(held, key=lambda s: s.last_used)
            self.drop_saved(oldest)
            oldest.n_past = 0
            log.debug("session state dropped", session_id=oldest.session_id)

    def free_slot_for(self, session: Session) -> int | None:
        """The slot this session can use now: its own, a free one, or an idle one to evict."""
        if session.slot is not None:
            return session.slot
        for index, holder in enumerate(self.slots):
            if holder is None:
                return index
        idle = [s for s in self.slots if s is not None and s.job is None]
        if not idle:
            return None
        victim = min(idle, key=lambda s: s.last_used)
        assert victim.slot is not None
        return victim.slot

    def bind_slot(self, session: Session, slot: int) -> None:
        """Give `slot` to `session` (called by the loop only: it touches the context)."""
        if session.slot == slot:
            if session.clear_slot:
                self.backend.seq_clear(slot)
                session.clear_slot = False
            return
        victim = self.slots[slot]
        if victim is not None:
            self.drop_saved(victim)
            if victim.n_past and not victim.clear_slot:
                self.store_saved(victim, self.backend.seq_save(slot))
            else:
                victim.n_past = 0
            victim.slot = None
            victim.clear_slot = False
            self.session_event("evicted", victim)
            log.debug(
                "session evicted", session_id=victim.session_id, bytes=len(victim.saved or b"")
            )
        self.backend.seq_clear(slot)
        self.slots[slot] = session
        session.slot = slot
        if session.saved is not None:
            self.session_event("restored", session)
            try:
                self.backend.seq_restore(slot, session.saved)
            except RuntimeError:
                log.warning("session restore failed, re-evaluating", session_id=session.session_id)
                self.backend.seq_clear(slot)
                session.n_past = 0
            self.drop_saved(session)

    def admit(self) -> None:
        """Move waiting jobs into slots, best effective priority first (the loop calls this)."""
        # Best first; a job that finds no slot does not hold up one whose session still owns
        # its slot (all slots held by sessions with queued jobs would otherwise never run).
        for job in self.queue.ordered(time.monotonic()):
            slot = self.free_slot_for(job.session)
            if slot is None:
                continue
            self.queue.remove(job)
            self.bind_slot(job.session, slot)
            self.use_prefix(job, slot)
            job.sampler = self.backend.new_sampler(job.params, job.session.tokens)
            job.state = "prefill"
            job.t_started = time.monotonic()
            self.active.append(job)

    def use_prefix(self, job: Job, slot: int) -> None:
        """A system prompt evaluated before is restored instead of evaluated again; a new one is
        snapshotted once its last token is in the KV."""
        prefix = job.prefix
        if prefix is None or job.session.n_past != 0:
            return
        state = self.prefix_cache.get(prefix)
        if state is None:
            job.prefix_end = len(prefix)
            return
        self.prefix_cache.move_to_end(prefix)
        try:
            self.backend.seq_restore(slot, state)
        except RuntimeError:
            self.backend.seq_clear(slot)
            return
        job.session.n_past = len(prefix)
        job.cached_tokens = len(prefix)
        job.prompt_tokens -= len(prefix)

    def snapshot_prefix(self, job: Job) -> None:
        assert job.prefix is not None and job.session.slot is not None
        self.prefix_cache[job.prefix] = self.backend.seq_save(job.session.slot)
        self.prefix_cache.move_to_end(job.prefix)
        while len(self.prefix_cache) > PREFIX_CACHE_ENTRIES:
            self.prefix_cache.popitem(last=False)
        job.prefix_end = 0

    # ---- the loop ------------------------------------------------------------------------

    def kick(self) -> None:
        """Something changed (an arrival, an abort, an end): the loop must look."""
        self.decoder.hold.set()
        self.wakeup.set()

    async def run(self) -> None:
        self.decoder.start()
        while True:
            await trio.lowlevel.checkpoint()  # steps wait for their results shielded
            if self.going_on is not None:  # the decode thread went on by itself
                await self.step_going_on(self.going_on)
                continue
            self.admit()
            if not self.active:
                await self.wakeup.wait()
                self.wakeup = trio.Event()
                await self.coalesce()
                continue
            await self.step()

    async def coalesce(self) -> None:
        deadline = trio.current_time() + COALESCE_MAX_S
        while trio.current_time() < deadline:
            seen = self.arrivals
            await trio.sleep(COALESCE_GAP_S)
            if self.arrivals == seen:
                return

    def build_batch(self) -> tuple[list[BatchEntry], list[tuple[Job, int, int]]]:
        """The next step: the next token of every generating job and/or chunks of pending
        prompts (within n_batch tokens). Returns the entries and, per job, (job, tokens it adds,
        batch index of its logits or -1).

        Streams generating keep their gap between tokens within a time budget (STEP_STRETCH ×
        their own step, at least --step-budget-ms), by the step cost model. Prompts that fit in
        it join their step; a longer one gets steps of its own, alternating with theirs, each a
        chunk that fits (a batch mixing a long chunk with the streams costs more than the two
        apart here: with a KV stream per sequence llama.cpp splits it into a ubatch of one token
        per sequence, which cannot be padded, and one of the rest). A burst of prompts with
        nothing generating: the first step takes more than half of them (at least what fits in
        --step-budget-ms), so the median first token comes a step earlier; the rest join the
        next step whole, so that the streams of a burst run in step."""
        generating = [
            j for j in self.active if j.state == "generating" and j.next_token is not None
        ]
        waiting = prefill_order(
            [(j, j.priority, j.t_arrival) for j in self.active if j.state == "prefill"],
            time.monotonic(),
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
            if len(waiting) == 1:
                return self.prompt_chunks(waiting, self.backend.n_batch, None)
            half = len(waiting) // 2 + 1
            entries, plan = self.prompt_chunks(waiting[:half], self.prefill_chunk, None)
            left_ms = self.step_budget_ms - self.step_cost.prompt_cost(len(entries))
            more, more_plan = self.prompt_chunks(
                waiting[half:], self.prefill_chunk - len(entries), left_ms, len(entries), 0
            )
            entries, plan = entries + more, plan + more_plan
            done = {id(job) for job, _, index in plan if index >= 0}
            self.burst_rest = {id(job) for job in waiting if id(job) not in done}
            return entries, plan
        burst_rest = all(id(job) in self.burst_rest for job in waiting)
        self.burst_rest = set()
        if self.prompt_turn:  # the streams waited for a prompt step: theirs comes now
            self.prompt_turn = False
            return rows, rows_plan
        alone_ms = self.step_cost.rows_cost(self.decode_rows(len(rows), PAD_GROUP))
        cycle_ms = max(self.step_budget_ms, STEP_STRETCH * alone_ms)
        left_ms = cycle_ms - self.step_cost.rows_cost(len(rows))
        remaining = self.remaining(waiting)
        if remaining <= self.backend.n_batch - len(rows) and (
            burst_rest
            or (
                self.step_cost.token_ms is not None
                and self.step_cost.prompt_cost(remaining) <= left_ms
            )
        ):
            entries, plan = self.prompt_chunks(waiting, remaining, None, offset=len(rows))
            return rows + entries, rows_plan + plan
        self.prompt_turn = True
        # The streams' step just done (unpadded when every slot is busy) plus this one.
        return self.prompt_chunks(
            waiting, self.prefill_chunk, cycle_ms - max(alone_ms, self.last_decode_ms)
        )

    @staticmethod
    def remaining(jobs: list[Job]) -> int:
        return sum(len(job.session.tokens) - job.session.n_past for job in jobs)

    def prompt_chunks(
        self,
        jobs: list[Job],
        room: int,
        time_left: float | None,
        offset: int = 0,
        at_least: int = MIN_PREFILL_TOKENS,
    ) -> tuple[list[BatchEntry], list[tuple[Job, int, int]]]:
        """Chunks of these prompts, in this order, within `room` tokens and (when given) the
        time the step cost model says fits, but `at_least` tokens so that prompts progress.
        `offset`: where these entries will start in the batch."""
        entries: list[BatchEntry] = []
        plan: list[tuple[Job, int, int]] = []
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

    def padding(self, entries: list[BatchEntry]) -> list[tuple[int, int]]:
        """Throw-away rows that make a decode-only step faster (see `pad_rows`): (slot,
        position) in slots whose session is not generating, appended after its KV and removed
        after the step; nearest the generating slots first, since llama.cpp's attention spans
        the range of sequences in a batch."""
        rows = len(entries)
        # A row count that is not padded even with every other slot idle is never padded: the
        # usual case (one stream, or a count the kernels like) skips the look at the slots.
        if self.decode_rows(rows, self.backend.n_seq_max - rows) == rows:
            return []
        spare = [
            (index, 0 if holder is None or holder.clear_slot else holder.n_past)
            for index, holder in enumerate(self.slots)
            if holder is None or (holder.job is None and holder.n_past < self.n_ctx - 1)
        ]
        wanted = self.decode_rows(rows, len(spare)) - rows
        if wanted <= 0:
            return []
        low = min(entry.seq_id for entry in entries)
        high = max(entry.seq_id for entry in entries)
        spare.sort(key=lambda pad: max(low - pad[0], pad[0] - high, 0))
        return spare[:wanted]

    def run_step(self, step: Step) -> tuple[list[int], list[int], int]:
        """The decode and sampling of a step, in the decode thread (ctypes releases the GIL, so
        the actor's socket tasks keep running meanwhile). Padding rows go after the KV of idle
        slots and are removed after. Returns the tokens, the slots whose padding could not be
        removed (their KV must be rebuilt) and the padding rows used."""
        backend = self.backend
        entries = step.entries
        used = []
        for slot, pos in step.pads:
            if pos == 0:
                backend.seq_clear(slot)
            if backend.seq_pos_max(slot) == pos - 1:  # never a gap: llama.cpp would refuse
                used.append((slot, pos))
        if used:
            token = entries[0].token
            entries = entries + [BatchEntry(token, pos, slot, True) for slot, pos in used]
        spoilt = []
        step.decoding()
        try:
            backend.decode(entries)
        finally:
            for slot, pos in used:
                if not backend.seq_trim(slot, pos):
                    spoilt.append(slot)
        tokens = [sampler.sample(index) for sampler, index in step.sample_at]
        return tokens, spoilt, len(used)

    async def step(self) -> None:
        started = time.perf_counter()
        # The loop looks at everything now; what happens from here on holds the thread again.
        self.decoder.hold.clear()
        self.finish_aborted()
        entries, plan = self.build_batch()
        if not entries:
            return
        sample_at = [(job.sampler, index) for job, _, index in plan if index >= 0 and job.sampler]
        decode_only = all(job.state == "generating" for job, _, _ in plan)
        pads = self.padding(entries) if decode_only else []
        for slot, pos in pads:
            holder = self.slots[slot]
            if holder is not None and pos == 0:
                holder.clear_slot = False  # emptied by the step
        step = Step(entries, sample_at, pads)
        prompts_wait = any(job.state == "prefill" for job in self.active)
        if decode_only and not prompts_wait and len(sample_at) == len(entries):
            step.rows_left = [self.steps_left(job) for job, _, _ in plan]
            step.eog_stops = [not job.params.ignore_eos for job, _, _ in plan]
        self.decoding = True
        self.decoder.submit(step)
        result = await self.next_result(plan)
        self.finish_step(result, plan, (time.perf_counter() - started) * 1000)

    def steps_left(self, job: Job) -> int:
        """How many steps after this one the job may take without the loop looking (each
        samples one more token): within max_tokens and the context."""
        tokens = len(job.session.tokens)
        return min(job.params.max_tokens - job.generated, self.n_ctx - tokens) - 1

    async def next_result(self, plan: list[tuple[Job, int, int]]) -> StepResult:
        """The decode thread's next result; the loop waits for it even when cancelled (the
        context must not be closed under a decode)."""
        with trio.CancelScope(shield=True):
            result = await self.decoder.results.get()
        self.steps += 1
        self.going_on = plan if result.continued else None
        if not result.continued:
            self.decoding = False
            for sampler in self.retired:
                sampler.free()
            self.retired.clear()
            self.trim_stale_rows()
        return result

    def trim_stale_rows(self) -> None:
        """Tokens the decode thread put in the KV of rows whose job had ended or been aborted
        (the thread is idle now: the context is the loop's)."""
        for slot, pos in sorted(self.stale_rows, key=lambda row: -row[1]):
            if not self.backend.seq_trim(slot, pos):
                holder = self.slots[slot]
                if holder is not None:
                    self.forget_kv(holder)
        self.stale_rows.clear()

    def finish_step(
        self, result: StepResult, plan: list[tuple[Job, int, int]], step_ms: float
    ) -> None:
        """Apply a step's result: positions, tokens, the step cost model."""
        if result.error is not None:
            if not isinstance(result.error, DecodeError):
                raise result.error
            self.decode_failed(result.error, plan, result.step.pads)
            return
        self.count_padding(result)
        now = time.monotonic()
        token_at = {
            index: token
            for (_, index), token in zip(result.step.sample_at, result.tokens, strict=True)
        }
        outputs = 0
        for job, added, logits_index in plan:
            job.session.n_past += added
            if job.prefix_end and job.session.n_past == job.prefix_end:
                self.snapshot_prefix(job)
            if job.state == "generating":
                job.next_token = None
            if logits_index < 0:
                continue
            outputs += 1
            if not job.aborted and job.session.job is job and logits_index in token_at:
                job.state = "generating"
                self.accept_token(job, token_at[logits_index], now)
        self.finish_aborted()
        entries = len(result.step.entries)
        if outputs == entries:
            self.last_decode_ms = step_ms
        self.step_cost.observe(outputs + result.pads_used, entries - outputs, step_ms)

    def finish_aborted(self) -> None:
        for job in [j for j in self.active if j.aborted]:
            self.finish(job, "aborted")

    def count_padding(self, result: StepResult) -> None:
        """A slot whose padding could not be removed has its KV rebuilt on next use."""
        for slot in result.spoilt:
            holder = self.slots[slot]
            if holder is not None:
                self.forget_kv(holder)
        self.padded_steps += 1 if result.pads_used else 0

    async def step_going_on(self, plan: list[tuple[Job, int, int]]) -> None:
        """A step the decode thread took by itself (same rows as `plan`, one position on).
        Each row is checked against its session: only one whose history holds the token it
        decoded (at the position it decoded it) keeps it; the others are trimmed later."""
        result = await self.next_result(plan)
        if result.error is not None:
            self.finish_step(result, plan, result.ms)
            return
        self.count_padding(result)
        now = time.monotonic()
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
                self.decoder.hold.set()
                continue
            session.n_past += 1
            job.next_token = None
            if job.state == "generating" and not job.aborted and session.job is job:
                self.accept_token(job, result.tokens[index], now)
        self.finish_aborted()
        self.step_cost.observe(len(plan) + result.pads_used, 0, result.ms)
        if self.going_on is None:
            self.trim_stale_rows()

    async def stop_decoding(self) -> None:
        """Let the decode thread finish what it is doing and end (the context is closed next)."""
        self.decoder.hold.set()
        while self.going_on is not None:
            await self.next_result(self.going_on)
        self.decoder.stop()

    def decode_failed(
        self, error: DecodeError, plan: list[tuple[Job, int, int]], pads: list[tuple[int, int]]
    ) -> None:
        log.error("decode failed", code=error.code, tokens=len(plan))
        for job, _, _ in plan:
            self.forget_kv(job.session)
            if job.session.job is job:
                self.finish(job, "error", message=f"decode failed (code {error.code})")
        for slot, _ in pads:
            holder = self.slots[slot]
            if holder is not None and holder.job is None:
                self.forget_kv(holder)  # its padding may still be in the KV

    def accept_token(self, job: Job, token: int, now: float) -> None:
        session = job.session
        session.tokens.append(token)
        job.generated += 1
        self.total_tokens += 1
        self.recent_tokens.append((now, 1))
        if job.t_first is None:
            job.t_first = now
        if self.backend.is_eog(token) and not job.params.ignore_eos:
            self.finish(job, "stop")
            return
        text, stopped = job.text.push(self.backend.token_bytes(token))
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

    def send_token(self, job: Job, text: str) -> None:
        job.caller.send(internal.TOKEN, seq=job.seq, content=text)
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
            if self.decoding:  # the worker thread may be sampling with it right now
                self.retired.append(job.sampler)
            else:
                job.sampler.free()
            job.sampler = None
        if session.job is job:
            session.job = None
            session.last_used = time.monotonic()
        if job.new_turns is not None and reason != "error":
            session.chat = session.chat + job.new_turns
            session.chat.append({"role": "assistant", "content": "".join(job.reply_text)})
        self.send_end(job, reason, message)
        self.save_history(session)
        self.kick()

    def save_history(self, session: Session) -> None:
        """Hand the conversation to the sessions actor: it outlives this process."""
        if self.sessions_link is not None and session.session_id in self.sessions:
            self.sessions_link.push(
                "history",
                session_id=session.session_id,
                tokens=session.tokens.tobytes(),
                chat=session.chat,
            )

    def load_histories(self, histories: list[Body]) -> None:
        """Sessions of an earlier engine life: their KV is rebuilt on their next infer."""
        for history in histories:
            tokens = _tokens()
            tokens.frombytes(bytes(history.get("tokens", b"")))
            session = Session(history["session_id"], history.get("system_prompt"), tokens)
            session.chat = list(history.get("chat", []))
            self.sessions[session.session_id] = session

    def send_end(self, job: Job, reason: str, message: str = "") -> None:
        now = time.monotonic()
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
        fields: dict[str, Any] = {"finish_reason": reason, "stats": stats}
        if reason == "error":
            fields["message"] = message or "generation failed"
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
        job.caller.send(internal.END, **fields)
        if self.monitor is not None:
            started = job.t_started or now
            self.monitor.push(
                "request",
                finish_reason=reason,
                tokens=job.generated,
                prompt_tokens=job.prompt_tokens,
                cached_tokens=job.cached_tokens,
                ttft_s=ttft_ms / 1000,
                tpot_s=(1 / tps) if tps > 0 else 0.0,
                queue_s=started - job.t_arrival,
                duration_s=now - job.t_arrival,
            )
        if job.generated:
            self.last_tps = stats["tps"]
            self.last_ttft_ms = stats["ttft_ms"]

    def abort_all(self) -> None:
        for job in list(self.active) + self.queue.items():
            self.finish(job, "aborted")

    def inference_snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        while self.recent_tokens and self.recent_tokens[0][0] < now - 1.0:
            self.recent_tokens.popleft()
        return {
            "active_generations": len(self.active),
            "queued": len(self.queue),
            "total_sessions": len(self.sessions),
            "last_tps": self.last_tps,
            "last_ttft_ms": self.last_ttft_ms,
            "total_tokens_generated": self.total_tokens,
            "tokens_per_second": float(sum(n for _, n in self.recent_tokens)),
            "kv_cells_used": sum(s.n_past for s in self.slots if s is not None),
            "kv_cells_total": self.n_ctx * len(self.slots),
            "decode_steps": self.steps,
            "padded_steps": self.padded_steps,
        }


async def expire_idle_sessions(engine: Engine) -> None:
    """Close sessions unused for --session-idle-timeout (their owner is told nothing: the next
    use answers not_found)."""
    timeout = engine.config.session_idle_timeout
    while True:
        await trio.sleep(min(30.0, timeout / 4))
        cutoff = time.monotonic() - timeout
        for session in list(engine.sessions.values()):
            if session.job is None and session.last_used < cutoff:
                engine.forget_session(session)
                if engine.sessions_link is not None:
                    engine.sessions_link.push("remove", session_id=session.session_id)
                log.info("session expired", session_id=session.session_id)


async def push_stats(engine: Engine, monitor: ActorLink, supervisor: SupervisorLink) -> None:
    """Figures for the monitor, and the heartbeat the supervisor's hang check reads."""
    while True:
        monitor.push("inference", inference=engine.inference_snapshot())
        pending = len(engine.active) + len(engine.queue)
        supervisor.send(
            {"op": "alive", "actor": internal.ENGINE, "steps": engine.steps, "pending": pending}
        )
        await trio.sleep(STATS_PERIOD_S)


def load_backend(config: Config) -> LlamaBackend:
    """Load the model; `--gpu-layers -1` offloads as many layers as the free VRAM holds."""
    import llama_cpp

    from .fit import FitError, gpu_vram_free_mb, plan_split

    gpu_layers = config.gpu_layers
    if gpu_layers == -1:
        vram_mb = gpu_vram_free_mb()
        if vram_mb is None or not llama_cpp.llama_supports_gpu_offload():
            reason = "no NVIDIA GPU" if vram_mb is None else "CPU build of llama-cpp-python"
            log.info("no GPU: running on CPU", reason=reason)
            gpu_layers = 0
        else:
            try:
                plan = plan_split(
                    config.model,
                    vram_mb,
                    config.parallel,
                    config.ctx_size,
                    config.vram_margin_mb,
                    batch_size=config.batch_size,
                )
            except FitError as exc:  # llama.cpp may still load it: offload all, as before
                log.warning("cannot plan gpu layers, offloading all", reason=str(exc))
            else:
                log.info("gpu layers planned", **plan.mib_fields())
                gpu_layers = plan.gpu_layers
    return LlamaBackend(
        config.model,
        n_seq_max=config.parallel,
        n_ctx_seq=config.ctx_size,
        n_batch=config.batch_size,
        n_threads=config.threads or None,
        n_gpu_layers=gpu_layers,
    )


# Row counts timed at start for --batch-padding auto (more would lengthen the start).
PAD_MEASURED_ROWS = 16


def measure_step_times(backend: LlamaBackend, most: int, reps: int = 3) -> dict[int, float]:
    """The time of a decode-only step of 1..`most` rows (one token of each of that many
    contiguous empty sequences), the fastest of `reps` after one that builds the compute graphs;
    the counts are interleaved so that the machine's noise hits all alike. A fraction of a
    second to a few seconds on CPU; the sequences are emptied after."""
    most = min(most, backend.n_seq_max)
    token = backend.tokenize("the", add_bos=False)[0]
    times: dict[int, list[float]] = {rows: [] for rows in range(1, most + 1)}
    try:
        for rep in range(reps + 1):
            positions = [0] * most  # each pass from empty sequences: `most` tokens deep at most
            for s in range(most):
                backend.seq_clear(s)
            for rows in times:
                entries = [BatchEntry(token, positions[s], s, True) for s in range(rows)]
                started = time.perf_counter()
                backend.decode(entries)
                if rep > 0:
                    times[rows].append((time.perf_counter() - started) * 1000)
                for s in range(rows):
                    positions[s] += 1
    finally:
        for s in range(most):
            backend.seq_clear(s)
    return {rows: min(ms) for rows, ms in times.items()}


def choose_padding(config: Config, backend: LlamaBackend) -> Callable[[int, int], int] | None:
    """--batch-padding: off, the fixed groups-of-4 rule, or (auto) a table from step times
    measured here and now."""
    if config.batch_padding == "off":
        return None
    if config.batch_padding == "on":
        return padded_rows
    step_ms = measure_step_times(backend, PAD_MEASURED_ROWS)
    padding = RowPadding(step_ms)
    log.info(
        "batch padding measured",
        step_ms={rows: round(ms, 1) for rows, ms in step_ms.items()},
        padded={f"{rows} rows": more for rows, more in padding.padded_counts().items()},
    )
    return padding.rows_for


async def main(config: Config, stop: trio.Event) -> None:
    started = time.monotonic()
    backend = await trio.to_thread.run_sync(load_backend, config)
    await trio.to_thread.run_sync(backend.eog_tokens)  # a vocabulary scan, once, not mid-request
    log.info(
        "model loaded",
        model=backend.model_name,
        seconds=round(time.monotonic() - started, 2),
        parallel=backend.n_seq_max,
        ctx_size=backend.n_ctx_seq,
        gpu_layers=backend.gpu_layers_used,
    )
    pad_rows = await trio.to_thread.run_sync(choose_padding, config, backend)
    sessions_link = ActorLink(internal.SESSIONS, config)
    monitor = ActorLink(internal.MONITOR, config)
    engine = Engine(config, backend, sessions_link, monitor, pad_rows)
    assert set(engine.handlers) == set(internal.ENGINE_OPS)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sessions_link.run)
            nursery.start_soon(monitor.run)
            snapshot = await sessions_link.request("snapshot", timeout=60.0)
            engine.load_histories(snapshot["sessions"])
            if engine.sessions:
                log.info("sessions reloaded", count=len(engine.sessions))
            server = ActorServer(internal.ENGINE, config, engine.handlers)
            nursery.start_soon(server.run)
            nursery.start_soon(push_stats, engine, monitor, SupervisorLink(config))
            nursery.start_soon(expire_idle_sessions, engine)
            loop_scope = trio.CancelScope()
            loop_done = trio.Event()

            async def run_loop() -> None:
                try:
                    with loop_scope:
                        await engine.run()
                finally:
                    loop_done.set()

            nursery.start_soon(run_loop)
            report_to_supervisor(config, {"op": "ready", "actor": internal.ENGINE})
            await stop.wait()
            engine.decoder.hold.set()
            loop_scope.cancel()  # the loop waits for a step in flight to complete
            await loop_done.wait()
            await engine.stop_decoding()
            engine.abort_all()
            await server.socket.flush(2.0)
            nursery.cancel_scope.cancel()
    finally:
        engine.decoder.stop(wait_s=10.0)  # never close the context under a decode
        backend.close()
