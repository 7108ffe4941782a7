"""The clients' DEALER socket: opened heartbeating with a monitor of its link, read, closed."""

from __future__ import annotations

import contextlib

import zmq
from zmq.utils.monitor import parse_monitor_message

from inferencecenter.protocol.curve import ClientCurve

from .core import Frames, Link, Received

# ZMTP heartbeats: a daemon that stops answering them for HEARTBEAT_TIMEOUT is a dropped
# connection (then ZeroMQ reconnects), not a silent hang; HEARTBEAT_TTL tells the daemon how
# long it may go without hearing from us (our own heartbeats keep that from ever happening).
HEARTBEAT_IVL_MS = 1_000
HEARTBEAT_TIMEOUT_MS = 3_000
HEARTBEAT_TTL_MS = 10_000
# What the socket monitor reports: the connection dropped, the connection is there again.
LINK_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED


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


def open_dealer(
    endpoint: str, curve: ClientCurve | None = None
) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """The client's DEALER, heartbeating and connected (under CURVE with `curve`), and the PAIR
    reporting its LINK_EVENTS."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
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


def read_ready(
    sock: zmq.Socket[bytes],
    monitor: zmq.Socket[bytes],
    replies: list[Frames],
    read: list[Received],
    drain: bool,
) -> None:
    """Append to `read` the monitor's pending events in order, then `replies` (replies already
    read) and, with `drain`, every reply ready after the events.

    A drop takes with it `replies` and the replies ready when it is seen: they came before it,
    or answer copies queued for the new connection (and so come before anything sent after
    it). Each list goes into `read` before it is filled, so what was read before an interrupt
    (Ctrl-C) is there to be filed.
    """
    while True:
        try:
            event = int(parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))["event"])
        except zmq.Again:
            break
        if event == zmq.EVENT_DISCONNECTED:
            read.append((Link.DROPPED, replies))
            receive_ready(sock, replies)
            replies = []
        elif event == zmq.EVENT_CONNECTED:
            read.append((Link.CONNECTED, []))
    read.append((None, replies))
    if drain:
        receive_ready(sock, replies)


def receive_ready(sock: zmq.Socket[bytes], replies: list[Frames]) -> None:
    """Append every reply the socket has ready."""
    while True:
        try:
            replies.append(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return
