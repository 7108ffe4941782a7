"""Scheduling against the real daemon: priorities, the queue bound, the session cache, shared
system prompts, hundreds of sessions. Each test runs a daemon of its own with small limits."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from inferencecenter.daemon.testing import (
    Daemon,
    RawClient,
    actor_process,
    new_session,
    reference_reply,
    run_infer,
    start_daemon,
    stop_daemon,
)

LONG = {"max_tokens": 1000, "ignore_eos": True}


def client_for(daemon: Daemon, client_id: str, key: str) -> RawClient:
    client = RawClient(daemon.endpoint)
    client.auth(client_id, key)
    return client


def roomy_client(daemon: Daemon) -> RawClient:
    """A client allowed 256 sessions, added to the running daemon's clients file (read at each
    auth)."""
    clients = daemon.clients_path
    data = json.loads(clients.read_text())
    data["clients"].append(
        {
            "client_id": "many",
            "api_key": "many-key-0123456789-abcdefghijklmnopq",
            "max_sessions": 256,
        }
    )
    clients.write_text(json.dumps(data))
    return client_for(daemon, "many", "many-key-0123456789-abcdefghijklmnopq")


def test_high_priority_gets_the_free_slot_first(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--parallel", "1")
    try:
        alice = client_for(daemon, "alice", daemon.api_key)  # high
        carol = client_for(daemon, "carol", daemon.extra["carol_key"])  # low
        blocker = new_session(alice)
        alice.send(
            {"op": "infer", "id": "blocker", "session_id": blocker, "prompt": "Go", "params": LONG}
        )
        assert alice.recv_for("blocker")["op"] == "token"
        low = new_session(carol)
        carol.send(
            {
                "op": "infer",
                "id": "low",
                "session_id": low,
                "prompt": "Low one",
                "params": {"max_tokens": 8, "ignore_eos": True},
            }
        )
        high = new_session(alice)
        alice.send(
            {
                "op": "infer",
                "id": "high",
                "session_id": high,
                "prompt": "High one",
                "params": {"max_tokens": 8, "ignore_eos": True},
            }
        )
        states = {
            s["session_id"]: s["state"] for s in carol.request({"op": "list_sessions"})["sessions"]
        }
        assert states[low] == "queued"
        alice.request({"op": "abort", "session_id": blocker})
        _, high_end = alice.stream("high")
        # The slot went to the high-priority request although the low one came first: the low
        # one had not produced a token when the high one ended.
        assert not any(r.get("id") == "low" for r in carol.backlog)
        assert not carol.sock.poll(0) or carol.recv()["op"] != "end"
        _, low_end = carol.stream("low")
        assert high_end["finish_reason"] == low_end["finish_reason"] == "length"
        assert low_end["stats"]["ttft_ms"] > high_end["stats"]["total_ms"] - 50
    finally:
        assert stop_daemon(daemon.process) == 0


def test_full_queue_is_overloaded(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--parallel", "1", "--max-queue", "1")
    try:
        client = client_for(daemon, "bob", daemon.other_api_key)
        running, waiting, refused = (new_session(client) for _ in range(3))
        client.send({"op": "infer", "id": 1, "session_id": running, "prompt": "a", "params": LONG})
        assert client.recv_for(1)["op"] == "token"
        client.send({"op": "infer", "id": 2, "session_id": waiting, "prompt": "b", "params": LONG})
        reply = client.request({"op": "infer", "id": 3, "session_id": refused, "prompt": "c"})
        assert (reply["op"], reply["code"]) == ("error", "overloaded")
        for session_id in (running, waiting):
            client.request({"op": "abort", "session_id": session_id})
        assert client.stream(1)[1]["finish_reason"] == "aborted"
        assert client.stream(2)[1]["finish_reason"] == "aborted"
        _, end = run_infer(client, refused, prompt="now it fits", params={"max_tokens": 4})
        assert end["finish_reason"] in ("length", "stop")
    finally:
        assert stop_daemon(daemon.process) == 0


def test_dropped_session_state_is_rebuilt_from_history(tmp_path: Path) -> None:
    # No host memory for evicted states: an evicted session is rebuilt from its tokens.
    daemon = start_daemon(tmp_path, "--parallel", "1", "--session-cache-mb", "0")
    try:
        client = client_for(daemon, "bob", daemon.other_api_key)
        params = {"temp": 0, "max_tokens": 12, "ignore_eos": True}
        first, other = new_session(client), new_session(client)
        _, end1 = run_infer(client, first, prompt="The tallest mountain is", params=params)
        run_infer(client, other, prompt="Something else entirely", params=params)
        _, end2 = run_infer(client, first, prompt=" and the deepest sea is", params=params)
        held = end1["stats"]["prompt_tokens"] + end1["stats"]["tokens"]
        assert end2["stats"]["cached_tokens"] == 0
        assert end2["stats"]["prompt_tokens"] > held
        assert end2["finish_reason"] == "length"
        listed = client.request({"op": "list_sessions"})["sessions"]
        tokens = {s["session_id"]: s["tokens"] for s in listed}
        assert tokens[first] == end2["stats"]["prompt_tokens"] + end2["stats"]["tokens"]
    finally:
        assert stop_daemon(daemon.process) == 0


def test_sessions_with_the_same_system_prompt_share_its_kv(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--parallel", "2")
    try:
        client = client_for(daemon, "bob", daemon.other_api_key)
        system = "You are a helpful assistant who knows geography. " * 20
        first = new_session(client, system_prompt=system)
        _, end1 = run_infer(
            client, first, prompt="Q: capital of Peru? A:", params={"max_tokens": 4}
        )
        second = new_session(client, system_prompt=system)
        _, end2 = run_infer(
            client, second, prompt="Q: capital of Chile? A:", params={"max_tokens": 4}
        )
        assert end1["stats"]["cached_tokens"] == 0
        shared = end2["stats"]["cached_tokens"]
        assert shared >= 150 and end2["stats"]["prompt_tokens"] < 20
        assert shared + end2["stats"]["prompt_tokens"] >= end1["stats"]["prompt_tokens"]
        # Chat turns share it too.
        chats = [new_session(client, system_prompt=system) for _ in range(2)]
        ends = [
            run_infer(
                client, s, messages=[{"role": "user", "content": q}], params={"max_tokens": 4}
            )[1]
            for s, q in zip(chats, ["Hi", "Hello"], strict=True)
        ]
        assert ends[1]["stats"]["cached_tokens"] >= 150
    finally:
        assert stop_daemon(daemon.process) == 0


def test_padding_rows_leave_an_idle_session_intact(tmp_path: Path) -> None:
    """Five streams on eight slots are decoded as eight rows: throw-away tokens in two free
    slots and in the idle session's slot, after its KV, removed after each step. That session
    then goes on from its kept KV exactly as a session never padded."""
    daemon = start_daemon(tmp_path, "--parallel", "8", "--batch-padding", "on")
    try:
        client = client_for(daemon, "bob", daemon.other_api_key)
        params = {"temp": 0, "max_tokens": 12, "ignore_eos": True}
        idle = new_session(client)
        run_infer(client, idle, prompt="Alice has a red bicycle.", params=params)
        busy = [new_session(client) for _ in range(5)]
        for index, session_id in enumerate(busy):
            client.send(
                {
                    "op": "infer",
                    "id": f"busy{index}",
                    "session_id": session_id,
                    "prompt": f"Tell me about rain, part {index}.",
                    "params": {"max_tokens": 32, "ignore_eos": True},
                }
            )
        for index in range(5):
            assert client.stream(f"busy{index}")[1]["finish_reason"] == "length"
        assert client.request({"op": "stats"})["inference"]["padded_steps"] > 0
        resumed, end = run_infer(client, idle, prompt=" Her bicycle is", params=params)
        assert end["stats"]["cached_tokens"] > 12  # its KV stayed in the slot
        for session_id in busy:
            client.request({"op": "close_session", "session_id": session_id})
        prompts = ["Alice has a red bicycle.", " Her bicycle is"]
        assert resumed == reference_reply(client, prompts, params)
    finally:
        assert stop_daemon(daemon.process) == 0


def test_padding_under_churn_keeps_every_session_intact(tmp_path: Path) -> None:
    """Rounds of 5 to 7 concurrent infers over 10 sessions on 8 slots (padding into idle and
    free slots, evictions, an abort, a session closed and another created each round). After
    it all, no step failed and every session still has its whole KV: its next infer evaluates
    only the new text (a stray padding token would make llama.cpp refuse the next decode)."""
    daemon = start_daemon(tmp_path, "--parallel", "8", "--batch-padding", "on", "--ctx-size", "512")
    rng = random.Random(7)
    try:
        client = roomy_client(daemon)
        sessions = [new_session(client) for _ in range(10)]
        for round_index in range(6):
            chosen = rng.sample(sessions, rng.randint(5, 7))
            for index, session_id in enumerate(chosen):
                client.send(
                    {
                        "op": "infer",
                        "id": f"r{round_index}-{index}",
                        "session_id": session_id,
                        "prompt": f" Round {round_index}, voice {index}:",
                        "params": {"max_tokens": rng.randint(6, 20), "ignore_eos": True},
                    }
                )
            victim = rng.randrange(len(chosen))
            assert client.recv_for(f"r{round_index}-{victim}")["op"] == "token"
            client.request({"op": "abort", "session_id": chosen[victim]})
            for index in range(len(chosen)):
                _, end = client.stream(f"r{round_index}-{index}")
                assert end["op"] == "end", end
                assert end["finish_reason"] in ("length", "aborted"), end
            gone = sessions.pop(rng.randrange(len(sessions)))
            client.request({"op": "close_session", "session_id": gone})
            sessions.append(new_session(client))
        assert client.request({"op": "stats"})["inference"]["padded_steps"] > 0
        held = {
            s["session_id"]: s["tokens"]
            for s in client.request({"op": "list_sessions"})["sessions"]
        }
        for session_id in sessions:
            _, end = run_infer(client, session_id, prompt=" And then", params={"max_tokens": 2})
            assert end["finish_reason"] == "length", end
            if held[session_id]:
                assert end["stats"]["cached_tokens"] >= held[session_id] - 1, (held, end)
        assert "decode failed" not in daemon.log()
    finally:
        assert stop_daemon(daemon.process) == 0


def test_long_prompt_is_prefilled_between_the_streams_steps(tmp_path: Path) -> None:
    """A 1,500-token prompt arriving while three streams generate is prefilled in chunks that
    alternate with the streams' steps: every stream keeps producing tokens meanwhile. (One
    connection for all, so the replies' order is the order the daemon sent them in.)"""
    daemon = start_daemon(
        tmp_path, "--parallel", "4", "--prefill-chunk", "64", "--ctx-size", "2048"
    )
    try:
        client = client_for(daemon, "bob", daemon.other_api_key)
        streams = [new_session(client) for _ in range(3)]
        long_session = new_session(client)
        for index, session_id in enumerate(streams):
            client.send(
                {
                    "op": "infer",
                    "id": f"s{index}",
                    "session_id": session_id,
                    "prompt": f"Story {index}:",
                    "params": LONG,
                }
            )
        for index in range(3):
            assert client.recv_for(f"s{index}")["op"] == "token"
        prompt = "The harbour wakes slowly and the boats come back. " * 140
        client.send(
            {
                "op": "infer",
                "id": "long",
                "session_id": long_session,
                "prompt": prompt,
                "params": {"max_tokens": 1},
            }
        )
        during = {f"s{index}": 0 for index in range(3)}
        while True:
            reply = client.recv()
            if reply.get("id") == "long" and reply["op"] in ("end", "error"):
                break
            if reply.get("id") in during and reply["op"] == "token":
                during[reply["id"]] += 1
        assert reply["op"] == "end" and reply["stats"]["prompt_tokens"] > 1400, reply
        # 64-token chunks: over 20 prompt steps, each followed by one of the streams.
        assert min(during.values()) >= 15, during
        for session_id in streams:
            client.request({"op": "abort", "session_id": session_id})
    finally:
        assert stop_daemon(daemon.process) == 0


def test_two_hundred_sessions_with_bounded_memory(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--parallel", "4", "--session-cache-mb", "16")
    try:
        client = roomy_client(daemon)
        engine = actor_process(daemon, "engine")
        baseline = engine.memory_info().rss
        sessions: list[str] = []
        ends: list[dict[str, Any]] = []
        for first in range(0, 200, 8):  # eight at a time: four run, four wait for a slot
            for index in range(first, first + 8):
                sessions.append(new_session(client))
                prompt = f"Session {index} remembers the number {index * 7}."
                request = {"op": "infer", "id": index, "session_id": sessions[-1]}
                client.send({**request, "prompt": prompt, "params": {"max_tokens": 8}})
            ends.extend(client.stream(index)[1] for index in range(first, first + 8))
        grown = engine.memory_info().rss - baseline
        assert all(end["finish_reason"] in ("length", "stop") for end in ends)
        assert len(client.request({"op": "list_sessions"})["sessions"]) == 200
        # 200 evicted states would take ~100 MB; the cache holds 16 MB of them.
        assert grown < 64 * 2**20, grown
        _, end = run_infer(client, sessions[0], prompt=" again", params={"max_tokens": 4})
        assert end["stats"]["cached_tokens"] == 0  # its state was dropped: rebuilt from history
        _, end = run_infer(client, sessions[-1], prompt=" again", params={"max_tokens": 4})
        assert end["stats"]["cached_tokens"] > 0  # still in a slot
    finally:
        assert stop_daemon(daemon.process) == 0
