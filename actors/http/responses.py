"""The Responses API (`POST /v1/responses`): requests, response objects, streaming events, and
which session each stored conversation lives in.

A stored response continues in its conversation's session: the session keeps its context, so a
request with `previous_response_id` evaluates only its new input (`cached_tokens`). A stored
response's id names its session and its place in the conversation (`resp_<session>.<n>`), so the
mapping needs no table that a restart would lose; only the conversation's latest response can be
continued (the session holds that one). `store: false` runs in a session closed after it; it
cannot continue a stored conversation (that would change it: the session holds every turn).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from ...protocol.errors import LimitReached, NotFound
from ...protocol.messages import SamplingParams
from .link import Client, DaemonLink
from .shapes import (
    SAMPLING_FIELDS,
    Body,
    FieldError,
    Turn,
    _bool,
    _check_known,
    _max_tokens,
    _model,
    _sampling,
    _text_of,
    _with,
    output_grammar,
)

FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "stream",
        "previous_response_id",
        "text",
        "stop",
        *SAMPLING_FIELDS,
    }
)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TEXT_PARTS = ("input_text", "output_text", "text")
ID_PREFIX = "resp_"


@dataclass(frozen=True)
class ResponseRequest:
    model: str | None
    turns: list[Turn]
    instructions: str | None
    previous_response_id: str | None
    store: bool
    stream: bool
    params: Body
    max_output_tokens: int | None
    echo: Body = field(default_factory=dict)  # request fields the response object repeats

    def infer_params(self, ctx_size: int) -> Body:
        params = SamplingParams(**self.params).to_wire()
        limit = self.max_output_tokens
        params["max_tokens"] = limit if limit is not None else ctx_size
        return params


def _input_turns(value: Any) -> list[Turn]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise FieldError("input", "input must be a string or a non-empty list of messages")
    turns: list[Turn] = []
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            kind = item.get("type") if isinstance(item, dict) else type(item).__name__
            raise FieldError("input", f"{where} of type {kind!r:.40} is not supported")
        role = ROLES.get(str(item.get("role")))
        if role is None:
            raise FieldError("input", f"{where}.role {item.get('role')!r:.40} is not served")
        turns.append({"role": role, "content": _text_of(item.get("content"), where, TEXT_PARTS)})
    return turns


def _text_format(body: Body) -> Any:
    """`text.format` (None when not given): text, json_object, or json_schema with its
    `schema` beside `type`."""
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise FieldError("text", "text must be an object")
    return text.get("format")


def _optional_str(body: Body, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise FieldError(name, f"{name} must be a string")
    return value


def parse_request(body: Body) -> ResponseRequest:
    _check_known(body, FIELDS)
    text_format = _text_format(body)
    constraint = output_grammar(text_format, "text.format", "")
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise FieldError("store", "store must be a boolean")
    instructions = _optional_str(body, "instructions")
    previous = _optional_str(body, "previous_response_id")
    if previous is not None and store is False:
        raise FieldError(
            "store",
            "store: false cannot continue a stored response (its session keeps every turn):"
            " send store: true, or the whole conversation as input",
        )
    turns = _input_turns(body.get("input"))
    if previous is not None and instructions:
        # The conversation's session keeps its first instructions; new ones join as a turn.
        turns.insert(0, {"role": "system", "content": instructions})
    max_output_tokens = _max_tokens(body, "max_output_tokens")
    params = _with(_sampling(body), grammar=constraint)
    return ResponseRequest(
        model=_model(body),
        turns=turns,
        instructions=instructions,
        previous_response_id=previous,
        store=store is not False,
        stream=_bool(body, "stream"),
        params=params,
        max_output_tokens=max_output_tokens,
        echo={
            "instructions": instructions,
            "max_output_tokens": max_output_tokens,
            "previous_response_id": previous,
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "metadata": body.get("metadata") or {},
            "user": body.get("user"),
            "store": store is not False,
            "text": {"format": text_format or {"type": "text"}},
        },
    )


# ---- ids and stored conversations ---------------------------------------------------------


def response_id(session_id: str, turn: int) -> str:
    return f"{ID_PREFIX}{session_id}.{turn}"


def unknown_response(response_id: str) -> NotFound:
    error = NotFound(f"no stored response {response_id[:100]!r} (not stored, or expired)")
    error.param = "previous_response_id"  # type: ignore[attr-defined]
    return error


def parse_response_id(value: str) -> tuple[str, int]:
    """(session_id, turn) of a stored response's id."""
    session_id, dot, turn = value.removeprefix(ID_PREFIX).rpartition(".")
    if not value.startswith(ID_PREFIX) or not dot or not turn.isdigit() or not session_id:
        raise unknown_response(value)
    return session_id, int(turn)


@dataclass
class Conversation:
    """The session one response runs in."""

    session_id: str
    ctx_size: int
    stored: bool
    turn: int = 1

    @property
    def response_id(self) -> str:
        if self.stored:
            return response_id(self.session_id, self.turn)
        return ID_PREFIX + secrets.token_hex(16)


class StoredConversations:
    """The sessions of stored conversations, per client, least recently used first, and each
    one's latest turn. They count against the client's max_sessions: when a new session (of a
    conversation, or of a stateless request) finds it full, the client's least recently used
    idle stored conversation is closed to make room. After a restart of this actor nothing is
    known, and any owned session is accepted."""

    def __init__(self) -> None:
        self.by_client: dict[str, OrderedDict[str, int]] = {}  # session_id -> latest turn
        self.running: set[str] = set()

    def latest(self, client: Client, session_id: str) -> int | None:
        return self.by_client.get(client.client_id, OrderedDict()).get(session_id)

    def answered(self, client: Client, conversation: Conversation) -> None:
        """The engine took the response's input: it is the conversation's latest from now on."""
        if not conversation.stored:
            return
        sessions = self.by_client.setdefault(client.client_id, OrderedDict())
        sessions[conversation.session_id] = conversation.turn
        sessions.move_to_end(conversation.session_id)

    async def new_session(
        self, link: DaemonLink, client: Client, model: str, system_prompt: str | None
    ) -> tuple[str, int]:
        """A new session of `client` (see the class for when one is closed to make room)."""
        sessions = self.by_client.setdefault(client.client_id, OrderedDict())
        while True:
            try:
                return await link.create_session(client, model, system_prompt)
            except LimitReached:
                idle = [s for s in sessions if s not in self.running]
                if not idle:
                    raise
                del sessions[idle[0]]
                await link.close_session(idle[0])

    @asynccontextmanager
    async def short_session(
        self, link: DaemonLink, client: Client, model: str, system_prompt: str | None
    ) -> AsyncIterator[tuple[str, int]]:
        """A session for one stateless request, closed after it whatever happens (a client
        that went away included: closing aborts its generation)."""
        session_id, ctx_size = await self.new_session(link, client, model, system_prompt)
        try:
            yield session_id, ctx_size
        finally:
            with trio.CancelScope(shield=True):
                await link.close_session(session_id)


# ---- response objects and events ----------------------------------------------------------


@dataclass
class Reply:
    id: str
    model: str
    request: ResponseRequest
    created_at: int = field(default_factory=lambda: int(time.time()))
    message_id: str = field(default_factory=lambda: "msg_" + secrets.token_hex(16))


def usage(stats: Body) -> Body:
    cached = int(stats.get("cached_tokens", 0))
    input_tokens = int(stats.get("prompt_tokens", 0)) + cached
    output_tokens = int(stats.get("tokens", 0))
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _status(finish_reason: str) -> str:
    return "incomplete" if finish_reason in ("length", "context") else "completed"


def text_part(text: str) -> Body:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(reply: Reply, text: str | None, status: str) -> Body:
    return {
        "type": "message",
        "id": reply.message_id,
        "status": status,
        "role": "assistant",
        "content": [] if text is None else [text_part(text)],
    }


def response_object(
    reply: Reply,
    text: str | None,
    finish_reason: str | None,
    stats: Body | None,
    error: Body | None = None,
) -> Body:
    """The response; `finish_reason` None: still in progress (the stream's first events)."""
    if error is not None:
        status = "failed"
    elif finish_reason is None:
        status = "in_progress"
    else:
        status = _status(finish_reason)
    item_status = "incomplete" if status == "failed" else status
    output = [] if text is None else [message_item(reply, text, item_status)]
    return {
        "id": reply.id,
        "object": "response",
        "created_at": reply.created_at,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": reply.model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "truncation": "disabled",
        "usage": None if stats is None else usage(stats),
        **reply.request.echo,
    }


class EventSequence:
    """The stream's events, numbered, as the openai package reads them: (event type, data)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.number = 0
        self.text: list[str] = []

    def event(self, kind: str, **fields: Any) -> tuple[str, Body]:
        data = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return kind, data

    def where(self) -> Body:
        return {"item_id": self.reply.message_id, "output_index": 0, "content_index": 0}

    def opening(self) -> list[tuple[str, Body]]:
        started = response_object(self.reply, None, None, None)
        return [
            self.event("response.created", response=started),
            self.event("response.in_progress", response=started),
            self.event(
                "response.output_item.added",
                output_index=0,
                item=message_item(self.reply, None, "in_progress"),
            ),
            self.event("response.content_part.added", **self.where(), part=text_part("")),
        ]

    def delta(self, content: str) -> tuple[str, Body]:
        self.text.append(content)
        return self.event("response.output_text.delta", **self.where(), delta=content, logprobs=[])

    def closing(self, finish_reason: str, stats: Body) -> list[tuple[str, Body]]:
        text = "".join(self.text)
        done = response_object(self.reply, text, finish_reason, stats)
        last = "response.completed" if done["status"] == "completed" else "response.incomplete"
        return [
            self.event("response.output_text.done", **self.where(), text=text, logprobs=[]),
            self.event("response.content_part.done", **self.where(), part=text_part(text)),
            self.event(
                "response.output_item.done",
                output_index=0,
                item=message_item(self.reply, text, done["status"]),
            ),
            self.event(last, response=done),
        ]

    def failed(self, error: Body) -> tuple[str, Body]:
        failure = {"code": error["code"], "message": error["message"]}
        failed = response_object(self.reply, "".join(self.text), None, None, error=failure)
        return self.event("response.failed", response=failed)
