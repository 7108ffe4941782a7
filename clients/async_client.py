"""The trio client: the same shape as Client; the socket's owner task routes replies by id."""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import trio
import zmq

from inferencecenter.protocol.errors import ProtocolError
from inferencecenter.protocol.messages import (
    ABORTED,
    PONG,
    SESSION_CLOSED,
    SESSION_CREATED,
    SESSION_LIST,
    STATS,
)
from inferencecenter.protocol.zmqtrio import TrioSocket

from . import credentials
from .core import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_ENDPOINT,
    DEFAULT_TIMEOUT,
    UP,
    Body,
    ConnectionLost,
    Frames,
    GenerationBase,
    Received,
    RequestTracker,
    TokenStream,
    auth_request,
    check_auth,
    expect,
    infer_request,
    reply_fields,
)
from .dealer import close_dealer, open_dealer, read_ready

# Longest wait on the monitor's FD before it is read anyway (it is edge-triggered).
MONITOR_HEDGE_S = 0.5


class _Route:
    """Where the socket's owner task puts the replies of one request."""

    def __init__(self) -> None:
        # Unbounded, so one unread stream never holds up the replies of other requests.
        self.send, self.receive = trio.open_memory_channel[Body](math.inf)


class AsyncClient:
    """A connection to the daemon for trio code: `async with AsyncClient(...) as client:`.

    Entering starts a nursery with the socket's owner task (which routes each reply to its
    request) and a watcher of the socket monitor, then authenticates (AuthFailed on
    `auth_failed`); leaving cancels both and closes the socket. Reconnects are handled as in
    Client: authenticate again, resend what had no reply (see RequestTracker).
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
        # Resolved now, so a missing key is reported before any socket exists.
        self._creds = credentials.resolve(client_id, api_key, clients_file)
        self.endpoint = endpoint
        self.timeout = timeout
        self.connect_timeout = (
            min(timeout, DEFAULT_CONNECT_TIMEOUT) if connect_timeout is None else connect_timeout
        )
        self.server: dict[str, Any] = {}
        self.client_id = self._creds.client_id
        self.max_sessions = 0
        self.priority = ""

        self._routes: dict[int, _Route] = {}
        self._tracker = RequestTracker(self._creds, self._send, self._deliver, self._apply_auth)
        self._forgotten: deque[int] = deque()  # appended from finalizers
        self._socket: TrioSocket | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncClient(endpoint={self.endpoint!r}, client_id={self.client_id!r})"

    async def __aenter__(self) -> AsyncClient:
        if self._nursery is not None or self._closed:
            raise RuntimeError("an AsyncClient can be entered only once")
        sock, self._monitor = open_dealer(self.endpoint)
        self._socket = TrioSocket(sock, on_receive=self._on_reply)
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._socket.run)
        self._nursery.start_soon(self._watch_monitor)
        try:
            await self._authenticate(self.connect_timeout)
        except BaseException:
            # Leave cleanly, then raise the error itself (not wrapped in an ExceptionGroup).
            await self._shutdown()
            raise
        return self

    async def _authenticate(self, timeout: float | None = None) -> None:
        reply = await self._exchange(auth_request(self._creds), timeout, "auth")
        self._apply_auth(check_auth(reply))

    def _apply_auth(self, reply: Body) -> None:
        server = reply.get("server")
        self.server = dict(server) if isinstance(server, dict) else {}
        self.client_id = str(reply.get("client_id", self.client_id))
        max_sessions = reply.get("max_sessions")
        self.max_sessions = max_sessions if isinstance(max_sessions, int) else 0
        self.priority = str(reply.get("priority", ""))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if exc is not None and not isinstance(exc, (trio.Cancelled, BaseExceptionGroup)):
            # An error of the caller's own code: let it propagate as itself. Cancelled must go
            # to the nursery, whose cancel scope may be the one that raised it.
            await self._shutdown()
            return False
        return await self._shutdown(exc_type, exc, tb)

    async def _shutdown(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> bool | None:
        self._closed = True
        assert self._nursery is not None and self._nursery_manager is not None
        assert self._socket is not None and self._monitor is not None
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_manager.__aexit__(exc_type, exc, tb)
        finally:
            close_dealer(self._socket.sock, self._monitor)
            self._socket.close()
            for route in self._routes.values():
                route.send.close()  # a reader still waiting learns the client is gone

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def _connected(self) -> bool:
        """Whether the connection is up and authenticated, as far as the client has noticed."""
        return self._tracker.state == UP

    # ---- operations ----

    async def ping(self) -> float:
        """Round-trip time in seconds."""
        start = time.perf_counter()
        await self._request({"op": "ping"}, PONG)
        return time.perf_counter() - start

    async def create_session(
        self, model: str | None = None, system_prompt: str | None = None
    ) -> AsyncSession:
        body: Body = {"op": "create_session"}
        if model is not None:
            body["model"] = model
        if system_prompt is not None:
            body["system_prompt"] = system_prompt
        reply = await self._request(body, SESSION_CREATED)
        ctx_size = reply.get("ctx_size")
        return AsyncSession(
            self,
            str(reply["session_id"]),
            str(reply.get("model", model or "")),
            ctx_size if isinstance(ctx_size, int) else None,
        )

    def session(self, session_id: str) -> AsyncSession:
        """A handle to an existing session (of this client_id); no request is sent."""
        return AsyncSession(self, session_id, None, None)

    async def list_sessions(self) -> list[dict[str, Any]]:
        reply = await self._request({"op": "list_sessions"}, SESSION_LIST)
        sessions = reply.get("sessions")
        if not isinstance(sessions, list):
            return []
        return [dict(s) for s in sessions if isinstance(s, dict)]

    async def stats(self) -> dict[str, Any]:
        return reply_fields(await self._request({"op": "stats"}, STATS))

    # ---- requests and replies ----

    async def _request(self, body: Body, op: str) -> Body:
        """Send one request and return its reply, checked to be `op`."""
        return expect(await self._exchange(body), op)

    async def _exchange(
        self, body: Body, timeout: float | None = None, waiting_for: str | None = None
    ) -> Body:
        request_id = self._start(body)
        try:
            reply = await self._receive(
                request_id,
                self.timeout if timeout is None else timeout,
                waiting_for or f"the reply to {body['op']}",
            )
        finally:
            self._forget(request_id)
        return reply

    def _start(self, body: Body) -> int:
        """Queue a request (now, or once the connection is back); its replies go to a route."""
        if self._closed or self._socket is None:
            raise RuntimeError(f"the client for {self.endpoint} is not open")
        self._drop_forgotten()
        request_id = self._tracker.open(body)
        self._routes[request_id] = _Route()
        return request_id

    def _send(self, frames: Frames) -> None:
        assert self._socket is not None
        self._socket.send(frames)

    def _deliver(self, request_id: int, reply: Body) -> None:
        route = self._routes.get(request_id)
        if route is not None:
            route.send.send_nowait(reply)

    async def _receive(self, request_id: int, timeout: float, waiting_for: str) -> Body:
        self._drop_forgotten()
        route = self._routes.get(request_id)
        if route is None:
            raise RuntimeError(f"request {request_id} has no route (already finished)")
        with trio.move_on_after(timeout):
            try:
                return await route.receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise RuntimeError(f"the client for {self.endpoint} is closed") from None
        raise self._tracker.timeout_error(request_id, self.endpoint, timeout, waiting_for)

    def _forget(self, request_id: int) -> None:
        self._forgotten.append(request_id)

    def _drop_forgotten(self) -> None:
        while self._forgotten:
            request_id = self._forgotten.popleft()
            route = self._routes.pop(request_id, None)
            if route is not None:
                route.send.close()
            self._tracker.forget(request_id)

    def _on_reply(self, frames: Frames) -> None:
        """Route one reply (called in the socket's owner task); monitor events go first."""
        self._drop_forgotten()
        self._read_monitor(frames)

    async def _watch_monitor(self) -> None:
        """Drops and reconnects, noticed also while no reply arrives."""
        assert self._monitor is not None
        while True:
            with trio.move_on_after(MONITOR_HEDGE_S):
                await trio.lowlevel.wait_readable(self._monitor.FD)
            self._drop_forgotten()
            self._read_monitor()

    def _read_monitor(self, reply: Frames | None = None) -> None:
        """Hand the tracker the monitor's pending events, then `reply` (see read_ready)."""
        assert self._socket is not None and self._monitor is not None
        read: list[Received] = []
        read_ready(self._socket.sock, self._monitor, [] if reply is None else [reply], read, False)
        for link, replies in read:
            self._tracker.take(link, replies)


class AsyncSession:
    """One conversation on the daemon; its context persists between `infer` calls."""

    def __init__(
        self, client: AsyncClient, session_id: str, model: str | None, ctx_size: int | None
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.model = model
        self.ctx_size = ctx_size

    def __repr__(self) -> str:
        return f"AsyncSession({self.session_id!r}, model={self.model!r})"

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lost = isinstance(exc, ConnectionLost) and not self.client._connected
        if self.client.closed or isinstance(exc, TimeoutError) or lost:
            return  # nobody to tell, or nobody answering: do not wait a second timeout
        with trio.CancelScope(shield=True):
            if exc is None:
                await self.close()
                return
            with contextlib.suppress(ProtocolError, TimeoutError, RuntimeError):
                await self.close()  # best effort: the error on its way is the one to see

    def infer(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        reset: bool = False,
        **params: Any,
    ) -> AsyncGeneration:
        """Start generating (the request is queued at once); `async for` over the pieces."""
        return AsyncGeneration(
            self, infer_request(self.session_id, prompt, messages, reset, params)
        )

    async def abort(self) -> None:
        """Stop a running generation; it then ends with finish_reason "aborted"."""
        await self.client._request({"op": "abort", "session_id": self.session_id}, ABORTED)

    async def close(self) -> None:
        """Free the session on the daemon (a running generation is aborted first)."""
        await self.client._request(
            {"op": "close_session", "session_id": self.session_id}, SESSION_CLOSED
        )


class AsyncGeneration(GenerationBase[Any], AsyncIterator[str]):
    """The pieces of one `infer`, in order; `.stats` and `.finish_reason` are set at the end."""

    def __init__(self, session: AsyncSession, body: Body) -> None:
        self.session = session
        self._stream = TokenStream()
        self.request_id = session.client._start(body)
        self._finalizer = weakref.finalize(self, session.client._forget, self.request_id)

    def __aiter__(self) -> AsyncGeneration:
        return self

    async def __anext__(self) -> str:
        client = self.session.client
        try:
            while not self._stream.done:
                reply = await client._receive(self.request_id, client.timeout, "the next token")
                piece = self._stream.feed(reply)
                if piece is not None:
                    return piece
        finally:
            if self._stream.done:
                self._finalizer()
        raise StopAsyncIteration

    async def wait(self) -> str:
        """Consume the rest of the stream and return the whole text."""
        async for _ in self:
            pass
        return self.text

    async def abort(self) -> None:
        """Ask the daemon to stop; keep iterating (or `await wait()`) to reach the "aborted"
        end, after which the session takes its next infer (before it: `busy`)."""
        if not self._stream.done:
            await self.session.abort()

    async def aclose(self) -> None:
        """Abort if still running and drain to the end, so the session is idle afterwards."""
        if self._stream.done or self.session.client.closed:
            return
        await self.abort()
        await self.wait()
