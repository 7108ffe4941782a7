"""What the engine core keeps per conversation and per infer, the backend it drives, and the
events it gives out."""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...protocol.messages import SamplingParams
from .backend import BatchEntry, Logprobs
from .text import TextStream


def token_array() -> array[int]:
    return array("i")  # 4 bytes a token: hundreds of sessions


class Sampler(Protocol):
    """One generation's sampler chain (C, in the real backend)."""

    def sample(self, batch_index: int) -> int: ...

    def logprobs(self, batch_index: int, token: int) -> Logprobs | None: ...

    def free(self) -> None: ...


class Backend(Protocol):
    """The model and its multi-sequence context (LlamaBackend; a fake in the core's unit tests).
    Only one thread uses it at a time: the decode thread during a step, the loop between; but
    `tokenize` reads only the vocabulary, and the tokenizer thread may call it at any time."""

    n_ctx_seq: int
    n_seq_max: int
    n_batch: int
    chat_template: str | None
    bos_text: str
    eos_text: str

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes: ...

    def max_token_bytes(self) -> int: ...

    def is_eog(self, token: int) -> bool: ...

    def decode(self, entries: Sequence[BatchEntry]) -> None: ...

    def seq_clear(self, seq_id: int) -> None: ...

    def seq_trim(self, seq_id: int, from_pos: int) -> bool: ...

    def seq_pos_max(self, seq_id: int) -> int: ...

    def seq_save(self, seq_id: int) -> bytes: ...

    def seq_restore(self, seq_id: int, data: bytes) -> None: ...

    def new_sampler(self, params: SamplingParams, history: Sequence[int]) -> Sampler: ...

    def check_grammar(self, grammar: str) -> None: ...


@dataclass
class Session:
    """One conversation as the KV needs it: the engine's working copy of its token history;
    its KV lives in a slot, or in `saved` (host memory) while another session uses the slot.
    The durable record is the sessions actor's; `journaled` says how much of `tokens` it has."""

    session_id: str
    system_prompt: str | None
    tokens: array[int] = field(default_factory=token_array)
    n_past: int = 0  # tokens of `tokens` whose KV exists (in the slot or in `saved`)
    slot: int | None = None
    saved: bytes | None = None
    clear_slot: bool = False  # its slot's KV is stale: cleared by the loop before next use
    client_id: str = ""
    chat: list[dict[str, str]] = field(default_factory=list)
    job: Job | None = None
    last_used: float = field(default_factory=time.monotonic)
    journaled: int = 0  # tokens the sessions actor's record holds
    reset_pending: bool = False  # the history was cleared since the record's last append


@dataclass
class Job:
    """One infer from arrival to `end`; `job_id` is how the shell finds who asked."""

    job_id: int
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
    logprobs: list[list[Any]] = field(default_factory=list)  # of tokens whose text is held back
    prompt_tokens: int = 0
    cached_tokens: int = 0
    t_arrival: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    t_started: float | None = None  # when it got a slot


# ---- events: what the core tells the world; the actor shell turns them into messages ----


@dataclass(frozen=True)
class TokenOut:
    """Text for the client of job `job_id` (the `seq`-th piece of its stream); with `logprobs`
    when the infer asked for them: per token of the piece, [bytes, logprob, [[bytes, logprob],
    ...]] (the most likely tokens)."""

    job_id: int
    seq: int
    content: str
    logprobs: list[list[Any]] | None = None


@dataclass(frozen=True)
class EndOut:
    """A job's end: the last message of its stream."""

    job_id: int
    finish_reason: str
    stats: dict[str, Any]
    message: str = ""


@dataclass(frozen=True)
class SessionEvent:
    """`event.session` on the metrics stream: created, closed, evicted, restored."""

    kind: str
    session_id: str
    client_id: str


@dataclass(frozen=True)
class HistoryAppend:
    """The new tokens and chat turns of a finished infer, for the durable record."""

    session_id: str
    tokens: bytes
    chat: list[dict[str, str]]
    reset: bool


@dataclass(frozen=True)
class RequestDone:
    """One finished infer's figures, for the monitor's histograms."""

    finish_reason: str
    tokens: int
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    tpot_s: float
    queue_s: float
    duration_s: float


@dataclass(frozen=True)
class QueueFull:
    """An infer was refused because the wait queue is full."""


Event = TokenOut | EndOut | SessionEvent | HistoryAppend | RequestDone | QueueFull
