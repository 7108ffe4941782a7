"""The gateway's guard at the door: its ZAP handler (caps, refused addresses, CURVE keys passed on
as each connection's User-Id) and the closing of connections that never authenticate.

libzmq gives a ROUTER no way to close one peer; to close a silent one the guard shuts its socket
down (`shutdown(2)` on a duplicate of the fd the socket monitor reported at accept), and libzmq then
sees the connection end as if the peer had left. The fd's peer address is checked first, so a
descriptor reused by a newer connection is never touched.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import trio

from .admission import Admission
from .config import Config
from .logs import EventLog
from .zap import Handshake, Verdict, ZapHandler

log = EventLog("gateway")

SWEEP_S = 1.0


def peer_of_fd(fd: int) -> tuple[str, int] | None:
    """(IP, port) of the TCP peer on `fd`, or None (not a TCP socket, already closed)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            peer = sock.getpeername()
    except OSError:
        return None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None


def shutdown_fd(fd: int, expected: tuple[str, int]) -> bool:
    """End the TCP connection on `fd` if its peer is still `expected`."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            peer = sock.getpeername()
            if (str(peer[0]), int(peer[1])) != expected:
                return False
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    return True


class StrangerGuard:
    def __init__(self, config: Config) -> None:
        self.admission = Admission(
            config.max_connections, config.max_connections_per_address, config.auth_timeout
        )
        self.zap = ZapHandler(self.decide)
        self.closed_unauthenticated = 0
        # Called before each decision: the gateway reads its socket monitor's pending accepts.
        self.before_decide: Callable[[], None] = lambda: None

    def decide(self, handshake: Handshake) -> Verdict:
        self.before_decide()
        verdict = self.admission.decide(handshake, trio.current_time())
        if not verdict.ok:
            log.debug("handshake refused", address=handshake.address, reason=verdict.reason)
        return verdict

    def accepted(self, fd: int) -> None:
        """A new connection: kept, or closed before its handshake (over a cap, or refused)."""
        peer = peer_of_fd(fd)
        if peer is not None and not self.admission.accepted(
            fd, peer[0], peer[1], trio.current_time()
        ):
            shutdown_fd(fd, peer)

    def closed(self, fd: int) -> None:
        self.admission.closed(fd)

    def spoke(self, fd: int) -> None:
        self.admission.spoke(fd)

    def authenticated(self, fd: int | None) -> None:
        if fd is not None:
            self.admission.authenticated(fd)

    def refuse(self, address: str, seconds: float) -> None:
        self.admission.refuse(address, seconds, trio.current_time())

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.zap.run)
            nursery.start_soon(self.sweep)

    async def sweep(self) -> None:
        """Close the connections that are past their time to authenticate."""
        while True:
            await trio.sleep(SWEEP_S)
            late = self.admission.overdue(trio.current_time())
            closed = sum(shutdown_fd(fd, (c.address, c.port)) for fd, c in late)
            if closed:
                self.closed_unauthenticated += closed
                log.debug("closed connections that did not authenticate", connections=closed)
