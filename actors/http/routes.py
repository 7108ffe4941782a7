"""The HTTP routes: the OpenAI API, /health and the routes of the systems this daemon replaces.

Every route but /health takes `Authorization: Bearer <api key>` and answers errors in OpenAI's
shape. A generation runs in a short-lived session of the key's client unless it continues a
stored response (/v1/responses); when its client goes away, closing that session aborts it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from ...protocol.errors import (
    BadRequest,
    Forbidden,
    InternalError,
    NotFound,
    ProtocolError,
    TooLarge,
    Unauthenticated,
)
from ..config import Config
from ..logs import EventLog
from . import responses as rs
from . import seed, shapes
from .link import Client, DaemonLink, End, InferStream, Token, Underway
from .shapes import Body, FieldError, Generation, ReplyIds, Unavailable

log = EventLog("http")

Endpoint = Callable[[Request], Awaitable[Response]]
# What a stream gives out: a JSON object as `data`, a bare `data` line ("[DONE]"), or a typed
# event (`event:` and its JSON `data`, as the Responses API streams).
SseEvent = Body | str | tuple[str, Body]


class DaemonState:
    """Whether every actor of the daemon is ready (the supervisor says so)."""

    def __init__(self) -> None:
        self.ready = False

    def check(self) -> None:
        if not self.ready:
            raise Unavailable("the daemon is loading; GET /health says when it serves")


class ClientGone(Exception):
    """The HTTP client disconnected while its request ran."""


def error_response(exc: ProtocolError) -> JSONResponse:
    headers = {}
    retry = shapes.retry_after(exc)
    if retry is not None:
        headers["Retry-After"] = str(retry)
    return JSONResponse(
        shapes.error_of(exc), status_code=shapes.error_status(exc.code), headers=headers
    )


def _handled(endpoint: Endpoint) -> Endpoint:
    """Protocol errors become OpenAI-shaped error replies; anything else is a 500 and a log."""

    async def run(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ProtocolError as exc:
            return error_response(exc)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        except Exception:
            log.exception("request failed", path=request.url.path)
            return error_response(InternalError("the request failed"))

    return run


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, a wrong method) in OpenAI's shape too."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "not_found", 405: "bad_request"}.get(status, "bad_request")
    message = f"{request.method} {request.url.path[:100]}: {getattr(exc, 'detail', '')}"
    headers = getattr(exc, "headers", None)  # a 405's Allow
    return JSONResponse(shapes.error_json(code, message), status_code=status, headers=headers)


class GenerationStream(EventSourceResponse):
    """Server-sent events of one generation; `cleanup` runs however the stream ends (a client
    that disconnects included: it closes the short-lived session, which aborts the generation)."""

    def __init__(
        self, events: AsyncIterator[SseEvent], cleanup: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(_sse(events), ping=15, headers={"Cache-Control": "no-cache"})
        self.cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with trio.CancelScope(shield=True):
                await self.cleanup()


async def _sse(events: AsyncIterator[SseEvent]) -> AsyncIterator[ServerSentEvent]:
    async for event in events:
        if isinstance(event, str):
            yield ServerSentEvent(data=event)
        elif isinstance(event, tuple):
            yield ServerSentEvent(data=json.dumps(event[1]), event=event[0])
        else:
            yield ServerSentEvent(data=json.dumps(event))


class Routes:
    def __init__(self, config: Config, link: DaemonLink, state: DaemonState) -> None:
        self.config = config
        self.link = link
        self.state = state
        self.models = link.models.names  # the known models, the default first (kept current)
        self.started = int(time.time())
        self.stored = rs.StoredConversations()

    def app(self, websocket: Any) -> Starlette:
        get, post = ["GET"], ["POST"]
        routes = [
            Route("/health", self.health, methods=get),
            Route("/v1/models", _handled(self.list_models), methods=get),
            Route("/v1/completions", _handled(self.completions), methods=post),
            Route("/v1/chat/completions", _handled(self.chat_completions), methods=post),
            Route("/v1/responses", _handled(self.responses), methods=post),
            Route("/stats", _handled(self.stats), methods=get),
            Route("/status", _handled(self.status), methods=get),
            Route("/metrics", _handled(self.metrics), methods=get),
            Route("/load_model", _handled(self.load_model), methods=post),
            WebSocketRoute("/ws", websocket),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})

    # ---- plumbing -----------------------------------------------------------------------

    async def authorized(self, request: Request, *, while_loading: bool = False) -> Client:
        if not while_loading:
            self.state.check()
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("missing Authorization: Bearer <api key>")
        address = request.client.host if request.client else ""
        return await self.link.authenticate_key(key.strip(), address)

    async def read_json(self, request: Request) -> Body:
        """The body as a JSON object, at most --max-message-bytes (like a ZeroMQ message)."""
        limit = self.config.max_message_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"the body is {declared} bytes, the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except ValueError:
            raise BadRequest("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def model_of(self, name: str | None) -> str:
        if name is None:
            return self.models[0]
        if name not in self.models:
            error = NotFound(f"no model {name[:80]!r}; this daemon serves {', '.join(self.models)}")
            error.param = "model"  # type: ignore[attr-defined]
            raise error
        return name

    async def until_disconnect(self, request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def watched(self, request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
        """`work()`, cancelled (ClientGone) if the client disconnects meanwhile."""
        result: list[Any] = []
        refused: list[ProtocolError] = []  # raised here, not wrapped in the nursery's group
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                try:
                    result.append(await work())
                except ProtocolError as exc:
                    refused.append(exc)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            await self.until_disconnect(request)
            nursery.cancel_scope.cancel()
        if refused:
            raise refused[0]
        if not result:
            raise ClientGone()
        return result[0]

    # ---- /health and /v1/models -----------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if not self.state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def list_models(self, request: Request) -> Response:
        await self.authorized(request)
        return JSONResponse(shapes.model_list(self.models, self.started))

    # ---- the seed systems' routes --------------------------------------------------------

    async def stats(self, request: Request) -> Response:
        """The `stats` op's map (this client's sessions), and the same figures per model."""
        client = await self.authorized(request)
        inference = await self.link.inference_stats()
        sessions = await self.link.list_sessions(client)
        return JSONResponse(
            {"inference": inference, "sessions": len(sessions), "models": inference["models"]}
        )

    async def status(self, request: Request) -> Response:
        """The models and their state, as `list_models` answers (answered while loading too)."""
        await self.authorized(request, while_loading=True)
        return JSONResponse(await self.link.list_models())

    async def metrics(self, request: Request) -> Response:
        """Prometheus text: the monitor's series, the same as --prometheus-port serves."""
        await self.authorized(request, while_loading=True)
        text = (await self.link.monitor_request("prometheus"))["text"]
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def load_model(self, request: Request) -> Response:
        """Admin only: `load_model` (a known name, or a file under a name: a new model or a hot
        swap); the answer comes once the model serves."""
        client = await self.authorized(request)
        if client.role != "admin":
            raise Forbidden("loading models is for admin clients")
        body = await self.read_json(request)
        name, path = seed.load_model_fields(body)
        loaded = await self.link.load_model(name, path)
        return JSONResponse({"status": "loaded", "model": name, "seconds": loaded["seconds"]})

    # ---- completions --------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        with self.link.underway.arriving() as underway:
            client = await self.authorized(request)
            generation = shapes.parse_completion(await self.read_json(request))
            return await self.generate(request, client, generation, underway, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        with self.link.underway.arriving() as underway:
            client = await self.authorized(request)
            generation = shapes.parse_chat(await self.read_json(request))
            return await self.generate(request, client, generation, underway, chat=True)

    async def generate(
        self,
        request: Request,
        client: Client,
        generation: Generation,
        underway: Underway,
        *,
        chat: bool,
    ) -> Response:
        """One generation in a short-lived session: a JSON reply, or a stream of chunks."""
        model = self.model_of(generation.model)
        ids = ReplyIds(shapes.new_id("chatcmpl-" if chat else "cmpl-"), model)
        async with self.resources() as stack:
            session_id, ctx_size = await stack.enter_async_context(
                self.stored.short_session(self.link, client, model, generation.system_prompt)
            )
            stream = self.start_infer(
                stack,
                underway,
                client,
                session_id,
                generation.infer_params(ctx_size),
                prompt=generation.prompt,
                messages=generation.messages,
            )
            if not generation.stream:
                end: End = await self.watched(request, stream.collect)
                check_end(end)
                text = "".join(stream.tokens)
                build = shapes.chat_completion if chat else shapes.completion
                logprobs = stream.logprobs if generation.logprobs else None
                return JSONResponse(build(ids, text, end.finish_reason, end.stats, logprobs))
            # The first event before the status line: an infer refused (a full queue) is a 429.
            first: Token | End = await self.watched(request, stream.next)
            if chat:
                events = chat_events(ids, stream, first, generation.include_usage)
            else:
                events = completion_events(ids, stream, first, generation.include_usage)
            return GenerationStream(events, stack.pop_all().aclose)

    @asynccontextmanager
    async def resources(self) -> AsyncIterator[AsyncExitStack]:
        """What a request holds (a session, a running infer), released when it ends, or handed
        to its stream with `pop_all()`; released even when the request is cancelled."""
        stack = AsyncExitStack()
        try:
            yield stack
        finally:
            with trio.CancelScope(shield=True):
                await stack.aclose()

    def start_infer(
        self,
        stack: AsyncExitStack,
        underway: Underway,
        client: Client,
        session_id: str,
        params: Body,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
    ) -> InferStream:
        """An infer that is aborted if the request ends before it does."""
        underway.left()
        stream = self.link.infer(client, session_id, params, prompt=prompt, messages=messages)

        def abort_unless_ended() -> None:
            if not stream.ended:
                self.link.abort(session_id)

        stack.callback(abort_unless_ended)
        return stream

    # ---- responses ----------------------------------------------------------------------

    async def responses(self, request: Request) -> Response:
        with self.link.underway.arriving() as underway:
            return await self.respond(request, underway)

    async def respond(self, request: Request, underway: Underway) -> Response:
        client = await self.authorized(request)
        ask = rs.parse_request(await self.read_json(request))
        model = self.model_of(ask.model)
        async with self.resources() as stack:
            conversation = await self.conversation(client, ask, model, stack)
            reply = rs.Reply(conversation.response_id, model, ask)
            stream = self.start_infer(
                stack,
                underway,
                client,
                conversation.session_id,
                ask.infer_params(conversation.ctx_size),
                messages=ask.turns,
            )
            if not ask.stream:
                end: End = await self.watched(request, stream.collect)
                self.stored.answered(client, conversation)
                check_end(end)
                text = "".join(stream.tokens)
                return JSONResponse(rs.response_object(reply, text, end.finish_reason, end.stats))
            first: Token | End = await self.watched(request, stream.next)
            self.stored.answered(client, conversation)
            events = response_events(reply, stream, first)
            return GenerationStream(events, stack.pop_all().aclose)

    async def conversation(
        self, client: Client, ask: rs.ResponseRequest, model: str, stack: AsyncExitStack
    ) -> rs.Conversation:
        """The session a response runs in: the one of `previous_response_id` (its owner and
        that it is the conversation's latest response checked), or a new one: kept when the
        response is stored, closed after it otherwise."""
        if ask.previous_response_id is not None:
            session_id, turn = rs.parse_response_id(ask.previous_response_id)
            try:
                if await self.link.check_owner(client, session_id) != model:
                    raise FieldError("model", "the previous response was made by another model")
            except (NotFound, Forbidden):
                raise rs.unknown_response(ask.previous_response_id) from None
            latest = self.stored.latest(client, session_id)
            if latest is not None and latest != turn:
                raise FieldError(
                    "previous_response_id",
                    "only the latest response of a conversation can be continued",
                )
            ctx_size = await self.link.ctx_size_of(model)
            conversation = rs.Conversation(session_id, ctx_size, True, turn + 1)
        elif not ask.store:
            session_id, ctx_size = await stack.enter_async_context(
                self.stored.short_session(self.link, client, model, ask.instructions)
            )
            return rs.Conversation(session_id, ctx_size, stored=False)
        else:
            session_id, ctx_size = await self.stored.new_session(
                self.link, client, model, ask.instructions
            )
            conversation = rs.Conversation(session_id, ctx_size, True)
        self.stored.running.add(session_id)
        stack.callback(self.stored.running.discard, session_id)
        return conversation


def check_end(end: End) -> None:
    """An end that is no answer: the engine failed, the client was revoked, or the daemon is
    stopping."""
    if end.revoked:
        raise Unauthenticated(end.message)
    if end.finish_reason == "error":
        raise InternalError(end.message or "the generation failed")
    if end.finish_reason == "aborted":
        raise Unavailable("the generation was aborted (the daemon is stopping)")


async def outcome(
    stream: InferStream, first: Token | End
) -> AsyncIterator[Token | End | ProtocolError]:
    """A generation's pieces of text, then its end, or the error that ended it instead (the
    engine lost, the daemon stopping): what a stream that already said 200 must tell."""
    event = first
    while True:
        if isinstance(event, End):
            try:
                check_end(event)
            except ProtocolError as exc:
                yield exc
                return
            yield event
            return
        if event.content:
            yield event
        try:
            event = await stream.next()
        except ProtocolError as exc:
            yield exc
            return


async def chat_events(
    ids: ReplyIds, stream: InferStream, first: Token | End, include_usage: bool
) -> AsyncIterator[SseEvent]:
    yield shapes.chat_chunk(ids, {"role": "assistant", "content": ""}, None, include_usage)
    async for item in outcome(stream, first):
        if isinstance(item, Token):
            logprobs = shapes.chat_logprobs(item.logprobs)
            yield shapes.chat_chunk(ids, {"content": item.content}, None, include_usage, logprobs)
        elif isinstance(item, ProtocolError):
            yield shapes.error_of(item)  # the openai package raises it as an APIError
        else:
            yield shapes.chat_chunk(ids, {}, item.finish_reason, include_usage)
            if include_usage:
                yield shapes.usage_chunk(ids, "chat.completion.chunk", item.stats)
            yield "[DONE]"


async def completion_events(
    ids: ReplyIds, stream: InferStream, first: Token | End, include_usage: bool
) -> AsyncIterator[SseEvent]:
    offset = 0  # where the next token starts in the whole text (legacy logprobs' text_offset)
    async for item in outcome(stream, first):
        if isinstance(item, Token):
            logprobs = shapes.completion_logprobs(item.logprobs, offset)
            if logprobs is not None:
                offset += sum(len(token) for token in logprobs["tokens"])
            yield shapes.completion_chunk(ids, item.content, None, logprobs)
        elif isinstance(item, ProtocolError):
            yield shapes.error_of(item)
        else:
            yield shapes.completion_chunk(ids, "", item.finish_reason)
            if include_usage:
                yield shapes.usage_chunk(ids, "text_completion", item.stats)
            yield "[DONE]"


async def response_events(
    reply: rs.Reply, stream: InferStream, first: Token | End
) -> AsyncIterator[tuple[str, Body]]:
    """The Responses API's stream: created, the text's deltas, then completed."""
    events = rs.EventSequence(reply)
    for item in events.opening():
        yield item
    async for piece in outcome(stream, first):
        if isinstance(piece, Token):
            yield events.delta(piece.content)
        elif isinstance(piece, ProtocolError):
            yield events.failed(shapes.error_of(piece)["error"])
        else:
            for item in events.closing(piece.finish_reason, piece.stats):
                yield item
