"""What every system is given (prompts, sampling) and what one run of N streams measures."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms, step by step.",
    "List some facts about the planet Mars.",
    "Describe a busy market in the morning.",
    "Tell me about the history of bicycles.",
    "What makes a good cup of tea?",
    "Describe the life cycle of a butterfly.",
    "Write a letter to a friend about a trip.",
]

# The same sampling for every system: the daemon's defaults, spelled out for llama-server.
TEMP, TOP_K, TOP_P, MIN_P = 0.8, 40, 0.95, 0.05


@dataclass
class StreamTiming:
    """When one stream's request was sent, and its first and last token arrived."""

    sent: float = 0.0
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Measurement:
    """The figures of N concurrent streams of one system, in one run."""

    n: int
    aggregate_tps: float  # N × tokens / (last token of any stream - first send)
    ttft_p50_ms: float
    ttft_p99_ms: float
    slowest_stream_tps: float  # decode rate after the first token, of the slowest stream
    fastest_stream_tps: float
    slowest_fastest_ratio: float
    ttfts_ms: list[float] = field(default_factory=list)
    stream_tps: list[float] = field(default_factory=list)

    @classmethod
    def from_timings(cls, timings: Sequence[StreamTiming], tokens: int) -> Measurement:
        for i, t in enumerate(timings):
            if t.error or t.first is None or t.last is None:
                raise RuntimeError(f"stream {i} did not finish: {t.error or 'no tokens'}")
        started = min(t.sent for t in timings)
        wall = max(arrived(t.last) for t in timings) - started
        ttfts = sorted((arrived(t.first) - t.sent) * 1000 for t in timings)
        rates = [(tokens - 1) / max(arrived(t.last) - arrived(t.first), 1e-9) for t in timings]
        return cls(
            n=len(timings),
            aggregate_tps=len(timings) * tokens / wall,
            ttft_p50_ms=statistics.median(ttfts),
            ttft_p99_ms=percentile(ttfts, 0.99),
            slowest_stream_tps=min(rates),
            fastest_stream_tps=max(rates),
            slowest_fastest_ratio=min(rates) / max(rates),
            ttfts_ms=ttfts,
            stream_tps=rates,
        )


def arrived(value: float | None) -> float:
    """A time the caller knows was recorded."""
    assert value is not None
    return value


def percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def medians(runs: Sequence[dict[str, Any]], fields: Sequence[str]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in fields}


# The systems compared, as the tables and the JSON name them.
KINDS = ("daemon", "inprocess", "llama_server")
LABELS = {"daemon": "daemon", "inprocess": "in-process", "llama_server": "llama-server"}
SUMMARY_FIELDS = (
    "aggregate_tps",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "slowest_stream_tps",
    "fastest_stream_tps",
    "slowest_fastest_ratio",
)
