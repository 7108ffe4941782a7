"""The HTTP actor's pure parts, without a daemon: OpenAI request fields to infers, results to
OpenAI's shapes, errors to statuses, stored responses' ids and events."""

from __future__ import annotations

from typing import Any

import pytest

from inferencecenter.actors.http import responses as rs
from inferencecenter.actors.http import shapes
from inferencecenter.actors.http.shapes import FieldError
from inferencecenter.protocol.errors import LimitReached, NotFound, Overloaded, TooLarge

USER = [{"role": "user", "content": "Hi"}]


def test_chat_fields_become_the_infer_params() -> None:
    generation = shapes.parse_chat(
        {
            "model": "m",
            "messages": [{"role": "developer", "content": "Be brief."}, *USER],
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 3,
            "stop": "\n",
            "max_completion_tokens": 7,
            "user": "someone",
            "n": 1,
            "presence_penalty": 0,
            "response_format": {"type": "text"},
        }
    )
    assert generation.system_prompt == "Be brief." and generation.messages == USER
    params = generation.infer_params(ctx_size=1024)
    assert params["temp"] == 0.5 and params["top_p"] == 0.9 and params["seed"] == 3
    assert params["stop"] == ["\n"] and params["max_tokens"] == 7
    # No limit given: until the context is full.
    assert shapes.parse_chat({"messages": USER}).infer_params(ctx_size=512)["max_tokens"] == 512


def test_text_parts_are_joined_and_other_parts_refused() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    generation = shapes.parse_chat({"messages": [{"role": "user", "content": parts}]})
    assert generation.messages == [{"role": "user", "content": "ab"}]
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(FieldError):
        shapes.parse_chat({"messages": [{"role": "user", "content": image}]})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 2),
        ("echo", True),
        ("logprobs", "yes"),
        ("top_logprobs", 21),
        ("top_logprobs", 2),  # without logprobs: true
        ("logit_bias", {"1": 2}),
        ("frequency_penalty", 2.5),
        ("presence_penalty", "high"),
        ("response_format", {"type": "grammar"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
        ("tools", [{"type": "function"}]),
        ("mirostat", 1),
        ("temperature", -0.1),
        ("top_p", 0),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [""]),
        ("max_tokens", 0),
        ("stream", "yes"),
        ("stream_options", {"include_usage": True}),  # without stream
        ("messages", []),
    ],
)
def test_unserved_or_bad_fields_are_refused_with_their_name(field: str, value: Any) -> None:
    with pytest.raises(FieldError) as caught:
        shapes.parse_chat({"messages": USER, field: value})
    assert caught.value.param == field and caught.value.code == "bad_request"


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "sunny": {"type": "boolean"}},
    "required": ["city", "sunny"],
    "additionalProperties": False,
}


def test_response_formats_become_grammars() -> None:
    def grammar_of(response_format: Any) -> str | None:
        chat = shapes.parse_chat({"messages": USER, "response_format": response_format})
        return chat.infer_params(ctx_size=64).get("grammar")

    assert grammar_of({"type": "text"}) is None
    assert "root ::= object" in str(grammar_of({"type": "json_object"}))
    schema = grammar_of({"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
    assert 'root ::= "{" space city-kv "," space sunny-kv "}" space' in str(schema)
    # JSON strings hold no raw control characters (the converter's own rule allowed them).
    assert "\\x00-\\x1F" in str(schema)
    # The Responses API's text.format has the schema beside its type.
    ask = rs.parse_request(
        {"input": "x", "text": {"format": {"type": "json_schema", "name": "w", "schema": SCHEMA}}}
    )
    assert ask.infer_params(64)["grammar"] == schema
    assert ask.echo["text"]["format"]["schema"] == SCHEMA


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "integer", "minimum": 3}, "'minimum'"),
        ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}}, "'oneOf'"),
        ({"type": "nosuchtype"}, "cannot be converted"),
        ({"type": "string", "pattern": "abc"}, "cannot be converted"),
        ([1, 2], "must be an object"),
    ],
)
def test_schemas_that_cannot_be_enforced_are_refused(schema: Any, says: str) -> None:
    with pytest.raises(FieldError) as caught:
        shapes.parse_chat(
            {
                "messages": USER,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema},
                },
            }
        )
    assert caught.value.param == "response_format" and says in caught.value.message


def test_logprobs_fields_and_shapes() -> None:
    chat = shapes.parse_chat({"messages": USER, "logprobs": True, "top_logprobs": 2})
    assert chat.infer_params(64)["logprobs"] == 2 and chat.logprobs
    assert shapes.parse_chat({"messages": USER, "logprobs": True}).params["logprobs"] == 0
    assert "logprobs" not in shapes.parse_chat({"messages": USER}).infer_params(64)
    assert shapes.parse_completion({"prompt": "x", "logprobs": 3}).params["logprobs"] == 3
    with pytest.raises(FieldError):
        shapes.parse_completion({"prompt": "x", "logprobs": 6})
    rows = [[b" Hel", -0.5, [[b" Hel", -0.5], [b" Hi", -1.5]]], [b"\xe2", -2.0, []]]
    entries = shapes.chat_logprobs(rows)["content"]  # type: ignore[index]
    assert entries[0] == {
        "token": " Hel",
        "logprob": -0.5,
        "bytes": [32, 72, 101, 108],
        "top_logprobs": [
            {"token": " Hel", "logprob": -0.5, "bytes": [32, 72, 101, 108]},
            {"token": " Hi", "logprob": -1.5, "bytes": [32, 72, 105]},
        ],
    }
    assert entries[1]["token"] == "\ufffd" and entries[1]["bytes"] == [0xE2]
    legacy = shapes.completion_logprobs(rows, offset=10)
    assert legacy == {
        "tokens": [" Hel", "\ufffd"],
        "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{" Hel": -0.5, " Hi": -1.5}, {}],
        "text_offset": [10, 14],
    }


def test_penalties_are_params_of_the_http_api_only() -> None:
    params = shapes.parse_chat(
        {"messages": USER, "presence_penalty": 0.5, "frequency_penalty": -1}
    ).infer_params(64)
    assert params["presence_penalty"] == 0.5 and params["frequency_penalty"] == -1.0


def test_null_means_not_given() -> None:
    generation = shapes.parse_chat({"messages": USER, "temperature": None, "n": None})
    assert "temp" not in generation.params


def test_completion_takes_one_prompt_and_openai_s_default_length() -> None:
    generation = shapes.parse_completion({"prompt": ["one prompt"]})
    assert generation.prompt == "one prompt" and generation.max_tokens == 16
    with pytest.raises(FieldError):
        shapes.parse_completion({"prompt": ["two", "prompts"]})


def test_usage_counts_cached_tokens_inside_the_prompt() -> None:
    usage = shapes.usage({"prompt_tokens": 5, "cached_tokens": 20, "tokens": 3})
    assert usage["prompt_tokens"] == 25 and usage["total_tokens"] == 28
    assert usage["prompt_tokens_details"] == {"cached_tokens": 20}
    assert shapes.finish_reason("context") == "length" and shapes.finish_reason("stop") == "stop"


def test_errors_get_their_status_and_retry_after() -> None:
    assert shapes.error_status("too_large") == 413 and shapes.retry_after(TooLarge()) is None
    assert shapes.error_status("not_found") == 404
    assert shapes.retry_after(Overloaded()) == 1 and shapes.retry_after(LimitReached()) == 1
    budget = Overloaded()
    budget.retry_after_s = 2.2  # type: ignore[attr-defined]
    assert shapes.retry_after(budget) == 3
    body = shapes.error_json("auth_failed", "wrong key")
    assert body == {
        "error": {
            "message": "wrong key",
            "type": "authentication_error",
            "code": "auth_failed",
            "param": None,
        }
    }


def test_a_stored_response_id_names_its_session_and_turn() -> None:
    session_id = "s-Ab_c-12345"
    assert rs.parse_response_id(rs.response_id(session_id, 3)) == (session_id, 3)
    for bad in ("resp_", "resp_s-x", "resp_s-x.y", "chatcmpl-1", "resp_.2"):
        with pytest.raises(NotFound):
            rs.parse_response_id(bad)


def test_response_input_and_instructions() -> None:
    ask = rs.parse_request(
        {
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                {"type": "message", "role": "assistant", "content": "Hello"},
            ],
            "instructions": "Be kind.",
            "max_output_tokens": 9,
        }
    )
    assert ask.turns == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert ask.instructions == "Be kind." and ask.store and ask.infer_params(99)["max_tokens"] == 9
    # Continuing: the session keeps its first instructions; new ones join as a system turn.
    more = rs.parse_request(
        {"input": "Go on", "instructions": "Shorter.", "previous_response_id": "r"}
    )
    assert more.turns[0] == {"role": "system", "content": "Shorter."}
    with pytest.raises(FieldError):
        rs.parse_request({"input": [{"type": "function_call_output", "output": "x"}]})
    with pytest.raises(FieldError):
        rs.parse_request({"input": "x", "text": {"format": {"type": "json_schema"}}})


def test_response_events_are_numbered_and_end_with_the_status() -> None:
    ask = rs.parse_request({"input": "Hi", "store": False})
    reply = rs.Reply("resp_x", "m", ask)
    events = rs.EventSequence(reply)
    stream = [*events.opening(), events.delta("Hel"), events.delta("lo")]
    stream += events.closing("length", {"prompt_tokens": 2, "cached_tokens": 0, "tokens": 2})
    assert [data["sequence_number"] for _, data in stream] == list(range(len(stream)))
    assert [kind for kind, _ in stream][-1] == "response.incomplete"
    final = stream[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello" and final["store"] is False
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"]["output_tokens"] == 2
