"""Constrained output, log-probabilities and penalties over HTTP, with the official `openai`
package against the real daemon: `response_format` json_schema output validates against its
schema every time at temperature 0.8 (jsonschema), json_object output parses, the Responses
API's `text.format` alike, logprobs in OpenAI's shapes, and schemas that cannot be enforced
are 400."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pydantic
import pytest
import trio

from inferencecenter.daemon.testing import Daemon, start_daemon, stop_daemon

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "sunny": {"type": "boolean"},
        "rank": {"type": "integer"},
        "season": {"enum": ["spring", "summer", "autumn", "winter"]},
    },
    "required": ["city", "sunny", "rank", "season"],
    "additionalProperties": False,
}
WEATHER = [{"role": "user", "content": "Describe the weather of a city you like, as JSON."}]
# Enough for the schema's longest output (16 characters, a 16-digit rank), not much more.
SCHEMA_MAX_TOKENS = 80


@pytest.fixture(scope="module")
def http_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("grammar"), http=True)
    yield daemon
    code = stop_daemon(daemon.process)
    assert code == 0, daemon.log()


@pytest.fixture(scope="module")
def client(http_daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{http_daemon.http_url}/v1", api_key=http_daemon.api_key, max_retries=0
    )


def json_schema_format(schema: Any) -> Any:
    return {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}


# ---- response_format ----------------------------------------------------------------------


def test_json_schema_output_validates_in_20_of_20_tries_at_temperature_0_8(
    client: openai.OpenAI,
) -> None:
    def one(_: int) -> tuple[str, str | None]:
        reply = client.chat.completions.create(
            model="gemma-3-270m-q4_k_m",
            messages=WEATHER,  # type: ignore[arg-type]
            response_format=json_schema_format(SCHEMA),
            temperature=0.8,
            max_tokens=SCHEMA_MAX_TOKENS,
        )
        choice = reply.choices[0]
        return choice.message.content or "", choice.finish_reason

    with ThreadPoolExecutor(4) as pool:  # the daemon's four slots
        replies = list(pool.map(one, range(20)))
    for text, reason in replies:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in replies}) > 1  # sampled, not one greedy answer


def test_json_object_output_parses_and_the_grammar_ends_it(http_daemon: Daemon) -> None:
    """Unconstrained, the small model goes on after the object (with the next question); the
    grammar allows nothing after it but the end."""
    ask: Any = {
        "model": "gemma-3-270m-q4_k_m",
        "messages": [
            {"role": "user", "content": "The colour red as a JSON object."},
            {"role": "assistant", "content": '{"colour": "red"}'},
            {"role": "user", "content": "The colour blue as a JSON object."},
        ],
        "response_format": {"type": "json_object"},
        "temperature": 0,
        "max_tokens": 60,
    }

    async def streamed() -> str:
        async with openai.AsyncOpenAI(
            base_url=f"{http_daemon.http_url}/v1", api_key=http_daemon.api_key, max_retries=0
        ) as client:
            chunks = await client.chat.completions.create(**ask, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in chunks])

    sync = openai.OpenAI(
        base_url=f"{http_daemon.http_url}/v1", api_key=http_daemon.api_key, max_retries=0
    )
    whole = sync.chat.completions.create(**ask).choices[0]
    assert whole.finish_reason == "stop"
    assert isinstance(json.loads(whole.message.content or ""), dict)
    assert trio.run(streamed) == whole.message.content
    free = sync.chat.completions.create(**{**ask, "response_format": {"type": "text"}})
    assert free.choices[0].finish_reason == "length"


def test_the_responses_api_text_format_constrains_its_output(client: openai.OpenAI) -> None:
    class Weather(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=16)
        sunny: bool

    parsed = client.responses.parse(
        model="gemma-3-270m-q4_k_m",
        input="Describe the weather of a city you like.",
        text_format=Weather,
        temperature=0.8,
        max_output_tokens=60,
        store=False,
    )
    assert parsed.status == "completed"
    assert isinstance(parsed.output_parsed, Weather)
    assert parsed.text.format.type == "json_schema"  # echoed as asked


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "integer", "minimum": 3}, "'minimum'"),
        ({"type": "nosuchtype"}, "cannot be converted"),
        ({"properties": {"a": {"type": "string", "pattern": "[a-z]+"}}}, "must start with"),
        ({"anyOf": [{"type": "string"}, {"type": "integer", "maximum": 9}]}, "'maximum'"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_400(
    client: openai.OpenAI, schema: Any, says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="gemma-3-270m-q4_k_m",
            messages=WEATHER,  # type: ignore[arg-type]
            response_format=json_schema_format(schema),
            max_tokens=4,
        )
    body: Any = caught.value.body
    assert caught.value.status_code == 400 and body["code"] == "bad_request"
    assert says in body["message"]


def test_the_daemon_still_serves_after_a_refused_grammar(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gemma-3-270m-q4_k_m",
        messages=WEATHER,  # type: ignore[arg-type]
        response_format=json_schema_format({"type": "boolean"}),
        max_tokens=8,
    )
    assert reply.choices[0].message.content in ("true", "false", "true ", "false ")


# ---- logprobs -------------------------------------------------------------------------------


def check_token_logprobs(entries: list[Any], top: int) -> None:
    for entry in entries:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode(errors="replace") == entry.token
        alternatives = [alt.logprob for alt in entry.top_logprobs]
        assert len(alternatives) == top and alternatives == sorted(alternatives, reverse=True)
        assert sum(math.exp(value) for value in alternatives) <= 1.0 + 1e-6
        assert entry.logprob <= alternatives[0] + 1e-6 if top else True


def test_chat_logprobs_cover_every_token_of_the_reply(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gemma-3-270m-q4_k_m",
        messages=[{"role": "user", "content": "Name three colours."}],
        temperature=0,
        max_tokens=12,
        logprobs=True,
        top_logprobs=3,
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert "".join(entry.token for entry in entries) == choice.message.content
    assert reply.usage is not None
    ended = 1 if choice.finish_reason == "stop" else 0  # the end token has no entry
    assert len(entries) == reply.usage.completion_tokens - ended
    check_token_logprobs(entries, 3)
    # Greedy: each token is the most likely one.
    assert all(entry.token == entry.top_logprobs[0].token for entry in entries)


def test_streamed_chat_chunks_carry_their_tokens_logprobs(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gemma-3-270m-q4_k_m",
            messages=[{"role": "user", "content": "Count to five."}],
            temperature=0,
            max_tokens=10,
            logprobs=True,
            stream=True,
        )
    )
    text, tokens = "", ""
    for chunk in chunks:
        choice = chunk.choices[0]
        if choice.delta.content:
            assert choice.logprobs is not None and choice.logprobs.content
            check_token_logprobs(choice.logprobs.content, 0)
            tokens += "".join(entry.token for entry in choice.logprobs.content)
            text += choice.delta.content
    assert text and tokens == text


def test_completion_logprobs_are_the_legacy_shape(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="gemma-3-270m-q4_k_m", prompt="The sky is", max_tokens=6, temperature=0, logprobs=2
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None
    logprobs = choice.logprobs
    assert logprobs.tokens is not None and "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs is not None and len(logprobs.token_logprobs) == 6
    assert logprobs.top_logprobs is not None and all(len(t) <= 2 for t in logprobs.top_logprobs)
    offsets = [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert logprobs.text_offset == offsets


def test_without_logprobs_there_are_none(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gemma-3-270m-q4_k_m",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
    )
    assert reply.choices[0].logprobs is None


# ---- penalties ------------------------------------------------------------------------------


def test_frequency_and_presence_penalties_change_a_repetitive_reply(client: openai.OpenAI) -> None:
    def reply(**penalties: float) -> str:
        return (
            client.completions.create(
                model="gemma-3-270m-q4_k_m",
                prompt="yes yes yes yes yes yes yes yes",
                max_tokens=12,
                temperature=0,
                **penalties,  # type: ignore[arg-type]
            )
            .choices[0]
            .text
        )

    plain = reply()
    assert plain.split().count("yes") >= 6  # greedy repeats
    penalised = reply(frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.split().count("yes") < plain.split().count("yes")
