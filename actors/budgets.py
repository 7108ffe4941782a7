"""Per-client budgets: what each client may use, and the book that counts it (no I/O).

A client's budgets are the daemon's defaults (serve flags) unless its clients-file entry says
otherwise; the auth actor hands them to the front actors with every successful auth. Each
front actor (the ZeroMQ gateway, the HTTP actor) counts the infers that pass through it, in a
book of its own, when it forwards them and when they end: an infer's way to its first token
asks no other actor (a shared book in the sessions actor would put a round trip, and that
actor's health, on every infer). A client that uses both ways at once has its budgets on each.

- `max_prompt_tokens`: the new tokens one infer may bring (checked by the engine, which
  tokenizes; 0: what the session can hold).
- `max_queued`: the client's infers waiting or running at once (0: no limit).
- `tokens_per_minute`: tokens generated in the last 60 s, counted when each infer ends; a new
  infer is refused while the window holds that many (0: no limit).

Also here, for the front actors: `PromptBounds` (a prompt too long by its length alone is
refused before it reaches the engine) and `RefusalPenalty` (a client refused again and again
waits before its next request).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..protocol.errors import RateLimited, TooLarge
from .config import Config

WINDOW_S = 60.0
# A client at its max_queued learns no better time than this: one of its infers has to end.
QUEUED_RETRY_S = 1.0


def prompt_limit(ctx_size: int, max_prompt_tokens: int) -> int:
    """The most new tokens one infer may bring: a position must be left to generate into."""
    limit = ctx_size - 1
    return min(limit, max_prompt_tokens) if max_prompt_tokens > 0 else limit


def too_large(tokens: str, limit: int, ctx_size: int) -> TooLarge:
    if limit < ctx_size - 1:
        return TooLarge(
            f"the prompt has {tokens} tokens, over this client's max_prompt_tokens ({limit})"
        )
    return TooLarge(f"the prompt has {tokens} tokens; a session holds {ctx_size}")


def input_chars(
    prompt: str | None, turns: list[dict[str, str]] | None, system: str | None = None
) -> int:
    """Characters of an infer's input (a lower bound of its UTF-8 bytes), its system prompt
    included when given (when the infer starts the context)."""
    chars = len(prompt or "") + len(system or "")
    for turn in turns or ():
        content = turn.get("content", "") if isinstance(turn, dict) else ""
        chars += len(content) if isinstance(content, str) else 0
    return chars


def check_length(chars: int, limit: int, ctx_size: int, max_token_bytes: int) -> None:
    """TooLarge when the input has more than `limit` tokens by its length alone: no token
    stands for more than `max_token_bytes` bytes, so this needs no tokenizing."""
    if chars > max_token_bytes * limit:
        raise too_large(f"at least {chars // max_token_bytes}", limit, ctx_size)


class PromptBounds:
    """What each engine said of its sessions when it opened one (ctx_size, max_token_bytes):
    a front actor refuses a prompt too long by its length alone before it is copied to the
    engine, or counted against the client's budgets. By engine id: a model loaded again (its
    context maybe larger) is a new engine, which the front actor learns of at its next open."""

    def __init__(self) -> None:
        self.engines: dict[str, tuple[int, int]] = {}

    def learn(self, engine: str, opened: dict[str, Any]) -> None:
        if opened.get("max_token_bytes"):
            self.engines[engine] = (int(opened["ctx_size"]), int(opened["max_token_bytes"]))

    def check(
        self,
        engine: str,
        prompt: str | None,
        turns: list[dict[str, str]] | None,
        max_prompt_tokens: int,
    ) -> None:
        known = self.engines.get(engine)
        if known is not None:
            ctx_size, max_token_bytes = known
            limit = prompt_limit(ctx_size, max_prompt_tokens)
            check_length(input_chars(prompt, turns), limit, ctx_size, max_token_bytes)


@dataclass(frozen=True)
class Budgets:
    max_prompt_tokens: int = 0
    max_queued: int = Config.max_queued
    tokens_per_minute: int = 0

    def to_wire(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def defaults(cls, config: Config) -> Budgets:
        return cls(config.max_prompt_tokens, config.max_queued, config.tokens_per_minute)

    @classmethod
    def from_wire(cls, data: Any) -> Budgets:
        """From the auth actor's reply (an older one without budgets: the defaults)."""
        if not isinstance(data, dict):
            return cls()
        names = cls.__dataclass_fields__
        return cls(**{key: int(value) for key, value in data.items() if key in names})

    def overridden(self, entry: Any) -> Budgets:
        """These defaults with what a clients-file entry sets (None there: the default)."""
        own = {name: getattr(entry, name, None) for name in self.__dataclass_fields__}
        return Budgets(**{**asdict(self), **{k: v for k, v in own.items() if v is not None}})


@dataclass
class ClientCount:
    in_flight: set[int] = field(default_factory=set)  # tickets
    ends: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens) in the window
    window_tokens: int = 0

    def prune(self, now: float) -> None:
        while self.ends and self.ends[0][0] <= now - WINDOW_S:
            self.window_tokens -= self.ends.popleft()[1]

    def retry_after(self, limit: int, now: float) -> float:
        """Seconds until the window holds fewer than `limit` tokens."""
        left = self.window_tokens
        for at, tokens in self.ends:
            left -= tokens
            if left < limit:
                return max(0.0, at + WINDOW_S - now)
        return 0.0


class BudgetBook:
    """Every client's infers in flight (by ticket) and the tokens its infers generated in the
    last minute."""

    def __init__(self) -> None:
        self.clients: dict[str, ClientCount] = {}

    def admit(self, client_id: str, budgets: Budgets, ticket: int, now: float) -> None:
        """Count one more infer in flight, or raise RateLimited (and count nothing)."""
        count = self.clients.setdefault(client_id, ClientCount())
        count.prune(now)
        limit = budgets.tokens_per_minute
        if limit and count.window_tokens >= limit:
            retry = round(count.retry_after(limit, now), 3)
            raise RateLimited(
                f"tokens_per_minute ({limit}) spent: {count.window_tokens} tokens generated in "
                f"the last {WINDOW_S:.0f} s; retry in {retry} s",
                retry,
            )
        if budgets.max_queued and len(count.in_flight) >= budgets.max_queued:
            raise RateLimited(
                f"max_queued ({budgets.max_queued}) infers of this client are waiting or running",
                QUEUED_RETRY_S,
            )
        count.in_flight.add(ticket)

    def release(self, client_id: str, ticket: int, tokens: int, now: float) -> None:
        """An admitted infer ended, having generated `tokens`."""
        count = self.clients.get(client_id)
        if count is None:
            return
        count.in_flight.discard(ticket)
        if tokens > 0:
            count.ends.append((now, tokens))
            count.window_tokens += tokens
        self.forget_idle(client_id, now)

    def forget_idle(self, client_id: str, now: float) -> None:
        count = self.clients[client_id]
        count.prune(now)
        if not count.in_flight and not count.ends:
            del self.clients[client_id]

    def in_flight(self, client_id: str) -> int:
        count = self.clients.get(client_id)
        return 0 if count is None else len(count.in_flight)


class RefusalPenalty:
    """A client whose infers keep being refused over a budget (too_large, rate_limited) waits
    before the next request of any of its connections is served: 0.1 s more for each refusal
    in a row, at most 1 s, until one of its infers ends. A client that sends over-long prompts
    as fast as they are refused would otherwise spend a core of the daemon's on decoding them;
    one that honours retry_after_s, or sends one over-long prompt, never waits."""

    STEP_S = 0.1
    MAX_S = 1.0

    def __init__(self) -> None:
        self.streak = 0
        self.until = 0.0  # no request of the client is served before this time

    def refused(self, now: float) -> None:
        self.streak += 1
        self.until = now + min(self.MAX_S, self.STEP_S * self.streak)

    def served(self) -> None:
        self.streak = 0


class Admissions:
    """A front actor's book: each infer it forwards is admitted first and released when its
    end (or error) comes back."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.book = BudgetBook()
        self.tickets = itertools.count(1)

    def admit(self, client_id: str, budgets: Budgets) -> int:
        """The infer's ticket, or RateLimited."""
        ticket = next(self.tickets)
        self.book.admit(client_id, budgets, ticket, self.clock())
        return ticket

    def release(self, client_id: str, ticket: int, tokens: int = 0) -> None:
        self.book.release(client_id, ticket, tokens, self.clock())
