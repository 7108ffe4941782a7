"""Soak: a daemon under a steady, moderate load for a long time; is it stable?

    make soak                       # 10 minutes
    make soak SOAK_SECONDS=180
    .venv/bin/python -m tests.load.soak --help

A few clients (4 by default, threads with their own sockets and client_ids) loop infers of random
lengths (max_tokens 4-64, temp 0.8) in their sessions; about one in ten is aborted after its first
token, and a few are abandoned by a disconnect or have their session closed mid-stream (see
loadtest.py, whose clients and checks this reuses). Every 30 s it prints the elapsed time, the
infers done, tokens/s over the last interval, and every actor's RSS (MiB) and open file
descriptors. At the end it compares the last third of the run with the first third (RSS: mean;
fds: highest) and says whether each actor is stable (RSS within 10 %, fds within 2), and it
fails when a stream broke or an actor crashed (its pid changed).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from statistics import mean

import psutil

from inferencecenter.daemon.testing import Daemon, actor_processes

from .loadtest import (
    MIB,
    LoadClient,
    Mix,
    Tally,
    Usage,
    add_clients,
    pids,
    run_daemon,
    usage,
    warm_up,
)

RSS_STABLE = 0.10
FDS_STABLE = 2


def stability(samples: list[tuple[float, dict[str, Usage]]]) -> tuple[list[str], bool]:
    """Lines comparing the last third of the samples with the first third, and the verdict."""
    third = max(1, len(samples) // 3)
    first, last = samples[:third], samples[-third:]
    lines = [
        f"{'actor':<10} {'RSS first 1/3':>14} {'last 1/3':>10} {'change':>8}"
        f"   {'fds first 1/3':>13} {'last 1/3':>8}   verdict"
    ]
    stable = True
    for name in samples[0][1]:
        rss_first = mean(s[name].rss for _, s in first)
        rss_last = mean(s[name].rss for _, s in last)
        fds_first = max(s[name].fds for _, s in first)
        fds_last = max(s[name].fds for _, s in last)
        change = rss_last / rss_first - 1
        ok = change <= RSS_STABLE and fds_last <= fds_first + FDS_STABLE
        stable &= ok
        lines.append(
            f"{name:<10} {rss_first / MIB:>10.1f} MiB {rss_last / MIB:>6.1f} MiB {change:>+8.1%}"
            f"   {fds_first:>13} {fds_last:>8}   {'stable' if ok else 'GROWING'}"
        )
    return lines, stable


def soak(daemon: Daemon, args: argparse.Namespace) -> int:
    keys = add_clients(daemon, args.clients, max_sessions=2)
    warm_up(daemon.endpoint, "load-000", keys["load-000"])
    processes = actor_processes(daemon)
    first_pids = pids(processes)
    names = list(processes)
    tally = Tally()
    stop = threading.Event()
    rng = random.Random(args.seed)
    mix = Mix(abort=0.10, disconnect=0.02, close=0.02, min_tokens=4, max_tokens=64)
    clients = [
        LoadClient(daemon.endpoint, client_id, key, None, tally, mix, rng.getrandbits(32), stop)
        for client_id, key in keys.items()
    ]
    print(
        f"soak: {args.seconds} s, {args.clients} clients looping infers (max_tokens 4-64), "
        f"--parallel {args.parallel}, seed {args.seed}",
        flush=True,
    )
    print(
        f"{'elapsed':>7} {'infers':>7} {'tok/s':>6}  RSS MiB "
        + " ".join(f"{n[:8]:>8}" for n in names)
        + "  fds "
        + " ".join(f"{n[:8]:>8}" for n in names),
        flush=True,
    )
    samples: list[tuple[float, dict[str, Usage]]] = []
    started = time.monotonic()
    for client in clients:
        client.start()
    next_print, next_sample = args.interval, 0.0
    last_tokens, last_time = 0, 0.0
    try:
        while not tally.failures:
            elapsed = time.monotonic() - started
            try:
                now = usage(processes)
            except psutil.Error as exc:
                tally.fail(f"an actor is gone: {exc}")
                break
            samples.append((elapsed, now))
            if elapsed >= next_print or elapsed >= args.seconds:
                with tally.lock:
                    infers, tokens = tally.infers, tally.tokens
                rate = (tokens - last_tokens) / max(1e-9, elapsed - last_time)
                last_tokens, last_time = tokens, elapsed
                print(
                    f"{elapsed:>6.0f}s {infers:>7} {rate:>6.1f}          "
                    + " ".join(f"{now[n].rss / MIB:>8.1f}" for n in names)
                    + "      "
                    + " ".join(f"{now[n].fds:>8}" for n in names),
                    flush=True,
                )
                next_print += args.interval
            if elapsed >= args.seconds:
                break
            next_sample += args.sample  # an absolute schedule: lines come every interval
            wake = min(next_sample, args.seconds)
            stop.wait(max(0.0, wake - (time.monotonic() - started)))
    finally:
        stop.set()
        for client in clients:
            client.join()
    wall = time.monotonic() - started
    after_pids = pids(actor_processes(daemon))
    crashed = {n: (p, after_pids.get(n)) for n, p in first_pids.items() if after_pids.get(n) != p}

    print()
    print(f"infers      {tally.infers} in {wall:.0f} s; outcomes {dict(tally.outcomes)}")
    print(f"tokens      {tally.tokens} ({tally.tokens / wall:.1f} tokens/s received)")
    print(f"errors      {dict(tally.errors.most_common()) or 'none'} (refusals, retried)")
    print(f"crashes     {crashed or 'none (every actor kept its pid)'}")
    print()
    lines, stable = stability(samples)
    print("\n".join(lines))
    for failure in tally.failures[:20]:
        print(f"FAILED: {failure}")
    failed = bool(tally.failures or crashed)
    print()
    print(
        "soak "
        + ("FAILED" if failed else "passed")
        + ("; RSS and fds stable" if stable else "; RSS or fds GREW (see the table)")
    )
    return 1 if failed or not stable else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("SOAK_SECONDS", "600")),
        help="how long (default: $SOAK_SECONDS, else 600)",
    )
    parser.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--parallel", type=int, default=4, help="daemon --parallel (default 4)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between lines")
    parser.add_argument("--sample", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.getrandbits(32)
    return run_daemon(args.parallel, lambda daemon: soak(daemon, args))


if __name__ == "__main__":
    sys.exit(main())
