"""The HTTP actor's OpenAI API against the real daemon: the official `openai` package (sync and
async, streaming and not), curl for SSE and /health, errors with their statuses, and a client
that goes away. Greedy replies are compared with the ZeroMQ path's for the same input."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import trio

from inferencecenter.daemon.testing import (
    Daemon,
    RawClient,
    actor_process,
    authenticated,
    new_session,
    run_infer,
    start_daemon,
    stop_daemon,
)

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def http_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("http")
    daemon = start_daemon(tmp, "--batch-padding", "off", http=True)
    yield daemon
    code = stop_daemon(daemon.process)
    assert code == 0, daemon.log()


@pytest.fixture(scope="module")
def model(http_daemon: Daemon) -> str:
    return openai_client(http_daemon).models.list().data[0].id


@pytest.fixture
def raw(http_daemon: Daemon) -> Iterator[RawClient]:
    with authenticated(http_daemon.endpoint, http_daemon.client_id, http_daemon.api_key) as client:
        yield client


def openai_client(daemon: Daemon, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{daemon.http_url}/v1", api_key=key or daemon.api_key, max_retries=0
    )


def async_client(daemon: Daemon) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{daemon.http_url}/v1", api_key=daemon.api_key, max_retries=0
    )


def zeromq_reply(
    raw: RawClient, params: dict[str, Any], **infer: Any
) -> tuple[str, dict[str, Any]]:
    """The same generation over ZeroMQ, in a new session (`system_prompt` goes to the session)."""
    system_prompt = infer.pop("system_prompt", None)
    fields = {"system_prompt": system_prompt} if system_prompt else {}
    session_id = new_session(raw, **fields)
    try:
        return run_infer(raw, session_id, params=params, **infer)
    finally:
        raw.request({"op": "close_session", "session_id": session_id})


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-s", "--max-time", "60", *args], capture_output=True, text=True, check=False
    )


def active_generations(raw: RawClient) -> int:
    return int(raw.request({"op": "stats"})["inference"]["active_generations"])


def wait_until(predicate: Any, deadline_s: float, what: str) -> float:
    """Seconds until `predicate()` held (polled every 10 ms), or fail after `deadline_s`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > deadline_s:
            pytest.fail(f"{what} not within {deadline_s} s")
        time.sleep(0.01)
    return time.monotonic() - start


# ---- the actor and /health ----------------------------------------------------------------


def test_http_actor_runs_and_health_says_ok(http_daemon: Daemon) -> None:
    http = actor_process(http_daemon, "http")
    assert "inferencecenter-http" in " ".join(http.cmdline())
    result = curl("-i", f"{http_daemon.http_url}/health")
    assert result.stdout.startswith("HTTP/1.1 200"), result.stdout
    assert json.loads(result.stdout.split("\n\n", 1)[1]) == {"status": "ok"}


def test_models_lists_the_served_model(http_daemon: Daemon, model: str) -> None:
    models = openai_client(http_daemon).models.list().data
    assert [m.id for m in models] == [model] and models[0].owned_by == "inferencecenter"
    assert model == "gemma-3-270m-q4_k_m"


# ---- completions and chat ---------------------------------------------------------------


def test_completion_is_the_zeromq_reply_with_usage(
    http_daemon: Daemon, model: str, raw: RawClient
) -> None:
    prompt = "The capital of France is"
    reply = openai_client(http_daemon).completions.create(
        model=model, prompt=prompt, max_tokens=8, **GREEDY
    )
    expected, end = zeromq_reply(raw, {"temp": 0, "max_tokens": 8}, prompt=prompt)
    choice = reply.choices[0]
    assert choice.text == expected and choice.finish_reason == "length"
    assert reply.object == "text_completion" and reply.model == model
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == end["stats"]["prompt_tokens"] > 0
    assert reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8


def test_completion_streams_with_usage_async(http_daemon: Daemon, model: str) -> None:
    sync = openai_client(http_daemon).completions.create(
        model=model, prompt="Once upon a time", max_tokens=6, **GREEDY
    )

    async def stream() -> tuple[str, Any, list[Any]]:
        client = async_client(http_daemon)
        chunks = [
            chunk
            async for chunk in await client.completions.create(
                model=model,
                prompt="Once upon a time",
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
        ]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return text, chunks[-1].usage, chunks

    text, usage, chunks = trio.run(stream)
    assert text == sync.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert usage.completion_tokens == 6 and usage.prompt_tokens == sync.usage.prompt_tokens


def test_chat_is_the_zeromq_chat_reply_and_reuses_the_system_prompt(
    http_daemon: Daemon, model: str, raw: RawClient
) -> None:
    system, user = "You answer in one word.", "Name a fruit."
    messages: Any = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    client = openai_client(http_daemon)
    first = client.chat.completions.create(
        model=model, messages=messages, max_completion_tokens=8, **GREEDY
    )
    expected, _ = zeromq_reply(
        raw,
        {"temp": 0, "max_tokens": 8},
        system_prompt=system,
        messages=[{"role": "user", "content": user}],
    )
    assert first.choices[0].message.content == expected
    assert first.choices[0].message.role == "assistant" and first.object == "chat.completion"
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=8, **GREEDY)
    assert again.choices[0].message.content == expected
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    # The system prompt's KV is shared between sessions: the second request reuses it.
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.usage.prompt_tokens == first.usage.prompt_tokens  # type: ignore[union-attr]


def test_chat_streams_deltas_and_usage_async(http_daemon: Daemon, model: str) -> None:
    messages: Any = [{"role": "user", "content": "Say hello."}]
    whole = openai_client(http_daemon).chat.completions.create(
        model=model, messages=messages, max_tokens=6, **GREEDY
    )

    async def stream() -> list[Any]:
        client = async_client(http_daemon)
        return [
            chunk
            async for chunk in await client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
        ]

    chunks = trio.run(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_streams_with_the_sync_client(http_daemon: Daemon, model: str) -> None:
    chunks = list(
        openai_client(http_daemon).chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Count to three."}],
            max_tokens=4,
            stream=True,
            **GREEDY,
        )
    )
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices[0].delta.content) >= 1


def test_stop_seed_and_max_tokens(http_daemon: Daemon, model: str) -> None:
    client = openai_client(http_daemon)
    prompt = "Rivers flow into the"
    full = client.completions.create(model=model, prompt=prompt, max_tokens=12, **GREEDY)
    words = full.choices[0].text.split()
    assert len(words) >= 3, full.choices[0].text
    stop = words[2]
    cut = client.completions.create(model=model, prompt=prompt, max_tokens=12, stop=stop, **GREEDY)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full.choices[0].text.split(stop)[0]
    sampled = [
        client.completions.create(
            model=model, prompt=prompt, max_tokens=10, temperature=1.0, top_p=0.9, seed=7
        ).choices[0]
        for _ in range(2)
    ]
    assert sampled[0].text == sampled[1].text
    short = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=3,
        **GREEDY,
    )
    assert short.usage is not None and short.usage.completion_tokens == 3


def test_curl_streams_server_sent_events(http_daemon: Daemon, model: str) -> None:
    body = {"model": model, "prompt": "One, two,", "max_tokens": 4, "stream": True}
    result = curl(
        "-N",
        f"{http_daemon.http_url}/v1/completions",
        "-H",
        f"Authorization: Bearer {http_daemon.api_key}",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps({**body, **GREEDY}),
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", result.stdout
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_stateless_request_leaves_no_session(http_daemon: Daemon, model: str) -> None:
    client = openai_client(http_daemon)
    client.completions.create(model=model, prompt="Hi", max_tokens=2)
    listing = RawClient(http_daemon.endpoint)
    try:
        listing.auth(http_daemon.client_id, http_daemon.api_key)
        assert listing.request({"op": "list_sessions"})["sessions"] == []
    finally:
        listing.close()


# ---- errors -------------------------------------------------------------------------------


def test_a_missing_or_wrong_key_is_401(http_daemon: Daemon, model: str) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        openai_client(http_daemon, key="not-a-key-at-all").models.list()
    assert caught.value.status_code == 401
    assert "not-a-key-at-all" not in str(caught.value)
    result = curl("-i", f"{http_daemon.http_url}/v1/models")
    assert result.stdout.startswith("HTTP/1.1 401"), result.stdout
    error = json.loads(result.stdout.split("\n\n", 1)[1])["error"]
    assert error["type"] == "authentication_error" and error["code"] == "unauthenticated"
    assert "not-a-key-at-all" not in http_daemon.log()


def test_an_unknown_model_is_404(http_daemon: Daemon) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client(http_daemon).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
    body: Any = caught.value.body
    assert body["code"] == "not_found" and body["param"] == "model"


@pytest.mark.parametrize(
    "extra",
    [
        {"n": 2},
        {"logit_bias": {"17": 5}},
        {"presence_penalty": 3},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"response_format": {"type": "regex"}},
        {"top_logprobs": 2},
        {"extra_body": {"mirostat": 2}},
        {"temperature": -1},
        {"max_tokens": 0},
    ],
)
def test_fields_that_would_change_the_output_unserved_are_400(
    http_daemon: Daemon, model: str, extra: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(http_daemon).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], **{"max_tokens": 2, **extra}
        )
    assert caught.value.status_code == 400
    body: Any = caught.value.body
    assert body["code"] == "bad_request" and body["param"]


def test_a_body_over_the_limit_is_413(http_daemon: Daemon, model: str) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        openai_client(http_daemon).completions.create(
            model=model, prompt="x" * (1 << 20), max_tokens=1
        )
    assert caught.value.status_code == 413
    body: Any = caught.value.body
    assert body["code"] == "too_large"


def test_malformed_bodies_and_unknown_routes_get_openai_errors(http_daemon: Daemon) -> None:
    auth = ["-H", f"Authorization: Bearer {http_daemon.api_key}"]
    for args, status in (
        ([f"{http_daemon.http_url}/v1/completions", "-d", "not json"], "400"),
        ([f"{http_daemon.http_url}/v1/completions", "-d", "[1]"], "400"),
        ([f"{http_daemon.http_url}/v1/nothing"], "404"),
        (["-X", "DELETE", f"{http_daemon.http_url}/v1/models"], "405"),
    ):
        result = curl("-i", *auth, *args)
        assert result.stdout.startswith(f"HTTP/1.1 {status}"), result.stdout
        assert "error" in json.loads(result.stdout.split("\n\n", 1)[1])
        if status == "405":
            allow = re.search(r"^allow: (.*)$", result.stdout, re.MULTILINE | re.IGNORECASE)
            assert allow and "GET" in allow.group(1), result.stdout


def test_all_sessions_in_use_is_429_with_retry_after(http_daemon: Daemon, model: str) -> None:
    """carol may hold two sessions: two running streams take them, a third request is 429."""
    carol = openai_client(http_daemon, key=http_daemon.extra["carol_key"])
    streams = [
        carol.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Tell a long story."}],
            max_tokens=500,
            stream=True,
        )
        for _ in range(2)
    ]
    try:
        for stream in streams:
            next(iter(stream))
        with pytest.raises(openai.RateLimitError) as caught:
            carol.completions.create(model=model, prompt="Hi", max_tokens=2)
        assert caught.value.status_code == 429
        assert int(caught.value.response.headers["retry-after"]) >= 1
        body: Any = caught.value.body
        assert body["type"] == "rate_limit_error"
    finally:
        for stream in streams:
            stream.close()


# ---- a client that goes away --------------------------------------------------------------


def _post(daemon: Daemon, body: dict[str, Any]) -> socket.socket:
    """A raw HTTP request whose reply nobody will read."""
    port = daemon.http_port
    data = json.dumps(body).encode()
    conn = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {daemon.api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    conn.sendall(head.encode() + data)
    return conn


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_has_its_generation_aborted(
    http_daemon: Daemon, model: str, raw: RawClient, stream: bool
) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 900,
        "stream": stream,
    }
    conn = _post(http_daemon, body)
    wait_until(lambda: active_generations(raw) == 1, 30.0, "the generation to start")
    if stream:
        conn.recv(1)  # it streams
    conn.close()
    seconds = wait_until(lambda: active_generations(raw) == 0, 0.5, "the abort")
    assert seconds < 0.5


# ---- responses ------------------------------------------------------------------------------


def alice_sessions(raw: RawClient) -> list[str]:
    return [s["session_id"] for s in raw.request({"op": "list_sessions"})["sessions"]]


def test_a_response_continues_its_conversation_evaluating_only_the_new_input(
    http_daemon: Daemon, model: str, raw: RawClient
) -> None:
    client = openai_client(http_daemon)
    first = client.responses.create(
        model=model,
        instructions="Answer briefly.",
        input="Name a color.",
        max_output_tokens=6,
        **GREEDY,
    )
    assert first.status == "incomplete" and first.output_text
    assert first.usage is not None and first.usage.input_tokens_details.cached_tokens == 0
    assert len(alice_sessions(raw)) == 1  # the stored conversation's session
    second = client.responses.create(
        model=model,
        previous_response_id=first.id,
        input="And another one?",
        max_output_tokens=6,
        **GREEDY,
    )
    assert second.previous_response_id == first.id and second.id != first.id
    assert second.usage is not None
    earlier = first.usage.input_tokens + first.usage.output_tokens
    # Every token of the first turn is reused but the last one sampled (not yet in the KV).
    assert second.usage.input_tokens_details.cached_tokens >= earlier - 1
    assert second.usage.input_tokens > second.usage.input_tokens_details.cached_tokens
    # The same conversation over ZeroMQ, turn by turn, answers the same.
    session_id = new_session(raw, system_prompt="Answer briefly.")
    params = {"temp": 0, "max_tokens": 6}
    turn = [{"role": "user", "content": "Name a color."}]
    assert run_infer(raw, session_id, messages=turn, params=params)[0] == first.output_text
    turn = [{"role": "user", "content": "And another one?"}]
    assert run_infer(raw, session_id, messages=turn, params=params)[0] == second.output_text


def test_only_the_latest_response_of_a_conversation_continues(
    http_daemon: Daemon, model: str, raw: RawClient
) -> None:
    client = openai_client(http_daemon)
    first = client.responses.create(model=model, input="Hello", max_output_tokens=2)
    client.responses.create(
        model=model, input="Again", previous_response_id=first.id, max_output_tokens=2
    )
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model=model, input="Once more", previous_response_id=first.id, max_output_tokens=2
        )
    body: Any = caught.value.body
    assert body["param"] == "previous_response_id"
    bob = openai_client(http_daemon, key=http_daemon.other_api_key)
    with pytest.raises(openai.NotFoundError):  # another client's response is not found
        bob.responses.create(model=model, input="Hi", previous_response_id=first.id)


def test_a_conversation_still_generating_is_409(
    http_daemon: Daemon, model: str, raw: RawClient
) -> None:
    client = openai_client(http_daemon)
    stream = client.responses.create(
        model=model, input="Tell a long story.", max_output_tokens=800, stream=True
    )
    try:
        events = iter(stream)
        created = next(events)
        assert created.type == "response.created"
        assert any(e.type == "response.output_text.delta" for e in events)  # it generates
        with pytest.raises(openai.ConflictError) as caught:
            client.responses.create(
                model=model,
                input="And then?",
                previous_response_id=created.response.id,
                max_output_tokens=2,
            )
        body: Any = caught.value.body
        assert body["code"] == "busy"
    finally:
        stream.close()


def test_store_false_keeps_nothing(http_daemon: Daemon, model: str, raw: RawClient) -> None:
    client = openai_client(http_daemon)
    reply = client.responses.create(model=model, input="Hi", max_output_tokens=2, store=False)
    assert reply.output_text is not None and reply.store is False
    assert alice_sessions(raw) == []
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=model, input="Again", previous_response_id=reply.id)
    body: Any = caught.value.body
    assert body["param"] == "previous_response_id"


def test_store_false_cannot_continue_a_stored_response(
    http_daemon: Daemon, model: str, raw: RawClient
) -> None:
    """It would add its turn to the stored conversation's session: refused, which changes
    nothing (the stored response still continues)."""
    client = openai_client(http_daemon)
    first = client.responses.create(model=model, input="Hello", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=model, input="Hi", previous_response_id=first.id, store=False)
    body: Any = caught.value.body
    assert body["param"] == "store"
    second = client.responses.create(
        model=model, input="Again", previous_response_id=first.id, max_output_tokens=2
    )
    assert second.usage is not None and second.usage.input_tokens_details.cached_tokens > 0


def test_stored_conversations_make_room_for_a_stateless_request(
    http_daemon: Daemon, model: str
) -> None:
    """carol may hold two sessions: her two stored conversations take them; a chat completion
    then closes the least recently used one instead of answering 429."""
    carol = openai_client(http_daemon, key=http_daemon.extra["carol_key"])
    older, newer = (
        carol.responses.create(model=model, input=text, max_output_tokens=2)
        for text in ("One", "Two")
    )
    reply = carol.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert reply.choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError):
        carol.responses.create(model=model, input="More", previous_response_id=older.id)
    carol.responses.create(
        model=model, input="More", previous_response_id=newer.id, max_output_tokens=2
    )


def test_a_response_streams_its_events_async(http_daemon: Daemon, model: str) -> None:
    async def stream() -> list[Any]:
        client = async_client(http_daemon)
        events = await client.responses.create(
            model=model, input="Count: one, two,", max_output_tokens=5, stream=True, **GREEDY
        )
        return [event async for event in events]

    events = trio.run(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.id == events[0].response.id and final.output_text == deltas
    assert final.usage.output_tokens == 5


def test_the_stream_helper_gets_the_final_response(http_daemon: Daemon, model: str) -> None:
    with openai_client(http_daemon).responses.stream(
        model=model,
        input="Write a line.",
        max_output_tokens=40,
        extra_body={"stop": ["\n", " "]},  # a stop string ends it: status "completed"
    ) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == deltas


# ---- loading ------------------------------------------------------------------------------


def test_health_says_loading_while_the_engine_loads_again(http_daemon: Daemon, model: str) -> None:
    """The engine is killed: the supervisor restarts it, and /health is 503 until it serves."""
    url = f"{http_daemon.http_url}/health"
    seen: list[tuple[str, str]] = []

    def status(code: str) -> bool:
        result = curl("-o", "-", "-w", " %{http_code}", url)
        body, _, got = result.stdout.rpartition(" ")
        seen.append((got, body))
        return got == code

    actor_process(http_daemon, "engine").send_signal(signal.SIGKILL)
    wait_until(lambda: status("503"), 10.0, "/health 503")
    assert json.loads(seen[-1][1]) == {"status": "loading"}
    # The engine takes seconds to come back: requests meanwhile are 503 too.
    with pytest.raises(openai.InternalServerError) as caught:
        openai_client(http_daemon).completions.create(model=model, prompt="Hi", max_tokens=1)
    assert caught.value.status_code == 503
    wait_until(lambda: status("200"), 120.0, "/health 200 after the restart")
    assert json.loads(seen[-1][1]) == {"status": "ok"}
    reply = openai_client(http_daemon).completions.create(model=model, prompt="Hi", max_tokens=2)
    assert reply.usage is not None and reply.usage.completion_tokens == 2
