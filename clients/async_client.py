"""The trio client: the core (core.py) over a socket whose owner task files replies by id."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeVar

import trio
import zmq

from inferencecenter.protocol.zmqtrio import TrioSocket

from . import core
from .core import Body, Call, ClientBase, Frames, GenerationBase, SessionBase, errors_hidden_by
from .dealer import close_dealer, open_dealer, read_ready

# Longest wait on the monitor's FD before it is read anyway (it is edge-triggered).
MONITOR_HEDGE_S = 0.5

ResultT = TypeVar("ResultT")


class AsyncClient(ClientBase):
    """A connection to the daemon for trio code: `async with AsyncClient(...) as client:`.

    Entering starts a nursery with the socket's owner task (which files each reply under its
    request) and a watcher of the socket monitor, then authenticates (AuthFailed on
    `auth_failed`); leaving cancels both and closes the socket. Reconnects are handled as in
    Client: authenticate again, resend what had no reply (see RequestTracker).
    """

    def _open(self) -> None:
        """Nothing to open before entering."""
        self._arrivals: dict[int, trio.Event] = {}  # set when a waited-for request gets replies
        self._socket: TrioSocket | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> AsyncClient:
        if self._nursery is not None or self.closed:
            raise RuntimeError("an AsyncClient can be entered only once")
        sock, self._monitor = open_dealer(self.endpoint, self._curve)
        self._socket = TrioSocket(sock, on_receive=self._on_reply)
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._socket.run)
        self._nursery.start_soon(self._watch_monitor)
        try:
            self._apply_auth(await self._call(core.auth_call(self._creds), self.connect_timeout))
        except BaseException:
            # Leave cleanly, then raise the error itself (not wrapped in an ExceptionGroup).
            await self._shutdown()
            raise
        return self

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
        self._core.closed = True
        assert self._nursery is not None and self._nursery_manager is not None
        assert self._socket is not None and self._monitor is not None
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_manager.__aexit__(exc_type, exc, tb)
        finally:
            close_dealer(self._socket.sock, self._monitor)
            self._socket.close()
            for arrived in self._arrivals.values():
                arrived.set()  # a reader still waiting learns the client is gone

    # ---- operations ----

    async def ping(self) -> float:
        """Round-trip time in seconds."""
        start = time.perf_counter()
        await self._call(core.ping_call())
        return time.perf_counter() - start

    async def create_session(
        self, model: str | None = None, system_prompt: str | None = None
    ) -> AsyncSession:
        """A new session of `model` (default: the daemon's); a model that is not loaded is
        loaded first (within the client's `timeout`)."""
        call = core.create_session_call(model, system_prompt)
        return AsyncSession(self, *await self._call(call))

    def session(self, session_id: str) -> AsyncSession:
        """A handle to an existing session (of this client_id, or any for an admin); no request
        is sent."""
        return AsyncSession(self, session_id, None, None)

    async def list_sessions(self, all_clients: bool = False) -> list[dict[str, Any]]:
        """This client's sessions; with `all_clients` (admin only) everyone's."""
        return await self._call(core.list_sessions_call(all_clients))

    async def stats(self) -> dict[str, Any]:
        return await self._call(core.stats_call())

    async def list_models(self) -> dict[str, Any]:
        """The default model's name and every known model with its state."""
        return await self._call(core.list_models_call())

    async def load_model(
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
        return await self._call(call, self.load_timeout)

    async def unload_model(self, model: str) -> dict[str, Any]:
        """Unload a model (admin only); its sessions stay and go on once it is loaded again."""
        return await self._call(core.unload_model_call(model))

    # ---- requests and replies ----

    async def _call(self, call: Call[ResultT], timeout: float | None = None) -> ResultT:
        """Send one request and return what its reply means."""
        request_id = self._start(call.body)
        try:
            wait = self.timeout if timeout is None else timeout
            reply = await self._receive(request_id, wait, call.waiting_for)
        finally:
            self._forget(request_id)
        return call.result(reply)

    def _start(self, body: Body) -> int:
        """Send a request (now, or once the connection is back); its replies are filed."""
        if self.closed or self._socket is None:
            raise RuntimeError(f"the client for {self.endpoint} is not open")
        request_id = self._core.start(body)
        self._flush()
        return request_id

    def _flush(self) -> None:
        """Hand what the core has to send to the socket (which never blocks)."""
        assert self._socket is not None
        outbox = self._core.outbox
        while outbox:
            self._socket.send(outbox.popleft())

    async def _receive(self, request_id: int, timeout: float, waiting_for: str) -> Body:
        try:
            with trio.move_on_after(timeout):
                while (reply := self._core.next_reply(request_id)) is None:
                    await self._arrivals.setdefault(request_id, trio.Event()).wait()
                return reply
        finally:
            self._arrivals.pop(request_id, None)
        raise self._core.timeout_error(request_id, timeout, waiting_for)

    def _on_reply(self, frames: Frames) -> None:
        """File one reply (called in the socket's owner task); monitor events go first."""
        self._read_monitor([frames])

    async def _watch_monitor(self) -> None:
        """Drops and reconnects, noticed also while no reply arrives."""
        assert self._monitor is not None
        while True:
            with trio.move_on_after(MONITOR_HEDGE_S):
                await trio.lowlevel.wait_readable(self._monitor.FD)
            self._read_monitor([])

    def _read_monitor(self, replies: list[Frames]) -> None:
        """Hand the core the monitor's pending events, then `replies` (see read_ready), and wake
        the readers of the requests that got replies."""
        assert self._socket is not None and self._monitor is not None
        read: list[core.Received] = []
        read_ready(self._socket.sock, self._monitor, replies, read, drain=False)
        for link, batch in read:
            for request_id in self._core.take(link, batch):
                arrived = self._arrivals.pop(request_id, None)
                if arrived is not None:
                    arrived.set()
        self._flush()


class AsyncSession(SessionBase[AsyncClient, "AsyncGeneration"]):
    """One conversation on the daemon (its context persists between `infer` calls); leaving an
    `async with` block closes it there, shielded from cancellation."""

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Shielded: a block left by cancellation still frees the session.
        with trio.CancelScope(shield=True):
            if self.client._answers_after(exc):
                with errors_hidden_by(exc):
                    await self.close()

    async def abort(self) -> None:
        """Stop a running generation; it then ends with finish_reason "aborted"."""
        await self.client._call(core.abort_call(self.session_id))

    async def close(self) -> None:
        """Free the session on the daemon (a running generation is aborted first)."""
        await self.client._call(core.close_session_call(self.session_id))

    def _generation(self, body: Body) -> AsyncGeneration:
        return AsyncGeneration(self, body)


class AsyncGeneration(GenerationBase[AsyncSession], AsyncIterator[str]):
    """The pieces of one `infer`, in order, for `async for`; `.stats` and `.finish_reason` are
    set at the end."""

    def __aiter__(self) -> AsyncGeneration:
        return self

    async def __anext__(self) -> str:
        client = self.session.client
        while not self.done:
            reply = await client._receive(self.request_id, client.timeout, "the next token")
            piece = self._feed(reply)
            if piece is not None:
                return piece
        raise StopAsyncIteration

    async def wait(self) -> str:
        """Consume the rest of the stream and return the whole text."""
        async for _ in self:
            pass
        return self.text

    async def abort(self) -> None:
        """Ask the daemon to stop; keep iterating (or `await wait()`) to reach the "aborted"
        end, after which the session takes its next infer (before it: `busy`)."""
        if not self.done:
            await self.session.abort()

    async def aclose(self) -> None:
        """Abort if still running and drain to the end, so the session is idle afterwards."""
        if self.done or self.session.client.closed:
            return
        await self.abort()
        await self.wait()
