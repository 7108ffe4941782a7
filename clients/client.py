"""The synchronous client: the core (core.py) over one DEALER socket shared between threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, TypeVar

import zmq

from . import core
from .core import DEFAULT_ENDPOINT as DEFAULT_ENDPOINT
from .core import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from .core import Body, Call, ClientBase, GenerationBase, SessionBase, errors_hidden_by
from .core import ConnectionLost as ConnectionLost
from .dealer import EndpointError as EndpointError
from .dealer import close_dealer, open_dealer, read_ready
from .dealer import connect as connect

# Longest a reader holds the socket before another thread may send on it.
POLL_SLICE = 0.02

ResultT = TypeVar("ResultT")


class Client(ClientBase):
    """A connection to the daemon, authenticated on open; safe to share between threads.

    Every request carries a fresh int `id`. Whichever thread reads the socket files each reply
    under its `id`, so generations of different sessions can be consumed interleaved, from one
    thread or several. When the connection drops and comes back (a daemon restart, a network
    fault), the client authenticates again and resends what had no reply (see RequestTracker).
    """

    def _open(self) -> None:
        # _state guards the core and the fields below; _sock_lock is held by whoever touches
        # the sockets. Lock order: _sock_lock before _state, never the other way round.
        self._state = threading.Condition()
        self._sock_lock = threading.Lock()
        self._reading = False
        self._senders = 0
        self._sock, self._monitor = open_dealer(self.endpoint, self._curve)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        try:
            self._apply_auth(self._call(core.auth_call(self._creds), self.connect_timeout))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- operations ----

    def ping(self) -> float:
        """Round-trip time in seconds (ping needs no auth, so it also says the daemon is up)."""
        start = time.perf_counter()
        self._call(core.ping_call())
        return time.perf_counter() - start

    def create_session(self, model: str | None = None, system_prompt: str | None = None) -> Session:
        """A new session of `model` (default: the daemon's); a model that is not loaded is
        loaded first (within the client's `timeout`)."""
        return Session(self, *self._call(core.create_session_call(model, system_prompt)))

    def session(self, session_id: str) -> Session:
        """A handle to an existing session (of this client_id, or any for an admin); no request
        is sent."""
        return Session(self, session_id, None, None)

    def list_sessions(self, all_clients: bool = False) -> list[dict[str, Any]]:
        """This client's sessions; with `all_clients` (admin only) everyone's."""
        return self._call(core.list_sessions_call(all_clients))

    def stats(self) -> dict[str, Any]:
        return self._call(core.stats_call())

    def list_models(self) -> dict[str, Any]:
        """The default model's name and every known model with its state."""
        return self._call(core.list_models_call())

    def load_model(
        self,
        model: str,
        path: str | None = None,
        *,
        parallel: int | None = None,
        ctx_size: int | None = None,
        gpu_layers: int | None = None,
    ) -> dict[str, Any]:
        """Load a model (admin only); returns once it serves: `{"model", "seconds"}`."""
        call = core.load_model_call(model, path, parallel, ctx_size, gpu_layers)
        return self._call(call, self.load_timeout)

    def unload_model(self, model: str) -> dict[str, Any]:
        """Unload a model (admin only); its sessions stay and go on once it is loaded again."""
        return self._call(core.unload_model_call(model))

    def close(self) -> None:
        """Disconnect. Sessions stay on the daemon (reach them again with `session(id)`)."""
        with self._state:
            if self._core.closed:
                return
            self._core.closed = True
            self._state.notify_all()
        with self._sock_lock:
            close_dealer(self._sock, self._monitor)

    # ---- requests and replies ----

    def _call(self, call: Call[ResultT], timeout: float | None = None) -> ResultT:
        """Send one request and return what its reply means."""
        request_id = self._start(call.body)
        try:
            wait = self.timeout if timeout is None else timeout
            return call.result(self._receive(request_id, wait, call.waiting_for))
        finally:
            self._forget(request_id)

    def _start(self, body: Body) -> int:
        """Send a request (now, or once the connection is back); read replies with `_receive`."""
        with self._state:
            if self._core.closed:
                raise RuntimeError(f"the client for {self.endpoint} is closed")
            request_id = self._core.start(body)
        self._flush()
        return request_id

    def _flush(self) -> None:
        """Hand the outbox to ZeroMQ, waiting for the socket no longer than a reader's slice."""
        with self._state:
            if not self._core.outbox or self._core.closed:
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
        if self._core.closed:
            return
        outbox = self._core.outbox
        with self._state:
            frames_list = list(outbox)
            outbox.clear()
        for index, frames in enumerate(frames_list):
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                with self._state:
                    outbox.extendleft(reversed(frames_list[index:]))
                return

    def _receive(self, request_id: int, timeout: float, waiting_for: str) -> Body:
        """The next reply for `request_id`, reading the socket ourselves when nobody else is."""
        deadline = time.monotonic() + timeout
        while True:
            with self._state:
                while True:
                    reply = self._core.next_reply(request_id)
                    if reply is not None:
                        return reply
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._core.timeout_error(request_id, timeout, waiting_for)
                    if not self._reading and self._senders == 0:
                        self._reading = True
                        break
                    self._state.wait(min(remaining, POLL_SLICE))
            read: list[core.Received] = []
            try:
                self._read_socket(min(remaining, POLL_SLICE), read)
            finally:
                # Even when interrupted (Ctrl-C), what was read is filed, not lost.
                with self._state:
                    self._reading = False
                    for link, replies in read:
                        self._core.take(link, replies)
                    self._state.notify_all()
            self._flush()  # what the replies called for: an auth, resent requests

    def _read_socket(self, wait: float, read: list[core.Received]) -> None:
        """Append what is ready within `wait` seconds (holding the sockets meanwhile)."""
        with self._sock_lock:
            if self._core.closed:
                return
            self._send_queued()
            if self._poller.poll(_ms(wait)):
                read_ready(self._sock, self._monitor, [], read, drain=True)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000 + 0.999))


class Session(SessionBase[Client, "Generation"]):
    """One conversation on the daemon (its context persists between `infer` calls); leaving a
    `with` block closes it there."""

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.client._answers_after(exc):
            with errors_hidden_by(exc):
                self.close()

    def abort(self) -> None:
        """Stop a running generation; it then ends with finish_reason "aborted"."""
        self.client._call(core.abort_call(self.session_id))

    def close(self) -> None:
        """Free the session on the daemon (a running generation is aborted first)."""
        self.client._call(core.close_session_call(self.session_id))

    def _generation(self, body: Body) -> Generation:
        return Generation(self, body)


class Generation(GenerationBase[Session], Iterator[str]):
    """The pieces of one `infer`, in order, for a `for` loop (in any thread); `.stats` and
    `.finish_reason` are set at the end."""

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        client = self.session.client
        while not self.done:
            piece = self._feed(client._receive(self.request_id, client.timeout, "the next token"))
            if piece is not None:
                return piece
        raise StopIteration

    def __enter__(self) -> Generation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.session.client._answers_after(exc):
            with errors_hidden_by(exc):
                self.close()

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
        if not self.done:
            self.session.abort()

    def close(self) -> None:
        """Abort if still running and drain to the end, so the session is idle afterwards."""
        if self.done or self.session.client.closed:
            return
        self.abort()
        self.wait()
