"""The trio-ZeroMQ adapter: one task owns a socket's waiting; other tasks send and receive.

pyzmq has no trio integration. The socket's FD is edge-triggered: it only says "check EVENTS
again", so the owner drains every receivable message and sends everything queued while EVENTS
allow it, and only then waits on the FD, with a timeout as a hedge against a missed edge.

Two shortcuts keep a token's trip cheap (it matters: every streamed token crosses two sockets):
`send` hands the message to ZeroMQ at once when nothing is queued before it (all tasks share
one thread, so this is safe), and an `on_receive` callback, when given, handles each message in
the owner task itself instead of passing it through a channel to another task. A send can
consume the FD's edge of an arriving message, so after one the owner is woken if EVENTS shows
POLLIN.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import trio
import zmq

Frames = list[bytes]

# Longest wait on the FD before EVENTS are checked again anyway (a missed edge costs this much).
HEDGE_SECONDS = 0.5


def _events(sock: zmq.Socket[Any]) -> int:
    return int(sock.getsockopt(zmq.EVENTS))


class TrioSocket:
    """A ZeroMQ socket used from trio: `run()` is the owner task; `send` and `receive` (or the
    `on_receive` callback) for the rest."""

    def __init__(
        self,
        sock: zmq.Socket[Any],
        on_receive: Callable[[Frames], None] | None = None,
        inbox_size: int = 1024,
        track_fd: bool = False,
    ) -> None:
        self.sock = sock
        self.on_receive = on_receive
        # With track_fd, `last_fd` is the OS socket the last message came through (ZMQ_SRCFD):
        # a ROUTER uses it to learn which peer a monitor's "disconnected" event is about.
        self.track_fd = track_fd
        self.last_fd = -1
        self._last_frame: zmq.Frame | None = None
        self._outbox: deque[Frames] = deque()
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[Frames](inbox_size)
        self._wait_scope: trio.CancelScope | None = None
        self._closed = False

    def send(self, frames: Frames) -> None:
        """Send a multipart message; never blocks (what ZeroMQ cannot take now waits in order)."""
        if self._closed:
            return
        if not self._outbox:
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
            else:
                if _events(self.sock) & zmq.POLLIN:
                    self._wake()
                return
        self._outbox.append(frames)
        self._wake()

    def _wake(self) -> None:
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    async def receive(self) -> Frames:
        return await self._inbox_receive.receive()

    def __aiter__(self) -> TrioSocket:
        return self

    async def __anext__(self) -> Frames:
        try:
            return await self._inbox_receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def has_input(self) -> bool:
        """Whether messages wait in the socket, not yet received."""
        return bool(_events(self.sock) & zmq.POLLIN)

    @property
    def pending_sends(self) -> int:
        return len(self._outbox)

    def _recv(self) -> Frames:
        if not self.track_fd:
            return self.sock.recv_multipart(zmq.NOBLOCK)
        parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        self.last_fd = int(parts[-1].get(zmq.SRCFD))
        self._last_frame = parts[-1]
        return [part.bytes for part in parts]

    def last_property(self, name: str) -> str:
        """A metadata property of the last message received with track_fd ("Peer-Address",
        "User-Id": what the ZAP handler answered), or "" when it has none."""
        if self._last_frame is None:
            return ""
        try:
            return str(self._last_frame.get(name))
        except zmq.ZMQError:
            return ""

    async def _deliver(self, frames: Frames) -> None:
        if self.on_receive is not None:
            self.on_receive(frames)
            return
        try:
            self._inbox_send.send_nowait(frames)
        except trio.WouldBlock:
            await self._inbox_send.send(frames)

    async def run(self) -> None:
        """Own the socket until cancelled."""
        sock = self.sock
        fd = sock.FD
        try:
            while True:
                busy = False
                events = _events(sock)
                while self._outbox and events & zmq.POLLOUT:
                    try:
                        sock.send_multipart(self._outbox[0], zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._outbox.popleft()
                    busy = True
                    events = _events(sock)
                received = 0
                while events & zmq.POLLIN and received < 256:
                    try:
                        frames = self._recv()
                    except zmq.Again:
                        break
                    received += 1
                    await self._deliver(frames)
                    events = _events(sock)
                if busy or received:
                    # More to do: yield once (others must run under a flood), then go on.
                    # Nothing more: wait at once (a token's trip skips a scheduler round).
                    events = _events(sock)
                    if events & zmq.POLLIN or (self._outbox and events & zmq.POLLOUT):
                        await trio.lowlevel.checkpoint()
                        continue
                elif self._outbox and events & zmq.POLLOUT:
                    continue
                with trio.move_on_after(HEDGE_SECONDS) as scope:
                    self._wait_scope = scope
                    await trio.lowlevel.wait_readable(fd)
                self._wait_scope = None
        finally:
            self._wait_scope = None

    async def flush(self, timeout: float) -> None:
        """Wait (bounded) until everything queued has been handed to ZeroMQ."""
        with trio.move_on_after(timeout):
            while self._outbox:
                await trio.sleep(0.005)

    def close(self, linger_ms: int = 0) -> None:
        self._closed = True
        self._inbox_send.close()
        self.sock.close(linger=linger_ms)
