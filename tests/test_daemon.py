"""Every op and error code of the protocol against the real daemon and the real model."""

from __future__ import annotations

import re
import time
from typing import Any

import msgpack
import pytest
import zmq

from inferencecenter.daemon.testing import (
    Daemon,
    RawClient,
    new_session,
    run_infer,
)
from inferencecenter.protocol import wire

from .doc_examples import doc_example, run_example

GREEDY = {"temp": 0, "max_tokens": 24}


# ---- before auth -------------------------------------------------------------------------


def test_ping_answers_before_auth_with_server_time(raw: RawClient) -> None:
    before = time.time()
    reply = raw.request({"op": "ping", "id": 41})
    assert reply["op"] == "pong" and reply["id"] == 41
    assert isinstance(reply["time"], float) and abs(reply["time"] - before) < 60


@pytest.mark.parametrize("op", ["create_session", "list_sessions", "stats"])
def test_ops_before_auth_are_unauthenticated(raw: RawClient, op: str) -> None:
    reply = raw.request({"op": op, "id": "x1"})
    assert (reply["op"], reply["code"], reply["id"]) == ("error", "unauthenticated", "x1")


def test_session_ops_before_auth_are_unauthenticated(raw: RawClient) -> None:
    for op in ("infer", "abort", "close_session"):
        body: dict[str, Any] = {"op": op, "id": op, "session_id": "s-nothing"}
        if op == "infer":
            body["prompt"] = "hi"
        reply = raw.request(body)
        assert reply["code"] == "unauthenticated", reply


def test_an_op_before_auth_is_unauthenticated_before_its_fields_are_checked(
    raw: RawClient,
) -> None:
    reply = raw.request({"op": "infer", "id": 7})  # no session_id, no prompt
    assert (reply["code"], reply["id"]) == ("unauthenticated", 7), reply


def test_an_op_that_is_no_name_before_auth_is_bad_request(raw: RawClient) -> None:
    for op in (["infer"], {"a": 1}, 3, None):
        reply = raw.request({"op": op, "id": 8})
        assert (reply["code"], reply["id"]) == ("bad_request", 8), reply


def test_requests_sent_right_behind_auth_wait_for_it(raw: RawClient, daemon: Daemon) -> None:
    """A client need not wait for `auth_success`: requests are served in the order sent."""
    raw.send({"op": "auth", "id": 1, "client_id": "alice", "api_key": daemon.api_key})
    raw.send({"op": "create_session", "id": 2})
    raw.send({"op": "list_sessions", "id": 3})
    replies = [raw.recv() for _ in range(3)]
    assert [(r["op"], r["id"]) for r in replies] == [
        ("auth_success", 1),
        ("session_created", 2),
        ("session_list", 3),
    ], replies
    assert [s["session_id"] for s in replies[2]["sessions"]] == [replies[1]["session_id"]]


def test_requests_behind_a_failed_auth_are_unauthenticated(raw: RawClient) -> None:
    raw.send({"op": "auth", "id": 1, "client_id": "alice", "api_key": "wrong-key-0123456789"})
    raw.send({"op": "create_session", "id": 2})
    replies = [raw.recv() for _ in range(2)]
    assert [(r["op"], r["id"]) for r in replies] == [("auth_failed", 1), ("error", 2)]
    assert replies[1]["code"] == "unauthenticated"
    assert raw.request({"op": "stats", "id": 3})["code"] == "unauthenticated"


def test_auth_success_describes_client_and_server(raw: RawClient, daemon: Daemon) -> None:
    reply = raw.request({"op": "auth", "id": 1, "client_id": "alice", "api_key": daemon.api_key})
    assert reply["op"] == "auth_success" and reply["id"] == 1
    assert (reply["client_id"], reply["max_sessions"], reply["priority"]) == ("alice", 6, "high")
    server = reply["server"]
    assert server["name"] == "inferencecenter" and server["protocol"] == 1.1
    assert server["models"] and all(isinstance(m, str) for m in server["models"])
    assert isinstance(server["version"], str)


def test_wrong_key_is_auth_failed_and_never_echoes_the_key(raw: RawClient, daemon: Daemon) -> None:
    secret = "guess-" + daemon.api_key[::-1]
    reply = raw.request({"op": "auth", "id": 2, "client_id": "alice", "api_key": secret})
    assert reply["op"] == "auth_failed" and reply["id"] == 2
    assert isinstance(reply["reason"], str) and secret not in repr(reply)
    assert raw.request({"op": "stats"})["code"] == "unauthenticated"
    assert secret not in daemon.log() and daemon.api_key not in daemon.log()


def test_unknown_client_is_auth_failed(raw: RawClient) -> None:
    reply = raw.request({"op": "auth", "client_id": "mallory", "api_key": "x" * 20})
    assert reply["op"] == "auth_failed"


def test_reauth_as_another_client_keeps_sessions_with_their_creator(daemon: Daemon) -> None:
    client = RawClient(daemon.endpoint)
    try:
        client.auth("alice", daemon.api_key)
        session_id = new_session(client)
        client.auth("bob", daemon.other_api_key)
        reply = client.request({"op": "abort", "session_id": session_id})
        assert reply["code"] == "forbidden"
        assert client.request({"op": "list_sessions"})["sessions"] == []
        client.auth("alice", daemon.api_key)
        assert (
            client.request({"op": "close_session", "session_id": session_id})["op"]
            == "session_closed"
        )
    finally:
        client.close()


# ---- malformed input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [
        [b"ICP1"],
        [b"ICP1", wire.pack({"op": "ping"}), b"extra"],
        [b"XXXX", wire.pack({"op": "ping"})],
        [b"ICP1", b"\xc1\xc1"],
        [b"ICP1", msgpack.packb(["op", "ping"])],
        [b"ICP1", msgpack.packb("ping")],
        [b"ICP1", b""],
    ],
)
def test_malformed_frames_get_bad_request_and_the_daemon_goes_on(
    raw: RawClient, frames: list[bytes]
) -> None:
    raw.send_frames(frames)
    reply = raw.recv()
    assert (reply["op"], reply["code"]) == ("error", "bad_request")
    assert isinstance(reply["message"], str) and reply["message"]
    assert raw.request({"op": "ping", "id": "after"})["op"] == "pong"


def test_body_over_the_limit_is_too_large(authed: RawClient) -> None:
    authed.send({"op": "infer", "id": 9, "session_id": "s", "prompt": "x" * (1 << 20)})
    reply = authed.recv()
    assert (reply["op"], reply["code"]) == ("error", "too_large")
    assert authed.request({"op": "ping"})["op"] == "pong"


@pytest.mark.parametrize(
    ("body", "echo"),
    [
        ({"op": "launch_missiles", "id": 3}, 3),
        ({"id": 4}, 4),
        ({"op": "ping", "id": True}, None),
        ({"op": "ping", "id": "y" * 65}, None),
        ({"op": "create_session", "id": 5, "model": 7}, 5),
    ],
)
def test_bad_bodies_are_bad_request(authed: RawClient, body: dict[str, Any], echo: Any) -> None:
    reply = authed.request(body)
    assert (reply["op"], reply["code"]) == ("error", "bad_request")
    assert reply.get("id") == echo


def test_junk_from_one_client_does_not_disturb_another_stream(
    daemon: Daemon, authed: RawClient
) -> None:
    session_id = new_session(authed)
    authed.send(
        {
            "op": "infer",
            "id": "s",
            "session_id": session_id,
            "prompt": "Once upon a time",
            "params": {"temp": 0, "max_tokens": 48},
        }
    )
    attacker = RawClient(daemon.endpoint)
    try:
        for frames in ([b"\x00" * 100], [b"ICP1", b"\xff" * 1000], [b"ICP1"] * 5):
            attacker.send_frames(frames)
            assert attacker.recv()["code"] == "bad_request"
    finally:
        attacker.close()
    _tokens, end = authed.stream("s")
    assert end["finish_reason"] == "length" and end["stats"]["tokens"] == 48


# ---- sessions -------------------------------------------------------------------------------


def test_create_session_gives_unguessable_id_model_and_ctx(authed: RawClient) -> None:
    first = authed.request({"op": "create_session", "id": 1})
    second = authed.request({"op": "create_session", "id": 2, "system_prompt": "You are terse."})
    assert first["session_id"] != second["session_id"] and len(first["session_id"]) >= 20
    assert first["ctx_size"] == 1024 and isinstance(first["model"], str)
    for reply in (first, second):
        authed.request({"op": "close_session", "session_id": reply["session_id"]})


def test_unknown_model_is_not_found(authed: RawClient) -> None:
    for model in ("llama-70b", ""):  # an empty name is no model, not the default
        reply = authed.request({"op": "create_session", "model": model})
        assert reply["code"] == "not_found", reply


def test_named_model_is_accepted(authed: RawClient) -> None:
    model = authed.auth("alice", authed_key(authed))["server"]["models"][0]
    reply = authed.request({"op": "create_session", "model": model})
    assert reply["op"] == "session_created" and reply["model"] == model
    authed.request({"op": "close_session", "session_id": reply["session_id"]})


def authed_key(client: RawClient) -> str:
    return client.key  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(autouse=True)
def _remember_key(request: pytest.FixtureRequest, daemon: Daemon) -> None:
    if "authed" in request.fixturenames:
        request.getfixturevalue("authed").key = daemon.api_key


def test_max_sessions_is_limit_reached(daemon: Daemon) -> None:
    client = RawClient(daemon.endpoint)
    try:
        client.auth("carol", daemon.extra["carol_key"])
        ids = [new_session(client), new_session(client)]
        reply = client.request({"op": "create_session", "id": "third"})
        assert (reply["code"], reply["id"]) == ("limit_reached", "third")
        client.request({"op": "close_session", "session_id": ids[0]})
        ids[0] = new_session(client)
        for session_id in ids:
            client.request({"op": "close_session", "session_id": session_id})
    finally:
        client.close()


def test_other_clients_session_is_forbidden(daemon: Daemon, authed: RawClient) -> None:
    session_id = new_session(authed)
    bob = RawClient(daemon.endpoint)
    try:
        bob.auth("bob", daemon.other_api_key)
        for body in (
            {"op": "infer", "session_id": session_id, "prompt": "steal"},
            {"op": "abort", "session_id": session_id},
            {"op": "close_session", "session_id": session_id},
        ):
            reply = bob.request(body)
            assert reply["code"] == "forbidden", (body, reply)
        assert session_id not in {
            s["session_id"] for s in bob.request({"op": "list_sessions"})["sessions"]
        }
    finally:
        bob.close()
    assert (
        authed.request({"op": "close_session", "session_id": session_id})["op"] == "session_closed"
    )


def test_unknown_session_is_not_found(authed: RawClient) -> None:
    for body in (
        {"op": "infer", "session_id": "s-nope", "prompt": "x"},
        {"op": "abort", "session_id": "s-nope"},
        {"op": "close_session", "session_id": "s-nope"},
    ):
        assert authed.request(body)["code"] == "not_found"


def test_list_sessions_shows_own_sessions_with_state_and_tokens(authed: RawClient) -> None:
    session_id = new_session(authed)
    run_infer(authed, session_id, prompt="Hello there", params=GREEDY)
    listed = authed.request({"op": "list_sessions", "id": "l"})
    assert listed["op"] == "session_list" and listed["id"] == "l"
    mine = [s for s in listed["sessions"] if s["session_id"] == session_id]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["state"] == "idle" and entry["tokens"] > 24 and isinstance(entry["created"], float)
    assert isinstance(entry["model"], str)
    authed.send(
        {
            "op": "infer",
            "id": "g",
            "session_id": session_id,
            "prompt": " more",
            "params": {"max_tokens": 400, "ignore_eos": True},
        }
    )
    first = authed.recv()
    assert first["op"] == "token"
    states = {
        s["session_id"]: s["state"] for s in authed.request({"op": "list_sessions"})["sessions"]
    }
    assert states[session_id] == "generating"
    authed.request({"op": "close_session", "session_id": session_id})


def test_close_session_aborts_its_generation_first(authed: RawClient) -> None:
    session_id = new_session(authed)
    authed.send(
        {
            "op": "infer",
            "id": "long",
            "session_id": session_id,
            "prompt": "Tell me a story",
            "params": {"max_tokens": 500, "ignore_eos": True},
        }
    )
    assert authed.recv()["op"] == "token"
    authed.send({"op": "close_session", "id": "close", "session_id": session_id})
    seen: list[tuple[Any, str]] = []
    while not seen or seen[-1][0] != "close":
        reply = authed.recv()
        seen.append((reply.get("id"), reply["op"]))
        if reply["op"] == "end":
            assert reply["finish_reason"] == "aborted"
    ops = [op for _, op in seen if op != "token"]
    assert ops == ["end", "session_closed"]
    assert authed.request({"op": "abort", "session_id": session_id})["code"] == "not_found"


# ---- inference ------------------------------------------------------------------------------


def test_infer_streams_tokens_then_end_with_stats(authed: RawClient) -> None:
    session_id = new_session(authed)
    text, end = run_infer(
        authed, session_id, request_id=77, prompt="The capital of France is", params=GREEDY
    )
    assert text.strip()
    assert end["id"] == 77 and end["session_id"] == session_id and end["finish_reason"] == "length"
    stats = end["stats"]
    assert set(stats) >= {"prompt_tokens", "cached_tokens", "tokens", "ttft_ms", "total_ms", "tps"}
    assert stats["tokens"] == 24 and stats["cached_tokens"] == 0 and stats["prompt_tokens"] >= 5
    assert 0 < stats["ttft_ms"] <= stats["total_ms"] and stats["tps"] > 0


def test_context_persists_and_is_reused(authed: RawClient) -> None:
    session_id = new_session(authed)
    _, first = run_infer(authed, session_id, prompt="One, two, three,", params=GREEDY)
    _, second = run_infer(authed, session_id, prompt=" seven, eight,", params=GREEDY)
    held = first["stats"]["prompt_tokens"] + first["stats"]["tokens"]
    # Everything from the first turn is reused; the last sampled token is evaluated now.
    assert second["stats"]["cached_tokens"] == held - 1
    assert second["stats"]["prompt_tokens"] <= 6
    _, third = run_infer(authed, session_id, prompt="Again", reset=True, params=GREEDY)
    assert third["stats"]["cached_tokens"] == 0


def test_greedy_output_is_reproducible_across_sessions(authed: RawClient) -> None:
    outputs = []
    for _ in range(2):
        session_id = new_session(authed)
        text, _ = run_infer(
            authed, session_id, prompt="The three primary colors are", params=GREEDY
        )
        outputs.append(text)
        authed.request({"op": "close_session", "session_id": session_id})
    assert outputs[0] == outputs[1] and outputs[0]


def test_seeded_sampling_is_reproducible(authed: RawClient) -> None:
    params = {"temp": 1.0, "seed": 1234, "max_tokens": 24}
    texts = [
        run_infer(authed, new_session(authed), prompt="Once upon a time", params=params)[0]
        for _ in range(2)
    ]
    assert texts[0] == texts[1]


def test_stop_string_ends_generation_and_is_not_sent(authed: RawClient) -> None:
    session_id = new_session(authed)
    reference, _ = run_infer(
        authed, session_id, prompt="The capital of France is", params={"temp": 0, "max_tokens": 40}
    )
    words = reference.split()
    assert len(words) >= 4
    stop = words[3]
    session_id = new_session(authed)
    text, end = run_infer(
        authed,
        session_id,
        prompt="The capital of France is",
        params={"temp": 0, "max_tokens": 40, "stop": [stop]},
    )
    assert end["finish_reason"] == "stop"
    assert stop not in text and reference.startswith(text)


def test_max_tokens_is_length(authed: RawClient) -> None:
    _, end = run_infer(
        authed,
        new_session(authed),
        prompt="Count: 1 2 3",
        params={"max_tokens": 3, "ignore_eos": True},
    )
    assert (end["finish_reason"], end["stats"]["tokens"]) == ("length", 3)


def test_bad_params_are_bad_request_and_change_nothing(authed: RawClient) -> None:
    session_id = new_session(authed)
    for params in ({"temp": -1}, {"top_p": 0}, {"bogus": 1}, {"stop": [""]}, {"max_tokens": 0}):
        reply = authed.request(
            {"op": "infer", "id": "b", "session_id": session_id, "prompt": "x", "params": params}
        )
        assert (reply["code"], reply["id"]) == ("bad_request", "b"), params
    listed = authed.request({"op": "list_sessions"})["sessions"]
    assert [s["tokens"] for s in listed if s["session_id"] == session_id] == [0]


def test_prompt_and_messages_together_is_bad_request(authed: RawClient) -> None:
    reply = authed.request(
        {
            "op": "infer",
            "session_id": new_session(authed),
            "prompt": "a",
            "messages": [{"role": "user", "content": "b"}],
        }
    )
    assert reply["code"] == "bad_request"


def test_infer_while_generating_is_busy(authed: RawClient) -> None:
    session_id = new_session(authed)
    authed.send(
        {
            "op": "infer",
            "id": "a",
            "session_id": session_id,
            "prompt": "Go",
            "params": {"max_tokens": 300, "ignore_eos": True},
        }
    )
    authed.send({"op": "infer", "id": "b", "session_id": session_id, "prompt": "Again"})
    while True:
        reply = authed.recv()
        if reply.get("id") == "b":
            assert (reply["op"], reply["code"]) == ("error", "busy")
            break
    authed.request({"op": "abort", "session_id": session_id})
    _, end = authed.stream("a")
    assert end["finish_reason"] == "aborted"


def test_abort_ends_generation_within_half_a_second(authed: RawClient) -> None:
    session_id = new_session(authed)
    authed.send(
        {
            "op": "infer",
            "id": "run",
            "session_id": session_id,
            "prompt": "Write a long essay",
            "params": {"max_tokens": 1000, "ignore_eos": True},
        }
    )
    assert authed.recv()["op"] == "token"
    sent = time.monotonic()
    authed.send({"op": "abort", "id": "stop", "session_id": session_id})
    got_ack = False
    while True:
        reply = authed.recv()
        if reply.get("id") == "stop":
            assert reply == {"op": "aborted", "id": "stop", "session_id": session_id}
            got_ack = True
        elif reply["op"] == "end":
            elapsed = time.monotonic() - sent
            assert reply["finish_reason"] == "aborted"
            break
    assert elapsed < 0.5, elapsed
    assert got_ack, "`aborted` comes before the `end` it brings"
    # The session goes on after an abort.
    _text, end = run_infer(authed, session_id, prompt=" Next", params=GREEDY)
    assert end["finish_reason"] == "length"


def test_aborting_a_queued_infer_answers_aborted_then_its_end(authed: RawClient) -> None:
    """Every slot (4) generates; a fifth infer waits in the queue, and its abort ends it at
    once: `aborted` first, then its `end`."""
    sessions = [new_session(authed) for _ in range(5)]
    long_run = {"max_tokens": 1000, "ignore_eos": True}
    for index, session_id in enumerate(sessions[:4]):
        body = {"op": "infer", "id": index, "session_id": session_id, "prompt": "Go on"}
        authed.send({**body, "params": long_run})
    started: set[int] = set()
    while len(started) < 4:
        reply = authed.recv()
        assert reply["op"] == "token", reply
        started.add(reply["id"])
    queued = sessions[4]
    authed.send({"op": "infer", "id": "q", "session_id": queued, "prompt": "Hi"})
    authed.send({"op": "abort", "id": "stop", "session_id": queued})
    order = []
    while "end" not in order:
        reply = authed.recv()
        if reply.get("id") == "stop":
            order.append(reply["op"])
        elif reply.get("id") == "q":
            assert reply["op"] == "end" and reply["finish_reason"] == "aborted", reply
            order.append("end")
    assert order == ["aborted", "end"]
    for session_id in sessions[:4]:
        authed.send({"op": "abort", "session_id": session_id})
    ended = 0
    while ended < 4:
        ended += authed.recv()["op"] == "end"


def test_abort_with_nothing_running_still_answers(authed: RawClient) -> None:
    session_id = new_session(authed)
    reply = authed.request({"op": "abort", "id": 5, "session_id": session_id})
    assert reply == {"op": "aborted", "id": 5, "session_id": session_id}


def test_prompt_over_what_is_left_of_the_context_ends_with_context(authed: RawClient) -> None:
    session_id = new_session(authed)
    run_infer(authed, session_id, prompt="word " * 600, params=GREEDY)
    listed = authed.request({"op": "list_sessions"})["sessions"]
    held = [s["tokens"] for s in listed if s["session_id"] == session_id]
    text, end = run_infer(authed, session_id, prompt="word " * 600, params=GREEDY)
    assert (text, end["finish_reason"], end["stats"]["tokens"]) == ("", "context", 0)
    listed = authed.request({"op": "list_sessions"})["sessions"]
    assert [s["tokens"] for s in listed if s["session_id"] == session_id] == held


def test_generation_that_fills_the_context_ends_with_context(authed: RawClient) -> None:
    session_id = new_session(authed)
    _, end = run_infer(
        authed, session_id, prompt="word " * 990, params={"max_tokens": 200, "ignore_eos": True}
    )
    assert end["finish_reason"] == "context"
    assert end["stats"]["prompt_tokens"] + end["stats"]["tokens"] == 1024


def test_messages_use_the_chat_format_and_append(authed: RawClient) -> None:
    session_id = new_session(authed, system_prompt="You answer briefly.")
    _text, end = run_infer(
        authed,
        session_id,
        messages=[{"role": "user", "content": "Say hello."}],
        params={"temp": 0, "max_tokens": 16},
    )
    assert end["finish_reason"] in ("stop", "length")
    _, second = run_infer(
        authed,
        session_id,
        messages=[{"role": "user", "content": "Again."}],
        params={"temp": 0, "max_tokens": 16},
    )
    assert second["stats"]["cached_tokens"] > end["stats"]["prompt_tokens"]


def test_multibyte_text_arrives_whole(authed: RawClient) -> None:
    session_id = new_session(authed)
    text, _ = run_infer(
        authed, session_id, prompt="日本語の文章: 東京は", params={"temp": 0, "max_tokens": 40}
    )
    assert text and "\ufffd" not in text


def test_stats_op_has_the_metrics_inference_map(authed: RawClient) -> None:
    reply = authed.request({"op": "stats", "id": "st"})
    assert reply["op"] == "stats" and reply["id"] == "st"
    assert set(reply["inference"]) >= {
        "active_generations",
        "queued",
        "total_sessions",
        "last_tps",
        "last_ttft_ms",
        "total_tokens_generated",
        "tokens_per_second",
    }
    assert isinstance(reply["sessions"], int)


# ---- concurrency ----------------------------------------------------------------------------


def test_more_streams_than_slots_all_complete(daemon: Daemon) -> None:
    clients = [RawClient(daemon.endpoint) for _ in range(3)]
    try:
        pending = []
        for n, client in enumerate(clients):
            client.auth("bob", daemon.other_api_key)
            for k in range(2):  # 6 generations on 4 slots
                session_id = new_session(client)
                client.send(
                    {
                        "op": "infer",
                        "id": k,
                        "session_id": session_id,
                        "prompt": f"List {n + k + 3} fruits:",
                        "params": {"max_tokens": 32, "ignore_eos": True},
                    }
                )
                pending.append((client, k))
        for client, k in pending:
            tokens, end = client.stream(k)
            assert end["finish_reason"] == "length" and end["stats"]["tokens"] == 32
            assert [t["seq"] for t in tokens] == list(range(len(tokens)))
        for client in clients:
            for s in client.request({"op": "list_sessions"})["sessions"]:
                client.request({"op": "close_session", "session_id": s["session_id"]})
    finally:
        for client in clients:
            client.close()


def test_concurrent_sessions_are_isolated_and_reproducible(daemon: Daemon) -> None:
    prompts = ["Paris is", "The ocean is", "Mathematics is", "My dog likes"]

    def run_round() -> list[str]:
        client = RawClient(daemon.endpoint)
        try:
            client.auth("bob", daemon.other_api_key)
            sessions = [new_session(client) for _ in prompts]
            for n, (session_id, prompt) in enumerate(zip(sessions, prompts, strict=False)):
                client.send(
                    {
                        "op": "infer",
                        "id": n,
                        "session_id": session_id,
                        "prompt": prompt,
                        "params": {"temp": 0, "max_tokens": 20, "ignore_eos": True},
                    }
                )
            texts = [
                "".join(t["content"] for t in client.stream(n)[0]) for n in range(len(prompts))
            ]
            for session_id in sessions:
                client.request({"op": "close_session", "session_id": session_id})
            return texts
        finally:
            client.close()

    first, second = run_round(), run_round()
    assert first == second
    assert len(set(first)) == len(prompts)


# ---- metrics --------------------------------------------------------------------------------


def test_metrics_stream_publishes_once_a_second(daemon: Daemon) -> None:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"metrics")
    sub.connect(daemon.metrics_endpoint)
    try:
        stamps = []
        while len(stamps) < 2:
            assert sub.poll(5000), "no metrics within 5 s"
            topic, body = sub.recv_multipart()
            assert topic == b"metrics"
            metrics = wire.unpack(body)
            stamps.append(metrics["timestamp"])
        assert 0.5 < stamps[1] - stamps[0] < 1.5
        assert metrics["gpu"] is None or {"name", "temp", "vram_total_mb", "throttling"} <= set(
            metrics["gpu"]
        )
        assert set(metrics["host"]) == {"cpu_percent", "ram_total_mb", "ram_used_mb"}
        assert set(metrics["inference"]) >= {
            "active_generations",
            "queued",
            "total_sessions",
            "last_tps",
            "last_ttft_ms",
            "total_tokens_generated",
            "tokens_per_second",
        }
    finally:
        sub.close()


def test_the_minimal_client_of_docs_protocol_runs_as_written(daemon: Daemon) -> None:
    """docs/protocol.md's one-file client (pyzmq and msgpack only), run as it says to run it."""
    code = doc_example("docs/protocol.md", "## A minimal client in Python")
    args = (daemon.endpoint, daemon.client_id, daemon.api_key, "The capital of France is")
    printed = run_example(code, *args)
    assert re.search(r"\n\[(length, 32|stop, \d+) tokens\]\n$", printed), printed
