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

The chat scenario (`--chat`, on by default): 16 conversations of 4 turns at once, through the
daemon with 4 and with 16 slots (and llama-server alike); generated tokens/s and first-token
times.

The HTTP chat scenario (`--http-chat`, on by default): 8 streaming /v1/chat/completions at once
through the daemon's HTTP actor, against llama-server's /v1/chat/completions and against the
same chats over ZeroMQ; then 4 streams through the HTTP actor, plain and with one constrained by
a JSON schema (`response_format`): how much the grammar slows the other streams.

This module is the command; the measurements live in its modules: `inprocess` (the in-process
loop, step times by row count, speculation), `daemonstreams` (the daemon as timed streams),
`llamaserver`, `scenarios` (stall, shared system prompt, many sessions), `chat` (multi-turn
chat), `httpchat` (chat over HTTP, the grammar's cost), `report` (tables, plot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ...actors.config import default_model_path
from .chat import measure_chat
from .daemonstreams import DaemonUnderTest, run_daemon
from .httpchat import measure_http_chat
from .inprocess import measure_sampling, measure_speculation, run_inprocess, run_row_sweep
from .llamaserver import run_llama_server
from .measurement import KINDS, LABELS, Measurement
from .report import (
    median_table,
    plot,
    print_chat,
    print_http_chat,
    print_prefix,
    print_rows,
    print_sampling,
    print_sessions,
    print_speculation,
    print_stall,
    print_table,
    require_matplotlib,
)
from .scenarios import MANY_SESSIONS, measure_prefix, measure_stall, run_many_sessions


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


def bench(args: argparse.Namespace) -> int:
    model = args.model or default_model_path()
    threads = args.threads or (os.cpu_count() or 1)
    streams = [int(x) for x in args.streams.split(",") if x.strip()]
    out = Path(args.output)
    if args.plot and not require_matplotlib():
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
    stall = measure_stall(model, threads, args.runs) if args.stall else None
    prefix = measure_prefix(model, threads, args.ctx_size, args.runs) if args.prefix else None
    sessions = run_many_sessions(model, threads) if args.sessions else None
    chat = (
        measure_chat(model, threads, args.ctx_size, args.runs, args.llama_server)
        if args.chat
        else None
    )
    http_chat = (
        measure_http_chat(model, threads, args.ctx_size, args.tokens, args.runs, args.llama_server)
        if args.http_chat
        else None
    )
    rows = run_row_sweep(model, threads) if args.rows else None
    sampling = measure_sampling(model, threads) if args.sampling else None
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
    if chat:
        print_chat(chat)
    if http_chat:
        print_http_chat(http_chat)
    if rows:
        print_rows(rows)
    if sampling:
        print_sampling(sampling)
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
        "chat": chat,
        "http_chat": http_chat,
        "decode_step_ms_by_rows": rows,
        "sampling": sampling,
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
        ("--chat", True, "measure 16 multi-turn chats at once, on 4 and on 16 slots"),
        (
            "--http-chat",
            True,
            "measure 8 streaming chats over HTTP against llama-server and ZeroMQ, and what a "
            "JSON-schema stream costs the others",
        ),
        ("--rows", False, "time a decode-only step of 1..16 rows in-process (does padding pay?)"),
        (
            "--sampling",
            False,
            "time sampling 8 rows after each decode in-process: handed the likeliest tokens or all",
        ),
        ("--plot", True, "write a PNG next to --output (needs matplotlib)"),
    ):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
    parser.add_argument("--output", default="bench-results/bench.json", help="JSON results")
    parser.set_defaults(func=bench)
