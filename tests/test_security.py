"""Attacks on the real daemon, each repeated against the defence that answers it (figures in
docs/security.md)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from inferencecenter.actors.auth import FREE_FAILURES, MAX_DELAY_S, Backoff
from inferencecenter.daemon.testing import (
    TEST_CLIENTS,
    Daemon,
    RawClient,
    actor_process,
    new_session,
    start_daemon,
    stop_daemon,
)
from inferencecenter.protocol import clientsfile, wire

WRONG = "unknown client_id or wrong api_key"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = start_daemon(tmp_path_factory.mktemp("security"))
    yield running
    assert stop_daemon(running.process) == 0, running.log()


def serve_refuses(*args: str) -> str:
    """`serve` with these flags must stop before anything starts: its one line on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "inferencecenter.daemon", "serve", "--http-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---- keys at rest ------------------------------------------------------------------------------


def test_a_stolen_clients_file_holds_no_key_once_migrated(daemon: Daemon) -> None:
    """The seed format is served (and warned about, by client_id); after `keys migrate` the file
    holds hashes only and every client still authenticates, without a restart."""
    text = daemon.clients_path.read_text()
    assert daemon.api_key in text
    assert clientsfile.migrate(daemon.clients_path) == [e.client_id for e in TEST_CLIENTS]
    text = daemon.clients_path.read_text()
    for entry in TEST_CLIENTS:
        assert entry.api_key not in text
        client = RawClient(daemon.endpoint)
        try:
            assert client.auth(entry.client_id, entry.api_key)["client_id"] == entry.client_id
        finally:
            client.close()
    log = daemon.log()
    warnings = [line for line in log.splitlines() if "stored in clear" in line]
    assert len(warnings) == 1 and "clients=alice,bob,carol" in warnings[0]
    assert all(entry.api_key not in log for entry in TEST_CLIENTS)


def test_short_hand_written_keys_are_refused_at_start(tmp_path: Path) -> None:
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps({"clients": [{"client_id": "a", "api_key": "hunter22hunter22"}]}))
    clients.chmod(0o600)
    line = serve_refuses("--clients", str(clients))
    assert "fewer than 32" in line and "hunter22" not in line


def test_a_clients_file_readable_by_others_is_refused_at_start(tmp_path: Path) -> None:
    clients = tmp_path / "clients.json"
    clientsfile.save(clients, list(TEST_CLIENTS))
    clients.chmod(0o644)
    line = serve_refuses("--clients", str(clients))
    assert "mode 644" in line and "chmod 600" in line


# ---- text logs and bodies ---------------------------------------------------------------------


def test_an_ansi_escape_in_a_client_id_cannot_repaint_the_terminal(daemon: Daemon) -> None:
    """The first auth failure of this daemon is logged at once, with its client_id escaped (the
    tests below fail auth many times: their failures go into one summary line)."""
    evil = "\x1b[2J\x1b[31mroot\u009b0m\nlevel=info event=forged\u202e"
    client = RawClient(daemon.endpoint)
    try:
        reply = client.request({"op": "auth", "client_id": evil, "api_key": "k" * 40})
        assert reply["op"] == "auth_failed"
    finally:
        client.close()
    log = daemon.log()
    assert not any(c in log for c in "\x1b\x9b\u202e")
    assert not any(line.startswith("level=info event=forged") for line in log.splitlines())
    (line,) = [line for line in log.splitlines() if "u001b[2J" in line]
    assert 'client_id="\\u001b[2J\\u001b[31mroot\\u009b0m\\nlevel=info event=forged\\u202e"' in line


def test_a_body_of_a_million_maps_does_not_stall_others(daemon: Daemon) -> None:
    """20 connections each send a 1 MiB body of nested empty maps (unlimited: ~0.4 s to decode
    each, and another client's ping took 2.1 s); each is now dropped after 8,192 maps and
    arrays, and a ping sent behind them is answered within 1 s (250 ms here)."""
    bomb = msgpack.packb({"op": "ping", "x": [[{}] * 8000] * 120})
    assert 900_000 < len(bomb) <= 1 << 20
    client = RawClient(daemon.endpoint)
    attackers = [RawClient(daemon.endpoint) for _ in range(20)]
    try:
        assert client.request({"op": "ping"})["op"] == "pong"  # connected
        for attacker in attackers:
            attacker.send_frames([wire.TAG, bomb])
        start = time.monotonic()
        assert client.request({"op": "ping"})["op"] == "pong"
        took = time.monotonic() - start
        for attacker in attackers:
            reply = attacker.recv()
            assert reply["code"] == "bad_request" and "8192 maps and arrays" in reply["message"]
    finally:
        for conn in (client, *attackers):
            conn.close()
    print(f"a ping behind 20 one-MiB bodies of maps: {took * 1000:.0f} ms")
    assert took < 1.0


# ---- auth failures -----------------------------------------------------------------------------


def auth_lines(daemon: Daemon) -> list[str]:
    return [line for line in daemon.log().splitlines() if 'event="auth fail' in line]


def most_checks(seconds: float) -> int:
    """How many keys of one client_id the backoff lets be checked within `seconds`."""
    backoff, spent, checks = Backoff(), 0.0, 0
    while spent <= seconds:
        spent += backoff.delay(checks)
        checks += 1
    return checks


def daemon_metrics(daemon: Daemon, at_least: int) -> dict[str, Any]:
    """The `daemon` map of the first metrics message counting `at_least` auth failures."""
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"metrics")
    sub.connect(daemon.metrics_endpoint)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert sub.poll(5000), "no metrics within 5 s"
            figures: dict[str, Any] = wire.unpack(sub.recv_multipart()[1])["daemon"]
            if figures["auth_failures"] >= at_least:
                return figures
        raise AssertionError(f"auth failures not counted: {figures}")
    finally:
        sub.close()


def test_wrong_keys_in_a_row_are_spaced_and_logged_once(daemon: Daemon) -> None:
    """One connection guessing carol's key as fast as the replies come: 60 guesses take at
    least the backoff's delays (20 a second at most: 10,000 would take 500 s), the log gets one
    line, the metrics count every failure; then carol herself gets in at once."""
    tries = 60
    lines_before = len(auth_lines(daemon))
    backoff = Backoff()
    least = sum(backoff.delay(n) for n in range(tries - 1))  # between the first and the last
    client = RawClient(daemon.endpoint)
    try:
        start = time.monotonic()
        for n in range(tries):
            reply = client.request({"op": "auth", "client_id": "carol", "api_key": f"guess-{n}"})
            assert reply["op"] == "auth_failed" and reply["reason"] == WRONG, reply
        elapsed = time.monotonic() - start
    finally:
        client.close()
    rate = tries / elapsed
    print(f"{tries} wrong keys in a row: {elapsed:.2f} s (at least {least:.2f}), {rate:.1f}/s")
    assert elapsed >= least and least >= (tries - FREE_FAILURES - 5) * MAX_DELAY_S
    assert len(auth_lines(daemon)) - lines_before <= 1
    assert daemon_metrics(daemon, tries)["auth_failures"] >= tries
    owner = RawClient(daemon.endpoint)
    try:
        start = time.monotonic()
        owner.auth("carol", daemon.extra["carol_key"])
        assert time.monotonic() - start < 0.5
    finally:
        owner.close()
    assert "guess-" not in daemon.log()


def test_guesses_from_eight_connections_are_spaced_not_multiplied(daemon: Daemon) -> None:
    """Eight connections guessing bob's key at once for 3 s (before the backoff: 2,700 guesses a
    second): the keys checked stay at one connection's rate, 20 a second. (Beyond 100 attempts
    waiting at once, the rest are refused unchecked: tests/test_security_unit.py.)"""
    seconds = 3.0
    conns = [RawClient(daemon.endpoint) for _ in range(8)]
    poller = zmq.Poller()
    for conn in conns:
        poller.register(conn.sock, zmq.POLLIN)
    counts = {"checked": 0, "refused": 0}
    sent = 0

    def guess(conn: RawClient) -> None:
        nonlocal sent
        sent += 1
        conn.send({"op": "auth", "id": sent, "client_id": "bob", "api_key": f"guess-{sent}"})

    try:
        start = time.monotonic()
        for conn in conns:
            guess(conn)
        end = start + seconds
        waiting = len(conns)
        while waiting:
            ready = dict(poller.poll(10_000))
            assert ready, "no reply within 10 s"
            for conn in conns:
                if conn.sock in ready:
                    reply = conn.recv()
                    assert reply["op"] == "auth_failed", reply
                    if reply["reason"] == WRONG:
                        counts["checked"] += 1
                    else:
                        assert reply["reason"].startswith("too many failed attempts: retry in")
                        counts["refused"] += 1
                    if time.monotonic() < end:
                        guess(conn)
                    else:
                        waiting -= 1
        elapsed = time.monotonic() - start
    finally:
        for conn in conns:
            conn.close()
    rate = counts["checked"] / elapsed
    print(f"8 connections, {elapsed:.2f} s: {counts}, {rate:.1f} keys checked a second")
    assert counts["checked"] <= most_checks(elapsed)
    assert counts["checked"] + counts["refused"] == sent


# ---- the metrics socket ------------------------------------------------------------------------


def subscriber(daemon: Daemon, topic: bytes) -> zmq.Socket[bytes]:
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(daemon.metrics_endpoint)
    return sub


def zmtp_subscriber(endpoint: str, topic: bytes) -> socket.socket:
    """A SUB speaking ZMTP 3.0 by hand: libzmq's own SUB keeps what it subscribed to, and one of
    4 MB crashes it when it is torn down."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.sendall(b"\xff" + b"\0" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32)
    name, value = b"Socket-Type", b"SUB"
    ready = b"\x05READY" + bytes([len(name)]) + name + struct.pack(">I", len(value)) + value
    body = b"\x01" + topic  # a subscription, as ZMTP 3.0 sends it
    conn.sendall(b"\x04" + bytes([len(ready)]) + ready)
    conn.sendall(b"\x02" + struct.pack(">Q", len(body)) + body)
    return conn


def test_a_4_mb_subscription_leaves_the_monitor_flat(daemon: Daemon) -> None:
    """A subscription message of 4 MB (kept without a limit) is more than the metrics socket
    takes: the peer is dropped, the monitor's memory does not move, other subscribers go on."""
    monitor = actor_process(daemon, "monitor")
    before = monitor.memory_info().rss
    try:
        conn = zmtp_subscriber(daemon.metrics_endpoint, b"x" * 4_000_000)
        with conn:
            while conn.recv(65536):  # the daemon's greeting, then the end
                pass
    except ConnectionResetError:
        pass  # dropped while it was still sending
    grown = (monitor.memory_info().rss - before) / 2**20
    print(f"the monitor after a 4 MB subscription: {grown:+.1f} MiB")
    assert grown < 2
    other = subscriber(daemon, b"metrics")
    try:
        assert other.poll(5000) and other.recv_multipart()[0] == b"metrics"
    finally:
        other.close()


def test_session_events_name_no_client(daemon: Daemon) -> None:
    """Anyone who reaches the metrics port reads `event.session` in clear text: no client_id."""
    sub = subscriber(daemon, b"")
    client = RawClient(daemon.endpoint)
    try:
        while not (sub.poll(5000) and sub.recv_multipart()[0] == b"metrics"):
            pass  # subscribed once a tick arrives
        client.auth(daemon.client_id, daemon.api_key)
        session_id = new_session(client)
        while True:
            assert sub.poll(5000), "no event.session"
            topic, body = sub.recv_multipart()
            event = wire.unpack(body)
            if topic == b"event.session" and event["session_id"] == session_id:
                break
        assert event["kind"] == "created" and "client_id" not in event
        assert daemon.client_id.encode() not in body
    finally:
        client.close()
        sub.close()
