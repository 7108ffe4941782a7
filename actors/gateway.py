"""The gateway actor: the only one that touches client sockets; authenticates and routes ops."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from ..protocol import curve, internal, messages, wire
from ..protocol.errors import (
    Forbidden,
    InternalError,
    NotFound,
    Overloaded,
    ProtocolError,
    RateLimited,
    TooLarge,
    Unauthenticated,
    error_from_body,
)
from ..protocol.messages import Request
from ..protocol.zmqtrio import TrioSocket
from .actor import ActorLink, Body, report_to_supervisor
from .budgets import Admissions, Budgets, PromptBounds, RefusalPenalty
from .config import Config, is_loopback
from .logs import EventLog
from .models import UNLOADED_MESSAGE, ModelDirectory, combine_inference
from .revocation import REVOKED_MESSAGE, ClientsWatch, Table, change_of
from .strangers import StrangerGuard

log = EventLog("gateway")

# Replies held for one connection that does not read them (then dropped): tokens are ~100
# bytes, so a client that never reads costs at most ~0.1-1 MiB here (docs/security.md).
SNDHWM_PER_CONNECTION = 1000
# Requests read ahead from one connection: beyond, libzmq stops reading its TCP socket and the
# client's sends wait (nothing is lost). A flood of small requests then costs ~0.2 MiB here.
RCVHWM_PER_CONNECTION = 1000
# Requests of one connection are handled in order (an abort never overtakes its infer);
# beyond this many waiting, the connection gets `overloaded`.
CONNECTION_QUEUE = 64
ZAP_DOMAIN = "frontend"
CONNECTION_IDLE_S = 60.0
# Owners of this many sessions are remembered (least recently used dropped first); beyond it,
# or after a restart, a session's owner is asked of the sessions actor once again.
OWNER_CACHE_ENTRIES = 100_000
# How long create_session waits for the engine to open a session (it may be restarting: the
# request waits in the socket and the restarted engine answers it).
ENGINE_OPEN_TIMEOUT_S = 120.0
ENGINE_OPEN_ATTEMPTS = 3  # an engine lost twice in a row is not coming back soon


def _version() -> str:
    try:
        return version("inferencecenter")
    except PackageNotFoundError:
        return "0.0.0"


@dataclass
class ClientState:
    client_id: str
    max_sessions: int
    priority: str
    role: str = "user"
    fingerprint: str = ""  # what it authenticated with (see revocation)
    budgets: Budgets = field(default_factory=Budgets)

    @property
    def admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Owner:
    """Who a session belongs to; fixed at create, so the gateway may remember it."""

    client_id: str
    model: str


@dataclass
class Stream:
    """A running infer: where its tokens go, and the engine it runs on."""

    peer: bytes
    request_id: int | str | None
    session_id: str
    engine: ActorLink
    revoked: bool = False  # aborted because its client was revoked


Handler = Callable[[bytes, Request], Awaitable[None]]

EMPTY_STATS = {
    "prompt_tokens": 0,
    "cached_tokens": 0,
    "tokens": 0,
    "ttft_ms": 0.0,
    "total_ms": 0.0,
    "tps": 0.0,
}


class Gateway:
    def __init__(self, config: Config, frontend: TrioSocket, guard: StrangerGuard) -> None:
        self.config = config
        self.frontend = frontend
        self.guard = guard
        guard.before_decide = self.drain_monitor
        # Where each connection's auth came from: (IP address, CURVE public key or "").
        self.origins: dict[bytes, tuple[str, str]] = {}
        frontend.on_receive = self.on_frontend
        self.nursery: trio.Nursery | None = None
        self.auth = ActorLink(internal.AUTH, config, watch=True)
        self.clients_watch = ClientsWatch(self.auth, internal.GATEWAY)
        self.clients_watch.listeners.append(self.revoke)
        self.revoked: set[bytes] = set()  # connections whose client was revoked since its auth
        # Connections with an `auth` queued or under way: requests sent behind it wait their
        # turn (they are served in order) instead of being refused on arrival.
        self.authenticating: Counter[bytes] = Counter()
        self.sessions = ActorLink(internal.SESSIONS, config)
        self.admissions = Admissions()
        self.prompt_bounds = PromptBounds()
        # By client_id (its connections share it; the clients file bounds how many).
        self.penalties: dict[str, RefusalPenalty] = {}
        self.models = ModelDirectory(config, internal.GATEWAY)
        self.clients: dict[bytes, ClientState] = {}
        self.queues: dict[bytes, trio.MemorySendChannel[Request]] = {}
        self.queued = 0  # requests in the connections' queues, not yet taken
        # Running infers by their engine and that engine's ref.
        self.streams: dict[tuple[str, int], Stream] = {}
        self.owners: OrderedDict[str, Owner] = OrderedDict()  # by session_id
        self.fd_peers: dict[int, bytes] = {}
        self.peer_fds: dict[bytes, int] = {}
        self.monitor = frontend.sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.server_info: dict[str, Any] = {
            "name": "inferencecenter",
            "version": _version(),
            "protocol": wire.PROTOCOL_VERSION,
            "models": self.models.names,  # the known models, the default first
        }
        self.handlers: dict[str, Handler] = {
            "ping": self.ping,
            "auth": self.authenticate,
            "create_session": self.create_session,
            "close_session": self.close_session,
            "list_sessions": self.list_sessions,
            "infer": self.infer,
            "abort": self.abort,
            "stats": self.stats,
            "list_models": self.list_models,
            "load_model": self.load_model,
            "unload_model": self.unload_model,
        }
        assert set(self.handlers) == set(messages.REQUEST_FIELDS)

    # ---- plumbing --------------------------------------------------------------------

    def reply(self, peer: bytes, request_id: int | str | None, op: str, **fields: Any) -> None:
        body: Body = {"op": op, **fields}
        if request_id is not None:
            body["id"] = request_id
        self.frontend.send([peer, wire.TAG, wire.pack(body)])

    def reply_error(self, peer: bytes, request_id: int | str | None, exc: ProtocolError) -> None:
        self.frontend.send([peer, wire.TAG, wire.pack(exc.to_body(request_id))])

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            for link in (self.auth, self.sessions, self.models):
                nursery.start_soon(link.run)
            self.clients_watch.start()
            nursery.start_soon(self.frontend.run)
            nursery.start_soon(self.watch_monitor)
            nursery.start_soon(self.guard.run)

    def on_frontend(self, frames: list[bytes]) -> None:
        """Check one client message (frames, size, body, auth) and queue it for its connection."""
        self.drain_monitor()
        peer, parts = frames[0], frames[1:]
        self.note_fd(peer, self.frontend.last_fd)
        try:
            body = wire.parse_client_frames(parts, self.config.max_message_bytes)
        except ProtocolError as exc:
            self.reply_error(peer, None, exc)
            return
        request_id = messages.request_id(body)
        try:
            if not self.authenticating[peer]:  # an op that needs auth: refused before its fields
                self.check_authenticated(peer, body.get("op"))
            request = messages.parse_request(body)
        except ProtocolError as exc:
            self.reply_error(peer, request_id, exc)
            return
        if request.op == "auth":
            self.origins[peer] = (
                self.frontend.last_property("Peer-Address"),
                self.frontend.last_property("User-Id"),
            )
        self.enqueue(peer, request)

    def check_authenticated(self, peer: bytes, op: Any) -> None:
        """Every op but those before auth needs a successful `auth` on this connection."""
        if (
            isinstance(op, str)
            and op in messages.REQUEST_FIELDS
            and op not in messages.OPS_BEFORE_AUTH
        ):
            if peer not in self.clients:
                if peer in self.revoked:
                    raise Unauthenticated(REVOKED_MESSAGE)
                raise Unauthenticated(f"{op} needs a successful auth first")

    async def watch_monitor(self) -> None:
        """Disconnects of quiet clients, noticed without waiting for their next message."""
        while True:
            # Edge-triggered FD, also drained by on_frontend: re-check at least once a second.
            with trio.move_on_after(1.0):
                await trio.lowlevel.wait_readable(self.monitor.FD)
            self.drain_monitor()

    def note_fd(self, peer: bytes, fd: int) -> None:
        """Remember which OS socket a peer speaks through. An fd belongs to one open connection
        at a time, so another peer still recorded on it is gone."""
        if fd < 0 or self.peer_fds.get(peer) == fd:
            return
        previous = self.fd_peers.get(fd)
        if previous is not None and previous != peer:
            self.connection_lost(previous)
        self.fd_peers[fd] = peer
        self.peer_fds[peer] = fd
        self.guard.spoke(fd)

    def drain_monitor(self) -> None:
        """Handle the monitor's pending events before any client message: a disconnect is queued
        there before a new connection on the same fd can deliver anything."""
        while True:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.on_monitor_event(frames)

    def on_monitor_event(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        if event["event"] == zmq.EVENT_ACCEPTED:
            self.guard.accepted(int(event["value"]))
        if event["event"] == zmq.EVENT_DISCONNECTED:
            self.guard.closed(int(event["value"]))
            peer = self.fd_peers.pop(int(event["value"]), None)
            if peer is not None:
                self.peer_fds.pop(peer, None)
                self.connection_lost(peer)

    def connection_lost(self, peer: bytes) -> None:
        """A client vanished: its running generations are aborted; its sessions stay."""
        self.clients.pop(peer, None)
        self.revoked.discard(peer)
        self.origins.pop(peer, None)
        self.authenticating.pop(peer, None)
        queue = self.queues.pop(peer, None)
        if queue is not None:
            queue.close()
        gone = [stream for stream in self.streams.values() if stream.peer == peer]
        for stream in gone:
            stream.engine.push("abort", session_id=stream.session_id)
            log.info("client gone, generation aborted", session_id=stream.session_id)
        if gone or queue is not None:
            log.info("client disconnected", streams=len(gone))

    def revoke(self, table: Table) -> None:
        """The clients file changed: connections of a client removed or re-keyed lose their
        auth and their running generations (they end `aborted`); one line per client."""
        cut: dict[str, list[bytes]] = {}
        for peer, state in self.clients.items():
            if table.get(state.client_id) != state.fingerprint:
                cut.setdefault(state.client_id, []).append(peer)
        for client_id, peers in cut.items():
            aborted = 0
            for peer in peers:
                del self.clients[peer]
                self.revoked.add(peer)
                for stream in self.streams.values():
                    if stream.peer == peer:
                        stream.revoked = True
                        stream.engine.push("abort", session_id=stream.session_id)
                        aborted += 1
            log.warning(
                "client revoked, connections cut",
                client_id=client_id,
                change=change_of(table, client_id),
                connections=len(peers),
                generations_aborted=aborted,
            )

    def enqueue(self, peer: bytes, request: Request) -> None:
        queue = self.queues.get(peer)
        if queue is None:
            assert self.nursery is not None
            send, receive = trio.open_memory_channel[Request](CONNECTION_QUEUE)
            self.queues[peer] = queue = send
            self.nursery.start_soon(self.serve_connection, peer, receive)
        try:
            queue.send_nowait(request)
        except trio.WouldBlock:
            self.reply_error(peer, request.id, Overloaded("too many requests in flight"))
        else:
            self.queued += 1
            if request.op == "auth":
                self.authenticating[peer] += 1

    async def serve_connection(
        self, peer: bytes, receive: trio.MemoryReceiveChannel[Request]
    ) -> None:
        while True:
            request: Request | None = None
            try:
                with trio.move_on_after(CONNECTION_IDLE_S):
                    request = await receive.receive()
                if request is None:
                    request = receive.receive_nowait()
            except trio.WouldBlock:
                if self.queues.get(peer) is not None:
                    del self.queues[peer]
                return
            except trio.EndOfChannel:  # the connection is gone
                return
            self.queued -= 1
            state = self.clients.get(peer)
            penalty = self.penalties.get(state.client_id) if state is not None else None
            if penalty is not None:
                await trio.sleep_until(penalty.until)
            try:
                self.check_authenticated(peer, request.op)  # its auth, sent before it, failed
                await self.handlers[request.op](peer, request)
            except (TooLarge, RateLimited) as exc:
                if state is not None:
                    self.penalty_of(state.client_id).refused(trio.current_time())
                self.reply_error(peer, request.id, exc)
            except ProtocolError as exc:
                self.reply_error(peer, request.id, exc)
            except Exception:
                log.exception("request failed", op=request.op)
                self.reply_error(peer, request.id, InternalError("the request failed"))

    def penalty_of(self, client_id: str) -> RefusalPenalty:
        penalty = self.penalties.get(client_id)
        if penalty is None:
            penalty = self.penalties[client_id] = RefusalPenalty()
        return penalty

    def client_of(self, peer: bytes) -> ClientState:
        state = self.clients.get(peer)
        if state is None:  # authentication was dropped while this request waited
            raise Unauthenticated("this connection is not authenticated")
        return state

    async def owned_session(
        self, peer: bytes, session_id: str, admin_too: bool = False
    ) -> tuple[ClientState, Owner]:
        """The client of this connection and the session's owner, if the client owns it (or,
        with `admin_too`, is an admin); from the owner cache, or on a miss one `check` to the
        sessions actor."""
        state = self.client_of(peer)
        owner = self.owners.get(session_id)
        if owner is None:
            found = await self.sessions.request("check", session_id=session_id)
            owner = Owner(found["client_id"], found["model"])
            self.remember_owner(session_id, owner)
        else:
            self.owners.move_to_end(session_id)
        if owner.client_id != state.client_id and not (admin_too and state.admin):
            raise Forbidden("this session belongs to another client")
        return state, owner

    def remember_owner(self, session_id: str, owner: Owner) -> None:
        self.owners[session_id] = owner
        if len(self.owners) > OWNER_CACHE_ENTRIES:
            self.owners.popitem(last=False)

    def forget_owner(self, session_id: str) -> None:
        """The session is gone (closed, or the engine no longer knows it: it expired)."""
        self.owners.pop(session_id, None)

    # ---- ops --------------------------------------------------------------------------

    async def ping(self, peer: bytes, request: Request) -> None:
        self.reply(peer, request.id, messages.PONG, time=time.time())

    async def authenticate(self, peer: bytes, request: Request) -> None:
        try:
            await self.check_key(peer, request)
        finally:
            self.authenticating[peer] -= 1
            if self.authenticating[peer] <= 0:
                del self.authenticating[peer]

    async def check_key(self, peer: bytes, request: Request) -> None:
        address, curve_key = self.origins.get(peer, ("", ""))
        result = await self.auth.request(
            "authenticate",
            client_id=request.fields["client_id"],
            api_key=request.fields["api_key"],
            address=address,
            curve_key=curve_key,
        )
        if not result.get("ok"):
            if result.get("retry_after_s"):  # refused unchecked: so is its next handshake
                self.guard.refuse(address, float(result["retry_after_s"]))
            self.clients.pop(peer, None)
            self.reply(peer, request.id, messages.AUTH_FAILED, reason=result.get("reason", ""))
            return
        state = ClientState(
            result["client_id"],
            result["max_sessions"],
            result["priority"],
            str(result.get("role", "user")),
            str(result.get("fingerprint", "")),
            Budgets.from_wire(result.get("budgets")),
        )
        if not self.clients_watch.current(state.client_id, state.fingerprint):
            # The file changed while the key was checked (the table came first): not valid now.
            self.clients.pop(peer, None)
            reason = "the clients file changed during the check: authenticate again"
            self.reply(peer, request.id, messages.AUTH_FAILED, reason=reason)
            return
        self.clients[peer] = state
        self.revoked.discard(peer)
        self.guard.authenticated(self.peer_fds.get(peer))
        self.reply(
            peer,
            request.id,
            messages.AUTH_SUCCESS,
            client_id=state.client_id,
            max_sessions=state.max_sessions,
            priority=state.priority,
            server=self.server_info,
        )

    async def create_session(self, peer: bytes, request: Request) -> None:
        """A session of a known model (the default without one), loaded on demand: the reply
        comes once the model serves."""
        state = self.client_of(peer)
        model = request.fields["model"]
        if model is None:
            model = self.models.default
        elif not model:
            raise NotFound("no model is named '' (leave `model` out for the default)")
        if not self.models.known(model):
            await self.models.engine(model)  # not_found, unless --models-dir has it now
        created = await self.sessions.request(
            "create",
            client_id=state.client_id,
            max_sessions=state.max_sessions,
            model=model,
            system_prompt=request.fields["system_prompt"],
        )
        session_id = created["session_id"]
        self.remember_owner(session_id, Owner(state.client_id, model))
        opened = await self.open_in_engine(
            model, session_id, request.fields["system_prompt"], state.client_id
        )
        self.reply(
            peer,
            request.id,
            messages.SESSION_CREATED,
            session_id=session_id,
            model=model,
            ctx_size=opened["ctx_size"],
        )

    async def open_in_engine(
        self, model: str, session_id: str, system_prompt: str | None, client_id: str
    ) -> Body:
        """Tell the model's engine (loaded on demand) of a session that exists now. An engine
        that is restarting loads it from the snapshot and then answers this `open` too (it
        waits in the socket meanwhile); an engine lost with the request in flight gets it
        again. If the model cannot be loaded, or no engine answers in time, the session is
        removed: its client never learned its id, and it would hold one of the client's
        sessions until it expired."""
        deadline = trio.current_time() + ENGINE_OPEN_TIMEOUT_S
        for attempt in range(ENGINE_OPEN_ATTEMPTS):
            try:
                engine = await self.models.engine(model)
                opened = await engine.request(
                    "open",
                    timeout=max(0.0, deadline - trio.current_time()),
                    session_id=session_id,
                    system_prompt=system_prompt,
                    client_id=client_id,
                )
                self.prompt_bounds.learn(engine.name, opened)
                return opened
            except ProtocolError as exc:
                if not isinstance(exc, InternalError):
                    with trio.CancelScope(shield=True):
                        await self.remove_unannounced(session_id)
                    raise
                last_attempt = attempt == ENGINE_OPEN_ATTEMPTS - 1
                if last_attempt or trio.current_time() >= deadline - 1.0:
                    with trio.CancelScope(shield=True):
                        await self.remove_unannounced(session_id)
                    raise
                await trio.sleep(0.5)  # the engine was lost: give it a moment to come back
        raise AssertionError("unreachable")

    async def remove_unannounced(self, session_id: str) -> None:
        self.forget_owner(session_id)
        try:
            await self.sessions.request("remove", session_id=session_id)
        except ProtocolError as exc:
            log.warning("session not removed", session_id=session_id, reason=exc.message)

    async def close_session(self, peer: bytes, request: Request) -> None:
        """Its owner, or an admin, closes a session; with its model unloaded only the sessions
        actor holds it."""
        session_id = request.fields["session_id"]
        _, owner = await self.owned_session(peer, session_id, admin_too=True)
        engine = self.models.running_link(owner.model)
        try:
            if engine is not None:
                await engine.request("close", session_id=session_id)
        except NotFound:
            pass  # the engine no longer holds it: the sessions actor decides whether it exists
        try:
            await self.sessions.request("remove", session_id=session_id)
        finally:
            self.forget_owner(session_id)
        self.reply(peer, request.id, messages.SESSION_CLOSED, session_id=session_id)

    async def list_sessions(self, peer: bytes, request: Request) -> None:
        """This client's sessions, or with `all` (admin only) everyone's, each with its
        client_id; state and tokens as each model's engine has them (a session of an unloaded
        model is idle, with the tokens of its history)."""
        state = self.client_of(peer)
        everyone = request.fields["all"]
        if everyone and not state.admin:
            raise Forbidden("listing every client's sessions is for admin clients")
        listed = await self.sessions.request(
            "list", client_id=state.client_id, all=everyone, timeout=30.0
        )
        records: list[Body] = listed["sessions"]
        details: dict[str, Body] = {}
        by_model: dict[str, list[str]] = {}
        for record in records:
            by_model.setdefault(record["model"], []).append(record["session_id"])

        async def ask(engine: ActorLink, session_ids: list[str]) -> None:
            try:
                info = await engine.request("info", session_ids=session_ids)
            except ProtocolError as exc:
                log.debug("no session details", reason=exc.message)
                return
            details.update(info["sessions"])

        async with trio.open_nursery() as nursery:
            for model, session_ids in by_model.items():
                engine = self.models.link(model)
                if engine is not None:
                    nursery.start_soon(ask, engine, session_ids)
        sessions = []
        for s in records:
            detail = details.get(s["session_id"], {})
            row = {
                "session_id": s["session_id"],
                "model": s["model"],
                "state": detail.get("state", "idle"),
                "tokens": detail.get("tokens", s.get("tokens", 0)),
                "created": s["created"],
            }
            if everyone:
                row["client_id"] = s["client_id"]
            sessions.append(row)
        self.reply(peer, request.id, messages.SESSION_LIST, sessions=sessions)

    async def infer(self, peer: bytes, request: Request) -> None:
        fields = request.fields
        session_id = fields["session_id"]
        state, owner = await self.owned_session(peer, session_id)
        engine = self.models.link(owner.model)
        if engine is not None:  # a prompt too long by its length is never forwarded
            self.prompt_bounds.check(
                engine.name,
                fields.get("prompt"),
                fields.get("messages"),
                state.budgets.max_prompt_tokens,
            )
        ticket = self.admissions.admit(state.client_id, state.budgets)
        try:
            # A model that was unloaded is loaded again; its sessions go on from their histories.
            engine = engine or await self.models.engine(owner.model)
            if self.clients.get(peer) is not state:  # revoked (or gone) while this waited
                raise Unauthenticated(REVOKED_MESSAGE)
        except BaseException:
            self.admissions.release(state.client_id, ticket)
            raise
        stream = Stream(peer, request.id, session_id, engine)
        payload: Body = {
            "session_id": session_id,
            "params": fields["params"].to_wire(),
            "reset": fields["reset"],
            "priority": state.priority,
            "client_id": state.client_id,
            "max_prompt_tokens": state.budgets.max_prompt_tokens,
        }
        if "prompt" in fields:
            payload["prompt"] = fields["prompt"]
        else:
            payload["messages"] = fields["messages"]
        if self.queued or self.frontend.has_input():
            payload["more"] = True  # others were sent with it: the engine waits for them
        ref = 0

        def end_early(finish_reason: str, message: str) -> None:
            self.reply(
                stream.peer,
                stream.request_id,
                messages.END,
                session_id=stream.session_id,
                finish_reason=finish_reason,
                stats=EMPTY_STATS,
                message=message,
            )

        def on_message(body: Body) -> None:
            op = body.get("op")
            if op == internal.TOKEN:
                self.reply(
                    stream.peer,
                    stream.request_id,
                    messages.TOKEN,
                    session_id=stream.session_id,
                    seq=body["seq"],
                    content=body["content"],
                )
                return
            engine.forget(ref)
            self.streams.pop((engine.name, ref), None)
            generated = body["stats"]["tokens"] if op == internal.END else 0
            self.admissions.release(state.client_id, ticket, int(generated))
            if body.get("unloaded"):  # its model was unloaded under it
                end_early("aborted", UNLOADED_MESSAGE)
            elif body.get("lost"):  # the engine died mid-generation
                end_early("error", "the engine restarted; the session goes on with its next infer")
            elif op == internal.END:
                if state.client_id in self.penalties:
                    self.penalties[state.client_id].served()
                end: Body = {"finish_reason": body["finish_reason"], "stats": body["stats"]}
                if "message" in body:
                    end["message"] = body["message"]
                if stream.revoked:
                    end["message"] = REVOKED_MESSAGE
                self.reply(
                    stream.peer,
                    stream.request_id,
                    messages.END,
                    session_id=stream.session_id,
                    **end,
                )
            else:
                error = error_from_body(body)
                if error.code == NotFound.code:
                    self.forget_owner(stream.session_id)
                if isinstance(error, TooLarge):  # over budget by its tokens
                    self.penalty_of(state.client_id).refused(trio.current_time())
                self.frontend.send(
                    [stream.peer, wire.TAG, wire.pack(error.to_body(stream.request_id))]
                )

        ref = engine.stream("infer", on_message, **payload)
        self.streams[(engine.name, ref)] = stream

    async def abort(self, peer: bytes, request: Request) -> None:
        """Its owner, or an admin, stops a session's generation (`aborted` even when nothing
        runs, its model unloaded included)."""
        session_id = request.fields["session_id"]
        _, owner = await self.owned_session(peer, session_id, admin_too=True)
        streaming = [s for s in self.streams.values() if s.session_id == session_id]
        if streaming:  # `aborted` goes out before the `end` it brings (a queued infer's at once)
            self.reply(peer, request.id, messages.ABORTED, session_id=session_id)
            for stream in streaming:
                stream.engine.push("abort", session_id=session_id)
            return
        engine = self.models.running_link(owner.model)
        try:
            if engine is not None:
                await engine.request("abort", session_id=session_id)
        except NotFound:
            self.forget_owner(session_id)
            raise
        self.reply(peer, request.id, messages.ABORTED, session_id=session_id)

    async def stats(self, peer: bytes, request: Request) -> None:
        state = self.client_of(peer)
        figures = await self.models.inference()
        described = await self.models.describe()
        listed = await self.sessions.request("list", client_id=state.client_id)
        inference = combine_inference(figures, described["models"], described["default"])
        self.reply(
            peer,
            request.id,
            messages.STATS,
            inference=inference,
            sessions=len(listed["sessions"]),
        )

    # ---- models -------------------------------------------------------------------------

    async def list_models(self, peer: bytes, request: Request) -> None:
        self.client_of(peer)
        listed = await self.models.model_list(self.sessions)
        self.reply(peer, request.id, messages.MODEL_LIST, **listed)

    async def load_model(self, peer: bytes, request: Request) -> None:
        """Admin only; the reply comes once the model serves."""
        state = self.client_of(peer)
        if not state.admin:
            raise Forbidden("loading models is for admin clients")
        fields = {key: value for key, value in request.fields.items() if value is not None}
        loaded = await self.models.load(**fields)
        self.reply(
            peer,
            request.id,
            messages.MODEL_LOADED,
            model=loaded["model"],
            seconds=float(loaded["seconds"]),
        )

    async def unload_model(self, peer: bytes, request: Request) -> None:
        """Admin only; generations running on the model end "aborted", its sessions stay."""
        state = self.client_of(peer)
        if not state.admin:
            raise Forbidden("unloading models is for admin clients")
        unloaded = await self.models.unload(request.fields["model"])
        self.reply(peer, request.id, messages.MODEL_UNLOADED, model=unloaded["model"])


def open_frontend(config: Config) -> TrioSocket:
    """The ROUTER, its handshakes checked by the guard's ZAP handler (under --curve, CURVE ones
    with the server's certificate; without it, NULL ones)."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.MAXMSGSIZE, wire.hard_cap(config.max_message_bytes))
    if config.curve:
        public, secret = curve.load_server_cert(Path(config.server_cert))
        curve.apply_server(sock, public, secret, ZAP_DOMAIN)
    else:
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.setsockopt(zmq.SNDHWM, SNDHWM_PER_CONNECTION)
    sock.setsockopt(zmq.RCVHWM, RCVHWM_PER_CONNECTION)
    # ZMTP heartbeats drop a silent peer (cable pulled) after --client-timeout; every peer
    # built on libzmq answers them by itself. The socket monitor then reports the connection's
    # OS socket as disconnected (see Gateway.drain_monitor).
    heartbeat_ms = int(config.client_timeout * 1000)
    sock.setsockopt(zmq.HEARTBEAT_IVL, min(2000, heartbeat_ms // 2))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, heartbeat_ms)
    sock.bind(f"tcp://{config.bind}:{config.port}")
    return TrioSocket(sock, track_fd=True)


async def main(config: Config, stop: trio.Event) -> None:
    guard = StrangerGuard(config)  # its ZAP handler is bound before the frontend
    frontend = open_frontend(config)
    gateway = Gateway(config, frontend, guard)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run)
        report_to_supervisor(config, {"op": "ready", "actor": internal.GATEWAY})
        log.info("serving", endpoint=f"tcp://{config.bind}:{config.port}")
        if not config.curve and not is_loopback(config.bind):  # --insecure-plaintext
            log.warning("serving in plaintext: keys and prompts cross the network in clear")
        await stop.wait()
        # Give ends that are still on their way (the engine stops first) a moment to leave.
        await frontend.flush(2.0)
        nursery.cancel_scope.cancel()
