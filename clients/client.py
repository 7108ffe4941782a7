"""The synchronous client: one DEALER socket, every reply matched to its request by `id`."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from inferencecenter.protocol import wire
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
# Replies come from our own daemon, not from strangers; the bound only stops a runaway peer.
MAX_REPLY_BYTES = 64 << 20
# Longest a reader holds the socket before another thread may send on it.
POLL_SLICE = 0.02
# ZMTP heartbeats: a daemon that stops answering them for HEARTBEAT_TIMEOUT is a dropped
# connection (then ZeroMQ reconnects), not a silent hang; HEARTBEAT_TTL tells the daemon how
# long it may go without hearing from us (our own heartbeats keep that from ever happening).
HEARTBEAT_IVL_MS = 1_000
HEARTBEAT_TIMEOUT_MS = 3_000
HEARTBEAT_TTL_MS = 10_000
# What the socket monitor reports: the connection dropped, the connection is there again.
LINK_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
# Copies of one request sent before giving up on it (each reconnect or re-auth resends it).
MAX_SENDS = 3
# Marks the replies the client makes up itself when the connection dropped.
LOST = "connection_lost"


# ---- shared with async_client: what a reply means, independent of how it was received ----


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


def auth_request(creds: credentials.Credentials) -> Body:
    return {"op": "auth", "client_id": creds.client_id, "api_key": creds.api_key}


def check_auth(reply: Body) -> Body:
    """The `auth_success` reply, or AuthFailed with the daemon's reason."""
    if reply.get("op") == AUTH_FAILED:
        raise AuthFailed(str(reply.get("reason") or "wrong client_id or api_key"))
    return expect(reply, AUTH_SUCCESS)


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


def lost_auth(reply: Body) -> bool:
    """An `unauthenticated` error: the daemon forgot this connection (a reconnect or restart)."""
    return reply.get("op") == ERROR and reply.get("code") == "unauthenticated"


def reply_fields(reply: Body) -> Body:
    """A reply without its envelope (`op`, `id`), as the caller wants it."""
    return {key: value for key, value in reply.items() if key not in ("op", "id")}


class EndpointError(ValueError):
    """The endpoint is not one ZeroMQ can connect to (the message shows the expected form)."""


def connect(sock: zmq.Socket[bytes], endpoint: str) -> None:
    """Connect, or close the socket and raise EndpointError for a malformed endpoint."""
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        reason = "unsupported transport" if exc.errno == zmq.EPROTONOSUPPORT else "malformed"
        raise EndpointError(
            f"cannot connect to {endpoint!r} ({reason}): an endpoint looks like tcp://HOST:PORT"
        ) from None


def open_dealer(endpoint: str) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """The client's DEALER, heartbeating and connected, and the PAIR reporting its LINK_EVENTS."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL_MS)
    connect(sock, endpoint)
    return sock, sock.get_monitor_socket(LINK_EVENTS)


def close_dealer(sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes]) -> None:
    with contextlib.suppress(zmq.ZMQError):
        sock.disable_monitor()
    monitor.close(linger=0)
    sock.close(linger=0)


def link_event(frames: Frames) -> int:
    """The event a message of the monitor socket reports (zmq.EVENT_*)."""
    return int(parse_monitor_message(frames)["event"])


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

    No I/O of its own, so the sync and the trio client share it: they hand it replies and the
    socket monitor's events (`take`), and it calls `send` with frames to send, `deliver` with a
    reply for the request waiting for it, `authenticated` with an `auth_success` it obtained.

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

    def take(self, event: int, replies: list[Frames]) -> None:
        """Replies read from the socket (event 0), or a monitor event with the replies that were
        read when it was seen (those came before it, or are answers to copies queued meanwhile)."""
        if event == zmq.EVENT_DISCONNECTED:
            self._dropped(replies)
            return
        for frames in replies:
            self._reply(frames)
        if event == zmq.EVENT_CONNECTED and self.state == DOWN:
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


class TokenStream:
    """What one `infer` has received so far; both generation classes feed replies into it."""

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


# ---- the sync client ----------------------------------------------------------------------


class Client:
    """A connection to the daemon, authenticated on open; safe to share between threads.

    Every request carries a fresh int `id`. Whichever thread reads the socket files each reply
    under its `id`, so generations of different sessions can be consumed interleaved, from one
    thread or several. When the connection drops and comes back (a daemon restart, a network
    fault), the client authenticates again and resends what had no reply (see RequestTracker).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        client_id: str | None = None,
        api_key: str | None = None,
        *,
        clients_file: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float | None = None,
    ) -> None:
        creds = credentials.resolve(client_id, api_key, clients_file)
        self._creds = creds
        self.endpoint = endpoint
        self.timeout = timeout
        self.server: dict[str, Any] = {}
        self.client_id = creds.client_id
        self.max_sessions = 0
        self.priority = ""

        # _state guards the fields below; _sock_lock is held by whoever touches the sockets.
        # Lock order: _sock_lock before _state, never the other way round.
        self._state = threading.Condition()
        self._sock_lock = threading.Lock()
        self._boxes: dict[int, deque[Body]] = {}
        self._outbox: deque[Frames] = deque()  # frames to send, in order
        self._tracker = RequestTracker(creds, self._outbox.append, self._deliver, self._apply_auth)
        self._forgotten: deque[int] = deque()  # appended from finalizers, so lock-free
        self._reading = False
        self._senders = 0
        self._closed = False
        self._sock, self._monitor = open_dealer(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        try:
            wait = (
                min(timeout, DEFAULT_CONNECT_TIMEOUT)
                if connect_timeout is None
                else connect_timeout
            )
            self._authenticate(wait)
        except BaseException:
            self.close()
            raise

    def _authenticate(self, timeout: float | None = None) -> None:
        self._apply_auth(check_auth(self._exchange(auth_request(self._creds), timeout, "auth")))

    def _apply_auth(self, reply: Body) -> None:
        server = reply.get("server")
        self.server = dict(server) if isinstance(server, dict) else {}
        self.client_id = str(reply.get("client_id", self.client_id))
        max_sessions = reply.get("max_sessions")
        self.max_sessions = max_sessions if isinstance(max_sessions, int) else 0
        self.priority = str(reply.get("priority", ""))

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(endpoint={self.endpoint!r}, client_id={self.client_id!r})"

    # ---- operations ----

    def ping(self) -> float:
        """Round-trip time in seconds (ping needs no auth, so it also says the daemon is up)."""
        start = time.perf_counter()
        self._request({"op": "ping"}, PONG)
        return time.perf_counter() - start

    def create_session(self, model: str | None = None, system_prompt: str | None = None) -> Session:
        body: Body = {"op": "create_session"}
        if model is not None:
            body["model"] = model
        if system_prompt is not None:
            body["system_prompt"] = system_prompt
        reply = self._request(body, SESSION_CREATED)
        ctx_size = reply.get("ctx_size")
        return Session(
            self,
            str(reply["session_id"]),
            str(reply.get("model", model or "")),
            ctx_size if isinstance(ctx_size, int) else None,
        )

    def session(self, session_id: str) -> Session:
        """A handle to an existing session (of this client_id); no request is sent."""
        return Session(self, session_id, None, None)

    def list_sessions(self) -> list[dict[str, Any]]:
        reply = self._request({"op": "list_sessions"}, SESSION_LIST)
        sessions = reply.get("sessions")
        if not isinstance(sessions, list):
            return []
        return [dict(s) for s in sessions if isinstance(s, dict)]

    def stats(self) -> dict[str, Any]:
        return reply_fields(self._request({"op": "stats"}, STATS))

    def close(self) -> None:
        """Disconnect. Sessions stay on the daemon (reach them again with `session(id)`)."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._state.notify_all()
        with self._sock_lock:
            close_dealer(self._sock, self._monitor)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def _connected(self) -> bool:
        """Whether the connection is up and authenticated, as far as the client has noticed."""
        return self._tracker.state == UP

    # ---- requests and replies ----

    def _request(self, body: Body, op: str) -> Body:
        """Send one request and return its reply, checked to be `op`."""
        return expect(self._exchange(body), op)

    def _exchange(
        self, body: Body, timeout: float | None = None, waiting_for: str | None = None
    ) -> Body:
        """Send one request and return its single reply, whatever it is."""
        request_id = self._start(body)
        try:
            return self._receive(
                request_id,
                self.timeout if timeout is None else timeout,
                waiting_for or f"the reply to {body['op']}",
            )
        finally:
            self._forget(request_id)

    def _start(self, body: Body) -> int:
        """Send a request (now, or once the connection is back); read replies with `_receive`."""
        with self._state:
            self._check_open()
            self._drop_forgotten()
            request_id = self._tracker.open(body)
            self._boxes[request_id] = deque()
        self._flush()
        return request_id

    def _forget(self, request_id: int) -> None:
        """Drop a request's mailbox; later replies for it are discarded (safe from finalizers)."""
        self._forgotten.append(request_id)

    def _deliver(self, request_id: int, reply: Body) -> None:
        """File a reply under its request (the tracker calls this with _state held)."""
        box = self._boxes.get(request_id)
        if box is not None:
            box.append(reply)

    def _flush(self) -> None:
        """Hand the outbox to ZeroMQ, waiting for the socket no longer than a reader's slice."""
        with self._state:
            if not self._outbox or self._closed:
                return
            self._senders += 1  # a reader seeing this hands the socket over after its slice
        try:
            with self._sock_lock:
                self._send_queued()
        finally:
            with self._state:
                self._senders -= 1
                self._state.notify_all()

    def _send_queued(self) -> None:
        """Send the outbox in order (with _sock_lock held). What ZeroMQ refuses at its high-water
        mark stays queued for the next reader's slice; the request's timeout bounds the wait."""
        if self._closed:
            return
        with self._state:
            frames_list = list(self._outbox)
            self._outbox.clear()
        for index, frames in enumerate(frames_list):
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                with self._state:
                    self._outbox.extendleft(reversed(frames_list[index:]))
                return

    def _receive(self, request_id: int, timeout: float, waiting_for: str) -> Body:
        """The next reply for `request_id`, reading the socket ourselves when nobody else is."""
        deadline = time.monotonic() + timeout
        while True:
            with self._state:
                while True:
                    self._drop_forgotten()
                    box = self._boxes.get(request_id)
                    if box:
                        return box.popleft()
                    self._check_open()
                    if box is None:
                        raise RuntimeError(f"request {request_id} is finished; nothing to receive")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._tracker.timeout_error(
                            request_id, self.endpoint, timeout, waiting_for
                        )
                    if not self._reading and self._senders == 0:
                        self._reading = True
                        break
                    self._state.wait(min(remaining, POLL_SLICE))
            read: list[tuple[int, list[Frames]]] = []
            try:
                self._read_socket(min(remaining, POLL_SLICE), read)
            finally:
                # Even when interrupted (Ctrl-C), what was read is filed, not lost.
                with self._state:
                    self._reading = False
                    self._drop_forgotten()
                    for event, replies in read:
                        self._tracker.take(event, replies)
                    self._state.notify_all()
            self._flush()  # what the replies called for: an auth, resent requests

    def _read_socket(self, wait: float, read: list[tuple[int, list[Frames]]]) -> None:
        """Append what is ready within `wait` seconds (holding the sockets meanwhile): monitor
        events first, each with the replies ready when it was seen, then the other replies."""
        with self._sock_lock:
            if self._closed:
                return
            self._send_queued()
            if not self._poller.poll(_ms(wait)):
                return
            while True:
                try:
                    event = link_event(self._monitor.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
                replies: list[Frames] = []
                read.append((event, replies))
                if event == zmq.EVENT_DISCONNECTED:
                    self._recv_all(replies)
            replies = []
            read.append((0, replies))
            self._recv_all(replies)

    def _recv_all(self, replies: list[Frames]) -> None:
        while True:
            try:
                replies.append(self._sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return

    def _drop_forgotten(self) -> None:
        while self._forgotten:
            request_id = self._forgotten.popleft()
            self._boxes.pop(request_id, None)
            self._tracker.forget(request_id)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the client for {self.endpoint} is closed")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000 + 0.999))


def nobody_answers(exc: BaseException | None, connected: bool) -> bool:
    """Whether a request sent now, after `exc`, would only wait for its timeout."""
    return isinstance(exc, TimeoutError) or (isinstance(exc, ConnectionLost) and not connected)


class Session:
    """One conversation on the daemon; its context persists between `infer` calls."""

    def __init__(
        self, client: Client, session_id: str, model: str | None, ctx_size: int | None
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.model = model
        self.ctx_size = ctx_size

    def __repr__(self) -> str:
        return f"Session({self.session_id!r}, model={self.model!r})"

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.client.closed or nobody_answers(exc, self.client._connected):
            return  # nobody to tell, or nobody answering: do not wait a second timeout
        if exc is None:
            self.close()
            return
        with contextlib.suppress(ProtocolError, TimeoutError, RuntimeError):
            self.close()  # best effort: the error already on its way is the one to see

    def infer(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        reset: bool = False,
        **params: Any,
    ) -> Generation:
        """Start generating; iterate the Generation for the pieces.

        `prompt` is raw text appended to the context; `messages` are chat turns rendered with
        the model's template and appended (send only the new turns). `params` are the sampling
        params of the protocol (temp, top_k, top_p, min_p, repeat_penalty, max_tokens, seed,
        stop, ignore_eos), checked here before anything is sent.
        """
        return Generation(self, infer_request(self.session_id, prompt, messages, reset, params))

    def abort(self) -> None:
        """Stop a running generation; it then ends with finish_reason "aborted"."""
        self.client._request({"op": "abort", "session_id": self.session_id}, ABORTED)

    def close(self) -> None:
        """Free the session on the daemon (a running generation is aborted first)."""
        self.client._request({"op": "close_session", "session_id": self.session_id}, SESSION_CLOSED)


class StreamView:
    """What a generation shows of its stream, the same for the sync and the trio client."""

    _stream: TokenStream

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


class Generation(StreamView, Iterator[str]):
    """The pieces of one `infer`, in order; `.stats` and `.finish_reason` are set at the end."""

    def __init__(self, session: Session, body: Body) -> None:
        self.session = session
        self._stream = TokenStream()
        self.request_id = session.client._start(body)
        # An abandoned generation must not keep collecting replies forever.
        self._finalizer = weakref.finalize(self, session.client._forget, self.request_id)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        client = self.session.client
        try:
            while not self._stream.done:
                reply = client._receive(self.request_id, client.timeout, "the next token")
                piece = self._stream.feed(reply)
                if piece is not None:
                    return piece
        finally:
            if self._stream.done:
                self._finalizer()
        raise StopIteration

    def __enter__(self) -> Generation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        elif not nobody_answers(exc, self.session.client._connected):
            with contextlib.suppress(ProtocolError, TimeoutError, RuntimeError):
                self.close()  # best effort: the error already on its way is the one to see

    def wait(self) -> str:
        """Consume the rest of the stream and return the whole text."""
        for _ in self:
            pass
        return self.text

    def abort(self) -> None:
        """Ask the daemon to stop; keep iterating (or `wait()`) to reach the "aborted" end.

        The session takes its next infer only after that end (before it: `busy`). This does not
        read the stream itself, so another thread may be consuming it meanwhile; `close()`
        aborts and drains.
        """
        if not self._stream.done:
            self.session.abort()

    def close(self) -> None:
        """Abort if still running and drain to the end, so the session is idle afterwards."""
        if self._stream.done or self.session.client.closed:
            return
        self.abort()
        self.wait()
