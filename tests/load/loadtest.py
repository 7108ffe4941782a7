"""Load test: a real daemon, many clients at once, with aborts, disconnects and session closes.

    make loadtest                       # 64 clients x 20 infers, --parallel 8
    make loadtest ARGS="--clients 16 --infers 5"
    .venv/bin/python -m tests.load.loadtest --help

Each client is a thread with its own DEALER socket and its own client_id (added to the daemon's
clients file, which the daemon re-reads). It opens a session and runs its infers one after the
other (max_tokens 8-32, temp 0.8). Some infers are aborted after their first token, some are
abandoned mid-stream by closing the socket (the client reconnects with a new socket and
authenticates again; the session goes on), and some have their session closed mid-stream (the
client opens a new one).

Checks: every stream the client reads to its end has `seq` 0, 1, 2, … without a gap and ends
with `end` (`aborted` where the client aborted or closed, else stop/length/context); a close's
`end` comes before its `session_closed`; the only refusals are `busy` right after a disconnect
(the abandoned generation is still being aborted) and `overloaded` (both retried); no actor
crashed (same pids at the end). Prints totals, errors by code, and the RSS and open file
descriptors of every actor before the load, at its peak and after (growth over 20 % flagged).
Exit status 1 when a check failed.

Not part of `make test`: pytest does not collect this file (no `test_` prefix).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from inferencecenter.daemon.testing import (
    Daemon,
    RawClient,
    actor_processes,
    start_daemon,
    stop_daemon,
)
from inferencecenter.protocol import clientsfile
from inferencecenter.protocol.clientsfile import ClientEntry

REPLY_DEADLINE_S = 120.0  # a queued infer may wait behind every other client's
RETRY_DEADLINE_S = 60.0
RSS_GROWTH_FLAG = 0.20
MIB = 1 << 20
PRIORITIES = ("high", "normal", "low")
PROMPTS = (
    "The river flows",
    "Once upon a time",
    "The capital of France is",
    "List three colours:",
    "def fibonacci(n):",
    "In the morning, the baker",
    "Water boils at",
    "A short poem about the sea:",
    "The meeting was postponed because",
    "Dear customer,",
)


# ---- the daemon's processes ----------------------------------------------------------------


@dataclass
class Usage:
    rss: int
    fds: int


def usage(processes: dict[str, psutil.Process]) -> dict[str, Usage]:
    return {
        name: Usage(process.memory_info().rss, process.num_fds())
        for name, process in processes.items()
    }


def pids(processes: dict[str, psutil.Process]) -> dict[str, int]:
    return {name: process.pid for name, process in processes.items()}


def add_clients(daemon: Daemon, count: int, max_sessions: int) -> dict[str, str]:
    """Add `count` clients to the daemon's clients file (re-read by the daemon at the next
    auth); returns their keys by client_id."""
    entries = clientsfile.load(daemon.clients_path)
    added = [
        ClientEntry(
            client_id=f"load-{index:03d}",
            api_key=f"load-key-{index:03d}-{random.getrandbits(64):016x}",
            max_sessions=max_sessions,
            priority=PRIORITIES[index % len(PRIORITIES)],
            description="load test",
        )
        for index in range(count)
    ]
    clientsfile.save(daemon.clients_path, entries + added)
    return {entry.client_id: entry.api_key for entry in added}


# ---- one client ----------------------------------------------------------------------------


class CheckFailed(Exception):
    """A broken promise of the protocol (not a refusal it allows)."""


@dataclass
class Tally:
    """Totals shared by every client thread (under `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter[str] = field(default_factory=Counter)
    finish: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    infers: int = 0
    failures: list[str] = field(default_factory=list)

    def add(self, outcome: str, tokens: int, finish: str | None = None) -> None:
        with self.lock:
            self.infers += 1
            self.outcomes[outcome] += 1
            self.tokens += tokens
            if finish is not None:
                self.finish[finish] += 1

    def error(self, code: str) -> None:
        with self.lock:
            self.errors[code] += 1

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)


@dataclass
class Mix:
    """How often an infer is aborted, abandoned by a disconnect, or has its session closed."""

    abort: float = 0.10
    disconnect: float = 0.05
    close: float = 0.05
    min_tokens: int = 8
    max_tokens: int = 32

    def scenario(self, rng: random.Random) -> str:
        draw = rng.random()
        for name, rate in (("abort", self.abort), ("disconnect", self.disconnect)):
            if draw < rate:
                return name
            draw -= rate
        return "close" if draw < self.close else "normal"


class LoadClient(threading.Thread):
    """One client: its own socket(s), client_id and session; runs `infers` infers, or until
    `stop` is set when `infers` is None."""

    def __init__(
        self,
        endpoint: str,
        client_id: str,
        api_key: str,
        infers: int | None,
        tally: Tally,
        mix: Mix,
        seed: int,
        stop: threading.Event | None = None,
    ) -> None:
        super().__init__(name=client_id, daemon=True)
        self.endpoint = endpoint
        self.client_id = client_id
        self.api_key = api_key
        self.infers = infers
        self.tally = tally
        self.mix = mix
        self.rng = random.Random(seed)
        self.stop = stop or threading.Event()
        self.client: RawClient | None = None
        self.session_id = ""
        self.serial = 0
        self.reset_next = False
        self.just_disconnected = False

    # -- plumbing --

    def next_id(self, what: str) -> str:
        self.serial += 1
        return f"{what}-{self.serial}"

    def connect(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = RawClient(self.endpoint)
        reply = self.request({"op": "auth", "client_id": self.client_id, "api_key": self.api_key})
        if reply["op"] != "auth_success":
            raise CheckFailed(f"auth: {reply}")

    def send(self, body: dict[str, Any]) -> None:
        assert self.client is not None
        self.client.send(body)

    def recv(self) -> dict[str, Any]:
        assert self.client is not None
        try:
            return self.client.recv(int(REPLY_DEADLINE_S * 1000))
        except TimeoutError:
            raise CheckFailed(
                f"no reply within {REPLY_DEADLINE_S} s; engine: {self.figures()}"
            ) from None
        except AssertionError as exc:  # malformed frames
            raise CheckFailed(str(exc)) from None

    def figures(self) -> str:
        """The engine's figures (`stats`), to tell a stall from a slow machine."""
        assert self.client is not None
        request_id = self.next_id("stats")
        self.client.send({"op": "stats", "id": request_id})
        try:
            reply = self.client.recv_for(request_id, timeout_ms=10_000)
        except TimeoutError:
            return "no answer to stats either"
        inference = reply.get("inference", {})
        keys = ("active_generations", "queued", "tokens_per_second")
        return ", ".join(f"{key} {inference.get(key)}" for key in keys)

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        """A request while nothing else is in flight on this socket."""
        request_id = self.next_id(str(body["op"]))
        self.send({**body, "id": request_id})
        reply = self.recv()
        if reply.get("id") != request_id:
            raise CheckFailed(f"reply to another request: {reply}")
        return reply

    def new_session(self) -> None:
        reply = self.request({"op": "create_session"})
        if reply["op"] != "session_created":
            raise CheckFailed(f"create_session: {reply}")
        self.session_id = reply["session_id"]
        self.reset_next = False

    # -- the run --

    def run(self) -> None:
        try:
            self.connect()
            self.new_session()
            done = 0
            while not self.stop.is_set() and (self.infers is None or done < self.infers):
                self.one_infer()
                done += 1
            self.request({"op": "close_session", "session_id": self.session_id})
        except CheckFailed as exc:
            self.tally.fail(f"{self.client_id}: {exc}")
        except Exception as exc:  # a bug of the load test itself, or the daemon went away
            self.tally.fail(f"{self.client_id}: {type(exc).__name__}: {exc}")
        finally:
            if self.client is not None:
                self.client.close()

    def one_infer(self) -> None:
        scenario = self.mix.scenario(self.rng)
        infer_id = self.next_id("infer")
        body: dict[str, Any] = {
            "op": "infer",
            "id": infer_id,
            "session_id": self.session_id,
            "prompt": " " + self.rng.choice(PROMPTS),
            "params": {
                "max_tokens": self.rng.randint(self.mix.min_tokens, self.mix.max_tokens),
                "temp": 0.8,
            },
        }
        if self.reset_next:
            body["reset"] = True
            self.reset_next = False
        deadline = time.monotonic() + RETRY_DEADLINE_S
        attempt = 0
        while True:
            self.send(body)
            refused = self.read_stream(infer_id, scenario)
            if refused is None:
                return
            attempt += 1
            if time.monotonic() > deadline:
                raise CheckFailed(f"infer still {refused} after {RETRY_DEADLINE_S} s")
            time.sleep(min(0.5, 0.02 * attempt))  # a real client's backoff

    def read_stream(self, infer_id: str, scenario: str) -> str | None:
        """Read one infer's replies; returns the error code of a refusal to retry, else None."""
        seq = 0
        extra: dict[str, str] = {}  # request id -> the reply op due (abort, close_session)
        end: dict[str, Any] | None = None
        disconnect_after = self.rng.randint(1, 3)
        while end is None or extra:
            reply = self.recv()
            reply_id, op = reply.get("id"), reply.get("op")
            if reply_id in extra:
                if op != extra.pop(reply_id):
                    raise CheckFailed(f"{scenario}: unexpected {reply}")
                if op == "session_closed" and end is None:
                    raise CheckFailed("session_closed came before the end of its generation")
                continue
            if reply_id != infer_id:
                raise CheckFailed(f"a reply to no request: {reply}")
            if op == "error":
                return self.refused(reply)
            if op == "token":
                if end is not None:
                    raise CheckFailed("a token after the end")
                if reply.get("seq") != seq:
                    raise CheckFailed(f"seq {reply.get('seq')} where {seq} was due")
                seq += 1
                if seq == 1 and scenario == "abort":
                    request_id = self.next_id("abort")
                    extra[request_id] = "aborted"
                    self.send({"op": "abort", "id": request_id, "session_id": self.session_id})
                elif seq == 1 and scenario == "close":
                    request_id = self.next_id("close")
                    extra[request_id] = "session_closed"
                    body = {"op": "close_session", "id": request_id, "session_id": self.session_id}
                    self.send(body)
                elif seq == disconnect_after and scenario == "disconnect":
                    self.connect()  # drop the socket mid-stream; a new one authenticates
                    self.just_disconnected = True
                    self.tally.add("disconnected", seq)
                    return None
            elif op == "end":
                end = reply
            else:
                raise CheckFailed(f"unexpected reply in a stream: {reply}")
        self.just_disconnected = False
        self.finished(end, seq, scenario)
        return None

    def refused(self, reply: dict[str, Any]) -> str | None:
        code = str(reply.get("code"))
        self.tally.error(code)
        if code == "overloaded" or (code == "busy" and self.just_disconnected):
            return code
        raise CheckFailed(f"infer refused: {reply}")

    def finished(self, end: dict[str, Any], tokens: int, scenario: str) -> None:
        reason = end.get("finish_reason")
        stats = end.get("stats") or {}
        if reason == "error" or reason not in ("stop", "length", "context", "aborted"):
            raise CheckFailed(f"{scenario}: generation ended with {end}")
        if reason == "aborted" and scenario not in ("abort", "close"):
            raise CheckFailed(f"{scenario}: aborted though nobody aborted it: {end}")
        if tokens > int(stats.get("tokens", 0)):
            raise CheckFailed(f"{tokens} tokens streamed, stats say {stats.get('tokens')}")
        if reason == "context":
            self.reset_next = True
        self.tally.add(scenario if scenario != "normal" else "complete", tokens, str(reason))
        if scenario == "close":
            self.new_session()


# ---- reporting -----------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples every actor's RSS and fds in the background, for the peaks."""

    def __init__(self, processes: dict[str, psutil.Process], interval: float = 1.0) -> None:
        super().__init__(name="sampler", daemon=True)
        self.processes = processes
        self.interval = interval
        self.stop = threading.Event()
        self.samples: list[tuple[float, dict[str, Usage]]] = []
        self.started = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append((time.monotonic() - self.started, usage(self.processes)))
            except psutil.Error:
                pass  # an actor died: the pid check reports it
            self.stop.wait(self.interval)

    def peak(self) -> dict[str, Usage]:
        names = self.processes
        return {
            name: Usage(
                max((s[name].rss for _, s in self.samples), default=0),
                max((s[name].fds for _, s in self.samples), default=0),
            )
            for name in names
        }


def usage_table(
    before: dict[str, Usage], peak: dict[str, Usage], afters: list[dict[str, Usage]]
) -> tuple[str, list[str]]:
    """The RSS/fds table (one "after" column per round), and the actors whose RSS grew by more
    than RSS_GROWTH_FLAG from before the load to after its last round."""
    rounds = len(afters)
    labels = ["after"] if rounds == 1 else [f"after r{i + 1}" for i in range(rounds)]
    header = f"{'actor':<10} {'RSS before':>11} {'peak':>9}"
    header += "".join(f" {label:>9}" for label in labels) + f" {'growth':>8}"
    if rounds > 1:
        header += f" {'r1->r' + str(rounds):>8}"
    header += f"   {'fds before':>10} {'peak':>5} {'after':>5}"
    lines = [header]
    flagged = []
    for name in before:
        last = afters[-1][name]
        growth = last.rss / before[name].rss - 1
        line = f"{name:<10} {before[name].rss / MIB:>7.1f} MiB {peak[name].rss / MIB:>5.1f} MiB"
        line += "".join(f" {after[name].rss / MIB:>5.1f} MiB" for after in afters)
        line += f" {growth:>+8.1%}"
        if rounds > 1:
            line += f" {last.rss / afters[0][name].rss - 1:>+8.1%}"
        line += f"   {before[name].fds:>10} {peak[name].fds:>5} {last.fds:>5}"
        if growth > RSS_GROWTH_FLAG:
            line += "  <-- over 20 %"
            flagged.append(name)
        lines.append(line)
    return "\n".join(lines), flagged


def warm_up(endpoint: str, client_id: str, api_key: str) -> None:
    """One small infer, so that the model's pages are resident before the first measurement."""
    tally = Tally()
    client = LoadClient(endpoint, client_id, api_key, 1, tally, Mix(0, 0, 0, 8, 8), seed=0)
    client.run()
    if tally.failures:
        raise RuntimeError(f"warm-up failed: {tally.failures}")


def run_daemon(parallel: int, body: Callable[[Daemon], int]) -> int:
    """Start a daemon in a temporary directory, run `body`, always stop the daemon. When
    something failed, the daemon's log is kept (its path is printed)."""
    with tempfile.TemporaryDirectory(prefix="ic-load-") as tmp:
        print(f"starting the daemon (--parallel {parallel}) ...", flush=True)
        daemon = start_daemon(Path(tmp), "--parallel", str(parallel))
        status = 1
        try:
            status = body(daemon)
        finally:
            code = stop_daemon(daemon.process)
            if code != 0:
                print(f"the daemon exited with {code}", file=sys.stderr)
                status = 1
            if status != 0:
                kept = Path(tempfile.gettempdir()) / f"ic-load-daemon-{daemon.process.pid}.log"
                kept.write_text(daemon.log())
                print(f"the daemon's log: {kept}", file=sys.stderr)
        return status


# ---- main ----------------------------------------------------------------------------------


def load(daemon: Daemon, args: argparse.Namespace) -> int:
    keys = add_clients(daemon, args.clients, max_sessions=2)
    warm_up(daemon.endpoint, "load-000", keys["load-000"])
    processes = actor_processes(daemon)
    first_pids = pids(processes)
    before = usage(processes)
    sampler = Sampler(processes)
    sampler.start()
    tally = Tally()
    rng = random.Random(args.seed)
    mix = Mix(args.abort_rate, args.disconnect_rate, args.close_rate)
    afters: list[dict[str, Usage]] = []
    wall = 0.0
    for round_index in range(args.rounds):
        clients = [
            LoadClient(
                daemon.endpoint, client_id, key, args.infers, tally, mix, rng.getrandbits(32)
            )
            for client_id, key in keys.items()
        ]
        print(
            f"round {round_index + 1} of {args.rounds}: {args.clients} clients x {args.infers} "
            f"infers (max_tokens 8-32, temp 0.8), seed {args.seed} ...",
            flush=True,
        )
        started = time.monotonic()
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        wall += time.monotonic() - started
        afters.append(usage(processes))
        if tally.failures:
            break
    sampler.stop.set()
    sampler.join()
    after_pids = pids(actor_processes(daemon))
    crashed = {n: (p, after_pids.get(n)) for n, p in first_pids.items() if after_pids.get(n) != p}
    expected = args.clients * args.infers * args.rounds

    print()
    print(f"infers      {tally.infers} of {expected}")
    print(f"outcomes    {dict(tally.outcomes.most_common())}")
    print(f"finish      {dict(tally.finish.most_common())}")
    print(f"tokens      {tally.tokens}")
    print(f"wall time   {wall:.1f} s ({tally.tokens / wall:.1f} tokens/s received)")
    print(f"errors      {dict(tally.errors.most_common()) or 'none'} (refusals, retried)")
    print(f"crashes     {crashed or 'none (every actor kept its pid)'}")
    print()
    table, flagged = usage_table(before, sampler.peak(), afters)
    print(table)
    print()
    failed = bool(tally.failures or crashed or tally.infers != expected)
    for failure in tally.failures[:20]:
        print(f"FAILED: {failure}")
    if flagged:
        print(f"RSS grew by more than {RSS_GROWTH_FLAG:.0%}: {', '.join(flagged)}")
    print("load test " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="client threads (default 64)")
    parser.add_argument("--infers", type=int, default=20, help="infers per client (default 20)")
    parser.add_argument("--parallel", type=int, default=8, help="daemon --parallel (default 8)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the whole load again on the same daemon"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--abort-rate", type=float, default=0.10)
    parser.add_argument("--disconnect-rate", type=float, default=0.05)
    parser.add_argument("--close-rate", type=float, default=0.05)
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.getrandbits(32)
    return run_daemon(args.parallel, lambda daemon: load(daemon, args))


if __name__ == "__main__":
    sys.exit(main())
