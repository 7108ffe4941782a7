"""Unit tests of the wire codec and request validation (pure logic, no daemon)."""

from __future__ import annotations

import msgpack
import pytest

from inferencecenter.protocol import errors, messages, wire
from inferencecenter.protocol.messages import SamplingParams, parse_params, parse_request


def test_frames_round_trip() -> None:
    frames = wire.client_frames({"op": "ping", "id": 7})
    assert frames[0] == b"ICP1"
    assert wire.parse_client_frames(frames, 1024) == {"op": "ping", "id": 7}


def test_strings_are_packed_as_str_not_bin() -> None:
    data = wire.pack({"op": "token", "content": "é"})
    assert msgpack.unpackb(data, raw=True)[b"content"] == "é".encode()
    assert b"\xa2\xc3\xa9" in data  # fixstr of two bytes, not bin8


@pytest.mark.parametrize(
    ("frames", "fragment"),
    [
        ([b"ICP1"], "expected 2 frames"),
        ([b"ICP1", b"\x80", b"x"], "expected 2 frames"),
        ([b"ICP2", wire.pack({"op": "ping"})], "protocol tag"),
        ([b"ICP1", b"\xc1"], "not valid msgpack"),
        ([b"ICP1", msgpack.packb([1, 2])], "must be a msgpack map"),
        ([b"ICP1", msgpack.packb({1: 2})], "not valid msgpack"),
        ([b"ICP1", wire.pack({"op": "ping"}) + b"\x00"], "more than one"),
        ([b"ICP1", b""], "not valid msgpack"),
    ],
)
def test_malformed_frames_are_bad_request(frames: list[bytes], fragment: str) -> None:
    with pytest.raises(errors.BadRequest, match=fragment):
        wire.parse_client_frames(frames, 1 << 20)


def test_body_over_limit_is_too_large() -> None:
    body = wire.pack({"op": "infer", "prompt": "x" * 2000})
    with pytest.raises(errors.TooLarge, match="limit is 1024"):
        wire.parse_client_frames([wire.TAG, body], 1024)


def test_deep_nesting_is_refused_not_a_crash() -> None:
    data = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(errors.BadRequest):
        wire.unpack(data, 1 << 20)


def test_params_defaults_match_the_protocol() -> None:
    params = parse_params(None)
    assert params == SamplingParams(0.8, 40, 0.95, 0.05, 1.0, 256, None, (), False)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"temp": -0.1}, "temp must be >= 0"),
        ({"temp": "hot"}, "temp must be a number"),
        ({"temp": float("nan")}, "finite"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_k": 1.5}, "top_k must be an int"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.01}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repeat_penalty": 0}, "repeat_penalty must be > 0"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": True}, "max_tokens must be an int"),
        ({"seed": -1}, "seed"),
        ({"stop": "x"}, "stop must be a list"),
        ({"stop": [""]}, "non-empty"),
        ({"stop": ["a"] * 9}, "at most 8"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool"),
        ({"temperature": 1}, "unknown param 'temperature'"),
        ([], "params must be a map"),
    ],
)
def test_bad_params_are_bad_request(raw: object, fragment: str) -> None:
    with pytest.raises(errors.BadRequest, match=fragment):
        parse_params(raw)


def test_int_accepted_where_float_expected() -> None:
    assert parse_params({"temp": 0, "top_p": 1}).temp == 0.0


def test_any_seed_from_zero_up_is_taken_and_never_means_random() -> None:
    """PROTOCOL.md: seed is an int >= 0. llama.cpp reads 2**32 - 1 as "random"."""
    assert [parse_params({"seed": s}).seed for s in (0, 7, 2**32 - 2)] == [0, 7, 2**32 - 2]
    for seed in (2**32 - 1, 2**32, 2**64 - 1, 10**30):
        reduced = parse_params({"seed": seed}).seed
        assert reduced is not None and 0 <= reduced < 2**32 - 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "'op'"),
        ({"op": 3}, "'op'"),
        ({"op": "launch"}, "unknown op"),
        ({"op": "ping", "id": True}, "id must be"),
        ({"op": "ping", "id": "x" * 65}, "id must be"),
        ({"op": "ping", "id": 1.5}, "id must be"),
        ({"op": "auth", "client_id": "a"}, "missing field 'api_key'"),
        ({"op": "auth", "client_id": 1, "api_key": "k"}, "must be a str"),
        ({"op": "infer", "session_id": "s"}, "exactly one"),
        ({"op": "infer", "session_id": "s", "prompt": "a", "messages": []}, "exactly one"),
        ({"op": "infer", "session_id": "s", "messages": []}, "non-empty list"),
        ({"op": "infer", "session_id": "s", "messages": [{"role": "user"}]}, "content"),
        ({"op": "infer", "session_id": "s", "prompt": "a", "reset": 1}, "'reset' must be a bool"),
        ({"op": "abort"}, "missing field 'session_id'"),
    ],
)
def test_bad_requests_say_precisely_why(body: dict[str, object], fragment: str) -> None:
    with pytest.raises(errors.BadRequest, match=fragment):
        parse_request(body)


def test_request_id_echo_rules() -> None:
    assert messages.request_id({"id": 5}) == 5
    assert messages.request_id({"id": "abc"}) == "abc"
    assert messages.request_id({"id": False}) is None
    assert messages.request_id({}) is None


def test_every_op_of_the_protocol_is_in_the_table() -> None:
    assert set(messages.REQUEST_FIELDS) == {
        "ping",
        "auth",
        "create_session",
        "close_session",
        "list_sessions",
        "infer",
        "abort",
        "stats",
        "list_models",
        "load_model",
        "unload_model",
    }


# From PROTOCOL.md, written out here rather than imported from the code under test.
PROTOCOL_ERROR_CODES = frozenset(
    {
        "bad_request",
        "too_large",
        "unauthenticated",
        "auth_failed",
        "forbidden",
        "not_found",
        "limit_reached",
        "busy",
        "overloaded",
        "internal",
        "unavailable",  # protocol 1.1
        "rate_limited",  # protocol 1.1
    }
)


def test_every_error_code_has_one_exception_type() -> None:
    assert errors.ERROR_CODES == PROTOCOL_ERROR_CODES
    for code, cls in errors.ERROR_TYPES.items():
        exc = errors.error_from_body({"op": "error", "code": code, "message": "m"})
        assert type(exc) is cls and exc.code == code


def test_rate_limited_carries_retry_after_s_both_ways() -> None:
    body = errors.RateLimited("spent", 12.5).to_body("r1")
    assert body == {
        "op": "error",
        "id": "r1",
        "code": "rate_limited",
        "message": "spent",
        "retry_after_s": 12.5,
    }
    exc = errors.error_from_body(body)
    assert isinstance(exc, errors.RateLimited) and exc.retry_after_s == 12.5


def test_error_body_omits_absent_id() -> None:
    assert "id" not in errors.BadRequest("x").to_body()
    assert errors.BadRequest("x").to_body("r1")["id"] == "r1"
