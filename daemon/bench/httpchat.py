"""Chat over HTTP: 8 concurrent streaming /v1/chat/completions through the daemon's HTTP actor,
against llama-server's /v1/chat/completions (same model, threads, slots and context) and against
the same chats over ZeroMQ; and what one stream constrained by a JSON schema costs the others."""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from .daemonstreams import DaemonUnderTest, pump
from .llamaserver import LlamaServerUnderTest
from .measurement import MIN_P, PROMPTS, TEMP, TOP_K, TOP_P, Measurement, StreamTiming, medians

HTTP_STREAMS = 8
HTTP_SYSTEMS = ("http", "zeromq", "llama_server")
HTTP_LABELS = {"http": "daemon HTTP", "zeromq": "daemon ZeroMQ", "llama_server": "llama-server"}
HTTP_FIELDS = ("aggregate_tps", "ttft_p50_ms", "ttft_p99_ms", "slowest_stream_tps")
GRAMMAR_STREAMS = 4
# An output that cannot be complete within the bench's tokens (at least 30 objects), so that the
# constrained stream generates as long as the others.
LONG_SCHEMA = {
    "type": "array",
    "minItems": 30,
    "items": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    },
}
CHAT_PATH = "/v1/chat/completions"


def chat_text(run: int, index: int) -> str:
    """A user message no system saw in an earlier run (llama-server keeps its slots' prompts)."""
    return f"(run {run + 1}, chat {index + 1}) {PROMPTS[index % len(PROMPTS)]}"


def chat_body(run: int, index: int, tokens: int, **extra: Any) -> dict[str, Any]:
    """A streaming chat completion sampled like every system of the bench, `tokens` long."""
    return {
        "messages": [{"role": "user", "content": chat_text(run, index)}],
        "max_tokens": tokens,
        "temperature": TEMP,
        "top_k": TOP_K,
        "top_p": TOP_P,
        "min_p": MIN_P,
        "seed": index,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


def post_chat(
    conn: http.client.HTTPConnection, body: dict[str, Any], timing: StreamTiming, key: str
) -> None:
    """POST a streaming chat completion and time its chunks: sent now, the first and the last
    piece of text; the tokens as its usage counts them (one chunk a token without usage)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    timing.sent = time.perf_counter()
    conn.request("POST", CHAT_PATH, json.dumps(body), headers)
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    chunks = 0
    for line in response:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        now = time.perf_counter()
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error']}")
        if event.get("usage"):
            timing.tokens = int(event["usage"]["completion_tokens"])
        for choice in event.get("choices") or ():
            if (choice.get("delta") or {}).get("content"):
                chunks += 1
                timing.last = now
                if timing.first is None:
                    timing.first = now
    if not timing.tokens:
        timing.tokens = chunks


def _chat_thread(
    port: int, body: dict[str, Any], key: str, timing: StreamTiming, start: threading.Barrier
) -> None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.connect()
        start.wait()
        post_chat(conn, body, timing, key)
        conn.close()
    except Exception as exc:  # reported by the caller, with the stream's number
        timing.error = repr(exc)


def run_chats(port: int, key: str, bodies: list[dict[str, Any]]) -> list[StreamTiming]:
    """The chats at once, a thread and a connection each, started together."""
    timings = [StreamTiming() for _ in bodies]
    start = threading.Barrier(len(bodies))
    workers = [
        threading.Thread(target=_chat_thread, args=(port, body, key, timing, start))
        for body, timing in zip(bodies, timings, strict=True)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for index, timing in enumerate(timings):
        if timing.error:
            raise RuntimeError(f"chat {index} failed: {timing.error}")
    return timings


def exact(timings: list[StreamTiming], tokens: int) -> Measurement:
    for timing in timings:
        if timing.tokens != tokens:
            timing.error = f"{timing.tokens} tokens, expected {tokens}"
    return Measurement.from_timings(timings, tokens)


def chat_zeromq(daemon: DaemonUnderTest, n: int, tokens: int, run: int) -> Measurement:
    """The same chats as one `messages` infer each, a session and a connection each."""
    streams = daemon.open_sessions(n)
    try:
        for index, stream in enumerate(streams):
            params = {"temp": TEMP, "seed": index, "max_tokens": tokens, "ignore_eos": True}
            message = {"role": "user", "content": chat_text(run, index)}
            stream.send_infer({"messages": [message]}, params)
        pump(streams, lambda: all(s.ended for s in streams))
        return exact([s.timing for s in streams], tokens)
    finally:
        for stream in streams:
            stream.close()


def measure_http_chat(
    model: str, threads: int, ctx: int, tokens: int, runs: int, llama_server: str | None
) -> dict[str, Any]:
    """8 streaming chats at once through the HTTP actor, over ZeroMQ and on llama-server (one
    daemon serving both of its paths, one llama-server, both with 8 slots), interleaved in an
    order rotating from run to run; medians of the runs; then the grammar's cost."""
    systems = [s for s in HTTP_SYSTEMS if s != "llama_server" or llama_server]
    results: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
    daemon = DaemonUnderTest(model, HTTP_STREAMS, threads, ctx, http=True)
    server = None
    try:
        if llama_server:
            # The default model has no chat template: llama-server's built-in Gemma one renders
            # what the daemon's fallback does.
            server = LlamaServerUnderTest(
                llama_server,
                model,
                HTTP_STREAMS,
                threads,
                ctx,
                extra=["--no-jinja", "--chat-template", "gemma"],
            )
        http_port = daemon.daemon.http_port
        measure: dict[str, Callable[[int], Measurement]] = {
            "http": lambda run: exact(
                run_chats(
                    http_port,
                    daemon.key,
                    [chat_body(run, i, tokens) for i in range(HTTP_STREAMS)],
                ),
                tokens,
            ),
            "zeromq": lambda run: chat_zeromq(daemon, HTTP_STREAMS, tokens, run),
        }
        if server is not None:
            port = server.port
            measure["llama_server"] = lambda run: exact(
                run_chats(port, "none", [chat_body(run, i, tokens) for i in range(HTTP_STREAMS)]),
                tokens,
            )
        # Each HTTP path serves a round of short chats before it is measured, as the ZeroMQ
        # path does (DaemonUnderTest's warm-up): the HTTP actor's first round paid first-use
        # costs (108-115 tokens/s, against 134-143 in the later runs).
        warm_up = [chat_body(-1, i, 8) for i in range(HTTP_STREAMS)]
        run_chats(http_port, daemon.key, warm_up)
        if server is not None:
            run_chats(server.port, "none", warm_up)
        for run in range(runs):
            shift = run % len(systems)
            for system in systems[shift:] + systems[:shift]:
                m = measure[system](run)
                results[system].append(asdict(m))
                print(
                    f"http chat run {run + 1}/{runs} {HTTP_LABELS[system]}: "
                    f"{m.aggregate_tps:.1f} tok/s, TTFT p50 {m.ttft_p50_ms:.0f} ms",
                    file=sys.stderr,
                )
        grammar = measure_grammar_cost(daemon, tokens, runs)
    finally:
        if server is not None:
            server.stop()
        daemon.stop()
    median = {system: medians(results[system], HTTP_FIELDS) for system in systems}
    pairs = [("http", "zeromq")] + ([("http", "llama_server")] if "llama_server" in median else [])
    ratios = {f"{a}_over_{b}": _paired_ratio(results, a, b) for a, b in pairs}
    ratios_of_medians = {f"{a}_over_{b}": _ratio(median, a, b) for a, b in pairs}
    return {
        "streams": HTTP_STREAMS,
        "tokens": tokens,
        "median": median,
        "ratios": ratios,  # the median of each run's ratio
        "ratios_of_medians": ratios_of_medians,
        "grammar": grammar,
        "runs": results,
    }


def _ratio(median: dict[str, dict[str, float]], a: str, b: str) -> float:
    return median[a]["aggregate_tps"] / median[b]["aggregate_tps"]


def _paired_ratio(results: dict[str, list[dict[str, Any]]], a: str, b: str) -> float:
    """The median of the runs' ratios: in one run the two are measured one after the other, so
    a stretch of time when the shared machine is slower slows both (single runs of one system
    spread over 92-130 tokens/s here, the ratio of medians mixes those stretches)."""
    runs = zip(results[a], results[b], strict=True)
    return float(statistics.median(x["aggregate_tps"] / y["aggregate_tps"] for x, y in runs))


def _rates(timings: list[StreamTiming]) -> list[float]:
    """Each stream's decode rate after its first token."""
    rates = []
    for timing in timings:
        assert timing.first is not None and timing.last is not None
        rates.append((timing.tokens - 1) / max(timing.last - timing.first, 1e-9))
    return rates


def measure_grammar_cost(daemon: DaemonUnderTest, tokens: int, runs: int) -> dict[str, Any]:
    """4 streaming chats through the HTTP actor, all plain, and with the last one constrained
    by a JSON schema: the three plain streams' decode rate in each case, interleaved. The
    steps are shared, so whatever the grammar costs in a step slows every stream of it."""
    port, key = daemon.daemon.http_port, daemon.key
    plain_rates: list[float] = []
    mixed_rates: list[float] = []
    grammar_rates: list[float] = []
    schema = {"type": "json_schema", "json_schema": {"name": "cities", "schema": LONG_SCHEMA}}
    for run in range(runs):
        for constrained in (False, True) if run % 2 == 0 else (True, False):
            bodies = [chat_body(run, i, tokens) for i in range(GRAMMAR_STREAMS)]
            if constrained:
                bodies[-1]["response_format"] = schema
            timings = run_chats(port, key, bodies)
            for timing in timings:
                if timing.tokens != tokens:
                    raise RuntimeError(f"a grammar bench stream made {timing.tokens} tokens")
            rates = _rates(timings)
            others = statistics.mean(rates[:-1])
            (mixed_rates if constrained else plain_rates).append(others)
            if constrained:
                grammar_rates.append(rates[-1])
            print(
                f"grammar run {run + 1}/{runs} {'one constrained' if constrained else 'plain'}:"
                f" the other streams {others:.1f} tok/s each",
                file=sys.stderr,
            )
    plain, mixed = statistics.median(plain_rates), statistics.median(mixed_rates)
    return {
        "streams": GRAMMAR_STREAMS,
        "plain_stream_tps": plain,
        "others_with_one_constrained_tps": mixed,
        "constrained_stream_tps": statistics.median(grammar_rates),
        "others_ratio": mixed / plain,
    }
