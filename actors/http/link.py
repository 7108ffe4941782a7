"""The HTTP actor's way into the daemon: auth, sessions, engine and monitor over the internal
sockets, as the ZeroMQ gateway reaches them (never through the public frontend)."""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from ...protocol import internal
from ...protocol.errors import (
    ERROR_TYPES,
    AuthFailed,
    BadRequest,
    Forbidden,
    InternalError,
    NotFound,
    ProtocolError,
    RateLimited,
    error_from_body,
)
from ...protocol.messages import MAX_SYSTEM_PROMPT_BYTES as MAX_SYSTEM
from ..actor import ActorLink, Body
from ..budgets import Admissions, Budgets, PromptBounds
from ..config import Config
from ..logs import EventLog
from ..models import UNLOADED_MESSAGE, ModelDirectory, combine_inference
from ..revocation import REVOKED_MESSAGE, ClientsWatch, Table, change_of

log = EventLog("http")

# As the gateway: an engine that is restarting answers `open` once it is back.
ENGINE_OPEN_TIMEOUT_S = 120.0
SESSION_MODELS = 100_000  # sessions whose model is remembered (a miss asks the sessions actor)
NO_STATS: Body = {
    "prompt_tokens": 0,
    "cached_tokens": 0,
    "tokens": 0,
    "ttft_ms": 0.0,
    "total_ms": 0.0,
    "tps": 0.0,
}


@dataclass(frozen=True)
class Client:
    """An authenticated client, as the auth actor describes it."""

    client_id: str
    max_sessions: int
    priority: str
    role: str = "user"
    fingerprint: str = ""  # what it authenticated with (see revocation)
    budgets: Budgets = field(default_factory=Budgets)


@dataclass
class Token:
    seq: int
    content: str
    logprobs: list[Any] | None = None  # per token of `content`, when the infer asked for them


@dataclass
class End:
    finish_reason: str
    stats: Body
    message: str = ""
    revoked: bool = False  # aborted because its client was revoked


@dataclass
class InferStream:
    """One running infer: its `Token`s then one `End` arrive on `events`; an error before the
    first token raises from `next()` as its protocol error."""

    session_id: str
    ref: int
    events: trio.MemoryReceiveChannel[Token | End | ProtocolError]
    ended: bool = False
    tokens: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)

    async def next(self) -> Token | End:
        event = await self.events.receive()
        if isinstance(event, ProtocolError):
            self.ended = True
            raise event
        if isinstance(event, End):
            self.ended = True
        else:
            self.tokens.append(event.content)
            self.logprobs.extend(event.logprobs or ())
        return event

    async def collect(self) -> End:
        """Wait for the end; the text is then `"".join(self.tokens)`."""
        while True:
            event = await self.next()
            if isinstance(event, End):
                return event


class RequestsUnderway:
    """Generation requests between their arrival and their infer: while any is on its way, an
    infer goes out marked `more`, so the engine starts those sent together in one step (as the
    gateway does for requests queued behind one another) instead of one after the other."""

    def __init__(self) -> None:
        self.on_the_way = 0

    @contextmanager
    def arriving(self) -> Iterator[Underway]:
        request = Underway(self)
        self.on_the_way += 1
        try:
            yield request
        finally:
            request.left()


class Underway:
    """One generation request on its way to its infer."""

    def __init__(self, requests: RequestsUnderway) -> None:
        self.requests = requests
        self.counted = True

    def left(self) -> None:
        """Its infer is on its way to the engine (or it ended without one)."""
        if self.counted:
            self.counted = False
            self.requests.on_the_way -= 1


class DaemonLink:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.auth = ActorLink(internal.AUTH, config, watch=True)
        self.clients = ClientsWatch(self.auth, internal.HTTP)
        self.clients.listeners.append(self.revoke)
        # Who else holds authenticated connections (the WebSocket ones): each cuts those of
        # revoked clients and says how many per client_id.
        self.revokers: list[Callable[[Table], Counter[str]]] = []
        self.generations: dict[str, Client] = {}  # running infers: session_id -> client
        self.revoked_generations: set[str] = set()  # aborted by a revocation, not yet ended
        self.sessions = ActorLink(internal.SESSIONS, config)
        self.admissions = Admissions()
        self.underway = RequestsUnderway()
        self.prompt_bounds = PromptBounds()
        # Sessions whose infer waits for its admission, and those of them aborted meanwhile.
        self.admitting: set[str] = set()
        self.aborted_early: set[str] = set()
        self.models = ModelDirectory(config, internal.HTTP)
        self.monitor = ActorLink(internal.MONITOR, config)
        self.ctx_sizes: dict[str, int] = {}  # a session's context per model, as its engine said
        self.session_models: OrderedDict[str, str] = OrderedDict()  # never changes after create
        self.nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            for link in (self.auth, self.sessions, self.models, self.monitor):
                nursery.start_soon(link.run)
            self.clients.start()

    # ---- clients ------------------------------------------------------------------------

    async def authenticate_key(self, api_key: str, address: str = "") -> Client:
        """The client whose key this is (HTTP's Bearer key names the client by itself);
        `address`, the peer's, slows down guesses from one place (the auth actor's backoff)."""
        result = await self.auth.request("authenticate_key", api_key=api_key, address=address)
        client = self.valid(result)
        if client is None:
            raise AuthFailed("missing or wrong api key (Authorization: Bearer <key>)")
        return client

    async def authenticate(self, client_id: str, api_key: str, address: str = "") -> Client | None:
        result = await self.auth.request(
            "authenticate", client_id=client_id, api_key=api_key, address=address
        )
        return self.valid(result)

    def valid(self, result: Body) -> Client | None:
        """The client of a successful auth, unless the clients file changed during the check;
        an attempt the auth actor refused unchecked (too many failures) is `rate_limited`."""
        if not result.get("ok"):
            retry = result.get("retry_after_s")
            if isinstance(retry, (int, float)):
                raise RateLimited(str(result.get("reason", "too many failed attempts")), retry)
            return None
        client = _client(result)
        return client if self.clients.current(client.client_id, client.fingerprint) else None

    def revoke(self, table: Table) -> None:
        """The clients file changed: generations of a client removed or re-keyed are aborted
        (they end `aborted`), its WebSocket connections lose their auth; one line per client."""
        aborted: Counter[str] = Counter()
        for session_id, client in list(self.generations.items()):
            if table.get(client.client_id) != client.fingerprint:
                self.revoked_generations.add(session_id)
                self.abort(session_id)
                aborted[client.client_id] += 1
        connections: Counter[str] = Counter()
        for revoker in self.revokers:
            connections.update(revoker(table))
        for client_id in sorted(set(aborted) | set(connections)):
            log.warning(
                "client revoked, connections cut",
                client_id=client_id,
                change=change_of(table, client_id),
                connections=connections[client_id],
                generations_aborted=aborted[client_id],
            )

    # ---- sessions -----------------------------------------------------------------------

    async def create_session(
        self, client: Client, model: str, system_prompt: str | None = None
    ) -> tuple[str, int]:
        """A new session of `client` in the sessions actor and its model's engine (loaded on
        demand): (id, ctx_size)."""
        if system_prompt and len(system_prompt.encode("utf-8", "surrogatepass")) > MAX_SYSTEM:
            raise BadRequest(f"the system prompt is longer than {MAX_SYSTEM} bytes")
        if not self.models.known(model):
            await self.models.engine(model)  # not_found, unless --models-dir has it now
        created = await self.sessions.request(
            "create",
            client_id=client.client_id,
            max_sessions=client.max_sessions,
            model=model,
            system_prompt=system_prompt,
        )
        session_id = str(created["session_id"])
        self.remember(session_id, model)
        try:
            engine = await self.models.engine(model)
            opened = await engine.request(
                "open",
                timeout=ENGINE_OPEN_TIMEOUT_S,
                session_id=session_id,
                system_prompt=system_prompt,
                client_id=client.client_id,
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.close_session(session_id)
            raise
        self.prompt_bounds.learn(engine.name, opened)
        self.ctx_sizes[model] = ctx_size = int(opened["ctx_size"])
        return session_id, ctx_size

    async def ctx_size_of(self, model: str) -> int:
        """A session's context on `model`: as its engine said at the last open, else as the
        registry describes the model."""
        known = self.ctx_sizes.get(model)
        if known is None:
            described = await self.models.describe()
            sizes = {m["model"]: m["ctx_size"] for m in described["models"]}
            known = int(sizes.get(model) or self.config.ctx_size)
        return known

    def remember(self, session_id: str, model: str) -> None:
        self.session_models[session_id] = model
        if len(self.session_models) > SESSION_MODELS:
            self.session_models.popitem(last=False)

    async def model_of(self, session_id: str) -> str:
        """The session's model (remembered, else asked of the sessions actor)."""
        model = self.session_models.get(session_id)
        if model is None:
            found = await self.sessions.request("check", session_id=session_id)
            model = str(found["model"])
            self.remember(session_id, model)
        return model

    async def close_session(self, session_id: str) -> None:
        """Close a session (a generation running in it is aborted); a gone one is no error."""
        try:
            engine = self.models.running_link(await self.model_of(session_id))
            if engine is not None:
                await engine.request("close", session_id=session_id)
        except ProtocolError as exc:
            log.debug("engine close failed", session_id=session_id, reason=exc.message)
        try:
            await self.sessions.request("remove", session_id=session_id)
        except NotFound:
            pass
        self.session_models.pop(session_id, None)

    async def check_owner(self, client: Client, session_id: str) -> str:
        """The session's model, if `client` owns it."""
        found = await self.sessions.request("check", session_id=session_id)
        if found["client_id"] != client.client_id:
            raise Forbidden("this session belongs to another client")
        self.remember(session_id, str(found["model"]))
        return str(found["model"])

    async def list_sessions(self, client: Client) -> list[Body]:
        listed = await self.sessions.request("list", client_id=client.client_id)
        sessions: list[Body] = listed["sessions"]
        return sessions

    async def session_tokens(self, session_id: str) -> int | None:
        """Tokens the session's context holds now (None: the engine does not know it)."""
        engine = await self.models.engine(await self.model_of(session_id))
        info = await engine.request("info", session_ids=[session_id])
        found = info["sessions"].get(session_id)
        return None if found is None else int(found["tokens"])

    # ---- inference ----------------------------------------------------------------------

    def infer(
        self,
        client: Client,
        session_id: str,
        params: Body,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
    ) -> InferStream:
        """Start an infer on the session's model (loaded again first if it was unloaded); its
        tokens and end come on the stream's channel."""
        send, receive = trio.open_memory_channel[Token | End | ProtocolError](math.inf)
        payload: Body = {
            "session_id": session_id,
            "params": params,
            "reset": False,
            "priority": client.priority,
            "client_id": client.client_id,
            "max_prompt_tokens": client.budgets.max_prompt_tokens,
        }
        if messages is not None:
            payload["messages"] = messages
        else:
            payload["prompt"] = prompt or ""
        started: list[tuple[ActorLink, int]] = []  # its engine and that engine's ref
        tickets: list[int] = []  # its admission's

        def on_message(body: Body) -> None:
            op = body.get("op")
            if op == internal.TOKEN:
                send.send_nowait(
                    Token(int(body["seq"]), str(body["content"]), body.get("logprobs"))
                )
                return
            engine, ref = started[0]
            engine.forget(ref)
            self.generations.pop(session_id, None)
            revoked = session_id in self.revoked_generations
            self.revoked_generations.discard(session_id)
            generated = body["stats"]["tokens"] if op == internal.END else 0
            self.admissions.release(client.client_id, tickets[0], int(generated))
            if body.get("unloaded"):
                send.send_nowait(End("aborted", dict(NO_STATS), UNLOADED_MESSAGE))
            elif body.get("lost"):
                send.send_nowait(InternalError("the engine restarted; retry the request"))
            elif op == internal.END:
                reason, stats = str(body["finish_reason"]), dict(body["stats"])
                if revoked:
                    send.send_nowait(End(reason, stats, REVOKED_MESSAGE, revoked=True))
                else:
                    send.send_nowait(End(reason, stats, str(body.get("message", ""))))
            else:
                send.send_nowait(remote_error(body))
            send.close()

        stream = InferStream(session_id, 0, receive)
        model = self.session_models.get(session_id, self.models.default)

        async def start() -> None:
            """Admitted within the client's budgets, on its engine (loaded if need be)."""
            self.admitting.add(session_id)
            try:
                engine = self.models.link(model)
                if engine is not None:  # a prompt too long by its length is never forwarded
                    self.prompt_bounds.check(
                        engine.name, prompt, messages, client.budgets.max_prompt_tokens
                    )
                tickets.append(self.admissions.admit(client.client_id, client.budgets))
                try:
                    engine = engine or await self.models.engine(model)
                except BaseException:
                    self.admissions.release(client.client_id, tickets[0])
                    raise
            except ProtocolError as exc:
                self.generations.pop(session_id, None)
                send.send_nowait(exc)
                send.close()
                return
            finally:
                self.admitting.discard(session_id)
            started.append((engine, 0))
            if self.underway.on_the_way or self.admitting:
                payload["more"] = True  # others were sent with it: the engine waits for them
            stream.ref = engine.stream("infer", on_message, **payload)
            started[0] = (engine, stream.ref)
            if session_id in self.aborted_early:
                self.aborted_early.discard(session_id)
                engine.push("abort", session_id=session_id)

        self.generations[session_id] = client
        assert self.nursery is not None
        self.nursery.start_soon(start)
        return stream

    def abort(self, session_id: str) -> None:
        """Ask the engine to end a running generation (it then sends its `end`)."""
        if session_id in self.admitting:
            self.aborted_early.add(session_id)  # sent once the infer is
        engine = self.models.running_link(self.session_models.get(session_id, ""))
        if engine is not None:
            engine.push("abort", session_id=session_id)

    async def abort_now(self, session_id: str) -> None:
        """Abort, answered by the engine (`aborted` even when nothing runs)."""
        if session_id in self.admitting:
            self.aborted_early.add(session_id)
        engine = self.models.running_link(await self.model_of(session_id))
        if engine is not None:
            await engine.request("abort", session_id=session_id)

    async def abort_and_wait(self, stream: InferStream) -> None:
        """Abort and drain to the end, so the session is idle again when this returns."""
        if stream.ended:
            return
        self.abort(stream.session_id)
        with trio.move_on_after(10.0):
            try:
                await stream.collect()
            except ProtocolError:
                pass

    # ---- figures ------------------------------------------------------------------------

    async def inference_stats(self) -> Body:
        """The `inference` map, every model's figures combined (and each in `models`)."""
        figures = await self.models.inference()
        described = await self.models.describe()
        return combine_inference(figures, described["models"], described["default"])

    async def list_models(self) -> Body:
        """`list_models`' answer, as the ZeroMQ gateway gives it."""
        return await self.models.model_list(self.sessions)

    async def load_model(self, model: str, path: str | None) -> Body:
        fields: Body = {"model": model} if path is None else {"model": model, "path": path}
        return await self.models.load(**fields)

    async def monitor_request(self, op: str, **fields: Any) -> Body:
        return await self.monitor.request(op, timeout=5.0, **fields)


def remote_error(body: Body) -> ProtocolError:
    """An `error` message as its exception, codes this side has no class for included (their
    code kept, for the HTTP status), with the `retry_after_s` a budget gives."""
    code = str(body.get("code", "internal"))
    if code in ERROR_TYPES:
        error = error_from_body(body)
    else:
        error = ProtocolError(str(body.get("message", code)))
        setattr(error, "code", code)  # noqa: B010 (an instance's code, not the class's)
    if isinstance(body.get("retry_after_s"), (int, float)):
        setattr(error, "retry_after_s", float(body["retry_after_s"]))  # noqa: B010
    return error


def _client(result: Body) -> Client:
    return Client(
        str(result["client_id"]),
        int(result["max_sessions"]),
        str(result["priority"]),
        str(result.get("role", "user")),
        str(result.get("fingerprint", "")),
        Budgets.from_wire(result.get("budgets")),
    )
