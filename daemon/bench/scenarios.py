"""Daemon-only scenarios: the stall a long prompt causes, a shared system prompt, 200 sessions."""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .daemonstreams import DaemonStream, DaemonUnderTest, pump, until_ended
from .inprocess import count_tokens
from .measurement import PROMPTS, arrived, medians

STALL_STREAMS = 7
STALL_TOKENS = 256
STALL_AFTER = 20  # tokens each of the seven has produced before the big prompt is sent
STALL_PROMPT_TOKENS = 2000
STALL_PARALLEL = 8
STALL_CTX = 3072
PARAGRAPH = (
    "The old harbour town wakes slowly. Fishing boats come back before dawn, their decks "
    "stacked with crates of silver fish, and the gulls follow them in, crying over the "
    "water. On the quay the market opens: bakers carry warm bread, a woman sells lemons "
    "and olives from a wooden cart, and children run between the stalls. By noon the sun "
    "is high, the cafés are full, and the sea lies flat and bright under a pale sky. "
)

SYSTEM_PROMPT = (
    "You are the assistant of a harbour town's visitor office. You answer questions about the "
    "ferry timetable, the market, the museums and the walks along the coast, briefly and "
    "kindly, in plain words. "
) * 8
MANY_SESSIONS = 200
MANY_SESSIONS_CACHE_MB = 16


# ---- the prefill stall --------------------------------------------------------------------


@dataclass
class StallResult:
    """How the seven streams' inter-token gaps grow while a long prompt is prefilled."""

    prompt_tokens: int
    prefill_ms: float  # from sending the long prompt to its first token
    median_gap_ms: float  # the seven streams' gaps that do not overlap the prefill
    max_gap_during_prefill_ms: float
    ratio: float  # max_gap_during_prefill_ms / median_gap_ms (target: ≤ 3)


def long_prompt(model: str, target: int = STALL_PROMPT_TOKENS) -> tuple[str, int]:
    """A prompt of about `target` tokens (a paragraph repeated) and its exact token count."""
    per_paragraph = count_tokens(model, PARAGRAPH * 10) / 10
    text = PARAGRAPH * max(1, round(target / per_paragraph))
    return text, count_tokens(model, text)


def stall_gaps(
    token_times: Sequence[Sequence[float]], window: tuple[float, float]
) -> tuple[list[float], list[float]]:
    """Inter-token gaps (s) of every stream, split into those outside the window and those that
    overlap it (a gap overlaps when it ends after the window starts and starts before it ends)."""
    outside: list[float] = []
    inside: list[float] = []
    begin, end = window
    for times in token_times:
        for a, b in itertools.pairwise(times):
            (inside if b > begin and a < end else outside).append(b - a)
    return outside, inside


def run_stall(daemon: DaemonUnderTest, prompt: str) -> StallResult:
    streams = daemon.open_sessions(STALL_STREAMS + 1)
    generating, big = streams[:STALL_STREAMS], streams[STALL_STREAMS]
    try:
        for i, stream in enumerate(generating):
            stream.infer(PROMPTS[i % len(PROMPTS)], seed=i, max_tokens=STALL_TOKENS)
        pump(generating, lambda: all(len(s.token_times) >= STALL_AFTER for s in generating))
        big.infer(prompt, seed=99, max_tokens=1)
        pump(streams, lambda: all(s.ended for s in streams))
        if any(s.timing.tokens != STALL_TOKENS for s in generating):
            raise RuntimeError("a stream of the stall scenario ended early")
        if big.timing.first is None and big.timing.last is None:
            raise RuntimeError("the long prompt got no reply")
        prefill_end = big.timing.first or arrived(big.timing.last)
        outside, inside = stall_gaps(
            [s.token_times for s in generating], (big.timing.sent, prefill_end)
        )
        median_gap = statistics.median(outside) * 1000
        max_gap = max(inside, default=0.0) * 1000
        return StallResult(
            prompt_tokens=int(big.stats.get("prompt_tokens", 0)),
            prefill_ms=(prefill_end - big.timing.sent) * 1000,
            median_gap_ms=median_gap,
            max_gap_during_prefill_ms=max_gap,
            ratio=max_gap / median_gap,
        )
    finally:
        for stream in streams:
            stream.close()


def measure_stall(model: str, threads: int, runs: int) -> dict[str, Any]:
    """The stall scenario `runs` times on one daemon with --parallel 8; the runs and medians."""
    prompt, tokens = long_prompt(model)
    daemon = DaemonUnderTest(model, STALL_PARALLEL, threads, STALL_CTX)
    results = []
    try:
        for run in range(runs):
            result = asdict(run_stall(daemon, prompt))
            results.append(result)
            print(f"stall run {run + 1}/{runs}: ratio {result['ratio']:.2f}", file=sys.stderr)
    finally:
        daemon.stop()
    fields = ("prompt_tokens", "prefill_ms", "median_gap_ms", "max_gap_during_prefill_ms", "ratio")
    return {"tokenized_prompt_tokens": tokens, "runs": results, "median": medians(results, fields)}


# ---- shared system prompts and many sessions ------------------------------------------------


def first_token(stream: DaemonStream, prompt: str) -> tuple[float, dict[str, Any]]:
    """Milliseconds from sending `prompt` (max_tokens 1) to its token, and the end's stats."""
    stream.infer(prompt, seed=0, max_tokens=1)
    until_ended(stream)
    first = stream.timing.first or arrived(stream.timing.last)
    return (first - stream.timing.sent) * 1000, stream.stats


def run_prefix_sharing(daemon: DaemonUnderTest, run: int) -> dict[str, float]:
    """First-token time of a session whose system prompt is new, then of a second session with
    the same one (its KV restored from the prefix cache). Each run its own system prompt."""
    system = f"[visitor office {run}] " + SYSTEM_PROMPT
    results: dict[str, float] = {}
    for label in ("without", "with"):
        (stream,) = daemon.open_sessions(1, system_prompt=system)
        try:
            ttft, stats = first_token(stream, "When does the first ferry leave?")
        finally:
            stream.close()
        results[f"ttft_{label}_ms"] = ttft
        results[f"cached_tokens_{label}"] = float(stats.get("cached_tokens", 0))
        results[f"prompt_tokens_{label}"] = float(stats.get("prompt_tokens", 0))
    results["speedup"] = results["ttft_without_ms"] / results["ttft_with_ms"]
    return results


def measure_prefix(model: str, threads: int, ctx: int, runs: int) -> dict[str, Any]:
    """The shared system prompt scenario `runs` times on one daemon with --parallel 4."""
    daemon = DaemonUnderTest(model, 4, threads, ctx)
    results = []
    try:
        for run in range(runs):
            results.append(run_prefix_sharing(daemon, run))
            print(
                f"shared system prompt run {run + 1}/{runs}: first token "
                f"{results[-1]['ttft_without_ms']:.0f} ms without, "
                f"{results[-1]['ttft_with_ms']:.0f} ms with",
                file=sys.stderr,
            )
    finally:
        daemon.stop()
    return {"runs": results, "median": medians(results, list(results[0]))}


def run_many_sessions(model: str, threads: int) -> dict[str, float]:
    """200 sessions, one short infer each, on 4 slots with a 16 MB session cache: the engine's
    memory before and after, and how the first session (state dropped) comes back."""
    daemon = DaemonUnderTest(
        model, 4, threads, 1024, extra=["--session-cache-mb", str(MANY_SESSIONS_CACHE_MB)]
    )
    streams: list[DaemonStream] = []
    try:
        baseline = daemon.engine_rss()
        client = daemon.client()
        started = time.perf_counter()
        for index in range(MANY_SESSIONS):
            stream = DaemonStream.open(client)
            streams.append(stream)
            stream.infer(f"Session {index} remembers the number {index * 7}.", 0, 8)
            until_ended(stream)
        elapsed = time.perf_counter() - started
        after = daemon.engine_rss()
        back, stats = first_token(streams[0], " again")
        client.close()
        return {
            "sessions": float(MANY_SESSIONS),
            "session_cache_mb": float(MANY_SESSIONS_CACHE_MB),
            "engine_rss_before_mb": baseline / 2**20,
            "engine_rss_after_mb": after / 2**20,
            "seconds": elapsed,
            "first_session_back_ttft_ms": back,
            "first_session_back_cached_tokens": float(stats.get("cached_tokens", 0)),
        }
    finally:
        daemon.stop()
