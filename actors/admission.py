"""Who may open a frontend connection: caps per address and in total, addresses refused for a
while, and connections that never authenticated. No I/O: the gateway passes what its socket
monitor and its ZAP handler see, and closes what `overdue` names.

A stranger costs the gateway only what libzmq holds for an open connection: it is closed as soon
as it is accepted, before its handshake, when its address already has its share of connections,
the daemon its total, or its address is refused for now (the auth actor's backoff said so, or
its connections were closed for never authenticating; the ZAP handler refuses such an address's
handshakes too); and it is closed when it has sent nothing at all `auth_timeout` seconds after it
opened. One that speaks (a `ping` is allowed before `auth`) but has not authenticated by then is
kept within the caps, and counts as a lapse of its address like a closed one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .zap import Handshake, Verdict

# An address whose connections were closed for not authenticating is refused, once more than
# FREE_LAPSES of them were within FORGET_S, for FIRST_REFUSE_S, doubling with each further sweep
# that closes some, up to MAX_REFUSE_S. A few lapses cost nothing: many clients may share an
# address (a NAT, this machine), and a client that was merely slow reconnects at once.
FREE_LAPSES = 8
FIRST_REFUSE_S = 2.0
MAX_REFUSE_S = 300.0
FORGET_S = 600.0
MAX_ADDRESSES = 100_000  # refusals remembered at once (the oldest go first)


@dataclass
class Connection:
    address: str
    port: int
    accepted: float
    authenticated: bool = False
    spoke: bool = False  # it has sent a message
    lapsed: bool = False  # counted once as not authenticated in time


@dataclass
class Strikes:
    lapses: int = 0  # connections closed for not authenticating
    refusals: int = 0  # times the address was refused for it
    last: float = 0.0


class Admission:
    def __init__(self, max_connections: int, per_address: int, auth_timeout: float) -> None:
        self.max_connections = max_connections
        self.per_address = per_address
        self.auth_timeout = auth_timeout
        self.connections: dict[int, Connection] = {}  # by the OS socket's fd
        self.per_ip: Counter[str] = Counter()
        self.refused_until: dict[str, float] = {}
        self.strikes: dict[str, Strikes] = {}
        self.refusals = 0  # handshakes refused so far

    # ---- what the socket monitor reports ----

    def accepted(self, fd: int, address: str, port: int, now: float) -> bool:
        """Whether to keep a connection just accepted (before its handshake): False when its
        address has its share already, the daemon its total, or the address is refused now."""
        self.closed(fd)  # an fd is one connection at a time: an older one on it is gone
        if (
            self.refused_for(address, now) > 0
            or self.per_ip[address] >= self.per_address
            or len(self.connections) >= self.max_connections
        ):
            self.refusals += 1
            return False
        self.connections[fd] = Connection(address, port, now)
        self.per_ip[address] += 1
        return True

    def closed(self, fd: int) -> None:
        conn = self.connections.pop(fd, None)
        if conn is None:
            return
        self.per_ip[conn.address] -= 1
        if self.per_ip[conn.address] <= 0:
            del self.per_ip[conn.address]

    # ---- the handshake (ZAP) ----

    def decide(self, handshake: Handshake, now: float) -> Verdict:
        """Admit or refuse before any message is read: an address refused since its accept
        (the backoff answered one of its connections meanwhile) is refused here too."""
        wait = self.refused_for(handshake.address, now)
        if wait > 0:
            self.refusals += 1
            return Verdict(False, f"refused for {wait:.1f} s more")
        return Verdict(True, user_id=handshake.curve_key)

    def refused_for(self, address: str, now: float) -> float:
        until = self.refused_until.get(address)
        if until is None:
            return 0.0
        if now >= until:
            del self.refused_until[address]
            return 0.0
        return until - now

    # ---- what auth says ----

    def spoke(self, fd: int) -> None:
        conn = self.connections.get(fd)
        if conn is not None:
            conn.spoke = True

    def authenticated(self, fd: int) -> None:
        conn = self.connections.get(fd)
        if conn is not None:
            conn.authenticated = True

    def refuse(self, address: str, seconds: float, now: float) -> None:
        """New handshakes from `address` are refused for `seconds` (the auth backoff's turn)."""
        if not address:
            return
        until = max(self.refused_until.pop(address, 0.0), now + seconds)
        self.refused_until[address] = until
        if len(self.refused_until) > MAX_ADDRESSES:
            del self.refused_until[next(iter(self.refused_until))]

    # ---- strangers that never authenticate ----

    def overdue(self, now: float) -> list[tuple[int, Connection]]:
        """The connections to close: silent for auth_timeout since they opened. Those and the
        ones that spoke without authenticating in that time are lapses of their address (many
        lapses: the address is refused for a while)."""
        late: list[tuple[int, Connection]] = []
        lapsed: Counter[str] = Counter()
        for fd, conn in list(self.connections.items()):
            if conn.authenticated or conn.lapsed or now - conn.accepted <= self.auth_timeout:
                continue
            conn.lapsed = True
            lapsed[conn.address] += 1
            if not conn.spoke:
                late.append((fd, conn))
                self.closed(fd)  # its disconnect, when the monitor reports it, changes nothing
        for address, count in lapsed.items():
            self.strike(address, count, now)
        return late

    def strike(self, address: str, lapses: int, now: float) -> None:
        strikes = self.strikes.pop(address, None) or Strikes()
        if now - strikes.last > FORGET_S:
            strikes.lapses = strikes.refusals = 0
        strikes.lapses += lapses
        strikes.last = now
        self.strikes[address] = strikes
        if len(self.strikes) > MAX_ADDRESSES:
            del self.strikes[next(iter(self.strikes))]
        if strikes.lapses > FREE_LAPSES:
            strikes.refusals += 1
            seconds = FIRST_REFUSE_S * 2.0 ** min(strikes.refusals - 1, 16)
            self.refuse(address, min(MAX_REFUSE_S, seconds), now)
