"""Every client op, its fields and their checks; sampling params with their ranges."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import BadRequest
from .wire import Body, kind_of

MAX_ID_BYTES = 64
MAX_NAME_BYTES = 256
MAX_STOP_STRINGS = 8
MAX_STOP_BYTES = 256  # each stop string (the engine matches them against every token's text)
# A session keeps its system prompt and evaluates it again at each reset; longer than this it
# would not fit in any context this daemon serves (and costs tokenizing before it is refused).
MAX_SYSTEM_PROMPT_BYTES = 32 * 1024
MAX_ROLE_BYTES = 32

# Reply ops (daemon -> client).
PONG = "pong"
AUTH_SUCCESS = "auth_success"
AUTH_FAILED = "auth_failed"
SESSION_CREATED = "session_created"
SESSION_CLOSED = "session_closed"
SESSION_LIST = "session_list"
TOKEN = "token"
END = "end"
ABORTED = "aborted"
STATS = "stats"
MODEL_LIST = "model_list"
MODEL_LOADED = "model_loaded"
MODEL_UNLOADED = "model_unloaded"
ERROR = "error"

FINISH_REASONS = ("stop", "length", "aborted", "context", "error")
SESSION_STATES = ("idle", "generating", "queued")
MODEL_STATES = ("available", "loading", "loaded", "unloading")
# A model's short name.
MODEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_PATH_BYTES = 4096
# What a load may set for its model (the serve flags' ranges).
LOAD_LIMITS = {"parallel": (1, 256), "ctx_size": (64, 1 << 20), "gpu_layers": (-1, 1 << 16)}


@dataclass(frozen=True)
class SamplingParams:
    """The `params` map of `infer`, with PROTOCOL.md's defaults.

    The fields after `ignore_eos` are set by the HTTP actor only (`parse_params` refuses them):
    `grammar` (GBNF that constrains decoding; an end-of-generation token then ends it even with
    ignore_eos), OpenAI's presence and frequency penalties, and `logprobs` (None: none; N: the
    sampled token's log-probability and the N most likely tokens'). At their defaults they stay
    off the wire, so an engine that does not know them reads what it always read.
    """

    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False
    grammar: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None

    @property
    def stops_at_eog(self) -> bool:
        """Whether an end-of-generation token ends the generation: a grammar that is complete
        allows nothing else."""
        return not self.ignore_eos or self.grammar is not None

    def to_wire(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        for name, default in OPTIONAL_PARAMS.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> SamplingParams:
        """Rebuild params that were already validated (internal messages)."""
        values = dict(data)
        values["stop"] = tuple(values.get("stop", ()))
        return cls(**values)


# SamplingParams' fields that only the HTTP actor sets, and their defaults (off the wire).
OPTIONAL_PARAMS: dict[str, Any] = {
    "grammar": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logprobs": None,
}
MAX_GRAMMAR_BYTES = 128 * 1024  # a JSON schema's grammar is a few kB
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"params.{name} must be a number, not {kind_of(value)}")
    if not math.isfinite(value):
        raise BadRequest(f"params.{name} must be finite")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"params.{name} must be an int, not {kind_of(value)}")
    return value


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise BadRequest(f"params.{name} must be {rule} (got {value!r})")


def _temp(v: Any) -> float:
    x = _number("temp", v)
    _check(x >= 0, "temp", ">= 0", v)
    return x


def _top_k(v: Any) -> int:
    x = _integer("top_k", v)
    _check(x >= 0, "top_k", ">= 0", v)
    return x


def _top_p(v: Any) -> float:
    x = _number("top_p", v)
    _check(0 < x <= 1, "top_p", "in (0, 1]", v)
    return x


def _min_p(v: Any) -> float:
    x = _number("min_p", v)
    _check(0 <= x <= 1, "min_p", "in [0, 1]", v)
    return x


def _repeat_penalty(v: Any) -> float:
    x = _number("repeat_penalty", v)
    _check(x > 0, "repeat_penalty", "> 0", v)
    return x


def _max_tokens(v: Any) -> int:
    x = _integer("max_tokens", v)
    _check(x >= 1, "max_tokens", ">= 1", v)
    return x


# Any int >= 0 is a seed; llama.cpp's is 32 bits and takes 2**32 - 1 for "random", so seeds
# are reduced modulo 2**32 - 1 (those below it are kept as they are).
SEED_MODULUS = 2**32 - 1


def _seed(v: Any) -> int:
    x = _integer("seed", v)
    _check(x >= 0, "seed", ">= 0", v)
    return x % SEED_MODULUS


def _stop(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise BadRequest(f"params.stop must be a list of str, not {kind_of(v)}")
    _check(len(v) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} strings", len(v))
    for item in v:
        if not isinstance(item, str) or not item:
            raise BadRequest("params.stop must hold only non-empty str")
        if len(item.encode("utf-8", "surrogatepass")) > MAX_STOP_BYTES:
            raise BadRequest(f"params.stop strings must be at most {MAX_STOP_BYTES} bytes each")
    return tuple(v)


def _ignore_eos(v: Any) -> bool:
    if not isinstance(v, bool):
        raise BadRequest(f"params.ignore_eos must be a bool, not {kind_of(v)}")
    return v


PARAM_CHECKS: dict[str, Callable[[Any], Any]] = {
    "temp": _temp,
    "top_k": _top_k,
    "top_p": _top_p,
    "min_p": _min_p,
    "repeat_penalty": _repeat_penalty,
    "max_tokens": _max_tokens,
    "seed": _seed,
    "stop": _stop,
    "ignore_eos": _ignore_eos,
}


def parse_params(raw: Any) -> SamplingParams:
    """Validate `params`; an unknown key or a value out of range is bad_request."""
    if raw is None:
        return SamplingParams()
    if not isinstance(raw, dict):
        raise BadRequest(f"params must be a map, not {kind_of(raw)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        check = PARAM_CHECKS.get(key)
        if check is None:
            raise BadRequest(f"unknown param {key!r}; known: {', '.join(PARAM_CHECKS)}")
        values[key] = check(value)
    return SamplingParams(**values)


# ---- request fields -------------------------------------------------------------------


def _str_field(body: Body, name: str, *, required: bool, max_bytes: int | None = None) -> Any:
    if name not in body:
        if required:
            raise BadRequest(f"missing field {name!r}")
        return None
    value = body[name]
    if not isinstance(value, str):
        raise BadRequest(f"field {name!r} must be a str, not {kind_of(value)}")
    if max_bytes is not None and len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise BadRequest(f"field {name!r} is longer than {max_bytes} bytes")
    return value


def _bool_field(body: Body, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"field {name!r} must be a bool, not {kind_of(value)}")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest("field 'messages' must be a non-empty list of {role, content} maps")
    turns: list[dict[str, str]] = []
    for index, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise BadRequest(f"messages[{index}] must be a map, not {kind_of(turn)}")
        role = turn.get("role")
        content = turn.get("content")
        if not isinstance(role, str) or not role or len(role.encode()) > MAX_ROLE_BYTES:
            raise BadRequest(f"messages[{index}].role must be a non-empty str")
        if not isinstance(content, str):
            raise BadRequest(f"messages[{index}].content must be a str")
        turns.append({"role": role, "content": content})
    return turns


def request_id(body: Body) -> int | str | None:
    """The request's `id` when it is valid, else None (a bad id is reported separately)."""
    value = body.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and len(value.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES:
        return value
    return None


def check_id(body: Body) -> None:
    if "id" in body and request_id(body) is None:
        raise BadRequest(f"id must be an int or a str of at most {MAX_ID_BYTES} bytes")


def _no_fields(body: Body) -> Body:
    return {}


def _auth(body: Body) -> Body:
    return {
        "client_id": _str_field(body, "client_id", required=True, max_bytes=MAX_NAME_BYTES),
        "api_key": _str_field(body, "api_key", required=True, max_bytes=1024),
    }


def _create_session(body: Body) -> Body:
    return {
        "model": _str_field(body, "model", required=False, max_bytes=MAX_NAME_BYTES),
        "system_prompt": _str_field(
            body, "system_prompt", required=False, max_bytes=MAX_SYSTEM_PROMPT_BYTES
        ),
    }


def _model_name(body: Body) -> str:
    name = _str_field(body, "model", required=True, max_bytes=MAX_NAME_BYTES)
    if not MODEL_NAME.fullmatch(name):
        raise BadRequest("field 'model' must match [A-Za-z0-9._-]{1,64}")
    return str(name)


def _load_model(body: Body) -> Body:
    fields: Body = {
        "model": _model_name(body),
        "path": _str_field(body, "path", required=False, max_bytes=MAX_PATH_BYTES),
    }
    for name, (low, high) in LOAD_LIMITS.items():
        value = body.get(name)
        if value is None:
            fields[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"field {name!r} must be an int, not {kind_of(value)}")
        if not low <= value <= high:
            raise BadRequest(f"field {name!r} must be in {low}..{high} (got {value})")
        fields[name] = value
    if fields["path"] == "":
        raise BadRequest("field 'path' must not be empty")
    return fields


def _unload_model(body: Body) -> Body:
    return {"model": _model_name(body)}


def _list_sessions(body: Body) -> Body:
    return {"all": _bool_field(body, "all")}


def _session_only(body: Body) -> Body:
    return {"session_id": _str_field(body, "session_id", required=True, max_bytes=MAX_NAME_BYTES)}


def _infer(body: Body) -> Body:
    fields = _session_only(body)
    has_prompt = "prompt" in body
    has_messages = "messages" in body
    if has_prompt == has_messages:
        raise BadRequest("infer needs exactly one of 'prompt' or 'messages'")
    if has_prompt:
        fields["prompt"] = _str_field(body, "prompt", required=True)
    else:
        fields["messages"] = _messages(body["messages"])
    fields["params"] = parse_params(body.get("params"))
    fields["reset"] = _bool_field(body, "reset")
    return fields


# op -> field parser; an op missing here is bad_request.
REQUEST_FIELDS: dict[str, Callable[[Body], Body]] = {
    "ping": _no_fields,
    "auth": _auth,
    "create_session": _create_session,
    "close_session": _session_only,
    "list_sessions": _list_sessions,
    "infer": _infer,
    "abort": _session_only,
    "stats": _no_fields,
    "list_models": _no_fields,
    "load_model": _load_model,
    "unload_model": _unload_model,
}

OPS_BEFORE_AUTH = frozenset({"ping", "auth"})


@dataclass(frozen=True)
class Request:
    op: str
    id: int | str | None
    fields: Body


def parse_request(body: Body) -> Request:
    """Validate a decoded body into a Request, or raise BadRequest with a precise reason."""
    check_id(body)
    op = body.get("op")
    if not isinstance(op, str):
        raise BadRequest("field 'op' (str) is required")
    parse_fields = REQUEST_FIELDS.get(op)
    if parse_fields is None:
        raise BadRequest(f"unknown op {op[:64]!r}")
    return Request(op=op, id=request_id(body), fields=parse_fields(body))
