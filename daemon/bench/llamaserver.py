"""llama.cpp's own server as the reference a user would otherwise run: started per measurement."""

from __future__ import annotations

import http.client
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..testing import free_ports
from .measurement import MIN_P, PROMPTS, TEMP, TOP_K, TOP_P, Measurement, StreamTiming


class LlamaServerUnderTest:
    """`llama-server -np N` on a free port, with the same model, threads and context per slot
    (`extra`: more flags)."""

    def __init__(
        self,
        binary: str,
        model: str,
        parallel: int,
        threads: int,
        ctx: int,
        extra: Sequence[str] = (),
    ) -> None:
        (self.port,) = free_ports(1)
        self.tmp = Path(tempfile.mkdtemp(prefix="ic-bench-llama-server-"))
        self.log = open(self.tmp / "llama-server.log", "wb")
        command = [binary, "-m", model, "-np", str(parallel), "-t", str(threads)]
        command += ["-c", str(parallel * ctx), "--host", "127.0.0.1", "--port", str(self.port)]
        command += extra
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


def post_completion(
    conn: http.client.HTTPConnection, body: dict[str, Any], timing: StreamTiming
) -> str:
    """POST a streaming /completion on `conn` and time its server-sent events (one per token):
    sent now, the first token, the stop event. Returns the text generated."""
    payload = json.dumps(body)
    timing.sent = time.perf_counter()
    conn.request("POST", "/completion", payload, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    pieces = []
    for line in response:  # to the end of the response, the stop event included
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        event = json.loads(line[6:])
        now = time.perf_counter()
        if event.get("stop"):
            timing.last = now
            # A token that ends inside a character has no event of its own: count them all.
            timing.tokens = int(event.get("tokens_predicted", timing.tokens))
            continue
        pieces.append(str(event.get("content", "")))
        timing.tokens += 1
        if timing.first is None:
            timing.first = now
    return "".join(pieces)


def _stream_completion(
    port: int, body: dict[str, Any], timing: StreamTiming, start: threading.Barrier
) -> None:
    """One stream of run_llama_server: its own connection, started with the others."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.connect()
        start.wait()
        post_completion(conn, body, timing)
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
                timing.error = f"{timing.tokens} tokens, expected {tokens}"
        return Measurement.from_timings(timings, tokens)
    finally:
        server.stop()
