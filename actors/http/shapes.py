"""OpenAI request bodies to daemon inputs, and daemon results to OpenAI's JSON shapes.

Pure functions without I/O: the routes call them, the unit tests drive them alone. A field that
would change the output and is not served is refused (400), never ignored; fields that change
nothing here (`user`, `metadata`, ...) are accepted.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ...protocol.errors import BadRequest, ProtocolError
from ...protocol.messages import MAX_STOP_BYTES, MAX_TOP_LOGPROBS, PARAM_CHECKS, SamplingParams
from ...protocol.wire import kind_of
from . import grammar

Body = dict[str, Any]
Turn = dict[str, str]


class FieldError(BadRequest):
    """A bad request field, named in the error's `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# ---- errors -----------------------------------------------------------------------------


class Unavailable(ProtocolError):
    """The daemon cannot serve this now (it is loading; a model it cannot load)."""

    code = "unavailable"


# Protocol error code -> HTTP status and OpenAI error type.
STATUS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "invalid_request_error"),
    "unauthenticated": (401, "authentication_error"),
    "auth_failed": (401, "authentication_error"),
    "forbidden": (403, "permission_error"),
    "not_found": (404, "invalid_request_error"),
    "busy": (409, "invalid_request_error"),
    "too_large": (413, "invalid_request_error"),
    "limit_reached": (429, "rate_limit_error"),
    "rate_limited": (429, "rate_limit_error"),
    "overloaded": (429, "rate_limit_error"),
    "internal": (500, "server_error"),
    "unavailable": (503, "server_error"),
}
RETRY_AFTER_S = 1  # when the daemon has no better figure (a full queue, all sessions in use)


def error_status(code: str) -> int:
    return STATUS.get(code, (500, ""))[0]


def error_json(code: str, message: str, param: str | None = None) -> Body:
    """OpenAI's error object, with the daemon's error code as `code`."""
    kind = STATUS.get(code, (500, "server_error"))[1]
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def error_of(exc: ProtocolError) -> Body:
    return error_json(exc.code, exc.message, getattr(exc, "param", None))


def retry_after(exc: ProtocolError) -> int | None:
    """Seconds for a 429's Retry-After header (rounded up), None for other statuses."""
    if error_status(exc.code) != 429:
        return None
    seconds = getattr(exc, "retry_after_s", None)
    if isinstance(seconds, (int, float)) and seconds > 0:
        return max(1, int(-(-seconds // 1)))
    return RETRY_AFTER_S


# ---- requests ---------------------------------------------------------------------------

# OpenAI's sampling fields (and llama.cpp server's extensions) -> the daemon's params.
SAMPLING_FIELDS = {
    "temperature": "temp",
    "top_p": "top_p",
    "seed": "seed",
    "top_k": "top_k",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "ignore_eos": "ignore_eos",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
# Accepted and without effect on the output.
NEUTRAL_FIELDS = frozenset(
    {"user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls"}
)
# Accepted when they ask for what the daemon does anyway (their default), else refused.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logit_bias": ({},),
    "logprobs": (False, 0),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "truncation": ("disabled",),
    "include": ([],),
}
MAX_STOP = 4  # OpenAI's limit (the daemon's own is 8)
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions


@dataclass(frozen=True)
class Generation:
    """One generation asked for over HTTP: the daemon's infer (prompt or chat turns, params)
    plus what the reply's shape needs. `max_tokens` None: until the context is full."""

    model: str | None
    prompt: str | None = None
    messages: list[Turn] | None = None
    system_prompt: str | None = None
    params: Body = field(default_factory=dict)
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False

    def infer_params(self, ctx_size: int) -> Body:
        """The infer's params, max_tokens filled in for the session's context size."""
        params = SamplingParams(**self.params).to_wire()
        params["max_tokens"] = self.max_tokens if self.max_tokens is not None else ctx_size
        return params

    @property
    def logprobs(self) -> bool:
        return self.params.get("logprobs") is not None


def _present(body: Body, name: str) -> bool:
    return body.get(name) is not None  # JSON null means "not given", as OpenAI reads it


def _check_known(body: Body, known: frozenset[str]) -> None:
    for name, value in body.items():
        if name in known or name in NEUTRAL_FIELDS or value is None:
            continue
        if name in NEUTRAL_VALUES:
            if value not in NEUTRAL_VALUES[name] or isinstance(value, bool) != isinstance(
                NEUTRAL_VALUES[name][0], bool
            ):
                raise FieldError(name, f"{name}={value!r:.60} is not supported by this server")
            continue
        raise FieldError(name, f"unknown or unsupported field {name[:64]!r}")


def _bool(body: Body, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise FieldError(name, f"{name} must be a boolean, not {kind_of(value)}")
    return value


def _model(body: Body) -> str | None:
    value = body.get("model")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise FieldError("model", "model must be a non-empty string")
    return value


def _penalty(value: Any) -> float:
    """OpenAI's presence and frequency penalties: -2.0 to 2.0 (only the HTTP API has them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
        raise BadRequest(f"params.penalty must be a number from -2.0 to 2.0 (got {value!r:.40})")
    return float(value)


# The protocol's own checks, and those of the params only the HTTP API sets.
CHECKS = {**PARAM_CHECKS, "presence_penalty": _penalty, "frequency_penalty": _penalty}


def _sampling(body: Body) -> Body:
    """The daemon's params from OpenAI's names, checked by the protocol's own rules."""
    params: Body = {}
    for name, key in SAMPLING_FIELDS.items():
        if not _present(body, name):
            continue
        try:
            params[key] = CHECKS[key](body[name])
        except BadRequest as exc:
            message = exc.message.replace(f"params.{key}", name).replace("params.penalty", name)
            raise FieldError(name, message) from None
    if _present(body, "stop"):
        stop = body["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise FieldError("stop", "stop must be a non-empty string or a list of them")
        if len(stop) > MAX_STOP:
            raise FieldError("stop", f"stop holds at most {MAX_STOP} strings")
        if any(len(s.encode("utf-8", "surrogatepass")) > MAX_STOP_BYTES for s in stop):
            raise FieldError("stop", f"each stop string is at most {MAX_STOP_BYTES} bytes")
        params["stop"] = tuple(stop)
    return params


def _max_tokens(body: Body, *names: str) -> int | None:
    for name in names:
        if _present(body, name):
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FieldError(name, f"{name} must be an integer >= 1")
            return value
    return None


def _stream_options(body: Body, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise FieldError("stream_options", "stream_options must be an object")
    if not stream:
        raise FieldError("stream_options", "stream_options needs stream: true")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise FieldError("stream_options", "stream_options.include_usage must be a boolean")
    return include


def output_grammar(value: Any, name: str, schema_at: str) -> str | None:
    """The grammar of a `response_format` (the Responses API's `text.format`, `name`): none for
    text, any JSON object for `json_object`, the schema's for `json_schema` (found under
    `schema_at`: `json_schema` in chat, the format itself in the Responses API)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return grammar.object_grammar()
    if kind != "json_schema":
        shown = kind if isinstance(value, dict) else value
        raise FieldError(name, f"{name} {shown!r:.40} is not supported by this server")
    assert isinstance(value, dict)
    holder = value.get(schema_at) if schema_at else value
    where = f"{name}.{schema_at}" if schema_at else name
    if not isinstance(holder, dict) or "schema" not in holder:
        raise FieldError(name, f"{where}.schema is required for json_schema")
    try:
        return grammar.schema_grammar(holder["schema"])
    except ValueError as exc:
        raise FieldError(name, f"{where}.schema: {exc}") from None


def _chat_logprobs(body: Body) -> int | None:
    """`logprobs` (bool) and `top_logprobs` (0..20) as the daemon's `logprobs` (N or None)."""
    wanted = _bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return 0 if wanted else None
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise FieldError("top_logprobs", f"top_logprobs must be an integer 0..{MAX_TOP_LOGPROBS}")
    if not wanted:
        raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
    return top


def _completion_logprobs(body: Body) -> int | None:
    """`logprobs` of /v1/completions: how many of the most likely tokens to list (0..5)."""
    value = body.get("logprobs")
    if value is None:
        return None
    limit = MAX_COMPLETION_LOGPROBS
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise FieldError("logprobs", f"logprobs must be an integer 0..{limit}")
    return value


def _with(params: Body, **more: Any) -> Body:
    """params and those of `more` that are set."""
    return {**params, **{key: value for key, value in more.items() if value is not None}}


def _text_of(content: Any, where: str, part_types: tuple[str, ...]) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FieldError(where, f"{where} must be a string or a list of text parts")
    texts: list[str] = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in part_types:
            kind = part.get("type") if isinstance(part, dict) else kind_of(part)
            raise FieldError(where, f"{where}[{index}] of type {kind!r:.40} is not supported")
        text = part.get("text")
        if not isinstance(text, str):
            raise FieldError(where, f"{where}[{index}].text must be a string")
        texts.append(text)
    return "".join(texts)


CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _chat_turns(value: Any) -> list[Turn]:
    if not isinstance(value, list) or not value:
        raise FieldError("messages", "messages must be a non-empty list")
    turns: list[Turn] = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise FieldError("messages", f"{where} must be an object")
        role = CHAT_ROLES.get(str(message.get("role")))
        if role is None:
            raise FieldError("messages", f"{where}.role {message.get('role')!r:.40} is not served")
        if message.get("tool_calls") or message.get("function_call"):
            raise FieldError("messages", f"{where}: tool calls are not supported")
        content = message.get("content")
        text = "" if content is None else _text_of(content, f"{where}.content", ("text",))
        turns.append({"role": role, "content": text})
    return turns


def split_system(turns: list[Turn]) -> tuple[str | None, list[Turn]]:
    """A leading system turn becomes the session's system prompt: the engine renders it the
    same way, and shares the KV of a system prompt it has seen (cached_tokens)."""
    if len(turns) > 1 and turns[0]["role"] == "system":
        return turns[0]["content"], turns[1:]
    return None, turns


COMPLETION_FIELDS = frozenset(
    {"model", "prompt", "max_tokens", "stream", "logprobs", *SAMPLING_FIELDS, "stop"}
)
CHAT_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "response_format",
        "logprobs",
        "top_logprobs",
        *SAMPLING_FIELDS,
        "stop",
    }
)


def parse_completion(body: Body) -> Generation:
    """`POST /v1/completions`."""
    _check_known(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise FieldError("prompt", "prompt must be a string (one prompt per request)")
    stream = _bool(body, "stream")
    return Generation(
        model=_model(body),
        prompt=prompt,
        params=_with(_sampling(body), logprobs=_completion_logprobs(body)),
        max_tokens=_max_tokens(body, "max_tokens") or 16,  # OpenAI's default for completions
        stream=stream,
        include_usage=_stream_options(body, stream),
    )


def parse_chat(body: Body) -> Generation:
    """`POST /v1/chat/completions`."""
    _check_known(body, CHAT_FIELDS)
    constraint = output_grammar(body.get("response_format"), "response_format", "json_schema")
    system, turns = split_system(_chat_turns(body.get("messages")))
    stream = _bool(body, "stream")
    return Generation(
        model=_model(body),
        messages=turns,
        system_prompt=system,
        params=_with(_sampling(body), grammar=constraint, logprobs=_chat_logprobs(body)),
        max_tokens=_max_tokens(body, "max_completion_tokens", "max_tokens"),
        stream=stream,
        include_usage=_stream_options(body, stream),
    )


# ---- replies ----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def finish_reason(reason: str) -> str:
    """The daemon's finish reason in OpenAI's words (a full context is a length limit too)."""
    return "length" if reason in ("length", "context") else "stop"


def usage(stats: Body) -> Body:
    """OpenAI counts cached prompt tokens inside prompt_tokens; the daemon counts them apart."""
    cached = int(stats.get("cached_tokens", 0))
    prompt = int(stats.get("prompt_tokens", 0)) + cached
    completion = int(stats.get("tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


@dataclass
class ReplyIds:
    """What every object and chunk of one reply repeats."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))


# ---- log-probabilities: the engine's rows, [bytes, logprob, [[bytes, logprob], ...]] a token


def _token_text(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")  # a token may end inside a character


def _chat_token(piece: bytes, value: float) -> Body:
    return {"token": _token_text(piece), "logprob": value, "bytes": list(piece)}


def chat_logprobs(rows: list[Any] | None) -> Body | None:
    """A chat choice's (or chunk's) `logprobs`: the tokens of its text."""
    if rows is None:
        return None
    content = [
        {**_chat_token(piece, value), "top_logprobs": [_chat_token(p, v) for p, v in best]}
        for piece, value, best in rows
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(rows: list[Any] | None, offset: int = 0) -> Body | None:
    """A completion choice's (or chunk's) `logprobs`, the legacy shape; `offset`: where its
    text starts in the whole text (`text_offset`)."""
    if rows is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for piece, value, best in rows:
        text = _token_text(piece)
        tokens.append(text)
        values.append(value)
        tops.append({_token_text(p): v for p, v in best})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def completion(
    ids: ReplyIds, text: str, reason: str, stats: Body, logprobs: list[Any] | None = None
) -> Body:
    return {
        "id": ids.id,
        "object": "text_completion",
        "created": ids.created,
        "model": ids.model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": completion_logprobs(logprobs),
                "finish_reason": finish_reason(reason),
            }
        ],
        "usage": usage(stats),
    }


def completion_chunk(
    ids: ReplyIds, text: str, reason: str | None, logprobs: Body | None = None
) -> Body:
    return {
        "id": ids.id,
        "object": "text_completion",
        "created": ids.created,
        "model": ids.model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": None if reason is None else finish_reason(reason),
            }
        ],
    }


def chat_completion(
    ids: ReplyIds, text: str, reason: str, stats: Body, logprobs: list[Any] | None = None
) -> Body:
    return {
        "id": ids.id,
        "object": "chat.completion",
        "created": ids.created,
        "model": ids.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": chat_logprobs(logprobs),
                "finish_reason": finish_reason(reason),
            }
        ],
        "usage": usage(stats),
    }


def chat_chunk(
    ids: ReplyIds,
    delta: Body,
    reason: str | None,
    include_usage: bool = False,
    logprobs: Body | None = None,
) -> Body:
    chunk: Body = {
        "id": ids.id,
        "object": "chat.completion.chunk",
        "created": ids.created,
        "model": ids.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": None if reason is None else finish_reason(reason),
            }
        ],
    }
    if include_usage:
        chunk["usage"] = None  # every chunk has it; only the last one fills it
    return chunk


def usage_chunk(ids: ReplyIds, obj: str, stats: Body) -> Body:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {
        "id": ids.id,
        "object": obj,
        "created": ids.created,
        "model": ids.model,
        "choices": [],
        "usage": usage(stats),
    }


def model_list(names: list[str], created: int) -> Body:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "inferencecenter"}
            for name in names
        ],
    }
