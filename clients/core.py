"""The client without I/O: requests built and checked, replies routed by id, streams read.

Client (threads) and AsyncClient (trio) are thin adapters over this module: they own the socket
and the waiting, and hand the core what they read (`ClientCore.take`); the core says what to send
(`ClientCore.outbox`) and files each reply under its request (`ClientCore.next_reply`). What a
request looks like, what its reply means, how a reconnect is survived and what a token or an
`end` does to a generation is written here once, for both.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

from inferencecenter.protocol import curve, wire
from inferencecenter.protocol.errors import (
    AuthFailed,
    InternalError,
    ProtocolError,
    error_from_body,
)
from inferencecenter.protocol.messages import (
    ABORTED,
    AUTH_FAILED,
    AUTH_SUCCESS,
    END,
    ERROR,
    MODEL_LIST,
    MODEL_LOADED,
    MODEL_UNLOADED,
    PONG,
    SESSION_CLOSED,
    SESSION_CREATED,
    SESSION_LIST,
    STATS,
    TOKEN,
    parse_request,
)

from . import credentials

Body = dict[str, Any]
Frames = list[bytes]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT = 30.0
# A running daemon answers `auth` at once, so "is anyone there?" need not wait the full timeout.
DEFAULT_CONNECT_TIMEOUT = 10.0
# How long load_model waits for its reply: a large model from a slow disk takes minutes.
DEFAULT_LOAD_TIMEOUT = 600.0
# Replies come from our own daemon, not from strangers; the bound only stops a runaway peer.
MAX_REPLY_BYTES = 64 << 20
# Copies of one request sent before giving up on it (each reconnect or re-auth resends it).
MAX_SENDS = 3
# Marks the replies the client makes up itself when the connection dropped.
LOST = "connection_lost"


# ---- what a reply means ------------------------------------------------------------------


class ConnectionLost(InternalError):
    """The connection to the daemon dropped and took this request's replies with it.

    Raised by a generation that had already received tokens when the connection dropped (the
    rest of its stream went with the connection; the session and what the daemon generated stay
    on the daemon), and by a request whose copies were lost with the connection MAX_SENDS times.
    """


def reply_error(reply: Body) -> ProtocolError:
    """The exception an `error` reply (or a reply the client made up on a lost connection) means."""
    if reply.get(LOST):
        return ConnectionLost(str(reply.get("message") or "the connection to the daemon dropped"))
    return error_from_body(reply)


def expect(reply: Body, op: str) -> Body:
    """The reply when it is `op`; an `error` reply raises its typed exception."""
    got = reply.get("op")
    if got == op:
        return reply
    if got == ERROR:
        raise reply_error(reply)
    raise InternalError(f"expected a {op!r} reply, got {got!r}")


def check_auth(reply: Body) -> Body:
    """The `auth_success` reply, or AuthFailed with the daemon's reason."""
    if reply.get("op") == AUTH_FAILED:
        raise AuthFailed(str(reply.get("reason") or "wrong client_id or api_key"))
    return expect(reply, AUTH_SUCCESS)


def lost_auth(reply: Body) -> bool:
    """An `unauthenticated` error: the daemon forgot this connection (a reconnect or restart)."""
    return reply.get("op") == ERROR and reply.get("code") == "unauthenticated"


def reply_fields(reply: Body) -> Body:
    """A reply without its envelope (`op`, `id`), as the caller wants it."""
    return {key: value for key, value in reply.items() if key not in ("op", "id")}


def no_reply(endpoint: str, timeout: float, waiting_for: str, why: str = "") -> TimeoutError:
    return TimeoutError(
        f"no reply from {endpoint} within {timeout:g}s (waiting for {waiting_for}){why}: "
        f"is the daemon running?"
    )


def lost_stream_end(request_id: int, session_id: Any) -> Body:
    """The `end` a generation gets when the connection dropped in the middle of its stream."""
    return {
        "op": END,
        "id": request_id,
        "session_id": session_id,
        "finish_reason": "error",
        "stats": {},
        "message": "the connection to the daemon dropped while this generation was streaming; "
        "the rest of it is lost (the session stays on the daemon)",
        LOST: True,
    }


def errors_hidden_by(exc: BaseException | None) -> AbstractContextManager[object]:
    """Around a close on the way out of a block: with an error already on its way (the one to
    see), the close's own failure is dropped; without one, it is raised."""
    if exc is None:
        return contextlib.nullcontext()
    return contextlib.suppress(ProtocolError, TimeoutError, RuntimeError)


# ---- requests ----------------------------------------------------------------------------

ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class Call(Generic[ResultT]):
    """One request and what its reply becomes for the caller (raising for an `error`)."""

    body: Body
    result: Callable[[Body], ResultT]
    waiting_for: str = ""  # named in the TimeoutError; by default "the reply to <op>"

    def __post_init__(self) -> None:
        if not self.waiting_for:
            object.__setattr__(self, "waiting_for", f"the reply to {self.body['op']}")


class NewSession(NamedTuple):
    """What `session_created` says of a new session."""

    session_id: str
    model: str
    ctx_size: int | None


def auth_request(creds: credentials.Credentials) -> Body:
    return {"op": "auth", "client_id": creds.client_id, "api_key": creds.api_key}


def auth_call(creds: credentials.Credentials) -> Call[Body]:
    return Call(auth_request(creds), check_auth, "auth")


def ping_call() -> Call[Body]:
    return Call({"op": "ping"}, lambda reply: expect(reply, PONG))


def create_session_call(model: str | None, system_prompt: str | None) -> Call[NewSession]:
    body: Body = {"op": "create_session"}
    if model is not None:
        body["model"] = model
    if system_prompt is not None:
        body["system_prompt"] = system_prompt

    def created(reply: Body) -> NewSession:
        reply = expect(reply, SESSION_CREATED)
        ctx_size = reply.get("ctx_size")
        return NewSession(
            str(reply["session_id"]),
            str(reply.get("model", model or "")),
            ctx_size if isinstance(ctx_size, int) else None,
        )

    return Call(body, created)


def list_sessions_call(all_clients: bool = False) -> Call[list[dict[str, Any]]]:
    """This client's sessions; with `all_clients` (an admin's) every client's, with client_id."""

    def listed(reply: Body) -> list[dict[str, Any]]:
        sessions = expect(reply, SESSION_LIST).get("sessions")
        if not isinstance(sessions, list):
            return []
        return [dict(s) for s in sessions if isinstance(s, dict)]

    body: Body = {"op": "list_sessions"}
    if all_clients:
        body["all"] = True
    return Call(body, listed)


def list_models_call() -> Call[Body]:
    """`{"default": name, "models": [{model, state, parallel, ctx_size, sessions, memory_mb}]}`."""

    def listed(reply: Body) -> Body:
        fields = reply_fields(expect(reply, MODEL_LIST))
        models = fields.get("models")
        fields["models"] = [dict(m) for m in models if isinstance(m, dict)] if models else []
        return fields

    return Call({"op": "list_models"}, listed)


def load_model_call(
    model: str,
    path: str | None = None,
    parallel: int | None = None,
    ctx_size: int | None = None,
    gpu_layers: int | None = None,
) -> Call[Body]:
    """Load `model` (admin only): a known name, or a GGUF `path` on the daemon's host under
    that name (a hot swap when it is loaded); checked here as the daemon checks it."""
    body: Body = {"op": "load_model", "model": model}
    optional = {"path": path, "parallel": parallel, "ctx_size": ctx_size, "gpu_layers": gpu_layers}
    body.update({key: value for key, value in optional.items() if value is not None})
    parse_request(body)
    return Call(body, lambda reply: reply_fields(expect(reply, MODEL_LOADED)))


def unload_model_call(model: str) -> Call[Body]:
    body: Body = {"op": "unload_model", "model": model}
    parse_request(body)
    return Call(body, lambda reply: reply_fields(expect(reply, MODEL_UNLOADED)))


def stats_call() -> Call[Body]:
    return Call({"op": "stats"}, lambda reply: reply_fields(expect(reply, STATS)))


def abort_call(session_id: str) -> Call[Body]:
    return Call({"op": "abort", "session_id": session_id}, lambda reply: expect(reply, ABORTED))


def close_session_call(session_id: str) -> Call[Body]:
    body: Body = {"op": "close_session", "session_id": session_id}
    return Call(body, lambda reply: expect(reply, SESSION_CLOSED))


def infer_request(
    session_id: str,
    prompt: str | None,
    chat: Sequence[Mapping[str, str]] | None,
    reset: bool,
    params: Mapping[str, Any],
) -> Body:
    """Build an `infer` body and check it as the daemon will (BadRequest before sending).

    parse_request runs the same checks as the daemon, parse_params for `params` included, so a
    bad request fails here with the daemon's own message instead of after a round trip.
    """
    body: Body = {"op": "infer", "session_id": session_id}
    if prompt is not None:
        body["prompt"] = prompt
    if chat is not None:
        body["messages"] = [dict(turn) for turn in chat]
    if reset:
        body["reset"] = True
    if params:
        # Only the keys the caller chose go on the wire, so the daemon's defaults apply to the
        # rest (a missing seed means a random one, not a fixed default).
        body["params"] = dict(params)
    parse_request(body)
    return body


# ---- routing replies by id ---------------------------------------------------------------


class Link(enum.Enum):
    """What the socket's monitor saw happen to the connection."""

    CONNECTED = "connected"
    DROPPED = "dropped"


# Replies read together, with the link event they came with (None: replies only).
Received = tuple[Link | None, list[Frames]]

# The RequestTracker's view of the connection.
UP = "up"  # sent requests reach the daemon, authenticated
DOWN = "down"  # the connection dropped; requests wait for it to come back
AUTHENTICATING = "authenticating"  # connected again; requests wait for `auth` to succeed


@dataclass
class Outstanding:
    """A request that may have to be sent again: until its (first) reply, or its stream's end."""

    body: Body  # with its `id`
    sends: int = 0  # copies handed to ZeroMQ
    replied: bool = False  # a reply arrived (for an infer: a token)
    queued: bool = False  # to be sent once the connection is up and authenticated again
    orphaned: bool = False  # an infer resent and answered `busy`: its first copy runs elsewhere

    @property
    def op(self) -> str:
        return str(self.body["op"])


class RequestTracker:
    """Every request until it is answered, and what to do when the connection drops and returns.

    It is handed replies and the socket monitor's events (`take`), and calls `send` with frames
    to send, `deliver` with a reply for the request waiting for it, `authenticated` with an
    `auth_success` it obtained.

    ZeroMQ reconnects by itself, but a copy of a request that was on its way when the connection
    dropped is lost, and the daemon knows the new connection as unauthenticated. So when the
    connection comes back the tracker sends `auth` first, then (once it succeeded) every request
    that has had no reply yet, under the same id. A stream that had tokens cannot be resumed: it
    ends with a made-up `end` (finish_reason "error", raising ConnectionLost).
    """

    def __init__(
        self,
        creds: credentials.Credentials,
        send: Callable[[Frames], None],
        deliver: Callable[[int, Body], None],
        authenticated: Callable[[Body], None],
    ) -> None:
        self.creds = creds
        self.send = send
        self.deliver = deliver
        self.authenticated = authenticated
        self.requests: dict[int, Outstanding] = {}  # in id order: insertion order
        self.state = UP  # the first connection is authenticated by the client itself
        self.down_since: float | None = None
        self.reauth_id: int | None = None
        self.reauthentications = 0
        self._ids = itertools.count(1)

    def open(self, body: Body) -> int:
        """Give a request its id and send it now, or once the connection is usable again."""
        request_id = next(self._ids)
        request = Outstanding({**body, "id": request_id})
        self.requests[request_id] = request
        if self.state == UP:
            self._send(request)
        else:
            request.queued = True
        return request_id

    def forget(self, request_id: int) -> None:
        """Nobody waits for this request any more: never resend it, drop its replies."""
        self.requests.pop(request_id, None)

    def take(self, link: Link | None, replies: list[Frames]) -> None:
        """Replies read from the socket (link None), or a monitor event with the replies that
        were read when it was seen (those came before it, or answer copies queued meanwhile)."""
        if link is Link.DROPPED:
            self._dropped(replies)
            return
        for frames in replies:
            self._reply(frames)
        if link is Link.CONNECTED and self.state == DOWN:
            self._start_auth()

    def timeout_error(
        self, request_id: int, endpoint: str, timeout: float, waiting_for: str
    ) -> Exception:
        """What to raise when `request_id` had no reply within `timeout`."""
        request = self.requests.get(request_id)
        if request is not None and request.orphaned:
            return ConnectionLost(
                f"the daemon had started this {request.op} before the connection to {endpoint} "
                f"dropped, and its replies did not come back within {timeout:g}s"
            )
        if self.state == DOWN and self.down_since is not None:
            ago = time.monotonic() - self.down_since
            why = f"; the connection dropped {ago:.1f}s ago and has not come back"
            return no_reply(endpoint, timeout, waiting_for, why)
        if self.state == AUTHENTICATING:
            why = "; the connection came back but the daemon did not answer auth"
            return no_reply(endpoint, timeout, waiting_for, why)
        return no_reply(endpoint, timeout, waiting_for)

    # ---- inside ----

    def _send(self, request: Outstanding) -> None:
        request.sends += 1
        request.queued = False
        self.send(wire.client_frames(request.body))

    def _start_auth(self) -> None:
        self.state = AUTHENTICATING
        self.reauth_id = next(self._ids)
        self.send(wire.client_frames({**auth_request(self.creds), "id": self.reauth_id}))

    def _reply(self, frames: Frames) -> None:
        try:
            reply = wire.parse_client_frames(frames, MAX_REPLY_BYTES)
        except ProtocolError:
            return  # not a reply of this protocol; nothing could be waiting for it
        request_id = reply.get("id")
        if "id" not in reply and reply.get("op") == ERROR:
            # The daemon could not read our request's id (e.g. too_large): the newest request
            # still waiting for its first reply is the one it could not read.
            request_id = max(
                (i for i, r in self.requests.items() if r.sends and not r.replied), default=None
            )
        if isinstance(request_id, bool) or not isinstance(request_id, int):
            return
        if request_id == self.reauth_id:
            self._reauthenticated(reply)
            return
        request = self.requests.get(request_id)
        if request is None:
            return  # forgotten, finished, or an answer to a copy that was already answered
        if not request.replied and not self._first_reply(request, reply):
            return
        request.replied = True
        request.queued = False
        if request.op != "infer" or reply.get("op") != TOKEN:
            del self.requests[request_id]
        self.deliver(request_id, reply)

    def _first_reply(self, request: Outstanding, reply: Body) -> bool:
        """Whether the first reply to arrive for `request` is its answer (else it waits on)."""
        if lost_auth(reply) and request.sends < MAX_SENDS:
            # A copy the daemon read on a connection it does not know as authenticated (one
            # that came back before we noticed, or a copy queued before our auth): resend it
            # after authenticating again.
            request.queued = True
            if self.state == UP:
                self._start_auth()
            return False
        if request.sends < 2 or reply.get("op") != ERROR:
            return True
        code = reply.get("code")
        if request.op == "infer" and code == "busy":
            # An earlier copy did arrive and runs: wait for that stream (timeout_error says so).
            request.orphaned = True
            return False
        if request.op == "close_session" and code == "not_found":
            # An earlier copy closed it.
            reply.clear()
            reply.update(
                op=SESSION_CLOSED, id=request.body["id"], session_id=request.body["session_id"]
            )
        return True

    def _dropped(self, replies: list[Frames]) -> None:
        self.state = DOWN
        self.reauth_id = None
        if self.down_since is None:
            self.down_since = time.monotonic()
        for frames in replies:
            self._reply(frames)
        for request_id, request in list(self.requests.items()):
            if request.replied:
                del self.requests[request_id]
                session_id = request.body["session_id"]
                self.deliver(request_id, lost_stream_end(request_id, session_id))
                # Nobody can receive the rest of it: stop it once the connection is back, so
                # the session is soon idle again (its `aborted` reply is for nobody).
                self.open({"op": "abort", "session_id": session_id})
            elif request.sends >= MAX_SENDS:
                del self.requests[request_id]
                message = (
                    f"the connection to the daemon dropped {request.sends} times while this "
                    f"{request.op} waited for its reply"
                )
                lost = {"op": ERROR, "id": request_id, "code": "internal", "message": message}
                self.deliver(request_id, {**lost, LOST: True})
            elif request.sends:
                request.queued = True  # its copy may be lost with the connection

    def _reauthenticated(self, reply: Body) -> None:
        self.reauth_id = None
        self.state = UP
        self.down_since = None
        failure: Body | None = None
        if reply.get("op") == AUTH_SUCCESS:
            self.reauthentications += 1
            self.authenticated(reply)
        elif reply.get("op") == AUTH_FAILED:
            reason = str(reply.get("reason") or "wrong client_id or api_key")
            failure = {"op": ERROR, "code": "auth_failed", "message": reason}
        elif reply.get("op") == ERROR:
            failure = dict(reply)
        else:
            failure = {"op": ERROR, "code": "internal", "message": "unexpected reply to auth"}
        for request_id, request in list(self.requests.items()):
            if not request.queued:
                continue
            if failure is None or request.op in ("ping", "auth"):
                self._send(request)
            else:
                del self.requests[request_id]
                self.deliver(request_id, {**failure, "id": request_id})


class ClientCore:
    """A client's requests and replies without the socket: frames out, replies filed by id.

    The adapter sends what gathers in `outbox` (in order), hands what it reads to `take`, and
    asks `next_reply` for a request's replies. Not thread-safe: the sync client holds a lock
    around every call but `forget`, which finalizers call at any time.
    """

    def __init__(
        self,
        creds: credentials.Credentials,
        endpoint: str,
        authenticated: Callable[[Body], None],
    ) -> None:
        self.endpoint = endpoint
        self.outbox: deque[Frames] = deque()  # frames to send, in order
        self.mailboxes: dict[int, deque[Body]] = {}  # replies not taken yet, by request id
        self.tracker = RequestTracker(creds, self.outbox.append, self._file, authenticated)
        self.closed = False
        self._forgotten: deque[int] = deque()  # appended without a lock
        self._filed: set[int] = set()  # the requests given replies by this `take`

    @property
    def connected(self) -> bool:
        """Whether the connection is up and authenticated, as far as the client has noticed."""
        return self.tracker.state == UP

    def start(self, body: Body) -> int:
        """Open a request (its frames go to `outbox` now, or once the connection is back)."""
        self.drop_forgotten()
        request_id = self.tracker.open(body)
        self.mailboxes[request_id] = deque()
        return request_id

    def forget(self, request_id: int) -> None:
        """Nobody waits for this request any more (safe from finalizers: takes no lock)."""
        self._forgotten.append(request_id)

    def drop_forgotten(self) -> None:
        while self._forgotten:
            request_id = self._forgotten.popleft()
            self.mailboxes.pop(request_id, None)
            self.tracker.forget(request_id)

    def take(self, link: Link | None, replies: list[Frames]) -> set[int]:
        """File replies read from the socket (see RequestTracker.take); the requests that got
        replies (their readers may wake)."""
        self.drop_forgotten()
        self._filed = set()
        self.tracker.take(link, replies)
        return self._filed

    def next_reply(self, request_id: int) -> Body | None:
        """The next reply filed for `request_id`, None while there is none yet; RuntimeError
        once the client is closed (replies filed before are taken first) or the request is
        finished."""
        self.drop_forgotten()
        box = self.mailboxes.get(request_id)
        if box:
            return box.popleft()
        if self.closed:
            raise RuntimeError(f"the client for {self.endpoint} is closed")
        if box is None:
            raise RuntimeError(f"request {request_id} is finished; nothing to receive")
        return None

    def timeout_error(self, request_id: int, timeout: float, waiting_for: str) -> Exception:
        return self.tracker.timeout_error(request_id, self.endpoint, timeout, waiting_for)

    def _file(self, request_id: int, reply: Body) -> None:
        box = self.mailboxes.get(request_id)
        if box is not None:
            box.append(reply)
            self._filed.add(request_id)


class TokenStream:
    """What one `infer` has received so far: each reply fed in says what it means."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.next_seq = 0
        self.stats: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.message: str | None = None
        self.done = False

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def feed(self, reply: Body) -> str | None:
        """The piece a `token` carries; None once `end` arrived; raises for an `error`."""
        op = reply.get("op")
        if op == TOKEN:
            seq = reply.get("seq")
            if seq != self.next_seq:
                self.done = True
                raise InternalError(
                    f"token seq {seq!r} arrived where {self.next_seq} was due: replies were lost"
                )
            self.next_seq += 1
            content = reply.get("content")
            piece = content if isinstance(content, str) else ""
            self.pieces.append(piece)
            return piece
        self.done = True
        if op == END:
            stats = reply.get("stats")
            self.stats = dict(stats) if isinstance(stats, dict) else {}
            self.finish_reason = str(reply.get("finish_reason"))
            if self.finish_reason == "error":
                self.message = str(reply.get("message") or "the generation failed")
                if reply.get(LOST):
                    raise ConnectionLost(self.message)
                raise InternalError(self.message)
            return None
        if op == ERROR:
            raise reply_error(reply)
        raise InternalError(f"unexpected {op!r} reply in a token stream")


# ---- what both clients' objects share -----------------------------------------------------


class ClientBase:
    """The part of Client and AsyncClient that does no I/O: credentials, what `auth` said of
    the server, the core. An adapter adds the socket (`_open`, `_start`) and the waiting."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        client_id: str | None = None,
        api_key: str | None = None,
        *,
        clients_file: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float | None = None,
        load_timeout: float = DEFAULT_LOAD_TIMEOUT,
        curve_serverkey: str | bytes | None = None,
        curve_keypair: tuple[str | bytes, str | bytes] | None = None,
    ) -> None:
        # Resolved first, so a missing key is reported before any socket exists.
        self._creds = credentials.resolve(client_id, api_key, clients_file)
        # With the daemon's public key (Z85, its server.key), the connection is under CURVE:
        # encrypted, and only the daemon holding the secret half can answer. `curve_keypair`
        # (public, secret) is this client's own, for an entry bound by `curve_public_key`.
        self._curve = curve.client_curve(curve_serverkey, curve_keypair)
        self.endpoint = endpoint
        self.timeout = timeout
        # load_model's wait (at least `timeout`). A create_session or infer that loads its model
        # on demand waits `timeout`: give a longer one where large models load on demand.
        self.load_timeout = max(timeout, load_timeout)
        self.connect_timeout = (
            min(timeout, DEFAULT_CONNECT_TIMEOUT) if connect_timeout is None else connect_timeout
        )
        self.server: dict[str, Any] = {}
        self.client_id = self._creds.client_id
        self.max_sessions = 0
        self.priority = ""
        self._core = ClientCore(self._creds, endpoint, self._apply_auth)
        self._open()

    def _open(self) -> None:
        """The adapter's own setup (the sync client connects and authenticates here)."""

    def _start(self, body: Body) -> int:
        """Send a request (now, or once the connection is back); its replies are filed."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(endpoint={self.endpoint!r}, client_id={self.client_id!r})"

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def _tracker(self) -> RequestTracker:
        return self._core.tracker

    @property
    def _connected(self) -> bool:
        return self._core.connected

    def _apply_auth(self, reply: Body) -> None:
        server = reply.get("server")
        self.server = dict(server) if isinstance(server, dict) else {}
        self.client_id = str(reply.get("client_id", self.client_id))
        max_sessions = reply.get("max_sessions")
        self.max_sessions = max_sessions if isinstance(max_sessions, int) else 0
        self.priority = str(reply.get("priority", ""))

    def _forget(self, request_id: int) -> None:
        """Later replies for this request are discarded (safe from finalizers)."""
        self._core.forget(request_id)

    def _answers_after(self, exc: BaseException | None) -> bool:
        """Whether a request sent now, after `exc` (None: no error), would be answered rather
        than only wait for its timeout (so a block's exit closes what it opened)."""
        if self.closed or isinstance(exc, TimeoutError):
            return False
        return not isinstance(exc, ConnectionLost) or self._connected


ClientT = TypeVar("ClientT", bound=ClientBase)
GenerationT = TypeVar("GenerationT")


class SessionBase(Generic[ClientT, GenerationT]):
    """One conversation on the daemon; its context persists between `infer` calls."""

    def __init__(
        self, client: ClientT, session_id: str, model: str | None, ctx_size: int | None
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.model = model
        self.ctx_size = ctx_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.session_id!r}, model={self.model!r})"

    def infer(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        reset: bool = False,
        **params: Any,
    ) -> GenerationT:
        """Start generating (the request goes out at once); iterate the generation (`for`, or
        `async for` with the trio client) for the pieces.

        `prompt` is raw text appended to the context; `messages` are chat turns rendered with
        the model's template and appended (send only the new turns). `params` are the sampling
        params of the protocol (temp, top_k, top_p, min_p, repeat_penalty, max_tokens, seed,
        stop, ignore_eos), checked here before anything is sent.
        """
        return self._generation(infer_request(self.session_id, prompt, messages, reset, params))

    def _generation(self, body: Body) -> GenerationT:
        raise NotImplementedError


SessionT = TypeVar("SessionT", bound=SessionBase[Any, Any])


class GenerationBase(Generic[SessionT]):
    """The pieces of one `infer`, in order; `.stats` and `.finish_reason` are set at the end."""

    def __init__(self, session: SessionT, body: Body) -> None:
        self.session = session
        self._stream = TokenStream()
        client: ClientBase = session.client
        self.request_id = client._start(body)
        # An abandoned generation must not keep collecting replies forever.
        self._finalizer = weakref.finalize(self, client._forget, self.request_id)

    @property
    def text(self) -> str:
        """Everything received so far."""
        return self._stream.text

    @property
    def stats(self) -> dict[str, Any] | None:
        return self._stream.stats

    @property
    def finish_reason(self) -> str | None:
        return self._stream.finish_reason

    @property
    def done(self) -> bool:
        return self._stream.done

    def _feed(self, reply: Body) -> str | None:
        """The piece `reply` carries, None at the end (raising for an error end); once the
        stream is done, its request is forgotten."""
        try:
            return self._stream.feed(reply)
        finally:
            if self._stream.done:
                self._finalizer()
