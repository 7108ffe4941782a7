"""Strangers cost the gateway little: connections capped per address and in total, closed when
they do not authenticate in time, refused at the handshake for a while after; a client that does
not read its replies holds at most SNDHWM of them."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from inferencecenter.actors.admission import FIRST_REFUSE_S, FREE_LAPSES, Admission
from inferencecenter.actors.zap import Handshake
from inferencecenter.clients import Client
from inferencecenter.daemon.testing import Daemon, actor_process, start_daemon, stop_daemon
from inferencecenter.protocol import wire

PER_ADDRESS = 64
AUTH_TIMEOUT_S = 3.0
STRANGERS = 1000
STRANGER_ADDRESSES = 10  # 127.0.0.2 .. 127.0.0.11, 100 strangers each
NON_READERS = 20  # from 127.0.0.50 .. 127.0.0.69
PINGS_PER_NON_READER = 2000


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = start_daemon(
        tmp_path_factory.mktemp("strangers"),
        "--max-connections-per-address",
        str(PER_ADDRESS),
        "--auth-timeout",
        str(AUTH_TIMEOUT_S),
    )
    yield running
    assert stop_daemon(running.process) == 0, running.log()


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def _from(address: str, daemon: Daemon) -> str:
    """A ZeroMQ endpoint that connects to the daemon from a source address of our choice."""
    return f"tcp://{address}:0;127.0.0.1:{_port(daemon.endpoint)}"


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _stranger(context: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 1000)  # come back, but not in a busy loop
    sock.connect(endpoint)
    return sock


def _gateway_peers(gateway: psutil.Process, port: int) -> dict[str, int]:
    """Established connections to the frontend, by the peer's address."""
    counts: dict[str, int] = {}
    for conn in gateway.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.raddr and conn.status == "ESTABLISHED":
            counts[conn.raddr.ip] = counts.get(conn.raddr.ip, 0) + 1
    return counts


def _strangers(peers: dict[str, int]) -> dict[str, int]:
    return {
        ip: n for ip, n in peers.items() if 2 <= int(ip.rsplit(".", 1)[1]) < 2 + STRANGER_ADDRESSES
    }


def test_an_idle_stranger_is_closed_after_the_auth_timeout(guarded: Daemon) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    events = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    sock.connect(_from("127.0.0.90", guarded))
    try:
        seen: list[tuple[int, float]] = []
        deadline = time.monotonic() + AUTH_TIMEOUT_S + 15
        while zmq.EVENT_DISCONNECTED not in [e for e, _ in seen]:
            assert time.monotonic() < deadline, seen
            if events.poll(500):
                seen.append((int(recv_monitor_message(events)["event"]), time.monotonic()))
        (first, connected), (second, closed) = seen[:2]
        assert (first, second) == (zmq.EVENT_CONNECTED, zmq.EVENT_DISCONNECTED)
        # Closed for its silence (swept once a second), not refused at once.
        assert AUTH_TIMEOUT_S - 0.5 < closed - connected < AUTH_TIMEOUT_S + 10
    finally:
        sock.disable_monitor()
        events.close()
        sock.close()


def test_strangers_and_non_readers_cost_little_and_slow_nobody(guarded: Daemon) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * (STRANGERS + NON_READERS) + 256  # a socket, its mailbox, a monitor...
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    gateway = actor_process(guarded, "gateway")
    port = _port(guarded.endpoint)
    with Client(guarded.endpoint, guarded.client_id, guarded.api_key):
        pass  # the gateway has served one client: its baseline includes that
    before = _rss_mib(gateway.pid)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    context.setsockopt(zmq.LINGER, 0)
    sockets: list[zmq.Socket[bytes]] = []
    try:
        for index in range(STRANGERS):
            address = f"127.0.0.{2 + index % STRANGER_ADDRESSES}"
            sockets.append(_stranger(context, _from(address, guarded)))
        # Non-readers: authenticate, then ask for far more than they read (nothing), with a
        # receive buffer of one message so the replies pile up on the daemon's side.
        for index in range(NON_READERS):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.RCVHWM, 1)
            sock.setsockopt(zmq.RCVBUF, 4096)
            sock.connect(_from(f"127.0.0.{50 + index}", guarded))
            sock.send_multipart(
                wire.client_frames(
                    {"op": "auth", "client_id": guarded.client_id, "api_key": guarded.api_key}
                )
            )
            sockets.append(sock)
        padding = "x" * 60  # ids of 64 bytes: every pong carries one
        for _ in range(PINGS_PER_NON_READER):
            for sock in sockets[STRANGERS:]:
                sock.send_multipart(wire.client_frames({"op": "ping", "id": padding}))
        # Measure once every stranger address holds (nearly) its share of connections.
        admitted = STRANGER_ADDRESSES * PER_ADDRESS
        deadline = time.monotonic() + 60
        while sum(_strangers(_gateway_peers(gateway, port)).values()) < 0.9 * admitted:
            assert time.monotonic() < deadline, _gateway_peers(gateway, port)
            time.sleep(0.2)  # polling the kernel's table: it signals nothing
        started = time.monotonic()
        with Client(guarded.endpoint, guarded.client_id, guarded.api_key) as client:
            auth_s = time.monotonic() - started
            assert client.ping() > 0
        grown = _rss_mib(gateway.pid) - before
        peers = _gateway_peers(gateway, port)
        strangers = _strangers(peers)
        print(
            f"auth {auth_s * 1000:.0f} ms with {sum(strangers.values())} stranger connections "
            f"open; gateway RSS +{grown:.1f} MiB"
        )
        assert auth_s < 1.0
        assert grown < 50
        for ip, count in strangers.items():
            assert count <= PER_ADDRESS + 8, (ip, count)  # a refused one may still be closing
    finally:
        for sock in sockets:
            sock.close(linger=0)
        context.term()


def _handshake(address: str) -> Handshake:
    return Handshake("frontend", address, "NULL", "")


def test_admission_caps_per_address_and_in_total() -> None:
    admission = Admission(max_connections=5, per_address=2, auth_timeout=10.0)
    assert admission.accepted(10, "10.0.0.1", 1000, 0.0)
    assert admission.accepted(11, "10.0.0.1", 1001, 0.0)
    assert not admission.accepted(12, "10.0.0.1", 1002, 0.0)
    admission.closed(12)  # its disconnect, once reported, does not count twice
    assert not admission.accepted(13, "10.0.0.1", 1003, 0.0)
    admission.closed(11)
    assert admission.accepted(14, "10.0.0.1", 1004, 0.0)
    assert all(admission.accepted(fd, f"10.0.1.{fd}", 1, 0.0) for fd in range(20, 23))
    assert not admission.accepted(23, "10.0.1.23", 1, 0.0)  # 5 open, 5 allowed


def test_an_address_the_backoff_refused_is_refused_at_the_handshake_until_then() -> None:
    admission = Admission(max_connections=100, per_address=10, auth_timeout=10.0)
    admission.refuse("10.0.0.1", 2.5, now=100.0)
    assert not admission.decide(_handshake("10.0.0.1"), 101.0).ok
    assert not admission.accepted(10, "10.0.0.1", 1000, 101.0)
    assert admission.decide(_handshake("10.0.0.2"), 101.0).ok
    assert admission.decide(_handshake("10.0.0.1"), 102.6).ok


def test_connections_that_never_authenticate_are_dropped_then_their_address_refused() -> None:
    admission = Admission(max_connections=100, per_address=100, auth_timeout=5.0)
    admission.accepted(10, "10.0.0.1", 1000, 0.0)
    admission.accepted(11, "10.0.0.1", 1001, 0.0)
    admission.authenticated(11)
    assert admission.overdue(4.0) == []
    admission.accepted(12, "10.0.0.1", 1002, 0.0)
    admission.spoke(12)  # pings, never authenticates: kept, but a lapse
    late = admission.overdue(6.0)
    assert [fd for fd, _ in late] == [10]  # the authenticated one stays, and the speaker
    assert admission.overdue(7.0) == []  # dropped once, not named again
    # A few lapses cost nothing (a NAT, this machine); more than FREE_LAPSES, a refusal.
    for fd in range(20, 20 + FREE_LAPSES - 2):
        assert admission.accepted(fd, "10.0.0.1", fd, 7.0)
    assert len(admission.overdue(13.0)) == FREE_LAPSES - 2
    assert admission.decide(_handshake("10.0.0.1"), 13.0).ok
    admission.accepted(40, "10.0.0.1", 40, 13.0)
    assert [fd for fd, _ in admission.overdue(19.0)] == [40]
    assert not admission.decide(_handshake("10.0.0.1"), 19.0).ok
    assert not admission.accepted(41, "10.0.0.1", 41, 19.0)
    assert admission.decide(_handshake("10.0.0.2"), 19.0).ok
    assert admission.decide(_handshake("10.0.0.1"), 19.0 + FIRST_REFUSE_S + 0.1).ok
    admission.accepted(42, "10.0.0.1", 42, 22.0)
    admission.overdue(28.0)  # a further lapse: refused twice as long
    assert not admission.decide(_handshake("10.0.0.1"), 28.0 + FIRST_REFUSE_S + 0.1).ok
    assert admission.decide(_handshake("10.0.0.1"), 28.0 + 2 * FIRST_REFUSE_S + 0.1).ok
