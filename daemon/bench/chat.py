"""Multi-turn chat: 16 conversations of 4 turns at once, through the daemon and llama-server."""

from __future__ import annotations

import http.client
import statistics
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .daemonstreams import DaemonStream, DaemonUnderTest, pump
from .llamaserver import LlamaServerUnderTest, post_completion
from .measurement import StreamTiming, arrived, medians, percentile

CONVERSATIONS = 16
TURNS = 4
REPLY_TOKENS = 32
SLOTS = (4, 16)
# llama-server's host memory for slot states (`--cache-ram`), as the daemon's --session-cache-mb
# default for the sessions it evicts from their slots.
HOST_CACHE_MB = 1024
CHAT_FIELDS = ("generated_tps", "ttft_p50_ms", "ttft_p90_ms", "seconds")

# A visitor's questions, about 30 tokens each; conversation c asks them from c on, in turn.
QUESTIONS = (
    "We arrive by the evening ferry on Friday with two small children and a dog. Which "
    "hotels near the harbour would take all of us?",
    "Is the fish market on the quay open on Saturday mornings, and what time should we come "
    "to find the freshest catch of the day?",
    "My grandmother walks slowly with a stick. Is there a short and flat path along the "
    "coast where she can still see the lighthouse?",
    "Which museum in the old town would you choose for a rainy afternoon with a curious "
    "ten year old who loves boats and maps?",
    "How long does the walk from the station to the old lighthouse take, and is there "
    "somewhere to buy water and food along the way?",
    "Could you suggest a quiet café near the market where we can sit outside, eat something "
    "simple and watch the boats come in at noon?",
    "Are there boat trips around the bay in late autumn, and do they still run when the "
    "wind is strong and the sea is a little rough?",
    "We would like to rent bicycles for a whole day. Where can we find them, and which road "
    "out of town is the safest for beginners?",
)


def user_turn(run: int, conversation: int, turn: int) -> str:
    """The user's text of one turn; the first names the run and the conversation, so that no
    conversation ever starts like one the systems saw before."""
    question = QUESTIONS[(conversation + turn) % len(QUESTIONS)]
    if turn == 0:
        return f"Hello, this is visitor {conversation + 1} of group {run + 1}. {question}"
    return question


@dataclass
class ChatResult:
    """One configuration's run: every turn's first-token time and the generation rate."""

    system: str
    slots: int
    generated_tps: float  # every turn's REPLY_TOKENS / (the last end - the first send)
    ttft_p50_ms: float
    ttft_p90_ms: float
    seconds: float
    ttfts_ms: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)  # the daemon's, per turn

    @classmethod
    def from_turns(
        cls, system: str, slots: int, turns: Sequence[StreamTiming], prompt_tokens: list[int]
    ) -> ChatResult:
        errors = [t.error for t in turns if t.error]
        if errors:
            raise RuntimeError(f"a chat turn failed: {errors[0]}")
        for timing in turns:
            if timing.first is None or timing.last is None:
                raise RuntimeError("a chat turn did not finish")
            if timing.tokens != REPLY_TOKENS:
                raise RuntimeError(f"a chat turn generated {timing.tokens} tokens")
        wall = max(arrived(t.last) for t in turns) - min(t.sent for t in turns)
        ttfts = sorted((arrived(t.first) - t.sent) * 1000 for t in turns)
        return cls(
            system=system,
            slots=slots,
            generated_tps=len(turns) * REPLY_TOKENS / wall,
            ttft_p50_ms=statistics.median(ttfts),
            ttft_p90_ms=percentile(ttfts, 0.9),
            seconds=wall,
            ttfts_ms=ttfts,
            prompt_tokens=prompt_tokens,
        )


def chat_daemon(daemon: DaemonUnderTest, slots: int, run: int) -> ChatResult:
    """Every conversation a session on its own connection; each turn sends only the new user
    message (`messages`), the next turn as soon as the previous one ends."""
    streams = daemon.open_sessions(CONVERSATIONS)
    params = {"temp": 0, "max_tokens": REPLY_TOKENS, "ignore_eos": True}
    turns_done = dict.fromkeys(range(CONVERSATIONS), 0)
    number = {id(stream): index for index, stream in enumerate(streams)}
    timings: list[StreamTiming] = []
    prompt_tokens: list[int] = []

    def send_turn(stream: DaemonStream) -> None:
        index = number[id(stream)]
        content = user_turn(run, index, turns_done[index])
        stream.send_infer({"messages": [{"role": "user", "content": content}]}, params)

    def turn_ended(stream: DaemonStream) -> None:
        index = number[id(stream)]
        timings.append(stream.timing)
        prompt_tokens.append(int(stream.stats.get("prompt_tokens", 0)))
        turns_done[index] += 1
        if turns_done[index] < TURNS:
            send_turn(stream)

    try:
        for stream in streams:
            send_turn(stream)
        pump(streams, lambda: len(timings) == CONVERSATIONS * TURNS, on_end=turn_ended)
    finally:
        for stream in streams:
            stream.close()
    return ChatResult.from_turns("daemon", slots, timings, prompt_tokens)


def _converse(
    port: int,
    render: Callable[[list[dict[str, str]], list[dict[str, str]]], str],
    run: int,
    index: int,
    timings: list[StreamTiming],
    start: threading.Barrier,
) -> None:
    """One conversation with llama-server: every turn posts the whole conversation so far, as
    the text the daemon's session holds (`render`: the daemon's chat rendering), with
    `cache_prompt`."""
    history: list[dict[str, str]] = []
    prompt = ""
    try:
        for turn in range(TURNS):
            # llama-server closes the connection after a streamed reply: one connection a turn,
            # opened before the clock starts.
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            conn.connect()
            if turn == 0:
                start.wait()
            user = {"role": "user", "content": user_turn(run, index, turn)}
            prompt += render(history, [user])
            body = {
                "prompt": prompt,
                "n_predict": REPLY_TOKENS,
                "temperature": 0,
                "repeat_penalty": 1.0,
                "ignore_eos": True,
                "cache_prompt": True,
                "stream": True,
            }
            timing = StreamTiming()
            timings.append(timing)
            try:
                reply = post_completion(conn, body, timing)
            finally:
                conn.close()
            prompt += reply
            history += [user, {"role": "assistant", "content": reply}]
    except Exception as exc:  # reported with the results
        timings.append(StreamTiming(error=repr(exc)))


def chat_llama_server(
    binary: str, model: str, slots: int, threads: int, ctx: int, run: int
) -> ChatResult:
    """llama-server with the daemon's slots, threads, KV cells and host cache for evicted slots;
    every conversation a thread of its own with its own connection."""
    from ...actors.engine.chat import ChatRenderer

    render = ChatRenderer(None, "", "").render  # the default model has no template: Gemma's
    server = LlamaServerUnderTest(
        binary, model, slots, threads, ctx, extra=["--cache-ram", str(HOST_CACHE_MB)]
    )
    try:
        timings: list[list[StreamTiming]] = [[] for _ in range(CONVERSATIONS)]
        start = threading.Barrier(CONVERSATIONS)
        workers = [
            threading.Thread(
                target=_converse, args=(server.port, render, run, i, timings[i], start)
            )
            for i in range(CONVERSATIONS)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        server.stop()
    every = [timing for conversation in timings for timing in conversation]
    return ChatResult.from_turns("llama_server", slots, every, [])


def measure_chat(
    model: str, threads: int, ctx: int, runs: int, llama_server: str | None
) -> dict[str, Any]:
    """The chat scenario on the daemon with 4 and with 16 slots (and on llama-server alike),
    interleaved in an order rotating from run to run; medians of the runs."""
    systems = ["daemon", "llama_server"] if llama_server else ["daemon"]
    configurations = [(system, slots) for slots in SLOTS for system in systems]
    daemons: dict[int, DaemonUnderTest] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for slots in SLOTS:
            daemons[slots] = DaemonUnderTest(model, slots, threads, ctx)
        for run in range(runs):
            shift = run % len(configurations)
            for system, slots in configurations[shift:] + configurations[:shift]:
                if llama_server and system == "llama_server":
                    result = chat_llama_server(llama_server, model, slots, threads, ctx, run)
                else:
                    result = chat_daemon(daemons[slots], slots, run)
                results.setdefault(f"{system}/{slots}", []).append(asdict(result))
                print(
                    f"chat run {run + 1}/{runs} {system} {slots} slots: "
                    f"{result.generated_tps:.1f} tok/s, first token p50 "
                    f"{result.ttft_p50_ms:.0f} ms, p90 {result.ttft_p90_ms:.0f} ms",
                    file=sys.stderr,
                )
    finally:
        for daemon in daemons.values():
            daemon.stop()
    daemon_prompts = [
        tokens
        for key, got in results.items()
        if key.startswith("daemon/")
        for result in got
        for tokens in result["prompt_tokens"]
    ]
    return {
        "conversations": CONVERSATIONS,
        "turns": TURNS,
        "reply_tokens": REPLY_TOKENS,
        "daemon_prompt_tokens_per_turn": statistics.mean(daemon_prompts),
        "median": [
            {"system": system, "slots": slots, **medians(results[f"{system}/{slots}"], CHAT_FIELDS)}
            for system, slots in configurations
        ],
        "runs": results,
    }
