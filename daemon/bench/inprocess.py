"""The in-process references: a plain batched decode loop, step times by row count, speculation."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ...protocol.messages import SamplingParams
from .measurement import PROMPTS, TEMP, Measurement, StreamTiming, medians

if TYPE_CHECKING:
    from ...actors.engine.backend import LlamaBackend, Sampler


def open_streams(backend: LlamaBackend, n: int) -> tuple[list[list[int]], list[Sampler]]:
    """The bench's prompts for n streams, tokenized, and a sampler each (seed = stream)."""
    prompts = [backend.tokenize(PROMPTS[i % len(PROMPTS)], add_bos=True) for i in range(n)]
    samplers = [
        backend.new_sampler(SamplingParams(temp=TEMP, seed=i, ignore_eos=True), p)
        for i, p in enumerate(prompts)
    ]
    return prompts, samplers


def prefill(backend: LlamaBackend, prompts: list[list[int]], samplers: list[Sampler]) -> list[int]:
    """All prompts in one llama_decode, sequence i for prompt i; the first token of each."""
    from ...actors.engine.backend import BatchEntry

    entries = []
    last_index = []
    for seq, prompt in enumerate(prompts):
        for pos, token in enumerate(prompt):
            entries.append(BatchEntry(token, pos, seq, pos == len(prompt) - 1))
        last_index.append(len(entries) - 1)
    backend.decode(entries)
    return [sampler.sample(index) for sampler, index in zip(samplers, last_index, strict=True)]


def run_inprocess(model: str, n: int, tokens: int, threads: int, ctx: int) -> Measurement:
    from ...actors.engine.backend import BatchEntry, LlamaBackend

    backend = LlamaBackend(model, n_seq_max=n, n_ctx_seq=ctx, n_batch=512, n_threads=threads)
    try:
        prompts, samplers = open_streams(backend, n)
        started = time.perf_counter()
        next_tokens = prefill(backend, prompts, samplers)
        first = time.perf_counter()
        positions = [len(p) for p in prompts]
        for _ in range(tokens - 1):
            backend.decode([BatchEntry(next_tokens[s], positions[s], s, True) for s in range(n)])
            for s in range(n):
                positions[s] += 1
                next_tokens[s] = samplers[s].sample(s)
                backend.token_bytes(next_tokens[s])
        last = time.perf_counter()
        for sampler in samplers:
            sampler.free()
        timing = StreamTiming(sent=started, first=first, last=last, tokens=tokens)
        return Measurement.from_timings([timing] * n, tokens)
    finally:
        backend.close()


def run_row_sweep(model: str, threads: int, most: int = 16, reps: int = 8) -> dict[int, float]:
    """The time of a decode-only step of 1..`most` rows in-process, as the engine measures it at
    start for --batch-padding auto (the fastest of `reps`): where the CPU kernels favour some
    row counts, batch padding pays."""
    from ...actors.engine.backend import LlamaBackend
    from ...actors.engine.startup import measure_step_times

    backend = LlamaBackend(model, n_seq_max=most, n_ctx_seq=1024, n_batch=512, n_threads=threads)
    try:
        return measure_step_times(backend, most, reps)
    finally:
        backend.close()


def measure_sampling(model: str, threads: int, rows: int = 8, steps: int = 60) -> dict[str, Any]:
    """Steps of `rows` generating rows in-process, sampled in alternate steps by chains handed
    the likeliest tokens (as the engine does, backend.likeliest) and by the same chains handed
    every token (llama_sampler_sample's way): the medians of each, in ms."""
    import statistics

    from ...actors.engine.backend import BatchEntry, LlamaBackend

    backend = LlamaBackend(model, n_seq_max=rows, n_ctx_seq=1024, n_batch=512, n_threads=threads)
    prompts, likeliest = open_streams(backend, rows)
    _, every = open_streams(backend, rows)
    for sampler in every:
        sampler.search_all()
    ways = {"the likeliest tokens": likeliest, "every token": every}
    try:
        tokens = prefill(backend, prompts, likeliest)
        positions = [len(p) for p in prompts]
        times: dict[str, dict[str, list[float]]] = {w: {"step": [], "sampling": []} for w in ways}
        for step in range(steps):
            way = list(ways)[step % 2]
            started = time.perf_counter()
            backend.decode([BatchEntry(t, positions[s], s, True) for s, t in enumerate(tokens)])
            decoded = time.perf_counter()
            tokens = [sampler.sample(s) for s, sampler in enumerate(ways[way])]
            ended = time.perf_counter()
            positions = [p + 1 for p in positions]
            times[way]["step"].append((ended - started) * 1000)
            times[way]["sampling"].append((ended - decoded) * 1000)
        return {
            "rows": rows,
            **{
                way: {f"{part}_ms": statistics.median(ms) for part, ms in parts.items()}
                for way, parts in times.items()
            },
        }
    finally:
        for sampler in likeliest + every:
            sampler.free()
        backend.close()


class NgramDrafts:
    """Prompt-lookup drafts for one sequence: the token that followed the latest earlier
    occurrence of its last 3 (else 2, else 1) tokens, from an index kept up to date per token."""

    def __init__(self, history: Sequence[int]) -> None:
        self.history: list[int] = []
        self.follows: list[dict[tuple[int, ...], int]] = [{}, {}, {}]
        for token in history:
            self.append(token)

    def append(self, token: int) -> None:
        history = self.history
        history.append(token)
        for n in (1, 2, 3):
            if len(history) > n:
                self.follows[n - 1][tuple(history[-n - 1 : -1])] = token

    def draft(self) -> int | None:
        for n in (3, 2, 1):
            found = self.follows[n - 1].get(tuple(self.history[-n:]))
            if found is not None:
                return found
        return None


def run_speculative(
    model: str, n: int, tokens: int, threads: int, ctx: int, every_row: bool
) -> dict[str, float]:
    """The in-process loop with one n-gram draft token per row, verified exactly: a row samples
    at its own position as usual and keeps the draft only when the sample equals it (for a
    one-token draft that is speculative sampling's rule), then samples again after it. The
    output has the plain loop's distribution, at up to two tokens a row per step. `every_row`:
    rows with no n-gram match draft their last token, so that every sequence has two tokens in
    the batch (llama.cpp splits a batch whose sequences have unequal counts into several)."""
    from ...actors.engine.backend import BatchEntry, LlamaBackend

    backend = LlamaBackend(model, n_seq_max=n, n_ctx_seq=ctx, n_batch=512, n_threads=threads)
    try:
        prompts, samplers = open_streams(backend, n)
        started = time.perf_counter()
        drafts = [NgramDrafts(p) for p in prompts]
        for seq, token in enumerate(prefill(backend, prompts, samplers)):
            drafts[seq].append(token)
        generated = [1] * n
        steps = drafted = accepted = 0
        while min(generated) < tokens:
            entries: list[BatchEntry] = []
            plan: list[tuple[int, int, int | None]] = []  # (sequence, its row, its draft)
            for seq in range(n):
                if generated[seq] >= tokens:
                    continue
                history = drafts[seq].history
                guess = drafts[seq].draft()
                if guess is None and every_row:
                    guess = history[-1]
                plan.append((seq, len(entries), guess))
                entries.append(BatchEntry(history[-1], len(history) - 1, seq, True))
                if guess is not None:
                    entries.append(BatchEntry(guess, len(history), seq, True))
            backend.decode(entries)
            steps += 1
            for seq, index, guess in plan:
                token = samplers[seq].sample(index)
                drafts[seq].append(token)
                generated[seq] += 1
                if guess is None:
                    continue
                drafted += 1
                if token == guess:
                    accepted += 1
                    drafts[seq].append(samplers[seq].sample(index + 1))
                    generated[seq] += 1
                elif not backend.seq_trim(seq, len(drafts[seq].history) - 1):
                    raise RuntimeError("llama.cpp refused to remove a rejected draft")
        elapsed = time.perf_counter() - started
        for sampler in samplers:
            sampler.free()
        return {
            "aggregate_tps": n * tokens / elapsed,
            "steps": steps,
            "drafted_rows": drafted / max(steps, 1),
            "acceptance": accepted / max(drafted, 1),
        }
    finally:
        backend.close()


def measure_speculation(
    model: str, streams: Sequence[int], tokens: int, threads: int, ctx: int, runs: int
) -> dict[str, Any]:
    """The plain loop against n-gram speculation (drafts where they match, and in every row),
    interleaved, per N; medians of `runs`."""
    variants: dict[str, Callable[[int], dict[str, float]]] = {
        "plain": lambda n: {
            "aggregate_tps": run_inprocess(model, n, tokens, threads, ctx).aggregate_tps
        },
        "matched_rows": lambda n: run_speculative(model, n, tokens, threads, ctx, False),
        "every_row": lambda n: run_speculative(model, n, tokens, threads, ctx, True),
    }
    table = {}
    for n in streams:
        runs_of: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for _ in range(runs):
            for name, measure in variants.items():
                runs_of[name].append(measure(n))
        row: dict[str, Any] = {}
        for name, got in runs_of.items():
            row[name] = medians(got, list(got[0]))
        for name in ("matched_rows", "every_row"):
            row[name]["over_plain"] = row[name]["aggregate_tps"] / row["plain"]["aggregate_tps"]
        table[str(n)] = row
        print(
            f"speculation N={n}: plain {row['plain']['aggregate_tps']:.1f} tok/s, drafts where "
            f"matched {row['matched_rows']['over_plain']:.3f}x, in every row "
            f"{row['every_row']['over_plain']:.3f}x",
            file=sys.stderr,
        )
    return table


def count_tokens(model: str, text: str) -> int:
    """Tokens of text as a prompt (with BOS), from the model's own tokenizer."""
    from ...actors.engine.backend import LlamaBackend

    backend = LlamaBackend(model, n_seq_max=1, n_ctx_seq=64, n_batch=64, n_threads=1)
    try:
        return len(backend.tokenize(text, add_bos=True))
    finally:
        backend.close()
