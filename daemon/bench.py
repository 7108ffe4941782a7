"""`inferencecenter bench`: the daemon against an in-process batched loop, side by side, in one run.

Both decode the same model with the same threads and the same sampling (temp 0.8, fixed seeds,
ignore_eos so every stream is exactly --tokens long). The in-process loop is the limit: one
llama_decode per step over all sequences, no sockets, no processes. Figures are medians of
--runs repetitions; the two are measured alternately so the machine's noise hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from ..protocol import wire
from ..protocol.messages import SamplingParams
from .config import default_model_path

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


def _summary(
    ttfts: list[float], per_stream_tps: list[float], tokens: int, wall: float
) -> dict[str, float]:
    ordered = sorted(ttfts)
    return {
        "aggregate_tps": tokens / wall,
        "ttft_p50_ms": statistics.median(ordered) * 1000,
        "ttft_p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
        "slowest_fastest_ratio": min(per_stream_tps) / max(per_stream_tps),
    }


def run_inprocess(model: str, n: int, tokens: int, threads: int, ctx: int) -> dict[str, float]:
    from ..actors.engine.backend import BatchEntry, LlamaBackend

    backend = LlamaBackend(model, n_seq_max=n, n_ctx_seq=ctx, n_batch=512, n_threads=threads)
    try:
        prompts = [backend.tokenize(PROMPTS[i % len(PROMPTS)], add_bos=True) for i in range(n)]
        samplers = [
            backend.new_sampler(SamplingParams(temp=0.8, seed=i, ignore_eos=True), p)
            for i, p in enumerate(prompts)
        ]
        started = time.perf_counter()
        entries = []
        last_index = []
        for seq, prompt in enumerate(prompts):
            for pos, token in enumerate(prompt):
                entries.append(BatchEntry(token, pos, seq, pos == len(prompt) - 1))
            last_index.append(len(entries) - 1)
        backend.decode(entries)
        next_tokens = [samplers[s].sample(last_index[s]) for s in range(n)]
        first = time.perf_counter()
        ttfts = [first - started] * n
        positions = [len(p) for p in prompts]
        for _ in range(tokens - 1):
            backend.decode([BatchEntry(next_tokens[s], positions[s], s, True) for s in range(n)])
            for s in range(n):
                positions[s] += 1
                next_tokens[s] = samplers[s].sample(s)
                backend.token_bytes(next_tokens[s])
        wall = time.perf_counter() - started
        stream_tps = [(tokens - 1) / (wall - ttfts[0])] * n
        for sampler in samplers:
            sampler.free()
        return _summary(ttfts, stream_tps, n * tokens, wall)
    finally:
        backend.close()


class DaemonUnderTest:
    """A real `inferencecenter serve` on free ports, with its own clients file."""

    def __init__(self, model: str, parallel: int, threads: int, ctx: int) -> None:
        import socket as net

        self.tmp = Path(tempfile.mkdtemp(prefix="ic-bench-"))
        self.key = "bench-key-" + os.urandom(8).hex()
        clients = self.tmp / "clients.json"
        clients.write_text(
            json.dumps(
                {
                    "clients": [
                        {
                            "client_id": "bench",
                            "api_key": self.key,
                            "max_sessions": 256,
                            "priority": "normal",
                        }
                    ]
                }
            )
        )
        ports = []
        for _ in range(2):
            with net.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                ports.append(probe.getsockname()[1])
        self.endpoint = f"tcp://127.0.0.1:{ports[0]}"
        self.log = open(self.tmp / "daemon.log", "wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "inferencecenter.daemon",
                "serve",
                "--model",
                model,
                "--port",
                str(ports[0]),
                "--metrics-port",
                str(ports[1]),
                "--clients",
                str(clients),
                "--parallel",
                str(parallel),
                "--threads",
                str(threads),
                "--ctx-size",
                str(ctx),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        sock = self.connect()
        sock.send_multipart(wire.client_frames({"op": "ping"}))
        if not sock.poll(300_000):
            raise RuntimeError("the daemon did not start; see " + str(self.tmp / "daemon.log"))
        sock.close()

    def connect(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def _request(sock: zmq.Socket[Any], body: dict[str, Any]) -> dict[str, Any]:
    sock.send_multipart(wire.client_frames(body))
    return wire.unpack(sock.recv_multipart()[1])


def run_daemon(daemon: DaemonUnderTest, n: int, tokens: int) -> dict[str, float]:
    socks, sessions = [], []
    for _ in range(n):
        sock = daemon.connect()
        _request(sock, {"op": "auth", "client_id": "bench", "api_key": daemon.key})
        sessions.append(_request(sock, {"op": "create_session"})["session_id"])
        socks.append(sock)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    index = {sock: i for i, sock in enumerate(socks)}
    first: list[float | None] = [None] * n
    last: list[float] = [0.0] * n
    done = 0
    started = time.perf_counter()
    for i, sock in enumerate(socks):
        params = {"temp": 0.8, "seed": i, "max_tokens": tokens, "ignore_eos": True}
        sock.send_multipart(
            wire.client_frames(
                {
                    "op": "infer",
                    "session_id": sessions[i],
                    "prompt": PROMPTS[i % len(PROMPTS)],
                    "params": params,
                }
            )
        )
    while done < n:
        for sock, _ in poller.poll(60_000):
            i = index[sock]
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                reply = wire.unpack(sock.recv_multipart()[1])
                now = time.perf_counter()
                if reply["op"] == "token" and first[i] is None:
                    first[i] = now
                elif reply["op"] == "end":
                    last[i] = now
                    done += 1
                elif reply["op"] == "error":
                    raise RuntimeError(f"daemon error: {reply}")
    wall = max(last) - started
    ttfts = [(f or started) - started for f in first]
    stream_tps = [(tokens - 1) / (last[i] - (first[i] or started)) for i in range(n)]
    for sock, session_id in zip(socks, sessions, strict=False):
        _request(sock, {"op": "close_session", "session_id": session_id})
        sock.close()
    return _summary(ttfts, stream_tps, n * tokens, wall)


def bench(args: argparse.Namespace) -> int:
    model = args.model or default_model_path()
    threads = args.threads or (os.cpu_count() or 1)
    streams = [int(x) for x in args.streams.split(",")]
    parallel = max(streams)
    results: dict[str, dict[int, list[dict[str, float]]]] = {"inprocess": {}, "daemon": {}}
    daemon = DaemonUnderTest(model, parallel, threads, args.ctx_size)
    try:
        for run in range(args.runs):
            for n in streams:
                results["inprocess"].setdefault(n, []).append(
                    run_inprocess(model, n, args.tokens, threads, args.ctx_size)
                )
                results["daemon"].setdefault(n, []).append(run_daemon(daemon, n, args.tokens))
                print(f"run {run + 1}/{args.runs} N={n} done", file=sys.stderr)
    finally:
        daemon.stop()
    table = []
    print(
        f"{'N':>3} {'in-process tok/s':>17} {'daemon tok/s':>13} {'ratio':>6} "
        f"{'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'slow/fast':>9}"
    )
    for n in streams:
        row: dict[str, Any] = {"n": n}
        for kind in ("inprocess", "daemon"):
            runs = results[kind][n]
            row[kind] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        row["ratio"] = row["daemon"]["aggregate_tps"] / row["inprocess"]["aggregate_tps"]
        table.append(row)
        d = row["daemon"]
        print(
            f"{n:>3} {row['inprocess']['aggregate_tps']:>17.1f} {d['aggregate_tps']:>13.1f} "
            f"{row['ratio']:>6.3f} {d['ttft_p50_ms']:>12.1f} {d['ttft_p99_ms']:>12.1f} "
            f"{d['slowest_fastest_ratio']:>9.2f}"
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": model,
                "threads": threads,
                "tokens": args.tokens,
                "runs": args.runs,
                "median_of_runs": table,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


def add_bench_command(commands: Any) -> None:
    parser = commands.add_parser("bench", help="measure the daemon against an in-process loop")
    parser.add_argument("--model", help="GGUF model (default: the gemma package's)")
    parser.add_argument("--streams", default="1,4,8", help="comma-separated stream counts")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (medians are reported)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    parser.add_argument("--ctx-size", type=int, default=1024)
    parser.add_argument("--output", default="bench-results/bench.json")
    parser.set_defaults(func=bench)
