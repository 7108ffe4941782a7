"""`inferencecenter bench`: the daemon, an in-process batched loop and llama-server, side by side.

All three decode the same model with the same threads and the same sampling (temp 0.8, fixed
seeds, ignore_eos so every stream is exactly --tokens long). The in-process loop is the limit: one
llama_decode per step over all sequences, no sockets, no processes. llama.cpp's own server
(`--llama-server PATH`, see `make llama-server`) is the reference a user would otherwise run.
Figures are medians of --runs repetitions; the three are measured interleaved, in a rotating
order, so the machine's noise hits all alike.

The stall scenario (`--stall`, on by default): seven streams generate through the daemon, then
one client sends a ~2,000-token prompt; it reports how much longer the seven streams' largest
inter-token gap is while that prompt is prefilled than their usual gap.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from ..actors.config import default_model_path
from ..protocol import wire
from ..protocol.messages import SamplingParams
from .testing import free_ports

if TYPE_CHECKING:
    from ..actors.engine.backend import LlamaBackend, Sampler

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


# ---- one measurement ----------------------------------------------------------------------


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
        wall = max(_done(t.last) for t in timings) - started
        ttfts = sorted((_done(t.first) - t.sent) * 1000 for t in timings)
        rates = [(tokens - 1) / max(_done(t.last) - _done(t.first), 1e-9) for t in timings]
        return cls(
            n=len(timings),
            aggregate_tps=len(timings) * tokens / wall,
            ttft_p50_ms=statistics.median(ttfts),
            ttft_p99_ms=_percentile(ttfts, 0.99),
            slowest_stream_tps=min(rates),
            fastest_stream_tps=max(rates),
            slowest_fastest_ratio=min(rates) / max(rates),
            ttfts_ms=ttfts,
            stream_tps=rates,
        )


def _done(value: float | None) -> float:
    assert value is not None
    return value


def _percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _medians(runs: Sequence[dict[str, Any]], fields: Sequence[str]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in fields}


# ---- in-process loop ----------------------------------------------------------------------


def _open_streams(backend: LlamaBackend, n: int) -> tuple[list[list[int]], list[Sampler]]:
    """The bench's prompts for n streams, tokenized, and a sampler each (seed = stream)."""
    prompts = [backend.tokenize(PROMPTS[i % len(PROMPTS)], add_bos=True) for i in range(n)]
    samplers = [
        backend.new_sampler(SamplingParams(temp=TEMP, seed=i, ignore_eos=True), p)
        for i, p in enumerate(prompts)
    ]
    return prompts, samplers


def _prefill(backend: LlamaBackend, prompts: list[list[int]], samplers: list[Sampler]) -> list[int]:
    """All prompts in one llama_decode, sequence i for prompt i; the first token of each."""
    from ..actors.engine.backend import BatchEntry

    entries = []
    last_index = []
    for seq, prompt in enumerate(prompts):
        for pos, token in enumerate(prompt):
            entries.append(BatchEntry(token, pos, seq, pos == len(prompt) - 1))
        last_index.append(len(entries) - 1)
    backend.decode(entries)
    return [sampler.sample(index) for sampler, index in zip(samplers, last_index, strict=True)]


def run_inprocess(model: str, n: int, tokens: int, threads: int, ctx: int) -> Measurement:
    from ..actors.engine.backend import BatchEntry, LlamaBackend

    backend = LlamaBackend(model, n_seq_max=n, n_ctx_seq=ctx, n_batch=512, n_threads=threads)
    try:
        prompts, samplers = _open_streams(backend, n)
        started = time.perf_counter()
        next_tokens = _prefill(backend, prompts, samplers)
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
    from ..actors.engine.backend import LlamaBackend
    from ..actors.engine.service import measure_step_times

    backend = LlamaBackend(model, n_seq_max=most, n_ctx_seq=1024, n_batch=512, n_threads=threads)
    try:
        return measure_step_times(backend, most, reps)
    finally:
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
    from ..actors.engine.backend import BatchEntry, LlamaBackend

    backend = LlamaBackend(model, n_seq_max=n, n_ctx_seq=ctx, n_batch=512, n_threads=threads)
    try:
        prompts, samplers = _open_streams(backend, n)
        started = time.perf_counter()
        drafts = [NgramDrafts(p) for p in prompts]
        for seq, token in enumerate(_prefill(backend, prompts, samplers)):
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
            row[name] = _medians(got, list(got[0]))
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


def print_speculation(table: dict[str, Any]) -> None:
    print("\nn-gram speculation in-process (one draft token per row; medians):")
    print(f"{'N':>3} {'plain':>7} {'matched':>8} {'accept':>7} {'every row':>10} {'accept':>7}")
    for n, row in table.items():
        matched, every = row["matched_rows"], row["every_row"]
        print(
            f"{n:>3} {row['plain']['aggregate_tps']:>7.1f} {matched['over_plain']:>7.3f}x "
            f"{matched['acceptance']:>7.2f} {every['over_plain']:>9.3f}x "
            f"{every['acceptance']:>7.2f}"
        )


def count_tokens(model: str, text: str) -> int:
    """Tokens of text as a prompt (with BOS), from the model's own tokenizer."""
    from ..actors.engine.backend import LlamaBackend

    backend = LlamaBackend(model, n_seq_max=1, n_ctx_seq=64, n_batch=64, n_threads=1)
    try:
        return len(backend.tokenize(text, add_bos=True))
    finally:
        backend.close()


# ---- the daemon ---------------------------------------------------------------------------


class DaemonUnderTest:
    """A real `inferencecenter serve` on free ports, with its own clients file (`extra`: more
    `serve` flags)."""

    def __init__(
        self, model: str, parallel: int, threads: int, ctx: int, extra: Sequence[str] = ()
    ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="ic-bench-"))
        self.key = "bench-key-" + os.urandom(8).hex()
        clients = self.tmp / "clients.json"
        client = {
            "client_id": "bench",
            "api_key": self.key,
            "max_sessions": 256,
            "priority": "normal",
        }
        clients.write_text(json.dumps({"clients": [client]}))
        port, metrics_port = free_ports(2)
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.log = open(self.tmp / "daemon.log", "wb")
        command = [sys.executable, "-m", "inferencecenter.daemon", "serve", "--model", model]
        command += ["--port", str(port), "--metrics-port", str(metrics_port)]
        command += ["--clients", str(clients), "--parallel", str(parallel)]
        command += ["--threads", str(threads), "--ctx-size", str(ctx), *extra]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        sock = self.connect()
        sock.send_multipart(wire.client_frames({"op": "ping"}))
        if not sock.poll(300_000):
            self.stop()
            raise RuntimeError("the daemon did not start; see " + str(self.tmp / "daemon.log"))
        sock.close()
        self._warm_up()

    def _warm_up(self) -> None:
        """One short generation, so no measurement pays for first-use costs (llama-server warms
        up on its own at start)."""
        (stream,) = self.open_sessions(1)
        stream.infer(PROMPTS[0], seed=0, max_tokens=8)
        _pump([stream], lambda: stream.ended)
        stream.close()

    def connect(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def open_sessions(self, n: int) -> list[DaemonStream]:
        streams = []
        for _ in range(n):
            sock = self.connect()
            _request(sock, {"op": "auth", "client_id": "bench", "api_key": self.key})
            streams.append(DaemonStream(sock, _request(sock, {"op": "create_session"})))
        return streams

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def _request(sock: zmq.Socket[Any], body: dict[str, Any]) -> dict[str, Any]:
    sock.send_multipart(wire.client_frames(body))
    reply = wire.unpack(sock.recv_multipart()[1])
    if reply["op"] == "error":
        raise RuntimeError(f"daemon error: {reply}")
    return reply


class DaemonStream:
    """One connection with one session; records when each token message of its infer arrives."""

    def __init__(self, sock: zmq.Socket[Any], created: dict[str, Any]) -> None:
        self.sock = sock
        self.session_id: str = created["session_id"]
        self.timing = StreamTiming()
        self.token_times: list[float] = []
        self.stats: dict[str, Any] = {}
        self.ended = False

    def infer(self, prompt: str, seed: int, max_tokens: int) -> None:
        params = {"temp": TEMP, "seed": seed, "max_tokens": max_tokens, "ignore_eos": True}
        body = {"op": "infer", "session_id": self.session_id, "prompt": prompt, "params": params}
        self.timing = StreamTiming()
        self.token_times = []
        self.ended = False
        self.timing.sent = time.perf_counter()
        self.sock.send_multipart(wire.client_frames(body))

    def receive(self) -> None:
        """Take every message waiting on the socket."""
        while int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            reply = wire.unpack(self.sock.recv_multipart()[1])
            now = time.perf_counter()
            if reply["op"] == "token":
                self.token_times.append(now)
                if self.timing.first is None:
                    self.timing.first = now
            elif reply["op"] == "end":
                self.timing.last = now
                self.timing.tokens = int(reply["stats"].get("tokens", 0))
                self.stats = reply["stats"]
                self.ended = True
            elif reply["op"] == "error":
                raise RuntimeError(f"daemon error: {reply}")

    def close(self) -> None:
        _request(self.sock, {"op": "close_session", "session_id": self.session_id})
        self.sock.close()


def _pump(streams: Sequence[DaemonStream], until: Callable[[], bool]) -> None:
    """Receive on every stream until `until()` holds."""
    poller = zmq.Poller()
    by_socket = {s.sock: s for s in streams}
    for stream in streams:
        poller.register(stream.sock, zmq.POLLIN)
    while not until():
        ready = poller.poll(120_000)
        if not ready:
            raise RuntimeError("the daemon sent nothing for 120 s")
        for sock, _ in ready:
            by_socket[sock].receive()


def run_daemon(daemon: DaemonUnderTest, n: int, tokens: int) -> Measurement:
    streams = daemon.open_sessions(n)
    try:
        for i, stream in enumerate(streams):
            stream.infer(PROMPTS[i % len(PROMPTS)], seed=i, max_tokens=tokens)
        _pump(streams, lambda: all(s.ended for s in streams))
        return Measurement.from_timings([s.timing for s in streams], tokens)
    finally:
        for stream in streams:
            stream.close()


# ---- llama.cpp's server -------------------------------------------------------------------


class LlamaServerUnderTest:
    """`llama-server -np N` on a free port, with the same model, threads and context per slot."""

    def __init__(self, binary: str, model: str, parallel: int, threads: int, ctx: int) -> None:
        (self.port,) = free_ports(1)
        self.tmp = Path(tempfile.mkdtemp(prefix="ic-bench-llama-server-"))
        self.log = open(self.tmp / "llama-server.log", "wb")
        command = [binary, "-m", model, "-np", str(parallel), "-t", str(threads)]
        command += ["-c", str(parallel * ctx), "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_healthy(timeout=300)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama-server did not become healthy; see {self.tmp}/llama-server.log")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _completion_body(prompt: str, seed: int, tokens: int) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "n_predict": tokens,
        "temperature": TEMP,
        "top_k": TOP_K,
        "top_p": TOP_P,
        "min_p": MIN_P,
        "repeat_penalty": 1.0,
        "seed": seed,
        "ignore_eos": True,
        "cache_prompt": True,
        "stream": True,
    }


def _stream_completion(
    port: int, body: dict[str, Any], timing: StreamTiming, start: threading.Barrier
) -> None:
    """POST a streaming /completion and time its server-sent events (one per token)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.connect()
        payload = json.dumps(body)
        start.wait()
        timing.sent = time.perf_counter()
        conn.request("POST", "/completion", payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        for line in response:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            now = time.perf_counter()
            if event.get("stop"):
                timing.last = now
                break
            timing.tokens += 1
            if timing.first is None:
                timing.first = now
        conn.close()
    except Exception as exc:  # reported by the caller, with the stream's number
        timing.error = repr(exc)


def run_llama_server(
    binary: str, model: str, n: int, tokens: int, threads: int, ctx: int
) -> Measurement:
    server = LlamaServerUnderTest(binary, model, n, threads, ctx)
    try:
        timings = [StreamTiming() for _ in range(n)]
        start = threading.Barrier(n)
        workers = [
            threading.Thread(
                target=_stream_completion,
                args=(server.port, _completion_body(PROMPTS[i % len(PROMPTS)], i, tokens)),
                kwargs={"timing": timings[i], "start": start},
            )
            for i in range(n)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        for timing in timings:
            if timing.error is None and timing.tokens != tokens:
                timing.error = f"{timing.tokens} token events, expected {tokens}"
        return Measurement.from_timings(timings, tokens)
    finally:
        server.stop()


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
        _pump(generating, lambda: all(len(s.token_times) >= STALL_AFTER for s in generating))
        big.infer(prompt, seed=99, max_tokens=1)
        _pump(streams, lambda: all(s.ended for s in streams))
        if any(s.timing.tokens != STALL_TOKENS for s in generating):
            raise RuntimeError("a stream of the stall scenario ended early")
        if big.timing.first is None and big.timing.last is None:
            raise RuntimeError("the long prompt got no reply")
        prefill_end = big.timing.first or _done(big.timing.last)
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


# ---- shared system prompts and many sessions ------------------------------------------------

SYSTEM_PROMPT = (
    "You are the assistant of a harbour town's visitor office. You answer questions about the "
    "ferry timetable, the market, the museums and the walks along the coast, briefly and "
    "kindly, in plain words. "
) * 8
MANY_SESSIONS = 200
MANY_SESSIONS_CACHE_MB = 16


def _until_ended(stream: DaemonStream) -> None:
    _pump([stream], lambda: stream.ended)


def _first_token(stream: DaemonStream, prompt: str) -> tuple[float, dict[str, Any]]:
    stream.infer(prompt, seed=0, max_tokens=1)
    _until_ended(stream)
    first = stream.timing.first or _done(stream.timing.last)
    return (first - stream.timing.sent) * 1000, stream.stats


def run_prefix_sharing(daemon: DaemonUnderTest, run: int) -> dict[str, float]:
    """First-token time of a session whose system prompt is new, then of a second session with
    the same one (its KV restored from the prefix cache). Each run its own system prompt."""
    system = f"[visitor office {run}] " + SYSTEM_PROMPT
    results: dict[str, float] = {}
    for label in ("without", "with"):
        sock = daemon.connect()
        _request(sock, {"op": "auth", "client_id": "bench", "api_key": daemon.key})
        created = _request(sock, {"op": "create_session", "system_prompt": system})
        stream = DaemonStream(sock, created)
        try:
            ttft, stats = _first_token(stream, "When does the first ferry leave?")
        finally:
            stream.close()
        results[f"ttft_{label}_ms"] = ttft
        results[f"cached_tokens_{label}"] = float(stats.get("cached_tokens", 0))
        results[f"prompt_tokens_{label}"] = float(stats.get("prompt_tokens", 0))
    results["speedup"] = results["ttft_without_ms"] / results["ttft_with_ms"]
    return results


def _engine_rss(daemon: DaemonUnderTest) -> int:
    """The engine process's resident memory."""
    import psutil

    for child in psutil.Process(daemon.process.pid).children():
        if "inferencecenter-engine" in " ".join(child.cmdline()):
            return int(child.memory_info().rss)
    raise RuntimeError("no engine process found")


def run_many_sessions(model: str, threads: int) -> dict[str, float]:
    """200 sessions, one short infer each, on 4 slots with a 16 MB session cache: the engine's
    memory before and after, and how the first session (state dropped) comes back."""
    daemon = DaemonUnderTest(
        model, 4, threads, 1024, extra=["--session-cache-mb", str(MANY_SESSIONS_CACHE_MB)]
    )
    streams: list[DaemonStream] = []
    try:
        baseline = _engine_rss(daemon)
        sock = daemon.connect()
        _request(sock, {"op": "auth", "client_id": "bench", "api_key": daemon.key})
        started = time.perf_counter()
        for index in range(MANY_SESSIONS):
            stream = DaemonStream(sock, _request(sock, {"op": "create_session"}))
            streams.append(stream)
            stream.infer(f"Session {index} remembers the number {index * 7}.", 0, 8)
            _until_ended(stream)
        elapsed = time.perf_counter() - started
        after = _engine_rss(daemon)
        back, stats = _first_token(streams[0], " again")
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


# ---- reporting ----------------------------------------------------------------------------


def median_table(
    results: dict[str, dict[int, list[dict[str, Any]]]], streams: Sequence[int]
) -> list[dict[str, Any]]:
    """Per N: each system's medians over the runs, and the daemon's throughput ratios."""
    table = []
    for n in streams:
        row: dict[str, Any] = {"n": n}
        for kind, by_n in results.items():
            if by_n.get(n):
                row[kind] = _medians(by_n[n], SUMMARY_FIELDS)
        daemon_tps = row["daemon"]["aggregate_tps"]
        for kind in ("inprocess", "llama_server"):
            if kind in row:
                row[f"daemon_over_{kind}"] = daemon_tps / row[kind]["aggregate_tps"]
        table.append(row)
    return table


def _cell(row: dict[str, Any], kind: str, key: str, spec: str = ".1f") -> str:
    return format(row[kind][key], spec) if kind in row else "-"


def _ratio(row: dict[str, Any], key: str) -> str:
    return format(row[key], ".3f") if key in row else "-"


def print_table(table: Sequence[dict[str, Any]]) -> None:
    print("aggregate tokens/s (medians)")
    print(
        f"{'N':>3} {'daemon':>8} {'in-proc':>8} {'llama-srv':>9} "
        f"{'d/in-proc':>9} {'d/llama-srv':>11}"
    )
    for row in table:
        print(
            f"{row['n']:>3} {_cell(row, 'daemon', 'aggregate_tps'):>8} "
            f"{_cell(row, 'inprocess', 'aggregate_tps'):>8} "
            f"{_cell(row, 'llama_server', 'aggregate_tps'):>9} "
            f"{_ratio(row, 'daemon_over_inprocess'):>9} "
            f"{_ratio(row, 'daemon_over_llama_server'):>11}"
        )
    print("\nlatency and fairness (medians): TTFT p50 / p99 ms, slowest/fastest stream rate")
    print(
        f"{'N':>3} {'system':<13} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'slow tok/s':>10} {'slow/fast':>9}"
    )
    for row in table:
        for kind in KINDS:
            if kind in row:
                print(
                    f"{row['n']:>3} {LABELS[kind]:<13} {_cell(row, kind, 'ttft_p50_ms'):>9} "
                    f"{_cell(row, kind, 'ttft_p99_ms'):>9} "
                    f"{_cell(row, kind, 'slowest_stream_tps'):>10} "
                    f"{_cell(row, kind, 'slowest_fastest_ratio', '.2f'):>9}"
                )


def print_stall(median: dict[str, float]) -> None:
    print(
        f"\nprefill stall ({STALL_STREAMS} streams, one {median['prompt_tokens']:.0f}-token "
        f"prompt, --parallel {STALL_PARALLEL}; medians): usual gap {median['median_gap_ms']:.1f} "
        f"ms, largest gap during the prefill {median['max_gap_during_prefill_ms']:.1f} ms, "
        f"ratio {median['ratio']:.2f} (target ≤ 3); prefill {median['prefill_ms']:.0f} ms"
    )


def _require_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(table: Sequence[dict[str, Any]], path: Path) -> None:
    """Two panels against N: aggregate tokens/s and TTFT p50, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in KINDS:
        rows = [row for row in table if kind in row]
        if not rows:
            continue
        ns = [row["n"] for row in rows]
        left.plot(ns, [r[kind]["aggregate_tps"] for r in rows], marker="o", label=LABELS[kind])
        right.plot(ns, [r[kind]["ttft_p50_ms"] for r in rows], marker="o", label=LABELS[kind])
    for axis, title, unit in (
        (left, "aggregate throughput", "tokens/s"),
        (right, "time to first token (p50)", "ms"),
    ):
        axis.set_title(title)
        axis.set_xlabel("concurrent streams N")
        axis.set_ylabel(unit)
        axis.set_xticks([row["n"] for row in table])
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---- the command --------------------------------------------------------------------------


def _measure_all(
    args: argparse.Namespace, model: str, threads: int, streams: Sequence[int]
) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Every run of every N of every system, interleaved, the order rotating from run to run."""
    kinds = [k for k in KINDS if k != "llama_server" or args.llama_server]
    results: dict[str, dict[int, list[dict[str, Any]]]] = {k: {} for k in kinds}
    daemon = DaemonUnderTest(model, max(streams), threads, args.ctx_size)
    measure: dict[str, Callable[[int], Measurement]] = {
        "daemon": lambda n: run_daemon(daemon, n, args.tokens),
        "inprocess": lambda n: run_inprocess(model, n, args.tokens, threads, args.ctx_size),
        "llama_server": lambda n: run_llama_server(
            args.llama_server, model, n, args.tokens, threads, args.ctx_size
        ),
    }
    try:
        for run in range(args.runs):
            order = kinds[run % len(kinds) :] + kinds[: run % len(kinds)]
            for n in streams:
                for kind in order:
                    m = measure[kind](n)
                    results[kind].setdefault(n, []).append(asdict(m))
                    print(
                        f"run {run + 1}/{args.runs} N={n} {LABELS[kind]}: "
                        f"{m.aggregate_tps:.1f} tok/s, TTFT p50 {m.ttft_p50_ms:.0f} ms",
                        file=sys.stderr,
                    )
    finally:
        daemon.stop()
    return results


def _measure_stall(args: argparse.Namespace, model: str, threads: int) -> dict[str, Any]:
    prompt, tokens = long_prompt(model)
    daemon = DaemonUnderTest(model, STALL_PARALLEL, threads, STALL_CTX)
    runs = []
    try:
        for run in range(args.runs):
            result = asdict(run_stall(daemon, prompt))
            runs.append(result)
            print(f"stall run {run + 1}/{args.runs}: ratio {result['ratio']:.2f}", file=sys.stderr)
    finally:
        daemon.stop()
    fields = ("prompt_tokens", "prefill_ms", "median_gap_ms", "max_gap_during_prefill_ms", "ratio")
    return {"tokenized_prompt_tokens": tokens, "runs": runs, "median": _medians(runs, fields)}


def _measure_prefix(args: argparse.Namespace, model: str, threads: int) -> dict[str, Any]:
    daemon = DaemonUnderTest(model, 4, threads, args.ctx_size)
    runs = []
    try:
        for run in range(args.runs):
            runs.append(run_prefix_sharing(daemon, run))
            print(
                f"shared system prompt run {run + 1}/{args.runs}: first token "
                f"{runs[-1]['ttft_without_ms']:.0f} ms without, {runs[-1]['ttft_with_ms']:.0f} ms "
                "with",
                file=sys.stderr,
            )
    finally:
        daemon.stop()
    return {"runs": runs, "median": _medians(runs, list(runs[0]))}


def print_prefix(median: dict[str, float]) -> None:
    print(
        f"\nshared system prompt ({median['prompt_tokens_without']:.0f} prompt tokens; medians): "
        f"first token {median['ttft_without_ms']:.0f} ms for a new system prompt, "
        f"{median['ttft_with_ms']:.0f} ms for a second session with it "
        f"({median['cached_tokens_with']:.0f} tokens restored): {median['speedup']:.1f}x"
    )


def print_sessions(result: dict[str, float]) -> None:
    print(
        f"\n{result['sessions']:.0f} sessions on 4 slots, --session-cache-mb "
        f"{result['session_cache_mb']:.0f}: engine RSS {result['engine_rss_before_mb']:.0f} MB "
        f"before, {result['engine_rss_after_mb']:.0f} MB after; the first session, its state "
        f"dropped, answers again in {result['first_session_back_ttft_ms']:.0f} ms "
        f"(rebuilt from its history)"
    )


def bench(args: argparse.Namespace) -> int:
    model = args.model or default_model_path()
    threads = args.threads or (os.cpu_count() or 1)
    streams = [int(x) for x in args.streams.split(",") if x.strip()]
    out = Path(args.output)
    if args.plot and not _require_matplotlib():
        print(
            "inferencecenter bench: matplotlib is missing (a bench-only dependency): "
            "pip install -e '.[bench]' (make bench does it), or pass --no-plot",
            file=sys.stderr,
        )
        return 2
    if args.llama_server and not os.access(args.llama_server, os.X_OK):
        print(f"inferencecenter bench: {args.llama_server} is not an executable", file=sys.stderr)
        return 2
    # SIGTERM ends the bench through the `finally`s that stop the daemon and llama-server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = _measure_all(args, model, threads, streams) if streams else {}
    stall = _measure_stall(args, model, threads) if args.stall else None
    prefix = _measure_prefix(args, model, threads) if args.prefix else None
    sessions = run_many_sessions(model, threads) if args.sessions else None
    rows = run_row_sweep(model, threads) if args.rows else None
    speculated = [int(x) for x in args.speculation.split(",") if x.strip()]
    speculation = (
        measure_speculation(model, speculated, args.tokens, threads, args.ctx_size, args.runs)
        if speculated
        else None
    )
    table = median_table(results, streams)
    if table:
        print_table(table)
    if stall:
        print_stall(stall["median"])
    if prefix:
        print_prefix(prefix["median"])
    if sessions:
        print_sessions(sessions)
    if rows:
        print(
            "\ndecode step of N rows alone, in-process (ms): "
            + ", ".join(f"{n}: {ms:.1f}" for n, ms in rows.items())
        )
    if speculation:
        print_speculation(speculation)
    report = {
        "model": model,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "threads": threads,
        "tokens": args.tokens,
        "ctx_size": args.ctx_size,
        "runs": args.runs,
        "llama_server": args.llama_server,
        "median_of_runs": table,
        "stall": stall,
        "shared_system_prompt": prefix,
        "many_sessions": sessions,
        "decode_step_ms_by_rows": rows,
        "speculation": speculation,
        "raw": {kind: {str(n): runs for n, runs in by_n.items()} for kind, by_n in results.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    if args.plot and table:
        png = out.with_suffix(".png")
        plot(table, png)
        print(f"wrote {png}")
    return 0


def add_bench_command(commands: Any) -> None:
    parser = commands.add_parser(
        "bench", help="measure the daemon against an in-process loop and llama-server"
    )
    parser.add_argument("--model", help="GGUF model (default: the gemma package's)")
    parser.add_argument(
        "--streams", default="1,4,8,16", help="comma-separated stream counts ('' for none)"
    )
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (medians are reported)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    parser.add_argument("--ctx-size", type=int, default=1024, help="context per stream")
    parser.add_argument("--llama-server", metavar="PATH", help="also measure this llama-server")
    parser.add_argument(
        "--speculation",
        default="",
        metavar="N,N,...",
        help="in-process, at these stream counts: does n-gram speculative decoding pay here?",
    )
    for flag, default, text in (
        ("--stall", True, "measure the stall a long prompt causes to 7 generating streams"),
        ("--prefix", True, "measure the first token of a session sharing a cached system prompt"),
        ("--sessions", True, f"measure the engine's memory with {MANY_SESSIONS} sessions"),
        ("--rows", False, "time a decode-only step of 1..16 rows in-process (does padding pay?)"),
        ("--plot", True, "write a PNG next to --output (needs matplotlib)"),
    ):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
    parser.add_argument("--output", default="bench-results/bench.json", help="JSON results")
    parser.set_defaults(func=bench)
