"""Session state with one owner per fact, against the real daemon: an infer goes gateway →
engine with no other hop, the --state-dir journal grows by each turn, a restarted daemon goes
on with a session's context, and idle sessions expire but generating ones do not."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from inferencecenter.daemon.testing import (
    Daemon,
    RawClient,
    actor_process,
    new_session,
    run_infer,
    start_daemon,
    stop_daemon,
)

GREEDY = {"temp": 0, "max_tokens": 16, "ignore_eos": True}
CHAT = {"temp": 0, "max_tokens": 16}


@contextmanager
def running(tmp: Path, *extra: str) -> Iterator[tuple[Daemon, RawClient]]:
    """A daemon and a client authenticated as alice; the daemon must stop cleanly after."""
    daemon = start_daemon(tmp, *extra)
    client = RawClient(daemon.endpoint)
    try:
        client.auth(daemon.client_id, daemon.api_key)
        yield daemon, client
    finally:
        client.close()
        assert stop_daemon(daemon.process) == 0, daemon.log()


def listed_sessions(client: RawClient) -> list[dict[str, Any]]:
    reply = client.request({"op": "list_sessions"})
    assert reply["op"] == "session_list", reply
    return list(reply["sessions"])


def wait_for_growth(path: Path, size: int, deadline_s: float = 10.0) -> int:
    """The file's size once it is past `size` (the engine's append reaches the sessions actor
    on its own, after the client's `end`)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        now = path.stat().st_size
        if now > size:
            return now
        time.sleep(0.01)  # a poll interval, not a guess at how long it takes
    raise AssertionError(f"{path.name} did not grow past {size} bytes")


def test_infer_and_abort_need_no_sessions_actor(tmp_path: Path) -> None:
    """The gateway knows who owns a session it created: with the sessions actor frozen, an
    infer still streams to its end and an abort is answered."""
    journal = tmp_path / "state" / "sessions.journal"
    with running(tmp_path, "--state-dir", str(tmp_path / "state")) as (daemon, client):
        session_id = new_session(client)
        sessions = actor_process(daemon, "sessions")
        frozen_size = journal.stat().st_size
        sessions.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            text, end = run_infer(client, session_id, prompt="Once upon a time", params=GREEDY)
            assert end["finish_reason"] == "length" and text
            assert end["stats"]["tokens"] == GREEDY["max_tokens"]
            aborted = client.request({"op": "abort", "session_id": session_id})
            assert aborted["op"] == "aborted", aborted
            assert time.monotonic() - started < 20.0  # a request to sessions would wait 30 s
            assert journal.stat().st_size == frozen_size
        finally:
            sessions.send_signal(signal.SIGCONT)
        # The turn the engine pushed meanwhile is recorded once the sessions actor runs again.
        wait_for_growth(journal, frozen_size)


def test_the_journal_grows_by_each_turn_not_the_whole_conversation(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = state / "sessions.journal"
    with running(tmp_path, "--state-dir", str(state)) as (_, client):
        session_id = new_session(client, system_prompt="You are a storyteller.")
        size = journal.stat().st_size
        held = 0
        growth: list[tuple[int, int]] = []  # (bytes written, tokens the turn added at most)
        for turn in range(8):
            params = {**GREEDY, "max_tokens": 32}
            _, end = run_infer(client, session_id, prompt=f" Part {turn}:", params=params)
            added = end["stats"]["prompt_tokens"] + end["stats"]["tokens"]
            held += added
            grown = wait_for_growth(journal, size)
            growth.append((grown - size, added))
            size = grown
        for written, added in growth:
            assert written <= 4 * added + 200  # int32 ids and a record's few fields
        assert growth[-1][0] < 4 * held / 3  # far less than the conversation's int32 ids


def chat_turn(client: RawClient, session_id: str, content: str) -> tuple[str, dict[str, Any]]:
    messages = [{"role": "user", "content": content}]
    return run_infer(client, session_id, messages=messages, params=CHAT)


TURNS = ["Name a colour.", "Name a fruit of that colour.", "Now name an animal."]
SYSTEM = "Answer in a few words."


def test_a_restarted_daemon_goes_on_with_the_session_and_its_chat(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with running(tmp_path, "--state-dir", str(state)) as (_, client):
        session_id = new_session(client, system_prompt=SYSTEM)
        for content in TURNS[:2]:
            chat_turn(client, session_id, content)
        held = listed_sessions(client)[0]["tokens"]
    with running(tmp_path, "--state-dir", str(state)) as (_, client):
        listed = listed_sessions(client)
        assert [(s["session_id"], s["tokens"]) for s in listed] == [(session_id, held)]
        text, end = chat_turn(client, session_id, TURNS[2])
        assert end["stats"]["cached_tokens"] == 0 and end["stats"]["prompt_tokens"] > held
        # A session that had the whole conversation in this daemon answers the same.
        reference_id = new_session(client, system_prompt=SYSTEM)
        for content in TURNS:
            reference_text, _ = chat_turn(client, reference_id, content)
        assert text == reference_text
        tokens = {s["session_id"]: s["tokens"] for s in listed_sessions(client)}
        assert tokens[session_id] == tokens[reference_id]
        _, again = chat_turn(client, session_id, "Thanks.")
        assert again["stats"]["cached_tokens"] >= tokens[session_id] - 1


def test_an_idle_session_expires_but_a_generating_one_does_not(tmp_path: Path) -> None:
    with running(tmp_path, "--session-idle-timeout", "2") as (daemon, client):
        generating = new_session(client)
        idle = new_session(client)
        client.send(
            {
                "op": "infer",
                "id": "long",
                "session_id": generating,
                "prompt": "Count:",
                "params": {"temp": 0, "max_tokens": 900, "ignore_eos": True},
            }
        )
        assert client.recv_for("long")["op"] == "token"
        watcher = RawClient(daemon.endpoint)
        try:
            watcher.auth(daemon.client_id, daemon.api_key)
            deadline = time.monotonic() + 15.0
            listed = {generating, idle}
            while idle in listed and time.monotonic() < deadline:
                listed = {s["session_id"] for s in listed_sessions(watcher)}
        finally:
            watcher.close()
        assert listed == {generating}
        # The long generation was still running when the idle session went; it runs to its end.
        assert not [r for r in client.waiting() if r.get("op") in ("end", "error")]
        _, end = client.stream("long")
        assert end["op"] == "end" and end["finish_reason"] == "length", end
        assert generating in {s["session_id"] for s in listed_sessions(client)}
        for op in ("infer", "abort"):
            request = {"op": op, "session_id": idle, "prompt": "Hi", "params": {"max_tokens": 1}}
            if op == "abort":
                del request["prompt"], request["params"]
            reply = client.request(request)
            assert (reply["op"], reply.get("code")) == ("error", "not_found"), reply
        expired = [line for line in daemon.log().splitlines() if "session expired" in line]
        assert len(expired) == 1 and idle in expired[0], expired
