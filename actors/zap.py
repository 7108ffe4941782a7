"""A ZAP handler (ZeroMQ RFC 27) as a trio task: admits or refuses each handshake on this
process's sockets before a peer's first message is decoded.

libzmq asks the handler bound at inproc://zeromq.zap.01 in the same context (so in the same
process) about every handshake of a socket that has a ZAP domain; the answer decides whether the
connection lives. A `Policy` (no I/O) decides; this module only speaks ZAP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.utils.z85

from ..protocol.zmqtrio import TrioSocket
from .logs import EventLog

log = EventLog("zap")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"


@dataclass(frozen=True)
class Handshake:
    """One ZAP request: the socket's domain, the peer's IP address, the mechanism, and for CURVE
    the client's public key in Z85 ("" otherwise)."""

    domain: str
    address: str
    mechanism: str
    curve_key: str


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""
    user_id: str = ""  # messages of an admitted connection carry it as their "User-Id"


Policy = Callable[[Handshake], Verdict]


def parse_request(frames: list[bytes]) -> tuple[bytes, Handshake]:
    """(request_id, handshake); ValueError on a request that is not ZAP 1.0."""
    if len(frames) < 6 or frames[0] != ZAP_VERSION:
        raise ValueError("not a ZAP 1.0 request")
    request_id, domain, address, _identity, mechanism = frames[1:6]
    credentials = frames[6:]
    curve_key = ""
    if mechanism == b"CURVE" and credentials and len(credentials[0]) == 32:
        curve_key = zmq.utils.z85.encode(credentials[0]).decode()
    return request_id, Handshake(
        domain.decode(errors="replace"),
        address.decode(errors="replace"),
        mechanism.decode(errors="replace"),
        curve_key,
    )


def reply_frames(request_id: bytes, verdict: Verdict) -> list[bytes]:
    status = (b"200", b"OK") if verdict.ok else (b"400", verdict.reason.encode()[:200])
    return [ZAP_VERSION, request_id, *status, verdict.user_id.encode(), b""]


class ZapHandler:
    """The REP socket at ZAP_ENDPOINT, answered synchronously as each request is received (REP
    alternates strictly; an inproc reply never waits). Bind it before the sockets it guards."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(ZAP_ENDPOINT)
        self.socket = TrioSocket(sock, on_receive=self.on_request)

    def on_request(self, frames: list[bytes]) -> None:
        try:
            request_id, handshake = parse_request(frames)
        except ValueError:
            self.socket.send([ZAP_VERSION, b"", b"500", b"malformed ZAP request", b"", b""])
            return
        try:
            verdict = self.policy(handshake)
        except Exception:
            log.exception("handshake check failed", address=handshake.address)
            verdict = Verdict(False, "internal")
        self.socket.send(reply_frames(request_id, verdict))

    async def run(self) -> None:
        await self.socket.run()
