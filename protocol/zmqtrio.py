"""The trio-ZeroMQ adapter: one task owns a socket; other tasks send and receive through it.

pyzmq has no trio integration. The socket's FD is edge-triggered: it only says "check EVENTS
again", so the owner drains every receivable message and sends everything queued while EVENTS
allow it, and only then waits on the FD, with a short timeout as a hedge against a missed edge.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import trio
import zmq

Frames = list[bytes]

# Longest wait on the FD before EVENTS are checked again anyway (a missed edge costs this much).
HEDGE_SECONDS = 0.05


def _events(sock: zmq.Socket[Any]) -> int:
    return int(sock.getsockopt(zmq.EVENTS))


class TrioSocket:
    """A ZeroMQ socket used from trio: `run()` is the owner task; `send`/`receive` for the rest."""

    def __init__(self, sock: zmq.Socket[Any], inbox_size: int = 1024) -> None:
        self.sock = sock
        self._outbox: deque[Frames] = deque()
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[Frames](inbox_size)
        self._wait_scope: trio.CancelScope | None = None
        self._closed = False

    def send(self, frames: Frames) -> None:
        """Queue a multipart message; never blocks (ZeroMQ's HWM bounds what is in flight)."""
        if self._closed:
            return
        self._outbox.append(frames)
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

    @property
    def pending_sends(self) -> int:
        return len(self._outbox)

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
                while events & zmq.POLLIN:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    busy = True
                    try:
                        self._inbox_send.send_nowait(frames)
                    except trio.WouldBlock:
                        await self._inbox_send.send(frames)
                    events = _events(sock)
                    if self._outbox and events & zmq.POLLOUT:
                        break  # interleave: keep replies flowing under a flood of requests
                if busy:
                    await trio.lowlevel.checkpoint()
                    continue
                with trio.move_on_after(HEDGE_SECONDS) as scope:
                    self._wait_scope = scope
                    if self._outbox and not (_events(sock) & zmq.POLLOUT):
                        await trio.lowlevel.wait_readable(fd)
                    elif not self._outbox:
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
