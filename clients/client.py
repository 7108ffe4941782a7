"""The synchronous client: one DEALER socket, every reply matched to its request by `id`."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import zmq

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

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT = 30.0
# A running daemon answers `auth` at once, so "is anyone there?" need not wait the full timeout.
DEFAULT_CONNECT_TIMEOUT = 10.0
# Replies come from our own daemon, not from strangers; the bound only stops a runaway peer.
MAX_REPLY_BYTES = 64 << 20
# Longest a reader holds the socket before another thread may send on it.
POLL_SLICE = 0.02


# ---- shared with async_client: what a reply means, independent of how it was received ----


def expect(reply: Body, op: str) -> Body:
    """The reply when it is `op`; an `error` reply raises its typed exception."""
    got = reply.get("op")
    if got == op:
        return reply
    if got == ERROR:
        raise error_from_body(reply)
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


def no_reply(endpoint: str, timeout: float, waiting_for: str) -> TimeoutError:
    return TimeoutError(
        f"no reply from {endpoint} within {timeout:g}s (waiting for {waiting_for}): "
        f"is the daemon running?"
    )


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
                raise InternalError(self.message)
            return None
        if op == ERROR:
            raise error_from_body(reply)
        raise InternalError(f"unexpected {op!r} reply in a token stream")


# ---- the sync client ----------------------------------------------------------------------


class Client:
    """A connection to the daemon, authenticated on open; safe to share between threads.

    Every request carries a fresh int `id`. Whichever thread reads the socket files each reply
    under its `id`, so generations of different sessions can be consumed interleaved, from one
    thread or several.
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

        self._ids = itertools.count(1)
        # _state guards the fields below; _sock_lock is held by whoever touches the socket.
        self._state = threading.Condition()
        self._sock_lock = threading.Lock()
        self._boxes: dict[int, deque[Body]] = {}
        self._unanswered: set[int] = set()
        self._forgotten: deque[int] = deque()  # appended from finalizers, so lock-free
        self._reading = False
        self._senders = 0
        self._closed = False
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        connect(self._sock, endpoint)
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
        reply = check_auth(self._exchange(auth_request(self._creds), timeout, "auth"))
        server = reply.get("server")
        self.server = dict(server) if isinstance(server, dict) else {}
        self.client_id = str(reply.get("client_id", self.client_id))
        self.max_sessions = int(reply.get("max_sessions", 0))
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
            self._sock.close(linger=0)

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- requests and replies ----

    def _request(self, body: Body, op: str) -> Body:
        """Send one request and return its reply, checked to be `op`.

        ZeroMQ reconnects on its own after a network fault or a gateway restart, and the daemon
        knows the new connection as unauthenticated: then authenticate again and retry once.
        """
        reply = self._exchange(body)
        if lost_auth(reply):
            self._authenticate()
            reply = self._exchange(body)
        return expect(reply, op)

    def _exchange(
        self, body: Body, timeout: float | None = None, waiting_for: str | None = None
    ) -> Body:
        """Send one request and return its single reply, whatever it is."""
        request_id = self._open_box()
        try:
            self._send({**body, "id": request_id})
            reply = self._receive(
                request_id,
                self.timeout if timeout is None else timeout,
                waiting_for or f"the reply to {body['op']}",
            )
        finally:
            self._forget(request_id)
        return reply

    def _start(self, body: Body) -> int:
        """Send a request whose replies are a stream; the caller reads them with `_receive`."""
        request_id = self._open_box()
        try:
            self._send({**body, "id": request_id})
        except BaseException:
            self._forget(request_id)
            raise
        return request_id

    def _open_box(self) -> int:
        request_id = next(self._ids)
        with self._state:
            self._boxes[request_id] = deque()
            self._unanswered.add(request_id)
        return request_id

    def _forget(self, request_id: int) -> None:
        """Drop a request's mailbox; later replies for it are discarded (safe from finalizers)."""
        self._forgotten.append(request_id)

    def _send(self, body: Body) -> None:
        frames = wire.client_frames(body)
        deadline = time.monotonic() + self.timeout
        with self._state:
            self._check_open()
            self._senders += 1  # a reader seeing this hands the socket over after its slice
        try:
            with self._sock_lock:
                self._check_open()
                while True:
                    try:
                        self._sock.send_multipart(frames, zmq.NOBLOCK)
                        return
                    except zmq.Again:
                        # Only at the high-water mark; wait for room rather than block forever.
                        remaining = deadline - time.monotonic()
                        if remaining <= 0 or not self._sock.poll(_ms(remaining), zmq.POLLOUT):
                            raise no_reply(self.endpoint, self.timeout, "room to send") from None
        finally:
            with self._state:
                self._senders -= 1
                self._state.notify_all()

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
                        raise no_reply(self.endpoint, timeout, waiting_for)
                    if not self._reading and self._senders == 0:
                        self._reading = True
                        break
                    self._state.wait(min(remaining, POLL_SLICE))
            received: list[list[bytes]] = []
            try:
                self._read_socket(min(remaining, POLL_SLICE), received)
            finally:
                # Even when interrupted (Ctrl-C), what was read is filed, not lost.
                with self._state:
                    self._reading = False
                    for frames in received:
                        self._route(frames)
                    self._state.notify_all()

    def _read_socket(self, wait: float, received: list[list[bytes]]) -> None:
        """Append every message ready within `wait` seconds (holding the socket meanwhile)."""
        with self._sock_lock:
            if self._closed or not self._sock.poll(_ms(wait), zmq.POLLIN):
                return
            while True:
                try:
                    received.append(self._sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    return

    def _route(self, frames: list[bytes]) -> None:
        """File one reply under its request's id (called with _state held)."""
        self._drop_forgotten()
        try:
            reply = wire.parse_client_frames(frames, MAX_REPLY_BYTES)
        except ProtocolError:
            return  # not a reply of this protocol; nothing could be waiting for it
        request_id = reply.get("id")
        if "id" not in reply and reply.get("op") == ERROR:
            # The daemon could not read our request's id (e.g. too_large): the newest request
            # still waiting for its first reply is the one it could not read.
            request_id = max(self._unanswered, default=None)
        if not isinstance(request_id, int):
            return
        box = self._boxes.get(request_id)
        if box is not None:
            box.append(reply)
            self._unanswered.discard(request_id)

    def _drop_forgotten(self) -> None:
        while self._forgotten:
            request_id = self._forgotten.popleft()
            self._boxes.pop(request_id, None)
            self._unanswered.discard(request_id)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the client for {self.endpoint} is closed")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000 + 0.999))


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
        if self.client.closed or isinstance(exc, TimeoutError):
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


class Generation(Iterator[str]):
    """The pieces of one `infer`, in order; `.stats` and `.finish_reason` are set at the end."""

    def __init__(self, session: Session, body: Body) -> None:
        self.session = session
        self._body = body
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
                if self._stream.next_seq == 0 and lost_auth(reply):
                    self._restart()
                    continue
                piece = self._stream.feed(reply)
                if piece is not None:
                    return piece
        finally:
            if self._stream.done:
                self._finalizer()
        raise StopIteration

    def _restart(self) -> None:
        """Authenticate again and resend the infer, which the daemon refused unread."""
        client = self.session.client
        self._finalizer()
        client._authenticate()
        self.request_id = client._start(self._body)
        self._finalizer = weakref.finalize(self, client._forget, self.request_id)

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
        elif not isinstance(exc, TimeoutError):
            with contextlib.suppress(ProtocolError, TimeoutError, RuntimeError):
                self.close()  # best effort: the error already on its way is the one to see

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
